"""The one-line speed recipe of every benchmark cell: which ``torch.compile`` call each column runs.

One named place for these choices: ``bench_speed.py`` builds its "compiled" and "CUDA graphs" columns from
:func:`recipe` and prints each recipe's line under the table, so what was timed is what a user pastes.

===========  ==========  ============  ==================================================================
device       workload    column        recipe (why)
===========  ==========  ============  ==================================================================
cpu          inference   compiled      ``torch.compile(model, fullgraph=True, dynamic=False,
                                       options={"freezing": True})``: inductor freezing folds the
                                       parameters into constants (PyTorch's own advice for CPU inference).
                                       The Dense GEMMs stay oneDNN calls of ``tokenlearner::linear``
                                       (cpu_gemm), with or without freezing (B/16 batch 1: 148.7 vs 148.0
                                       ms); without the custom op, freezing packed them for MKL, slower on
                                       the CI machine's AMD EPYC.
cpu          training    compiled      ``torch.compile(model, fullgraph=True, dynamic=False)``: freezing is
                                       inference-only (parameters change every step); AOTAutograd compiles
                                       the backward too (the GEMMs: ``tokenlearner::linear`` and its
                                       oneDNN input gradient).
cuda         inference   compiled      ``torch.compile(model, fullgraph=True, dynamic=False)``
cuda         inference   CUDA graphs   ``torch.compile(model, fullgraph=True, dynamic=False,
                                       mode="reduce-overhead")``: one graph launch per call instead of one
                                       launch per kernel, what small batches and bf16 need (issue 11: eager
                                       bf16 batch 8 is launch-bound).
cuda         training    compiled      as cuda inference
cuda         training    CUDA graphs   as cuda inference; the backward is captured too (cudagraph trees).
===========  ==========  ============  ==================================================================

The optimiser step of the "full step" rows runs eagerly after the compiled forward + backward in every
column (``torch.optim.AdamW(..., fused=True)``: one fused kernel over all parameters, nothing to compile).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

__all__ = ["Recipe", "recipe", "COLUMNS"]

#: The columns that a recipe builds, besides "eager" (the module as is) and "flax" (Scenic under jax.jit).
COLUMNS = ("compiled", "cudagraphs")


@dataclass(frozen=True)
class Recipe:
    column: str
    #: the exact line a user writes (printed under the benchmark's table)
    line: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def apply(self, model: torch.nn.Module, backend: Optional[str] = None) -> Any:
        """``torch.compile(model, **kwargs)``; ``backend`` overrides inductor (the smoke test uses aot_eager)."""
        kwargs = dict(self.kwargs)
        if backend is not None:
            kwargs["backend"] = backend
            kwargs.pop("options", None)  # inductor options mean nothing to another backend
            kwargs.pop("mode", None)
        return torch.compile(model, **kwargs)


_BASE = dict(fullgraph=True, dynamic=False)
_BASE_LINE = "torch.compile(model, fullgraph=True, dynamic=False"

_RECIPES: dict[tuple[str, str, str], Recipe] = {
    ("cpu", "infer", "compiled"): Recipe(
        "compiled", _BASE_LINE + ', options={"freezing": True})', {**_BASE, "options": {"freezing": True}}
    ),
    ("cpu", "train", "compiled"): Recipe("compiled", _BASE_LINE + ")", dict(_BASE)),
    ("cuda", "infer", "compiled"): Recipe("compiled", _BASE_LINE + ")", dict(_BASE)),
    ("cuda", "train", "compiled"): Recipe("compiled", _BASE_LINE + ")", dict(_BASE)),
    ("cuda", "infer", "cudagraphs"): Recipe(
        "cudagraphs", _BASE_LINE + ', mode="reduce-overhead")', {**_BASE, "mode": "reduce-overhead"}
    ),
    ("cuda", "train", "cudagraphs"): Recipe(
        "cudagraphs", _BASE_LINE + ', mode="reduce-overhead")', {**_BASE, "mode": "reduce-overhead"}
    ),
}


def recipe(device: str, workload: str, column: str) -> Optional[Recipe]:
    """The recipe of one cell, or None where the column does not exist (CUDA graphs on a CPU).

    ``device``: 'cpu' or 'cuda'; ``workload``: 'infer' or 'train' (forward + backward and the full step).
    """
    if workload not in ("infer", "train") or column not in COLUMNS:
        raise ValueError(f"recipe: workload must be 'infer' or 'train' and column one of {COLUMNS}, "
                         f"got {workload!r}, {column!r}")
    return _RECIPES.get(("cuda" if str(device).startswith("cuda") else "cpu", workload, column))
