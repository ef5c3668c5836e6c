"""Loading the genuine-Scenic golden cases in tests/fixtures/goldens (format: its README.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"
CASES: list[str] = json.loads((GOLDENS / "index.json").read_text())["cases"]

@dataclass
class Golden:
    name: str

    @property
    def dir(self) -> Path:
        return GOLDENS / self.name

    @cached_property
    def config(self) -> dict[str, Any]:
        return json.loads((self.dir / "config.json").read_text())

    @cached_property
    def params(self) -> dict:
        from tokenlearner_torch.weights_convert.readers import read_checkpoint

        return read_checkpoint(self.dir / "params.msgpack")

    @cached_property
    def inputs(self) -> list[np.ndarray]:
        data = np.load(self.dir / "inputs.npz")
        return [data[spec["name"]] for spec in self.config["inputs"]]

    @property
    def input_names(self) -> list[str]:
        return [spec["name"] for spec in self.config["inputs"]]

    @cached_property
    def cotangent(self) -> np.ndarray:
        return np.load(self.dir / "inputs.npz")["cotangent"]

    @cached_property
    def outputs(self) -> dict[str, np.ndarray]:
        data = np.load(self.dir / "outputs.npz")
        return {k: data[k] for k in data.files}

    @cached_property
    def grads(self) -> dict[str, np.ndarray]:
        data = np.load(self.dir / "grads.npz")
        return {k: data[k] for k in data.files}


def scaled_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max(1, max |reference|): the tolerance measure of the project."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, (actual.shape, reference.shape)
    if reference.size == 0:
        return 0.0
    return float(np.abs(actual - reference).max() / max(1.0, np.abs(reference).max()))


def is_structurally_zero(grad_key: str, golden: "Golden") -> bool:
    """Gradients that are mathematically zero, whose stored values are rounding noise (SCENIC_BEHAVIOUR.md)."""
    cls = golden.config["scenic_class"].rsplit(".", 1)[-1]
    kwargs = golden.config["constructor_kwargs"]
    if grad_key.endswith("MultiHeadDotProductAttention_0/key/bias"):
        return True  # softmax over keys is shift invariant
    in_v11 = "TokenLearnerModuleV11" in grad_key or cls == "TokenLearnerModuleV11"
    if in_v11 and grad_key.endswith("token_masking/Dense_1/bias"):
        return True  # softmax over positions is shift invariant
    # EncoderModFuser's fusers always normalise; a standalone TokenFuser does unless told otherwise.
    normalised_fuser = "TokenFuser" in grad_key or (cls == "TokenFuser" and kwargs.get("use_normalization", True))
    return normalised_fuser and grad_key.endswith("/Dense_0/bias") and "token_masking" not in grad_key
