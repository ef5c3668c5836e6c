"""tokenlearner-convert end to end: every golden converts and matches Scenic; every failure is one line, exit 1,
nothing left behind; usage errors exit 2."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenlearner_torch.weights_convert import load_pretrained, read_checkpoint
from tokenlearner_torch.weights_convert.cli import main
from tokenlearner_torch.weights_convert.mapping import flatten_tree, unflatten_tree
from tokenlearner_torch.weights_convert.readers import write_flax_msgpack

from goldens import CASES, Golden, scaled_error

TOL = 1e-4
VIT_CASES = [c for c in CASES if (Golden(c).dir / "checkpoint").is_dir()]
# What each golden needs on top of its tree when converted by inference alone (no --config).
SETS = {
    "vit_image_cls": ["tokenizer.type=dynamic", "tokenizer.tokenlearner_loc=2", "classifier=gap"],
    "vit_video_3dconv": ["classifier=gap"],
}


def _run_model(folder: Path, g: Golden) -> np.ndarray:
    model = load_pretrained(folder)
    with torch.no_grad():
        out = model(*[torch.from_numpy(a) for a in g.inputs])
    return out.numpy()


def _assert_nothing_left(parent: Path, out: Path) -> None:
    assert not out.exists()
    leftovers = [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}")]
    assert leftovers == []


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tokenlearner-convert: "), err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("name", VIT_CASES)
def test_golden_checkpoint_converts_with_config(name, tmp_path, capsys):
    g = Golden(name)
    out = tmp_path / "out"
    rc = main([str(g.dir / "checkpoint"), "-o", str(out), "--config", str(g.dir / "config.json"), "--report", str(tmp_path / "r.json")])
    assert rc == 0, capsys.readouterr().err
    summary = capsys.readouterr().out
    assert "flax leaves: " in summary and "opt_state" in summary
    assert scaled_error(_run_model(out, g), g.outputs["out"]) < TOL
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["ok"] and report["flax_leaves_consumed"] == report["flax_leaves_total"] == len(g.config["param_shapes"])
    assert report["step"] == 7 and report["layout"] == "optax-trainstate" and "opt_state" in report["skipped"]
    assert report["nonfinite"] == []


@pytest.mark.parametrize("name", VIT_CASES)
def test_golden_checkpoint_converts_by_inference(name, tmp_path, capsys):
    g = Golden(name)
    out = tmp_path / "out"
    args = [str(g.dir / "checkpoint"), "-o", str(out), "--verify"]
    for s in SETS[name]:
        args += ["--set", s]
    assert main(args) == 0, capsys.readouterr().err
    assert "bit for bit" in capsys.readouterr().out
    assert scaled_error(_run_model(out, g), g.outputs["out"]) < TOL
    cfg = json.loads((out / "config.json").read_text())
    model_kwargs = g.config["constructor_kwargs"]
    for key in ("num_classes", "mlp_dim", "num_layers", "num_heads", "hidden_size", "representation_size"):
        assert cfg["constructor_kwargs"][key] == model_kwargs[key]


@pytest.mark.parametrize("name", CASES)
def test_every_golden_params_file_converts_with_its_config(name, tmp_path, capsys):
    g = Golden(name)
    out = tmp_path / "out"
    assert main([str(g.dir / "params.msgpack"), "-o", str(out), "--config", str(g.dir / "config.json"), "-q"]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out == ""
    assert scaled_error(_run_model(out, g), g.outputs["out"]) < TOL
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["source_format"] == "flax-bytes" and meta["source_layout"] == "variables"
    assert len(meta["source_sha256"]) == 64 and meta["dtype_policy"] == "keep" and meta["converter_version"]
    assert meta["scenic_class"].endswith(g.config["scenic_class"].rsplit(".", 1)[-1])


def test_console_script(tmp_path):
    g = Golden("vit_video_3dconv")
    exe = shutil.which("tokenlearner-convert")
    cmd = [exe] if exe else [sys.executable, "-m", "tokenlearner_torch.weights_convert.cli"]
    out = tmp_path / "out"
    res = subprocess.run(cmd + [str(g.dir / "checkpoint" / "checkpoint_7"), "-o", str(out), "--set", "classifier=gap"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "91/91 consumed" in res.stdout
    assert scaled_error(_run_model(out, g), g.outputs["out"]) < TOL


def test_subtree_of_a_larger_model(tmp_path, capsys):
    g = Golden("vit_image_cls")
    out = tmp_path / "tl"
    rc = main([str(g.dir / "checkpoint"), "-o", str(out), "--subtree", "Transformer/TokenLearnerModuleV11_0", "--verify"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["scenic_class"].endswith("TokenLearnerModuleV11")
    assert cfg["constructor_kwargs"] == {"num_tokens": 8, "bottleneck_dim": 64}
    # The TokenLearner reproduces the golden's own intermediate: its input is encoderblock_1's output.
    model = load_pretrained(out)
    x = torch.from_numpy(g.outputs["inter/Transformer/encoderblock_1"])
    ref = g.outputs["inter/Transformer/TokenLearnerModuleV11_0"]
    with torch.no_grad():
        assert scaled_error(model(x).numpy(), ref) < TOL


def test_bf16_kept_or_cast(tmp_path, capsys):
    import ml_dtypes

    g = Golden("v11_tokens3d")
    flat = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in flatten_tree(g.params).items()}
    src = tmp_path / "bf16.msgpack"
    write_flax_msgpack(src, unflatten_tree(flat), wrap="variables")
    cfg = str(g.dir / "config.json")
    assert main([str(src), "-o", str(tmp_path / "keep"), "--config", cfg, "--verify"]) == 0, capsys.readouterr().err
    assert {p.dtype for p in load_pretrained(tmp_path / "keep").parameters()} == {torch.bfloat16}
    assert main([str(src), "-o", str(tmp_path / "f32"), "--config", cfg, "--dtype", "float32"]) == 0
    assert {p.dtype for p in load_pretrained(tmp_path / "f32").parameters()} == {torch.float32}
    assert main([str(g.dir / "params.msgpack"), "-o", str(tmp_path / "cast"), "--config", cfg, "--dtype", "bfloat16"]) == 0
    assert {p.dtype for p in load_pretrained(tmp_path / "cast").parameters()} == {torch.bfloat16}


# ------------------------------------------------------------------------------------------------
# Failures: one line, exit 1, nothing left behind
# ------------------------------------------------------------------------------------------------


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    ckpt = (Golden("vit_image_cls").dir / "checkpoint" / "checkpoint_7").read_bytes()
    files = {
        "empty": b"",
        "truncated": ckpt[: len(ckpt) // 2],
        "corrupt": ckpt[:1] + b"\xc1" * 64 + ckpt[65:],  # 0xc1 is never valid msgpack
        "text": b"hello, this is not a checkpoint\n",
        "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 100,
    }
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        paths[name].write_bytes(data)
    paths["missing"] = tmp_path / "does_not_exist"
    return paths


@pytest.mark.parametrize("kind", ["empty", "truncated", "corrupt", "text", "png", "missing"])
def test_bad_input_fails_cleanly(kind, tmp_path, capsys):
    src = _bad_files(tmp_path)[kind]
    out = tmp_path / "out"
    cfg = str(Golden("vit_image_cls").dir / "config.json")
    assert main([str(src), "-o", str(out), "--config", cfg]) == 1
    _one_line_error(capsys)
    _assert_nothing_left(tmp_path, out)


def test_wrong_architecture_lists_mismatches(tmp_path, capsys):
    g = Golden("vit_image_cls")
    other = Golden("vit_video_3dconv")
    out = tmp_path / "out"
    assert main([str(g.dir / "checkpoint"), "-o", str(out), "--config", str(other.dir / "config.json")]) == 1
    err = _one_line_error(capsys)
    assert "missing" in err and "unexpected" in err and "TokenFuser_0" in err
    _assert_nothing_left(tmp_path, out)
    # Wrong head count given explicitly: the mapping's head check catches it.
    assert main([str(g.dir / "checkpoint"), "-o", str(out), "--config", str(g.dir / "config.json"), "--set", "num_heads=2"]) == 1
    assert "heads" in _one_line_error(capsys)
    _assert_nothing_left(tmp_path, out)


def test_nonfinite_weights_flagged(tmp_path, capsys):
    g = Golden("v11_tokens3d")
    flat = {k: np.array(v) for k, v in flatten_tree(g.params).items()}
    flat["token_masking/Dense_0/kernel"][3, 5] = np.nan
    flat["LayerNorm_0/scale"][0] = np.inf
    src = tmp_path / "nan.msgpack"
    write_flax_msgpack(src, unflatten_tree(flat), wrap="variables")
    out = tmp_path / "out"
    args = [str(src), "-o", str(out), "--config", str(g.dir / "config.json"), "--report", str(tmp_path / "r.json")]
    assert main(args) == 1
    err = _one_line_error(capsys)
    assert "NaN/Inf" in err and "token_masking/Dense_0/kernel" in err and "LayerNorm_0/scale" in err
    _assert_nothing_left(tmp_path, out)
    report = json.loads((tmp_path / "r.json").read_text())
    assert not report["ok"] and sorted(report["nonfinite"]) == ["LayerNorm_0/scale", "token_masking/Dense_0/kernel"]
    assert main(args + ["--allow-nonfinite"]) == 0
    assert "NON-FINITE" in capsys.readouterr().out


def test_full_disk_leaves_nothing(tmp_path, capsys, monkeypatch):
    from tokenlearner_torch.weights_convert import writer

    real = writer._leaf_bytes
    written = []

    def full_disk(planned, scratch):
        if len(written) == 3:  # part of model.safetensors is on disk when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(planned.torch_key)
        return real(planned, scratch)

    monkeypatch.setattr(writer, "_leaf_bytes", full_disk)
    g = Golden("vit_image_cls")
    out = tmp_path / "out"
    assert main([str(g.dir / "checkpoint"), "-o", str(out), "--config", str(g.dir / "config.json")]) == 1
    assert len(written) == 3
    assert "disk full" in _one_line_error(capsys)
    _assert_nothing_left(tmp_path, out)


def test_existing_output_needs_force(tmp_path, capsys):
    g = Golden("v1_sum4d")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    args = [str(g.dir / "params.msgpack"), "-o", str(out), "--config", str(g.dir / "config.json")]
    assert main(args) == 1
    assert "already exists" in _one_line_error(capsys)
    assert (out / "keep.txt").exists()
    assert main(args + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_undetermined_fields_are_listed(tmp_path, capsys):
    g = Golden("vit_image_cls")
    assert main([str(g.dir / "checkpoint"), "-o", str(tmp_path / "o")]) == 1
    err = _one_line_error(capsys)
    assert "3 field(s)" in err
    for f in SETS["vit_image_cls"]:
        assert f"--set {f.split('=')[0]}=" in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["x"],  # no -o
        ["x", "-o", "y", "--dtype", "float16"],
        ["x", "-o", "y", "--bogus"],
        ["x", "-o", "y", "--set", "no_equals_sign"],
        ["x", "-o", "y", "--num-classes", "zero"],
        ["x", "-o", "y", "--to-flax", "--set", "a=1"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage error" in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "--to-flax" in capsys.readouterr().out
