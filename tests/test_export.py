"""The converted folder, load_pretrained, and the way back to Flax (bitwise, accepted by flax)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenlearner_torch.errors import CheckpointError, ConfigError
from tokenlearner_torch.weights_convert import convert, load_pretrained, read_checkpoint, read_checkpoint_info, to_flax_checkpoint
from tokenlearner_torch.weights_convert.cli import main
from tokenlearner_torch.weights_convert.mapping import flatten_tree, torch_to_flax

from goldens import Golden


def _bitwise_equal(a: dict, b: dict) -> None:
    fa, fb = flatten_tree(a), flatten_tree(b)
    assert set(fa) == set(fb)
    for k in fa:
        x, y = np.asarray(fa[k]), np.asarray(fb[k])
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), k


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    g = Golden("vit_video_3dconv")
    out = tmp_path_factory.mktemp("conv") / "vit"
    rep = convert(g.dir / "checkpoint", out, config=g.dir / "config.json")
    assert rep.ok
    return out


def test_round_trip_is_bitwise_and_flax_restores_it(folder, tmp_path):
    g = Golden("vit_video_3dconv")
    ckpt_dir = tmp_path / "ckpts"
    ckpt_dir.mkdir()
    info = to_flax_checkpoint(folder, ckpt_dir, step=7)
    assert info["path"].endswith("checkpoint_7")
    params, meta = read_checkpoint_info(ckpt_dir)
    assert meta.step == 7 and meta.layout == "optax-trainstate"
    _bitwise_equal(params, g.params)
    from flax.training import checkpoints

    restored = checkpoints.restore_checkpoint(str(ckpt_dir), target=None)
    assert int(restored["global_step"]) == 7
    _bitwise_equal(restored["params"], g.params)


def test_finetuned_weights_go_back_to_scenic(folder, tmp_path, capsys):
    model = load_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "fine-tuned in PyTorch"
    path = tmp_path / "checkpoint_100"
    to_flax_checkpoint(model, path, step=100)
    _bitwise_equal(read_checkpoint(path), torch_to_flax(model))
    # and forward again through the command line: bitwise equal to the PyTorch model
    assert main([str(path), "-o", str(tmp_path / "again"), "--config", str(folder / "config.json"), "-q"]) == 0
    again = load_pretrained(tmp_path / "again")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_cli_to_flax(folder, tmp_path, capsys):
    out = tmp_path / "checkpoint_3"
    assert main(["--to-flax", str(folder), "-o", str(out), "--step", "3", "--wrap", "variables"]) == 0
    assert "Flax msgpack" in capsys.readouterr().out
    _bitwise_equal(read_checkpoint(out), Golden("vit_video_3dconv").params)
    assert main(["--to-flax", str(folder), "-o", str(out)]) == 2  # exists: a usage error
    assert "already exists (pass --force" in capsys.readouterr().err
    assert main(["--to-flax", str(tmp_path / "nope"), "-o", str(tmp_path / "c")]) == 2  # missing input
    assert "no such folder" in capsys.readouterr().err


def test_folder_contents_and_provenance(folder):
    from safetensors import safe_open

    cfg = json.loads((folder / "config.json").read_text())
    assert set(cfg) == {"scenic_class", "constructor_kwargs", "format_version"}
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    for key in ("source_sha256", "source_format", "source_layout", "step", "converter_version", "dtype_policy", "scenic_class"):
        assert key in meta and isinstance(meta[key], str)
    assert meta["step"] == "7" and meta["source_layout"] == "optax-trainstate"
    model = load_pretrained(folder)
    assert not model.training and all(not p.is_meta for p in model.parameters())


def test_load_pretrained_errors(folder, tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        load_pretrained(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(broken)
    (broken / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_pretrained(broken)
    data = (folder / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_pretrained(broken)
    (broken / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        load_pretrained(broken)


def test_existing_output_and_bad_dtype(folder, tmp_path):
    g = Golden("v1_sum4d")
    with pytest.raises(ConfigError, match="already exists"):
        convert(g.dir / "params.msgpack", folder, config=g.dir / "config.json")
    with pytest.raises(ConfigError, match="dtype policy"):
        convert(g.dir / "params.msgpack", tmp_path / "x", config=g.dir / "config.json", dtype="float16")
    assert not (tmp_path / "x").exists()
