"""Loading the genuine-Scenic ``train()`` runs in tests/fixtures/loop_goldens (format: its README.md)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

LOOP_GOLDENS = Path(__file__).parent / "fixtures" / "loop_goldens"
LOOP_CASES = ("public_loop", "public_pmap2")


def scaled_error(a: np.ndarray, ref: np.ndarray) -> float:
    """``max|a - ref| / max(1, max|ref|)``: the parameter comparison of every training golden."""
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max()))) if ref.size else 0.0


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flat(v, path))
        else:
            out[path] = v
    return out


@dataclass
class LoopCase:
    name: str

    @property
    def dir(self) -> Path:
        return LOOP_GOLDENS / self.name

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.dir / "config.json").read_text())

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.meta["config"]))  # a fresh copy

    @cached_property
    def batches(self) -> dict[str, np.ndarray]:
        with np.load(self.dir / "batches.npz") as z:
            return {k: z[k] for k in z.files}

    @cached_property
    def eval_batches(self) -> dict[str, np.ndarray]:
        with np.load(self.dir / "eval_batches.npz") as z:
            return {k: z[k] for k in z.files}

    def train_batch(self, k: int, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
        """The batch of step ``k + 1`` (this process's rows of the global batch)."""
        return _shard(self.batches, k, rank, world)

    def eval_batch(self, j: int, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
        return _shard(self.eval_batches, j % self.meta["eval_batches"], rank, world)

    def dataset(self, rank: int = 0, world: int = 1) -> "GoldenDataset":
        return GoldenDataset(self, rank, world)

    def workdir(self, tmp: Path, start: str = "workdir_step0") -> Path:
        """A fresh workdir holding the case's ``workdir_step0`` (or ``ckpt_mid``) checkpoint."""
        wd = tmp / f"{self.name}_{start}"
        shutil.copytree(self.dir / start, wd)
        for p in wd.iterdir():
            p.chmod(0o644)
        return wd

    def read(self, name: str) -> dict:
        from tokenlearner_torch.training.checkpoint import read_train_state
        from tokenlearner_torch.weights_convert import msgpack_io

        path = self.dir / name
        if name.endswith(".msgpack"):
            return msgpack_io.MappedDecoder(memoryview(path.read_bytes())).unpack()
        return read_train_state(path)


class GoldenDataset:
    """Scenic's Dataset fields over the golden batches: the train iterator yields step k+1's batch, the
    validation iterator cycles through the eval batches; ``seek(step)`` as the built-in sources have it."""

    def __init__(self, case: LoopCase, rank: int = 0, world: int = 1) -> None:
        self.case, self.rank, self.world = case, rank, world
        self.meta_data = dict(case.meta["dataset_meta_data"])
        self._next = 0
        self.train_iter = self._train()
        self.valid_iter = self._valid()
        self.train_calls = 0

    def seek(self, step: int) -> None:
        self._next = step

    def _train(self) -> Iterator[dict]:
        while self._next < self.case.meta["steps"]:
            k = self._next
            self._next += 1
            self.train_calls += 1
            yield self.case.train_batch(k, self.rank, self.world)

    def _valid(self) -> Iterator[dict]:
        j = 0
        while True:
            yield self.case.eval_batch(j, self.rank, self.world)
            j += 1


class RecordingWriter:
    """clu's writer interface, recording every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.flushes = 0

    def write_scalars(self, step: int, scalars: dict) -> None:
        self.calls.append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

    def flush(self) -> None:
        self.flushes += 1


def compare_scalars(got: list[dict], want: list[dict], rtol: float = 1e-4, skip: tuple[str, ...] = ()) -> list[str]:
    """Differences between two lists of write_scalars calls (same order, steps, names; values to ``rtol``)."""
    problems = []
    if len(got) != len(want):
        problems.append(f"{len(got)} calls, expected {len(want)}: {[sorted(c) for c in got]}")
    for i, (g, w) in enumerate(zip(got, want)):
        if set(g) != set(w):
            problems.append(f"call {i}: names {sorted(g)}, expected {sorted(w)}")
            continue
        for k, v in w.items():
            if k in skip:
                continue
            if abs(g[k] - v) > rtol * abs(v) + (1e-7 if v == 0 else 0.0):
                problems.append(f"call {i} step {w['step']} {k}: {g[k]!r} vs {v!r}")
    return problems


def params_errors(port: dict, ref: dict) -> dict[str, float]:
    fp, fr = flat(port), flat(ref)
    assert set(fp) == set(fr), (sorted(set(fp) ^ set(fr)))[:5]
    return {k: scaled_error(fp[k], fr[k]) for k in fr}


def _shard(arrays: dict[str, np.ndarray], index: int, rank: int, world: int) -> dict[str, np.ndarray]:
    """Rows ``[rank*B/world, (rank+1)*B/world)`` of global batch ``index`` (Scenic's shard over devices)."""
    out = {}
    for key in ("inputs", "label", "batch_mask"):
        a = arrays[f"{key}_{index}"]
        per = a.shape[0] // world
        out[key] = a[rank * per : (rank + 1) * per]
    return out
