"""Loading the genuine-Scenic training cases in tests/fixtures/train_goldens (format: its README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_GOLDENS = Path(__file__).parent / "fixtures" / "train_goldens"
TRAIN_CASES: list[str] = json.loads((TRAIN_GOLDENS / "index.json").read_text())["cases"]


def read_tree(path: Path) -> dict:
    from tokenlearner_torch.weights_convert.readers import read_checkpoint

    return read_checkpoint(path)


def read_raw_msgpack(path: Path) -> Any:
    import msgpack

    from tokenlearner_torch.weights_convert import msgpack_io

    return msgpack.unpackb(path.read_bytes(), ext_hook=msgpack_io.ext_hook, raw=False)


@dataclass
class TrainCase:
    name: str

    @property
    def dir(self) -> Path:
        return TRAIN_GOLDENS / self.name

    @cached_property
    def meta(self) -> dict[str, Any]:
        return json.loads((self.dir / "config.json").read_text())

    @property
    def config(self) -> dict[str, Any]:
        return self.meta["config"]

    @property
    def dataset_meta_data(self) -> dict[str, Any]:
        return self.meta["dataset_meta_data"]

    @property
    def is_surgery(self) -> bool:
        return bool(self.meta.get("surgery"))

    @cached_property
    def steps(self) -> list[dict[str, Any]]:
        return json.loads((self.dir / "steps.json").read_text())["steps"]

    @property
    def noise_sensitive(self) -> set[str]:
        return set(self.meta["rounding_sensitivity"]["noise_sensitive_params (err > 1e-5)"])

    def tree(self, name: str) -> dict:
        return read_tree(self.dir / f"{name}.msgpack")

    def batch(self, k: int) -> dict[str, np.ndarray]:
        data = np.load(self.dir / "batches.npz")
        batch = {"inputs": data[f"inputs_{k}"], "label": data[f"label_{k}"]}
        if f"batch_mask_{k}" in data.files:
            batch["batch_mask"] = data[f"batch_mask_{k}"]
        return batch

    @cached_property
    def opt_state(self) -> Any:
        return read_raw_msgpack(self.dir / "opt_state_final.msgpack")
