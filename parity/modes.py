"""Precision modes of the parity harness: what each side computes in, and the tolerance.

Both frameworks' precision is pinned explicitly inside :func:`precision` and restored afterwards:

* JAX: ``jax_enable_x64`` and ``jax_default_matmul_precision`` (which also governs convolutions);
* torch: the TF32 switches for CUDA matmuls and cuDNN convolutions (``torch.backends.cuda.matmul``,
  ``torch.backends.cudnn``; the ``fp32_precision`` API where it exists, else ``allow_tf32``) and
  ``torch.set_float32_matmul_precision``.

JAX is touched only when the caller says so (``check`` never imports jax).

Tolerances are on the scaled error ``max|port - ref| / max(1, max|ref|)`` (see :mod:`.compare`):

======  =====================================================  ===========  ===================================
mode    computation                                            tolerance    why
======  =====================================================  ===========  ===================================
f64     both sides float64 (torch ``.double()``, JAX x64,      1e-10        float64 rounding is ~1e-16 per op, so
        Scenic ``dtype`` float64)                                           parity lands at ~1e-14; any semantic slip
                                                                            (LayerNorm eps, gelu form, head order,
                                                                            padding) is >= 1e-7. Structural check.
f32     float32, full-precision matmuls/convs                  1e-4         float32 noise of these models is
        (JAX 'highest', torch TF32 off)                                     ~1e-6..1e-5 (eager vs jit JAX alone
                                                                            differ by ~1e-5); 1e-4 leaves headroom
                                                                            over depth and for gradients.
tf32    CUDA: TF32 matmuls and convs on both sides             1e-2 (CUDA)  TF32 keeps 10 mantissa bits: ~1e-3
        (JAX 'tensorfloat32', torch TF32 on).                  1e-4 (CPU)   relative per GEMM, accumulating over
        CPU has no TF32: identical to f32.                                  depth. On CPU it is f32.
bf16    Scenic's ``dtype='bfloat16'`` on both sides: the       3e-2 (CPU),  bfloat16 keeps 8 mantissa bits
        encoder blocks (LayerNorm, attention, MLP) compute     5e-2 (CUDA), (~4e-3 relative per rounding); both
        in bfloat16, embedding / TokenLearner / TokenFuser /   grads x10/3  sides round at the same places but in
        heads and the output stay float32. Matmuls 'highest'.               different kernels. On an H100 a
                                                                            LayerNorm of a bf16 block output
                                                                            reached 3.2e-2 (4 bf16 ulps; outputs
                                                                            <= 1.5e-2), with XLA's excess
                                                                            precision on or off alike.
======  =====================================================  ===========  ===================================
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

__all__ = ["MODES", "Mode", "get_mode", "precision", "torch_settings"]


@dataclass(frozen=True)
class Mode:
    name: str
    #: Scenic ``dtype`` for the Flax side / the port (None: leave the config's dtype alone).
    flax_dtype: str
    torch_dtype: str
    #: the dtype the inputs, params and outputs are held in
    array_dtype: str
    jax_x64: bool
    jax_matmul_precision: str
    torch_tf32: bool
    tol_cpu: float
    tol_cuda: float
    why: str
    #: gradients: this multiple of the tolerance (bf16: the backward pass rounds again and sums over tokens)
    grad_factor: float = 1.0

    def tolerance(self, device: str = "cpu") -> float:
        return self.tol_cuda if str(device).startswith("cuda") else self.tol_cpu

    def grad_tolerance(self, device: str = "cpu") -> float:
        return self.tolerance(device) * self.grad_factor


MODES: dict[str, Mode] = {
    "f64": Mode(
        "f64", "float64", "float32", "float64", True, "highest", False, 1e-10, 1e-10,
        "float64 on both sides: rounding ~1e-16/op, any semantic slip >= 1e-7",
    ),
    "f32": Mode(
        "f32", "float32", "float32", "float32", False, "highest", False, 1e-4, 1e-4,
        "float32, TF32 off on both sides: noise ~1e-6..1e-5",
    ),
    "tf32": Mode(
        "tf32", "float32", "float32", "float32", False, "tensorfloat32", True, 1e-4, 1e-2,
        "TF32 matmuls/convs on CUDA (~1e-3 relative per GEMM); on CPU the same as f32",
    ),
    "bf16": Mode(
        "bf16", "bfloat16", "bfloat16", "float32", False, "highest", False, 3e-2, 5e-2,
        "Scenic dtype=bfloat16: encoder blocks in bfloat16 (8 mantissa bits)", grad_factor=10 / 3,
    ),
}


def get_mode(name: str) -> Mode:
    try:
        return MODES[name]
    except KeyError:
        raise ValueError(f"unknown mode {name!r}; expected one of {', '.join(MODES)}") from None


# ------------------------------------------------------------------------------------------------------
# torch
# ------------------------------------------------------------------------------------------------------
def _torch_new_api() -> bool:
    import torch

    return hasattr(torch.backends.cuda.matmul, "fp32_precision") and hasattr(torch.backends.cudnn, "conv")


def torch_settings() -> dict[str, Any]:
    """The torch precision switches now in force (new API names where it exists)."""
    import torch

    out: dict[str, Any] = {"torch.float32_matmul_precision": torch.get_float32_matmul_precision()}
    if _torch_new_api():
        out["torch.cuda.matmul.fp32_precision"] = torch.backends.cuda.matmul.fp32_precision
        out["torch.cudnn.conv.fp32_precision"] = torch.backends.cudnn.conv.fp32_precision
    else:
        out["torch.cuda.matmul.allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
        out["torch.cudnn.allow_tf32"] = torch.backends.cudnn.allow_tf32
    return out


def _set_torch(tf32: bool) -> None:
    import torch

    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    if _torch_new_api():
        value = "tf32" if tf32 else "ieee"
        torch.backends.cuda.matmul.fp32_precision = value
        torch.backends.cudnn.conv.fp32_precision = value
        if hasattr(torch.backends, "mkldnn") and hasattr(torch.backends.mkldnn, "matmul"):
            # CPU matmuls stay full float32 in every mode (there is no TF32 on CPU to compare with).
            torch.backends.mkldnn.matmul.fp32_precision = "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32


@contextlib.contextmanager
def _torch_precision(tf32: bool) -> Iterator[None]:
    import torch

    saved_prec = torch.get_float32_matmul_precision()
    if _torch_new_api():
        mk = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        saved = (
            torch.backends.cuda.matmul.fp32_precision,
            torch.backends.cudnn.conv.fp32_precision,
            getattr(mk, "fp32_precision", None),
        )
    else:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, None)
    _set_torch(tf32)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved_prec)
        if _torch_new_api():
            torch.backends.cuda.matmul.fp32_precision = saved[0]
            torch.backends.cudnn.conv.fp32_precision = saved[1]
            if saved[2] is not None:
                torch.backends.mkldnn.matmul.fp32_precision = saved[2]
        else:
            torch.backends.cuda.matmul.allow_tf32 = saved[0]
            torch.backends.cudnn.allow_tf32 = saved[1]


# ------------------------------------------------------------------------------------------------------
# JAX
# ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _jax_precision(mode: Mode) -> Iterator[None]:
    import jax

    saved_x64 = bool(jax.config.jax_enable_x64)
    saved_prec = jax.config.jax_default_matmul_precision
    jax.config.update("jax_enable_x64", mode.jax_x64)
    jax.config.update("jax_default_matmul_precision", mode.jax_matmul_precision)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", saved_x64)
        jax.config.update("jax_default_matmul_precision", saved_prec)


@contextlib.contextmanager
def precision(mode: Mode | str, *, use_jax: bool = False, layer_norm: str | None = None) -> Iterator[dict[str, Any]]:
    """Pin both frameworks' precision for ``mode``; restore the previous settings on exit.

    Yields the settings in force (for the report). ``use_jax=False`` leaves jax unimported. ``layer_norm``:
    the port's LayerNorm numerics (``"fused"`` or ``"xla_cpu"``, see ``tokenlearner_torch.numerics``); None
    keeps the one in force, so ``with tokenlearner_torch.numerics("xla_cpu"): parity.live(...)`` selects it
    too. The report records which one ran.
    """
    from tokenlearner_torch.numerics_mode import get_layer_norm_numerics, numerics

    mode = get_mode(mode) if isinstance(mode, str) else mode
    with contextlib.ExitStack() as stack:
        stack.enter_context(_torch_precision(mode.torch_tf32))
        if layer_norm is not None:
            stack.enter_context(numerics(layer_norm))
        settings = torch_settings()
        settings["tokenlearner.layer_norm_numerics"] = get_layer_norm_numerics()
        if use_jax:
            stack.enter_context(_jax_precision(mode))
            import jax

            settings["jax_enable_x64"] = bool(jax.config.jax_enable_x64)
            settings["jax_default_matmul_precision"] = jax.config.jax_default_matmul_precision
        yield settings
