"""The README's first command: convert a bundled Scenic checkpoint, then check parity on the converted weights."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tokenlearner_torch.parity.cli import main as parity_main
from tokenlearner_torch.weights_convert.cli import main as convert_main

ROOT = Path(__file__).resolve().parents[1]
GOLDENS = ROOT / "tests" / "fixtures" / "goldens"


def test_demo_converts_and_proves_parity():
    done = subprocess.run([sys.executable, "scripts/demo.py"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "flax leaves: 91/91 consumed (100%)" in done.stdout
    assert "(tokenlearner-convert output)" in done.stdout
    assert "\nPASS: 178 tensors within tol 0.0001" in done.stdout


def test_check_with_converted_weights_of_another_model_is_an_input_error(tmp_path, capsys):
    case = GOLDENS / "vit_image_cls"
    out = tmp_path / "converted"
    assert convert_main([str(case / "checkpoint"), "-o", str(out), "--config", str(case / "config.json"), "-q"]) == 0
    assert parity_main(["check", str(GOLDENS / "vit_image_cls"), "--weights", str(out), "-q"]) == 0
    assert parity_main(["check", str(GOLDENS / "vit_video_3dconv"), "--weights", str(out)]) == 2
    assert "describes another model" in capsys.readouterr().err
    assert parity_main(["check", str(GOLDENS / "vit_image_cls"), "--weights", str(tmp_path)]) == 2
    assert parity_main(["check", str(GOLDENS), "--weights", str(out)]) == 2  # one case only
