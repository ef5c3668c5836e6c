"""tokenlearner-convert end to end: every golden converts and matches Scenic; every failure is a complete summary
line (plus indented details where there is more to say), nothing left behind; exit 1 when the conversion fails,
2 for usage and input errors."""

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

from tokenlearner_torch import errors as tl_errors
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


def test_verify_catches_a_written_difference(tmp_path, capsys, monkeypatch):
    from tokenlearner_torch.weights_convert import writer

    real = writer._leaf_bytes

    def one_bit_off(planned, scratch):  # the sign bit of one element: -0.0 vs 0.0 only a bitwise check sees
        data = real(planned, scratch)
        if planned.flax_path != "Transformer/encoder_norm/bias":
            return data
        wrong = bytearray(data)
        wrong[3] ^= 0x80
        return memoryview(bytes(wrong))

    monkeypatch.setattr(writer, "_leaf_bytes", one_bit_off)
    g = Golden("vit_image_cls")
    assert main([str(g.dir / "checkpoint"), "-o", str(tmp_path / "out"), "--config", str(g.dir / "config.json"), "--verify", "-q"]) == 1
    err = _one_line_error(capsys)
    assert "verify: 1 leaves differ from the source" in err and err.rstrip().endswith("Transformer/encoder_norm/bias")


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
# Failures: a summary line, exit 1 (the conversion failed) or 2 (usage or input error), nothing left behind
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
    assert main([str(src), "-o", str(out), "--config", cfg]) == 2  # unreadable input
    _one_line_error(capsys)
    _assert_nothing_left(tmp_path, out)


def _summary_and_details(capsys) -> tuple[str, list[str]]:
    """stderr of a failed conversion: a complete first line, then indented detail lines (no traceback)."""
    err = capsys.readouterr().err
    first, *details = err.rstrip("\n").split("\n")
    assert first.startswith("tokenlearner-convert: error: ") and "Traceback" not in err, err
    assert all(line.startswith("  ") for line in details), err
    return first, details


def _param_shapes(g: Golden) -> dict[str, tuple]:
    return {k.removeprefix("params/"): tuple(v) for k, v in g.config["param_shapes"].items()}


def test_wrong_config_error_is_readable_and_the_report_complete(tmp_path, capsys):
    g, other = Golden("vit_image_cls"), Golden("vit_video_3dconv")
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main([str(g.dir / "checkpoint"), "-o", str(out), "--config", str(other.dir / "config.json"), "--report", str(report)]) == 1
    first, details = _summary_and_details(capsys)
    _assert_nothing_left(tmp_path, out)
    # What each side has, from the goldens' own records of the genuine Scenic trees.
    have, want = _param_shapes(g), _param_shapes(other)
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    # The position embedding's length follows the input size, which no config fixes: it is not checked.
    misshaped = sorted(p for p in set(have) & set(want) if have[p] != want[p] and not p.endswith("pos_embedding"))
    assert f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped" in first
    assert (len(missing), len(unexpected), len(misshaped)) == (30, 18, 5)
    # The summary says the config describes another model, and how: video vs image, depth.
    assert "the config evidently describes another model" in first
    assert "image vs video patch embedding" in first and "4 vs 3 encoder blocks" in first
    assert len(first) < 400 and max(len(line) for line in details) < 200
    assert "  hint: depth: the checkpoint has 4 encoder blocks, the model 3 (num_layers)" in details
    assert any(line.startswith("  hint: the checkpoint embeds 2-D patches (an image model)") for line in details)
    # The first entries of each kind, one per line; mis-shaped ones with found vs expected shapes.
    for kind, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
        header = f"  {kind} ({len(items)}, first 5):" if len(items) > 5 else f"  {kind} ({len(items)}):"
        i = details.index(header)
        shown = details[i + 1 : i + 1 + min(5, len(items))]
        assert all(line.startswith("    ") for line in shown)
        assert {line.split(":")[0].strip() for line in shown} <= set(items)
    assert "    output_projection/kernel: found [32, 10], expected [64, 5]" in details
    assert "    embedding/kernel: found [8, 8, 3, 64], expected [2, 8, 8, ?, 64] (rank 4, expected 5)" in details
    assert details[-1] == f"  (every entry: in {report}, under 'mismatch')"
    # --report: the complete lists, and the complete message (not cut).
    rep = json.loads(report.read_text())
    assert not rep["ok"] and rep["error"].startswith(first.removeprefix("tokenlearner-convert: error: "))
    assert rep["error"].splitlines()[1:] == details[:-1]
    mm = rep["mismatch"]
    assert sorted(mm["missing"]) == missing and sorted(mm["unexpected"]) == unexpected
    assert sorted(m["path"] for m in mm["misshaped"]) == misshaped
    for m in mm["misshaped"]:
        assert tuple(m["found"]) == have[m["path"]]
        assert all(e is None or e == w for e, w in zip(m["expected"], want[m["path"]], strict=True))
    assert any("4 encoder blocks" in h for h in mm["hints"])
    # Without --report the message says how to get every entry.
    assert main([str(g.dir / "checkpoint"), "-o", str(out), "--config", str(other.dir / "config.json")]) == 1
    assert _summary_and_details(capsys)[1][-1] == "  (every entry: pass --report FILE)"


def test_wrong_width_or_heads_is_named(tmp_path, capsys):
    g = Golden("vit_image_cls")
    args = [str(g.dir / "checkpoint"), "-o", str(tmp_path / "out"), "--config", str(g.dir / "config.json")]
    # Wrong head count given explicitly: the mapping's head check catches it, even with the same total width.
    assert main(args + ["--set", "num_heads=2"]) == 1
    first, details = _summary_and_details(capsys)
    assert "0 missing, 0 unexpected, 28 mis-shaped" in first and "(checkpoint vs model: heads 4 vs 2)" in first  # 4 blocks x 7
    assert "the config with the set values evidently describes another model" in first
    assert any("(4 heads, the model has num_heads=2)" in line for line in details)
    assert main(args + ["--set", "hidden_size=128"]) == 1
    first, details = _summary_and_details(capsys)
    assert "hidden size 64 vs 128" in first
    # No evident other model (one leaf renamed): counts and entries, no hint.
    flat = dict(flatten_tree(g.params))
    flat["Transformer/encoder_norm/gain"] = flat.pop("Transformer/encoder_norm/scale")
    src = tmp_path / "renamed.msgpack"
    write_flax_msgpack(src, unflatten_tree(flat), wrap="variables")
    assert main([str(src), "-o", str(tmp_path / "out"), "--config", str(g.dir / "config.json")]) == 1
    first, details = _summary_and_details(capsys)
    assert first.endswith("1 missing, 1 unexpected, 0 mis-shaped") and "hint" not in "".join(details)
    assert details == ["  missing (1):", "    Transformer/encoder_norm/scale", "  unexpected (1):", "    Transformer/encoder_norm/gain"]
    _assert_nothing_left(tmp_path, tmp_path / "out")


@pytest.mark.parametrize("case", ["missing source", "unreadable source", "missing config", "no output parent"])
def test_input_errors_exit_2(case, tmp_path, capsys, monkeypatch):
    g = Golden("vit_image_cls")
    src, cfg, out = g.dir / "checkpoint", g.dir / "config.json", tmp_path / "out"
    if case == "missing source":
        src = tmp_path / "does_not_exist"
    elif case == "unreadable source":
        from tokenlearner_torch.weights_convert import readers

        def denied(target):
            raise PermissionError(errno.EACCES, "Permission denied", str(target))

        monkeypatch.setattr(readers, "_read_source", denied)
    elif case == "missing config":
        cfg = tmp_path / "nope.json"
    else:
        out = tmp_path / "no" / "out"
    assert main([str(src), "-o", str(out), "--config", str(cfg)]) == 2
    err = _one_line_error(capsys)
    assert {"missing source": "no such file", "unreadable source": "cannot be read (Permission denied",
            "missing config": "config file not found", "no output parent": "does not exist"}[case] in err  # fmt: skip
    assert not out.exists()


def test_summary_says_where_each_field_came_from(tmp_path, capsys):
    g = Golden("vit_image_cls")
    args = [str(g.dir / "checkpoint"), "-o", str(tmp_path / "a")] + [a for s in SETS["vit_image_cls"] for a in ("--set", s)]
    assert main(args) == 0, capsys.readouterr().err
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model:"))
    assert line == (
        "model:       TokenLearnerViT (fields: 10 inferred from the checkpoint's shapes; "
        "--set tokenizer.type, tokenizer.tokenlearner_loc, classifier)"
    )
    assert main([str(g.dir / "checkpoint"), "-o", str(tmp_path / "b"), "--config", str(g.dir / "config.json")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("model:"))
    assert line == f"model:       TokenLearnerViT (fields: {len(g.config['constructor_kwargs'])} from the config)"


def test_python_api_mismatch_keeps_every_entry(tmp_path):
    from tokenlearner_torch.weights_convert import ConversionReport, convert
    from tokenlearner_torch.weights_convert import ParamsMismatchError

    g, other = Golden("vit_image_cls"), Golden("vit_video_3dconv")
    rep = ConversionReport()
    with pytest.raises(ParamsMismatchError) as info:
        convert(g.dir / "checkpoint", tmp_path / "out", config=other.dir / "config.json", report=rep)
    exc = info.value
    assert isinstance(exc, tl_errors.ConversionError) and exc.truncated
    assert (len(exc.missing), len(exc.unexpected), len(exc.misshaped)) == (30, 18, 5)
    assert rep.mismatch == exc.to_dict() and len(rep.mismatch["missing"]) == 30
    assert str(exc).splitlines()[0].endswith("(checkpoint vs model: image vs video patch embedding, 4 vs 3 encoder blocks, classes 10 vs 5, ...)")
    assert not (tmp_path / "out").exists()


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
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "already exists (pass --force to replace it)" in err and "force=True" not in err
    assert (out / "keep.txt").exists()
    # The Python API says it in Python.
    from tokenlearner_torch.weights_convert import convert

    with pytest.raises(tl_errors.ConfigError, match=r"already exists \(pass force=True to replace it\)$"):
        convert(g.dir / "params.msgpack", out, config=g.dir / "config.json")
    assert (out / "keep.txt").exists()
    assert main(args + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_undetermined_fields_are_listed(tmp_path, capsys):
    g = Golden("vit_image_cls")
    assert main([str(g.dir / "checkpoint"), "-o", str(tmp_path / "o")]) == 2  # fields to pass: a usage error
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


@pytest.mark.parametrize("form", ["trailing slash, not there yet", "existing folder"])
def test_to_flax_into_a_folder_writes_checkpoint_step(form, tmp_path, capsys):
    """docs/converter.md: `--to-flax OUT -o workdir/ --step 1000` writes workdir/checkpoint_1000 (Scenic's
    workdir layout). A trailing slash or an existing folder means a folder; the file it holds restores
    bit for bit to the source tree."""
    g = Golden("vit_image_cls")
    folder = tmp_path / "conv"
    assert main([str(g.dir / "checkpoint"), "-o", str(folder), "--config", str(g.dir / "config.json"), "-q"]) == 0
    workdir = tmp_path / "workdir"
    if form == "existing folder":
        workdir.mkdir()
    target = str(workdir) + ("/" if form.startswith("trailing") else "")
    assert main(["--to-flax", str(folder), "-o", target, "--step", "1000"]) == 0
    assert workdir.is_dir() and sorted(p.name for p in workdir.iterdir()) == ["checkpoint_1000"]
    assert capsys.readouterr().out.startswith(f"wrote {workdir / 'checkpoint_1000'} ")
    back = read_checkpoint(workdir / "checkpoint_1000")
    src = flatten_tree(read_checkpoint(g.dir / "checkpoint"))
    got = flatten_tree(back)
    assert set(got) == set(src) and all(np.asarray(got[k]).tobytes() == np.asarray(src[k]).tobytes() for k in src)


def test_to_flax_folder_without_step_is_refused_and_creates_nothing(tmp_path, capsys):
    g = Golden("vit_image_cls")
    folder = tmp_path / "conv"
    assert main([str(g.dir / "checkpoint"), "-o", str(folder), "--config", str(g.dir / "config.json"), "-q"]) == 0
    assert main(["--to-flax", str(folder), "-o", f"{tmp_path / 'wd'}/"]) == 2
    assert "pass a step" in _one_line_error(capsys) and not (tmp_path / "wd").exists()


def test_summary_names_a_trailing_slash_folder_once(tmp_path, capsys):
    """`-o /tmp/x/` printed `wrote: /tmp/x//`."""
    g = Golden("vit_image_cls")
    out = f"{tmp_path / 'x'}/"
    assert main([str(g.dir / "checkpoint"), "-o", out, "--config", str(g.dir / "config.json")]) == 0
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote:")]
    assert wrote == [f"wrote:       {tmp_path / 'x'}/ (model.safetensors, config.json)"]
