"""The documented Python API and pytest integration (docs/parity.md) run as written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenlearner_torch.parity import assert_parity, check_case
from tokenlearner_torch.parity.pytest_plugin import parity_cases

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"
DOC = Path(__file__).parents[1] / "docs" / "parity.md"


def test_assert_parity_on_a_stored_case_returns_the_report():
    report = assert_parity(GOLDENS / "v11_tokens4d")  # no jax: a stored case is checked
    assert report.passed and report.mode == "f32"
    assert report.reference.startswith("stored")


def test_assert_parity_raises_with_the_report_text(tmp_path):
    import shutil

    import numpy as np

    case = tmp_path / "bad"
    shutil.copytree(GOLDENS / "v1_sum4d", case)
    data = dict(np.load(case / "outputs.npz"))
    data["inter/Conv_2"] = data["inter/Conv_2"] + 1.0
    np.savez(case / "outputs.npz", **data)
    with pytest.raises(AssertionError) as info:
        assert_parity(case)
    text = str(info.value)
    assert "first diverging module: Conv_2" in text and "inter/Conv_2" in text
    assert not check_case(case).passed


def test_assert_parity_live_on_a_config():
    pytest.importorskip("jax")
    report = assert_parity(
        {"scenic_class": "TokenLearnerModuleV11", "constructor_kwargs": {"num_tokens": 2, "bottleneck_dim": 4},
         "inputs": [{"name": "inputs", "shape": [1, 5, 4]}]},
        mode="f64",
    )
    assert report.passed and report.max_error() <= 1e-10


def test_parity_cases_parametrizes_over_case_folders():
    params = parity_cases(GOLDENS)
    assert [p.id for p in params] == sorted(p.name for p in GOLDENS.iterdir() if (p / "config.json").is_file())
    assert parity_cases(GOLDENS / "does-not-exist") == []


def _doc_block(marker: str) -> str:
    """The python code block that follows ``<!-- marker -->`` in docs/parity.md."""
    text = DOC.read_text()
    start = text.index(f"<!-- {marker} -->")
    block = text[start:].split("```python\n", 1)[1].split("```", 1)[0]
    return block


def test_documented_api_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("jax")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tests").mkdir()
    os.symlink(GOLDENS, tmp_path / "goldens")
    code = _doc_block("example: api")
    code = code.replace("tests/fixtures/goldens", str(GOLDENS))
    exec(compile(code, str(DOC), "exec"), {"__name__": "doc_example"})


def test_documented_pytest_example_runs(tmp_path):
    """The conftest + test module from the docs, run by pytest in a subprocess, on a copy of two goldens."""
    import shutil

    cases = tmp_path / "tests" / "parity_cases"
    cases.mkdir(parents=True)
    for name in ("v1_sum4d", "fuser_norm"):
        shutil.copytree(GOLDENS / name, cases / name)
    (tmp_path / "conftest.py").write_text(_doc_block("example: conftest"))
    test = _doc_block("example: pytest")
    (tmp_path / "tests" / "test_port_parity.py").write_text(test)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not live", "--parity-accuracy", "always",
         str(tmp_path / "tests")],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout, proc.stdout[-2000:]
