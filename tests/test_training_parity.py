"""`tokenlearner-parity train`: a stored genuine-Scenic training case, a tampered one, and a live config run
against the project's Flax reference + optax."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from train_goldens import TRAIN_GOLDENS

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
    assert len(report["steps"]) == 2 and report["steps"][1]["ref_learning_rate"] > 0
    assert any("key/bias" in p for p in report["noise_sensitive"])
    assert max(e for p, e in report["param_errors"].items() if p not in report["noise_sensitive"]) < 1e-5


def test_check_accepts_a_training_case(capsys):
    assert main(["check", str(CASE), "-q"]) == 0
    assert "PASS: 3 steps vs genuine Scenic" in capsys.readouterr().out
