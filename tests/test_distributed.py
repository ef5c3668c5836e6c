"""Distributed training on torch.distributed: DDP and FSDP2 (with activation checkpointing) on 2 CPU
processes (gloo). (That checkpointing alone gives bitwise-equal gradients: tests/test_conventions.py.)

The DDP run goes through the documented launcher and script (``torchrun ... scripts/train_distributed.py``)
on 127.0.0.1 with a free port; the FSDP2 run calls the same script's main() in 2 rank processes with
torchrun's environment, forked from tests/forkserver.py (which imported torch once: ~3 s of CPU less
per rank, and no second launcher process). The model is built from its input shapes (no warm-up forward)
and wrapped at once. A few AdamW steps on 2 processes x half the batch must give the weights of one process
on the whole batch.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_distributed.py"
STEPS, GLOBAL_BATCH = 3, 8


def _script():
    spec = importlib.util.spec_from_file_location("train_distributed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, *args: str) -> tuple[dict[str, torch.Tensor], str]:
    from safetensors.torch import load_file

    out = tmp_path / "weights.safetensors"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), "--device", "cpu", "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH),
        "--save", str(out), *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 processes on a 2-core machine
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return load_file(str(out)), proc.stdout


@pytest.fixture(scope="module")
def single_process() -> dict[str, torch.Tensor]:
    """The reference: one process, the whole batch, the same steps."""
    script = _script()
    model = script.build_model()
    script.train(model, STEPS, GLOBAL_BATCH)
    return script.full_state_dict(model)


def _noise_gradient(name: str) -> bool:
    """Parameters whose gradient is mathematically zero (tests/goldens.is_structurally_zero): they hold
    rounding noise, which differs with the summation order (two halves vs the whole batch), and Adam
    normalises it, so their updates are noise of size up to lr."""
    return name.endswith("key.bias") or ("TokenFuser" in name and name.endswith(".Dense_0.bias")) or (
        "TokenLearnerModuleV11" in name and name.endswith("token_masking.Dense_1.bias")
    )


def _assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    diffs = {k: float((got[k] - want[k]).abs().max()) for k in want}
    real = {k: d for k, d in diffs.items() if not _noise_gradient(k)}
    worst = max(real, key=real.get)
    assert real[worst] <= 1e-6, f"max weight difference to one process: {real[worst]:.3g} ({worst})"
    assert len(real) > 0.9 * len(diffs)
    moved = max(float((want[k] - initial[k]).abs().max()) for k in want)
    assert moved > 1e-3  # the steps changed the weights, so the comparison means something


@pytest.fixture(scope="module")
def initial() -> dict[str, torch.Tensor]:
    script = _script()
    return script.full_state_dict(script.build_model())


@pytest.mark.skipif(not dist.is_available(), reason="this torch build has no torch.distributed")
def test_ddp_two_processes_equal_one_process(tmp_path, single_process, initial):
    weights, stdout = _torchrun(tmp_path, "--strategy", "ddp")
    assert "ddp: 2 processes, 3 steps" in stdout
    _assert_same_weights(weights, single_process, initial)


def _has_fully_shard() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401  (torch >= 2.6)
    except ImportError:
        return False
    return dist.is_available()


@pytest.mark.skipif(not _has_fully_shard(), reason="torch.distributed.fsdp.fully_shard (FSDP2) needs torch >= 2.6")
def test_fsdp2_two_processes_equal_one_process(tmp_path, single_process, initial):
    from safetensors.torch import load_file
    from test_training_distributed import launch

    out = tmp_path / "weights.safetensors"
    launch("script", tmp_path, args=("--device", "cpu", "--steps", str(STEPS), "--global-batch", str(GLOBAL_BATCH),
                                     "--save", str(out), "--strategy", "fsdp2", "--checkpointing"), timeout=300)  # fmt: skip
    weights, stdout = load_file(str(out)), (tmp_path / "log0.txt").read_text()
    assert "fsdp2: 2 processes, 3 steps" in stdout
    _assert_same_weights(weights, single_process, initial)
