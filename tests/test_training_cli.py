"""``tokenlearner-train`` end to end on a tiny TokenLearner ViT and the digits: exit codes, one-line errors that
lose nothing, ``--set``, Ctrl-C / SIGTERM (checkpoint + 130), and THE KILL -9 TEST: a real process killed
mid-step and mid-checkpoint-write, then the same command re-run, must end on parameters and optimiser state
bit for bit equal to an uninterrupted run's (CPU, one thread)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from forkserver import ForkServer

if importlib.util.find_spec("sklearn") is None:  # found, not imported: the digits are its CSV file (1.2 s less)
    pytest.skip("scikit-learn (the digits data source) is not installed", allow_module_level=True)

from tokenlearner_torch.training.checkpoint import read_train_state  # noqa: E402
from tokenlearner_torch.training.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "digits_tokenlearner.py") + ":runlocal"
# A tiny model (hidden 16, 2 layers), dropout on (its torch RNG stream must resume too), 12 steps:
# checkpoints at steps 5, 9 (step % 4 == 1) and 12 (the last), evaluation at 1, 7 and 12.
TINY = ["model.hidden_size=16", "model.mlp_dim=32", "model.num_layers=2", "model.num_heads=2",
        "model.tokenizer.tokenlearner_loc=1", "model.tokenizer.num_tokens=4", "model.dropout_rate=0.1",
        "num_training_epochs=null", "num_training_steps=12", "lr_configs.total_steps=12", "batch_size=16",
        "checkpoint_steps=4", "log_eval_steps=6", "log_summary_steps=3", "max_checkpoint_keep=5"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _args(workdir, *extra):
    return ["--config", CONFIG, "--workdir", str(workdir), *[a for s in TINY for a in ("--set", s)], *extra]


# The CLI in a process of its own, one thread (the same arithmetic in every run). HANG (env) makes the process
# stop for the test's kill at a chosen point: "replace:<name>" inside the checkpoint writer, after the temp
# file is written and fsynced and before it is renamed to <name>; "step:<n>" inside the optimiser step of the
# n-th step of this process (after the backward, before the parameters change). It writes TL_MARKER, then
# waits until it is killed or the test creates TL_MARKER.go.
_LAUNCH = r"""
import os, sys, time
hang = os.environ.get("TL_HANG", "")
marker = os.environ.get("TL_MARKER", "")
def _stop():
    open(marker, "w").close()
    for _ in range(6000):  # until the test kills us, or releases us by creating <marker>.go
        if os.path.exists(marker + ".go"):
            return
        time.sleep(0.1)
if hang.startswith("replace:"):
    _replace = os.replace
    def replace(src, dst, *a, **k):
        if os.path.basename(os.fspath(dst)) == hang.split(":", 1)[1]:
            _stop()
        return _replace(src, dst, *a, **k)
    os.replace = replace
elif hang.startswith("step:"):
    from tokenlearner_torch.training import optim
    _step, calls = optim.OptaxChain.step, [0]
    def step(self, *a, **k):
        calls[0] += 1
        if calls[0] == int(hang.split(":", 1)[1]):
            _stop()
        return _step(self, *a, **k)
    optim.OptaxChain.step = step
from tokenlearner_torch.training.cli import main
sys.exit(main(sys.argv[1:]))
"""


# What every run imports, once, in the fork server the runs are forked from (tests/forkserver.py): each run is
# still its own process, killed and signalled for real, without paying ~2.5 s of CPU for these imports.
PRELOAD = ["torch._dynamo", "torch.utils.tensorboard", "ml_collections", "tokenlearner_torch.models",
           "tokenlearner_torch.scenic", "tokenlearner_torch.config_check", "tokenlearner_torch.training.cli",
           "tokenlearner_torch.training.config", "tokenlearner_torch.training.data",
           "tokenlearner_torch.training.distributed", "tokenlearner_torch.training.loop",
           "tokenlearner_torch.training.writers"]
_runs = itertools.count()


def _spawn(workdir, *extra, hang="", marker=""):
    env = {**ENV, "TL_HANG": hang, "TL_MARKER": str(marker)}
    logs = Path(workdir).parent / f"{Path(workdir).name}-run{next(_runs)}"
    return ForkServer.spawn(_LAUNCH, _args(workdir, *extra), env=env, cwd=ROOT, stdout=logs.with_suffix(".out"),
                            stderr=logs.with_suffix(".err"), preload=PRELOAD)


def _run(workdir, *extra, timeout=240):
    p = _spawn(workdir, *extra)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, err


def _wait_for(path: Path, proc, timeout=180.0):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path.name}: {proc.stderr_text()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def _leaves(tree, prefix=""):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], f"{prefix}/{k}")
    else:
        yield prefix, np.asarray(tree)


def _assert_bitwise(ckpt_a: Path, ckpt_b: Path):
    a, b = read_train_state(ckpt_a), read_train_state(ckpt_b)
    assert int(np.asarray(a["global_step"])) == int(np.asarray(b["global_step"]))
    for part in ("params", "opt_state"):
        la, lb = dict(_leaves(a[part])), dict(_leaves(b[part]))
        assert la.keys() == lb.keys() and la
        for k in la:
            assert la[k].dtype == lb[k].dtype and la[k].tobytes() == lb[k].tobytes(), f"{part}{k} differs"


def _first_step_line(stderr: str) -> int:
    for line in stderr.splitlines():
        if ": step " in line:
            return int(line.split(": step ", 1)[1].split("/", 1)[0])
    raise AssertionError(f"no step line in: {stderr}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run's workdir."""
    wd = tmp_path_factory.mktemp("reference")
    rc, err = _run(wd)
    assert rc == 0, err
    return wd


# -- in-process: exit codes and one-line errors ----------------------------------------------------------------
def _main(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.err + cap.out


@pytest.mark.parametrize("argv, expected", [
    ([], "the following arguments are required: --config, --workdir"),
    (["--config", "nowhere.py", "--workdir", "W"], "config file not found: nowhere.py"),
    (["--config", CONFIG, "--workdir", "W", "--set", "batch_size"], "--set expects KEY=VALUE"),
    (["--config", CONFIG, "--workdir", "W", "--set", "dataset_name=imagenet"],
     "must be one of the built-in sources digits, image_folder, got 'imagenet' (the Python API"),
    (["--config", CONFIG, "--workdir", "W", "--device", "tpu"], "--device 'tpu': expected cpu, cuda or cuda:N"),
    (["--config", CONFIG, "--workdir", "W", "--set", "num_training_steps=5"], "set one"),
    (["--config", CONFIG, "--workdir", "W", "--strict", "--set", "lr_configs.learning_rate_schedul=x"],
     "learning_rate_schedule"),
])
def test_usage_and_input_errors_are_one_line(capsys, tmp_path, argv, expected):
    argv = [a.replace("W", str(tmp_path / "w")) if a == "W" else a for a in argv]
    rc, err = _main(capsys, *argv)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("tokenlearner-train: error: ") and expected in err, err
    assert "Traceback" not in err


def test_help_exits_0(capsys):
    rc, _ = _main(capsys, "--help")
    assert rc == 0 and "--workdir" in _


def test_run_resume_complete_and_another_model_loses_nothing(capsys, reference, tmp_path):
    names = sorted(p.name for p in reference.glob("checkpoint_*"))
    assert names == ["checkpoint_12", "checkpoint_5", "checkpoint_9"]
    records = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    # --set reached the model: hidden 16, 2 layers, 4 learned tokens on 16x16x3 digits with 4x4 patches.
    assert records[0]["step"] == 1 and 5000 < records[0]["num_trainable_params"] < 20000
    assert {r["step"] for r in records if "valid_accuracy" in r} == {1, 7, 12}
    params = read_train_state(reference / "checkpoint_12")["params"]
    assert np.asarray(params["embedding"]["kernel"]).shape == (4, 4, 3, 16)
    # A finished run re-run: nothing to do, exit 0, checkpoints untouched.
    before = {p.name: p.read_bytes() for p in reference.glob("checkpoint_*")}
    rc, err = _main(capsys, *_args(reference, "-q"))
    assert rc == 0 and err == ""
    # Another model on the same workdir: one line naming the parameters, exit 2, nothing lost.
    rc, err = _main(capsys, *_args(reference, "--set", "model.hidden_size=32"))
    assert rc == 2 and err.count("\n") == 1 and "another model" in err and "embedding" in err, err
    assert {p.name: p.read_bytes() for p in reference.glob("checkpoint_*")} == before


# -- signals and kill -9 (real processes) ------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_and_sigterm_write_a_checkpoint_and_exit_130(reference, tmp_path, sig):
    wd, marker = tmp_path / "run", tmp_path / "hung"
    p = _spawn(wd, hang="step:7", marker=marker)  # held inside step 7: the signal arrives mid-step
    _wait_for(marker, p)
    p.send_signal(sig)
    time.sleep(0.5)
    Path(f"{marker}.go").touch()  # step 7 goes on; the loop then writes checkpoint_7 and stops
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tokenlearner-train: error: ") and "checkpoint_7" in last, err
    assert (wd / "checkpoint_7").exists()
    if sig == signal.SIGTERM:
        return  # the same checkpoint as SIGINT's; the resume is checked once
    rc, err = _run(wd)
    assert rc == 0, err
    assert _first_step_line(err) == 8  # resumed after step 7
    _assert_bitwise(wd / "checkpoint_12", reference / "checkpoint_12")


@pytest.mark.slow
def test_kill_9_mid_step_and_mid_checkpoint_write_resumes_bitwise(reference, tmp_path):
    wd = tmp_path / "run"
    # 1. kill -9 while the checkpoint of step 9 is written: its temp file is complete, not yet renamed.
    p = _spawn(wd, hang="replace:checkpoint_9", marker=tmp_path / "m1")
    _wait_for(tmp_path / "m1", p)
    p.kill()
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert sorted(x.name for x in wd.glob("checkpoint_*")) == ["checkpoint_5"]  # the previous one intact
    assert list(wd.glob(".checkpoint_9.tmp-*")), "the kill did not land between the write and the rename"
    _assert_bitwise(wd / "checkpoint_5", reference / "checkpoint_5")
    # 2. the same command: resumes from step 5; kill -9 inside its 2nd step (global step 7), mid-update.
    p = _spawn(wd, hang="step:2", marker=tmp_path / "m2")
    _wait_for(tmp_path / "m2", p)
    p.kill()
    p.wait(timeout=60)
    assert sorted(x.name for x in wd.glob("checkpoint_*")) == ["checkpoint_5"]
    # 3. the same command again, uninterrupted: resumes from step 5 and ends where the reference ended.
    rc, err = _run(wd)
    assert rc == 0, err
    assert _first_step_line(err) == 6
    _assert_bitwise(wd / "checkpoint_9", reference / "checkpoint_9")
    _assert_bitwise(wd / "checkpoint_12", reference / "checkpoint_12")
