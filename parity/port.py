"""The PyTorch side of the harness: build the port, load Flax weights through the converter, run the
inputs, capture every intermediate (in execution order) and every gradient. No jax needed."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.scenic import SCENIC_CLASSES
from tokenlearner_torch.weights_convert import flax_to_torch, torch_to_flax
from tokenlearner_torch.weights_convert.mapping import flatten_tree

from .modes import Mode

__all__ = ["PortResult", "has_dtype_option", "build_port", "run_port"]


def _port_class(scenic_class: str) -> type[torch.nn.Module] | None:
    if scenic_class in SCENIC_CLASSES:
        return SCENIC_CLASSES[scenic_class]
    short = scenic_class.rsplit(".", 1)[-1]
    for name, cls in SCENIC_CLASSES.items():
        if name.rsplit(".", 1)[-1] == short:
            return cls
    return None


def has_dtype_option(scenic_class: str) -> bool:
    """Whether the Scenic class has a ``dtype`` field (the ViTs, encoders, Encoder1DBlock, MlpBlock)."""
    cls = _port_class(scenic_class)
    return cls is not None and "dtype" in inspect.signature(cls.__init__).parameters


def mode_kwargs(scenic_class: str, kwargs: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """``kwargs`` with Scenic's ``dtype`` set to ``dtype`` where the class has the option."""
    out = dict(kwargs)
    if has_dtype_option(scenic_class):
        out["dtype"] = dtype
    return out


@dataclass
class PortResult:
    out: np.ndarray
    intermediates: dict[str, np.ndarray]
    order: list[str]
    grads: dict[str, np.ndarray]


def _np(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.float()
    return t.numpy()


def build_port(scenic_class: str, constructor_kwargs: Mapping[str, Any], params: Mapping[str, Any], mode: Mode,
               device: str = "cpu") -> torch.nn.Module:
    """The port in eval mode with the Flax ``params`` loaded through the converter, in the mode's dtype."""
    model = tl.from_scenic(scenic_class, mode_kwargs(scenic_class, constructor_kwargs, mode.torch_dtype))
    state = flax_to_torch(model, params)
    model.load_state_dict(state, strict=True)  # materialises lazy parameters (float32)
    if mode.array_dtype == "float64":
        model.double()
        model.load_state_dict(state, strict=True)  # again: keep float64 values of a float64 case exact
    return model.to(device).eval()


def run_port(
    scenic_class: str,
    constructor_kwargs: Mapping[str, Any],
    params: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    cotangent: np.ndarray | None,
    mode: Mode,
    device: str = "cpu",
) -> PortResult:
    """Run the port on ``inputs`` (name -> array, in call order). Gradients of
    ``loss = sum(out * cotangent)`` (in float32, float64 in mode f64) when ``cotangent`` is given, keyed
    ``params/<flax path>`` and ``input/<name>`` like grads.npz."""
    model = build_port(scenic_class, constructor_kwargs, params, mode, device)
    dtype = torch.float64 if mode.array_dtype == "float64" else torch.float32
    want_grad = cotangent is not None
    xs = [
        torch.tensor(np.asarray(a), dtype=dtype, device=device).requires_grad_(want_grad) for a in inputs.values()
    ]
    with torch.set_grad_enabled(want_grad):
        out, inter = tl.capture_intermediates(model, *xs)
    grads: dict[str, np.ndarray] = {}
    if want_grad:
        cot = torch.tensor(np.asarray(cotangent), dtype=dtype, device=device)
        (out.to(dtype) * cot).sum().backward()
        named = {k: (p.grad if p.grad is not None else torch.zeros_like(p)) for k, p in model.named_parameters()}
        flat = flatten_tree(torch_to_flax(model, named))
        grads = {f"params/{k}": np.asarray(v) for k, v in flat.items()}
        grads.update({f"input/{n}": _np(x.grad) for n, x in zip(inputs, xs)})
    return PortResult(_np(out), {k: _np(v) for k, v in inter.items()}, list(inter), grads)
