"""`live` and `record`: the Flax reference and the port side by side in f32 / f64 / bf16, and a
record -> check round trip (f64 cases check to 1e-10 without jax)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

from tokenlearner_torch.parity import api  # noqa: E402
from tokenlearner_torch.parity.cli import main  # noqa: E402

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"

VIT = {
    "scenic_class": "TokenLearnerViT",
    "constructor_kwargs": {
        "num_classes": 3, "mlp_dim": 16, "num_layers": 2, "num_heads": 2, "hidden_size": 8,
        "representation_size": 4, "classifier": "gap",
        "tokenizer": {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 2, "tokenlearner_loc": 1,
                      "use_tokenfuse": True, "use_v11": True},
        "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
    },
    "inputs": [{"name": "x", "shape": [2, 8, 8, 3]}],
}
FUSER = {
    "scenic_class": "TokenFuser",
    "constructor_kwargs": {"use_normalization": True, "bottleneck_dim": 8},
    "inputs": [{"name": "inputs", "shape": [2, 3, 8]}, {"name": "original", "shape": [2, 3, 4, 8]}],
}


@pytest.mark.parametrize("mode", ["f32", "f64", "bf16"])
def test_live_vit(mode):
    report = api.live(VIT, mode=mode)
    assert report.passed, report.to_text()
    kinds = {r.kind for r in report.rows}
    assert kinds == {"output", "intermediate", "gradient"}
    if mode == "f64":
        assert report.max_error() <= 1e-10
        assert report.max_error(structural=True) <= 1e-10


def test_live_f64_on_golden_weights_reaches_1e_10():
    report = api.live(GOLDENS / "encoder_mod_image", mode="f64")
    assert report.passed, report.to_text()
    assert report.max_error(structural=True) < 1e-12


def test_live_detects_a_wrong_port(monkeypatch):
    """A semantic slip (LayerNorm epsilon 1e-5 instead of 1e-6) fails f64 and names the first module."""
    import tokenlearner_torch.layers as layers

    orig = layers.flax_layer_norm
    monkeypatch.setattr(layers, "flax_layer_norm", lambda x, w, b, eps: orig(x, w, b, 1e-5))
    report = api.live(FUSER, mode="f64")
    assert not report.passed
    assert report.first_divergence.module == "fuser_mix_norm1"


def test_cli_live_all_modes_json(tmp_path, capsys):
    cfg = tmp_path / "fuser.json"
    cfg.write_text(json.dumps(FUSER))
    out = tmp_path / "live.json"
    assert main(["live", str(cfg), "--mode", "all", "--json", str(out), "-q"]) == 0
    data = json.loads(out.read_text())
    assert [r["mode"] for r in data["reports"]] == ["f64", "f32", "tf32", "bf16"]
    assert data["reports"][0]["max_scaled_error"]["output"] <= 1e-10
    assert capsys.readouterr().out.count("PASS") == 4


def test_live_given_inputs_and_shapes(tmp_path):
    x = np.random.default_rng(3).standard_normal((1, 3, 3, 8)).astype(np.float32)
    npz = tmp_path / "in.npz"
    np.savez(npz, inputs=x)
    cfg = {"scenic_class": "TokenLearnerModule", "constructor_kwargs": {"num_tokens": 2, "use_sum_pooling": False}}
    assert api.live(cfg, inputs=npz).passed
    assert api.live(cfg, input_shapes={"inputs": [2, 9, 8]}, mode="f64").passed
    with pytest.raises(api.CaseError, match="input-shape"):
        api.live(cfg)


@pytest.mark.parametrize("mode", ["f32", "f64"])
def test_record_then_check_round_trip(mode, tmp_path, capsys):
    cfg = tmp_path / "vit.json"
    cfg.write_text(json.dumps(VIT))
    case = tmp_path / f"case_{mode}"
    assert main(["record", str(cfg), "-o", str(case), "--mode", mode, "--seed", "5"]) == 0
    for f in ("config.json", "params.msgpack", "inputs.npz", "outputs.npz", "grads.npz"):
        assert (case / f).is_file()
    # params.msgpack is {'params': tree}, like the goldens
    import msgpack

    top = msgpack.unpackb((case / "params.msgpack").read_bytes(), raw=False, strict_map_key=False,
                          ext_hook=lambda code, data: None)
    assert list(top) == ["params"]
    config = json.loads((case / "config.json").read_text())
    assert config["parity"]["mode"] == mode and config["intermediates"]
    out_dtype = np.load(case / "outputs.npz")["out"].dtype
    assert out_dtype == (np.float64 if mode == "f64" else np.float32)

    report = api.check_case(case)
    assert report.passed, report.to_text()
    assert report.mode == mode
    if mode == "f64":
        assert report.max_error(structural=True) <= 1e-10
    # the recorded case is checked without jax too (see test_parity_check) and refuses to be overwritten
    assert main(["record", str(cfg), "-o", str(case)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_record_with_checkpoint_copies_it(tmp_path):
    golden = GOLDENS / "vit_image_cls"
    case = tmp_path / "from_ckpt"
    api.record(golden / "config.json", case, checkpoint=golden / "checkpoint", copy_checkpoint=True)
    assert (case / "checkpoint").is_dir()
    report = api.check_case(case)
    assert report.passed and any("checkpoint/" in n for n in report.notes)
    # weights equal the golden's, so the recorded output is the golden's up to float noise
    ref = np.load(golden / "outputs.npz")["out"]
    got = np.load(case / "outputs.npz")["out"]
    assert np.abs(got - ref).max() < 1e-5
