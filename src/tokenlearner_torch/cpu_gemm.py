"""Dense's float32 GEMM on the CPU: oneDNN's kernel instead of MKL's, forward and backward.

Why: the port's CPU time is GEMMs (84-86% of a B/16 call or training step, benchmarks/profile_step.py), and
on the CI machine kind (AMD EPYC, AVX-512) oneDNN's ``mkldnn::_linear_pointwise`` ran B/16's forward and
input-gradient GEMMs at 198-222 GFLOP/s where MKL's ``addmm``/``mm`` behind ``F.linear`` ran 133-201
(benchmarks/bench_gemm.py). Same function: another float32 summation order, within 1e-6 of the output's
scale (tests/test_linear_kernel.py).

Where it applies (:func:`linear`), for float32 CPU tensors:

- eager inference (nothing needs a gradient): a direct call, and :func:`linear_gelu` fuses Flax's tanh GELU
  into the GEMM (oneDNN post-op; a separate ``F.gelu`` pass was 4-6% of a batch-1 call);
- eager training and ``torch.compile`` (inference and training): the custom op ``tokenlearner::linear``,
  whose backward takes oneDNN for the input gradient and MKL for the weight gradient (oneDNN was not
  faster there). A compiled graph calls it as one opaque kernel.

Everything else keeps ``F.linear``: other dtypes and devices, tensor subclasses (DTensor), ``torch.export``
/ ``jit.trace`` / FX graphs (a deployed graph holds ``aten.linear``), dispatch modes (FlopCounterMode counts
``aten.linear``), torch.func transforms and forward-mode AD (the oneDNN op has neither a batching rule nor a
JVP), torch builds without oneDNN, and older torch without ``torch.library.custom_op`` and
``torch.compiler.is_exporting`` (training and compiled graphs then keep ``F.linear``). A double backward
goes through the custom op's backward built from differentiable aten ops.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils import _python_dispatch

__all__ = ["linear", "linear_gelu", "fuses_gelu", "plain_eager"]

#: oneDNN's float32 linear ``x @ weight.T + bias`` with an optional fused activation (CPU builds with oneDNN).
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

#: oneDNN post-op arguments (name, scalars, algorithm) of each activation the custom op accepts.
_POST_OPS = {"none": ("none", [], ""), "gelu_tanh": ("gelu", [], "tanh")}

#: Tensor types whose storage Dense may key a cache on or hand to oneDNN (not FX proxies, DTensors, ...).
_PLAIN = (nn.Parameter, Tensor)

# Probes that older torch versions lack: without one, the path it guards is not taken.
_FUNCTORCH_STACK = getattr(torch._C._functorch, "peek_interpreter_stack", None)


def _float32_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return (
        x.dtype == torch.float32
        and weight.dtype == torch.float32
        and (bias is None or bias.dtype == torch.float32)
        and x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dim() >= 2
        and weight.dim() == 2
    )


def _plain_types(*tensors: Optional[Tensor]) -> bool:
    """No FX proxies, DTensors or other subclasses (parameters may be nn.Parameter)."""
    return all(t is None or type(t) in _PLAIN for t in tensors)


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """Eager execution on plain tensors: no torch.compile/export, no jit tracing, no FX proxies or subclasses.

    Where Dense's inference shortcuts (its bf16 cast cache, oneDNN's GEMM) may apply; graphs keep plain ops.
    """
    return _plain_types(*tensors) and not torch.compiler.is_compiling() and not torch.jit.is_tracing()


def _plain_eager_call(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Eager, on plain tensors, with nothing that needs to see ``aten.linear`` (see the module docstring)."""
    return (
        type(x) is Tensor
        and plain_eager(weight, bias)
        and _python_dispatch._get_current_dispatch_mode() is None
        and _FUNCTORCH_STACK is not None
        and _FUNCTORCH_STACK() is None
        and _forward_ad._current_level < 0
    )


def _needs_grad(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )


def _route(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> str:
    """'direct' (eager, no gradient), 'op' (the custom op: eager training, torch.compile) or 'aten'."""
    if _ONEDNN_LINEAR is None:
        return "aten"
    if torch.compiler.is_compiling():
        # Checked first: the eager-only probes below are not traceable. Export keeps aten.linear; tensor
        # subclasses (DTensor parameters of tensor parallelism) have no rule for the custom op.
        if (
            _LINEAR_OP is None
            or torch.compiler.is_exporting()
            or type(x) is not Tensor
            or not _plain_types(weight, bias)
            or not _float32_cpu(x, weight, bias)
            or x.numel() == 0
        ):
            return "aten"
        return "op"
    # Plain tensors first: an FX proxy must not reach the dtype comparisons.
    if not (_plain_eager_call(x, weight, bias) and _float32_cpu(x, weight, bias) and x.numel() > 0):
        return "aten"
    if _needs_grad(x, weight, bias):
        return "op" if _LINEAR_OP is not None else "aten"
    return "direct"


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear`` (``x @ weight.T + bias``), by oneDNN where it applies. [..., in] -> [..., out]."""
    route = _route(x, weight, bias)
    if route == "direct":
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
    if route == "op":
        return _LINEAR_OP(x, weight, bias, "none")
    return F.linear(x, weight, bias)


def fuses_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether :func:`linear_gelu` fuses the GELU into the GEMM for these arguments (no gradient needed)."""
    route = _route(x, weight, bias)
    return route == "direct" or (route == "op" and not _needs_grad(x, weight, bias))


def linear_gelu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Flax's ``nn.gelu`` (tanh) of :func:`linear`, fused into the GEMM where nothing needs a gradient.

    [..., in] -> [..., out]. With gradients the GELU stays a separate op (its backward needs the input).
    """
    route = _route(x, weight, bias)
    if route == "direct":
        return _ONEDNN_LINEAR(x, weight, bias, "gelu", [], "tanh")
    if route == "op" and not _needs_grad(x, weight, bias):
        return _LINEAR_OP(x, weight, bias, "gelu_tanh")
    return F.gelu(linear(x, weight, bias), approximate="tanh")


# ---------------------------------------------------------------------------------------------------------
# The custom op: what autograd and torch.compile see
# ---------------------------------------------------------------------------------------------------------
def _define_ops():
    if _ONEDNN_LINEAR is None or not hasattr(torch.library, "custom_op") or not hasattr(torch.compiler, "is_exporting"):
        return None

    @torch.library.custom_op("tokenlearner::linear", mutates_args=())
    def linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], activation: str) -> Tensor:
        """oneDNN's ``activation(x @ weight.T + bias)``; activation 'none' or 'gelu_tanh'."""
        return _ONEDNN_LINEAR(x, weight, bias, *_POST_OPS[activation])

    @linear_op.register_fake
    def _(x, weight, bias, activation):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @torch.library.custom_op("tokenlearner::linear_grad_input", mutates_args=())
    def grad_input_op(grad: Tensor, weight: Tensor) -> Tensor:
        """oneDNN's ``grad @ weight``: [..., out] x [out, in] -> [..., in]."""
        return _ONEDNN_LINEAR(grad, weight.t(), None, "none", [], "")

    @grad_input_op.register_fake
    def _(grad, weight):
        return grad.new_empty((*grad.shape[:-1], weight.shape[1]))

    def setup_context(ctx, inputs, output):
        x, weight, bias, activation = inputs
        if activation != "none":
            # Only called without gradients (linear_gelu); its backward would need the pre-activation.
            ctx.activation = activation
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    def backward(ctx, grad):
        if getattr(ctx, "activation", "none") != "none":
            raise RuntimeError("tokenlearner::linear: no gradient through a fused activation")
        x, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # create_graph=True runs this with autograd on: differentiable aten ops then.
            grad_x = grad.matmul(weight) if torch.is_grad_enabled() else grad_input_op(grad, weight)
        if ctx.needs_input_grad[1]:
            grad_w = g2.t().mm(x.reshape(-1, x.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = g2.sum(0)
        return grad_x, grad_w, grad_b, None

    linear_op.register_autograd(backward, setup_context=setup_context)
    return linear_op


_LINEAR_OP = _define_ops()
