"""`tokenlearner-parity train`: a stored genuine-Scenic training case, a tampered one, and a live config run
against the project's Flax reference + optax."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from train_goldens import TRAIN_CASES, TRAIN_GOLDENS

from tokenlearner_torch.parity.cli import main

CASE = TRAIN_GOLDENS / "finetune_surgery"


def test_train_on_a_stored_case_passes(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["train", str(CASE), "--json", str(out)]) == 0
    report = json.loads(out.read_text())["reports"][0]
    assert report["passed"] and len(report["steps"]) == 3 and report["first_divergence"] is None
    assert max(report["param_errors"].values()) < 1e-6
    step0 = report["steps"][0]
    assert abs(step0["loss"] - step0["ref_loss"]) <= 1e-5 * step0["ref_loss"]
    assert "PASS: 3 steps" in capsys.readouterr().out


def test_train_names_what_diverges(tmp_path, capsys):
    from tokenlearner_torch.weights_convert.readers import read_checkpoint, write_flax_msgpack

    case = tmp_path / "case"
    shutil.copytree(CASE, case)
    steps = json.loads((case / "steps.json").read_text())
    steps["steps"][1]["loss"] *= 1.001
    (case / "steps.json").write_text(json.dumps(steps))
    final = read_checkpoint(case / "params_final.msgpack")
    final["pre_logits"]["bias"] = final["pre_logits"]["bias"] + np.float32(1e-2)
    (case / "params_final.msgpack").unlink()
    write_flax_msgpack(case / "params_final.msgpack", final, wrap="bare")
    assert main(["train", str(case)]) == 1
    text = capsys.readouterr().out
    assert "step 1: loss" in text and "first divergence: step 2 pre_logits/bias" in text


def test_train_usage_errors(capsys):
    assert main(["train", str(CASE), "--steps", "9"]) == 2
    assert main(["train", str(TRAIN_GOLDENS)]) == 2  # a folder of cases is not a case
    assert main(["train", "missing_config.py", "--num-classes", "3", "--input-shape", "8,8,3"]) == 2
    err = capsys.readouterr().err
    assert "the case holds 3 steps" in err and "not a training case folder" in err and "not found" in err


def test_train_live_config_against_flax_reference(tmp_path, capsys):
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    config = json.loads((TRAIN_GOLDENS / "softmax_label_smoothing" / "config.json").read_text())["config"]
    config["model"].update(hidden_size=16, mlp_dim=32, num_layers=2, num_heads=2)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "r.json"
    rc = main(["train", str(path), "--steps", "2", "--num-classes", "10", "--input-shape", "16,16,3", "--json", str(out)])
    report = json.loads(out.read_text())["reports"][0]
    assert rc == 0, report
    assert "optax schedules from the raw lr_configs" in report["reference"]
    # constant*cosine_decay, base 0.05, steps_per_cycle 6 (no warmup): 0.05 * 0.5 * (1 + cos(pi * s / 6)) by hand
    for s in report["steps"]:
        hand = 0.05 * 0.5 * (1 + math.cos(math.pi * s["step"] / 6))
        assert abs(s["ref_learning_rate"] - hand) <= 1e-7 * 0.05 and abs(s["learning_rate"] - hand) <= 1e-7 * 0.05
    assert len(report["steps"]) == 2
    assert any("key/bias" in p for p in report["noise_sensitive"])
    assert max(e for p, e in report["param_errors"].items() if p not in report["noise_sensitive"]) < 1e-5


def test_check_accepts_a_training_case(capsys):
    assert main(["check", str(CASE), "-q"]) == 0
    assert "PASS: 3 steps vs genuine Scenic" in capsys.readouterr().out


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_reference_lr_is_genuine_scenic_logged_lr(case):
    """The live harness's reference learning rate (optax schedules built from the raw lr_configs, not the
    port's schedules.py) against the rates genuine Scenic logged in each training golden."""
    pytest.importorskip("optax")
    from parity.train import reference_lr_fn

    meta = json.loads((TRAIN_GOLDENS / case / "config.json").read_text())
    ref = reference_lr_fn(meta["config"]["lr_configs"])
    assert ref is not None, "every golden's schedule has a reference here"
    logged = json.loads((TRAIN_GOLDENS / case / "steps.json").read_text())["steps"]
    scale = max(abs(s["learning_rate"]) for s in logged)
    for s in logged:  # the step count optax reads is the step index (the goldens start at global step 0)
        assert abs(float(ref(s["global_step_before"])) - s["learning_rate"]) <= 1e-6 * scale, (case, s["step"])


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_reference_optax_config_is_scenic_translation(case):
    """The reference side's own translation of the raw config, against what each genuine Scenic run built
    (its config.json records the optax chain Scenic logged, where the case has it) or by hand."""
    from parity.train import scenic_optax_config

    config = json.loads((TRAIN_GOLDENS / case / "config.json").read_text())["config"]
    got = scenic_optax_config(config)
    hand = {  # from scenic/train_lib/optimizers.py's get_optax_optimizer_config, per case's raw config
        "adamw_masked_gap": {"optimizer": "adamw", "b1": 0.9, "b2": 0.999, "weight_decay": 0.3,
                             "skip_scale_and_bias_regularization": True},
        "finetune_surgery": {"optimizer": "sgd", "weight_decay": 0.001, "momentum": 0.9},
        "im1k_like_multilabel": {"optimizer": "adamw", "b1": 0.9, "b2": 0.999, "weight_decay": 0.3},
        "inflate_average_resize_tile": {"optimizer": "adam", "b1": 0.9, "b2": 0.999},
        "inflate_central_tile_gradclip": {"optimizer": "adamw", "b1": 0.9, "b2": 0.95, "weight_decay": 0.05,
                                          "skip_scale_and_bias_regularization": True,
                                          "grad_clip": {"clip_method": "clip_by_global_norm", "clip_value": 0.5}},
        "softmax_label_smoothing": {"optimizer": "sgd", "momentum": 0.9, "nesterov": True},
        "video_fuser_rsqrt": {"optimizer": "adam", "b1": 0.9, "b2": 0.98},
    }
    assert got == hand[case], got
