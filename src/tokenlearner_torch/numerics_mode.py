"""The one switch that changes the port's numbers: how LayerNorm computes its statistics.

``"fused"`` (default): torch's fused LayerNorm (``F.layer_norm``), statistics in float32 for float16 /
bfloat16 inputs, as Flax computes them. One graph, no data-dependent branch, no host sync; it exports
(``torch.export``, ONNX), traces and compiles. On well-conditioned inputs it is within ~1e-6 of Flax; on
inputs whose mean is large against their spread it is *closer to the exact LayerNorm* than Flax (Flax's
``E[x²] - E[x]²`` cancels; docs/numerics.md, "Numerics").

``"xla_cpu"`` (opt-in, for bit-level studies): Flax's formula summed in XLA:CPU's order
(:mod:`tokenlearner_torch.flax_numerics`), which reproduces jitted Flax's statistics bit for bit on the
measured platforms (jaxlib 0.10, x86-64 AVX2 or AVX-512), rounding noise included. It is 5-10x slower in eager mode,
branches on shapes (XLA's YNNPACK threshold) and uses ``nextafter``, which ONNX has no function for.

    with tokenlearner_torch.numerics("xla_cpu"):
        out = model(x)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["NUMERICS", "numerics", "set_layer_norm_numerics", "get_layer_norm_numerics"]

NUMERICS = ("fused", "xla_cpu")
_current = "fused"


def _check(mode: str) -> str:
    if mode not in NUMERICS:
        raise ValueError(f"unknown LayerNorm numerics {mode!r}; expected one of {', '.join(map(repr, NUMERICS))}")
    return mode


def get_layer_norm_numerics() -> str:
    """The LayerNorm numerics now in force: ``"fused"`` or ``"xla_cpu"``."""
    return _current


def set_layer_norm_numerics(mode: str) -> str:
    """Sets the LayerNorm numerics for every module (process-wide); returns the previous mode."""
    global _current
    previous, _current = _current, _check(mode)
    return previous


@contextlib.contextmanager
def numerics(mode: str) -> Iterator[None]:
    """``with numerics("xla_cpu"): ...`` runs LayerNorms in that mode and restores the previous one on exit.

    A compiled or exported graph keeps the mode it was captured with (``torch.compile`` recompiles when the
    mode changes, since the mode is a Python global it guards on).
    """
    previous = set_layer_norm_numerics(mode)
    try:
        yield
    finally:
        set_layer_norm_numerics(previous)
