"""Creating every parameter of a model from its input shapes, as Flax's ``init`` does, without data.

Why a shape pass and not shape arithmetic: the sizes that a Scenic module infers (position-embedding
length after the patch embedding, frame sampling and 3-D convolution; TokenFuser's token-axis Dense; the
TokenLearner's channels) are exactly what one forward call computes, so the parameters are created by the
same code that later checks them: one batch-1 forward on zeros, in ``eval()`` mode (no dropout draws),
under ``no_grad`` and outside ``inference_mode``, on the device the model is being built on (a
``torch.device('meta')`` build costs nothing).

Random numbers: parameters whose shapes the constructor knows are drawn at construction, in construction
order; the others are drawn by that pass in the order the forward call reaches them, each from Scenic's
initialiser. This is the order a lazy model draws them in on its first call, so ``torch.manual_seed(s)``
then building with ``input_shape`` gives the same parameters as building without it and calling the model.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .errors import ConfigError, ShapeError

__all__ = ["build_parameters", "lazy_parameter_names"]


def lazy_parameter_names(module: nn.Module) -> list[str]:
    """The names of the parameters of ``module`` that have no shape yet."""
    return [n for n, p in module.named_parameters() if isinstance(p, nn.UninitializedParameter)]


def _shape(s: object, i: int, who: str) -> tuple[int, ...]:
    try:
        dims = tuple(s)  # type: ignore[arg-type]
    except TypeError:
        dims = None
    if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ConfigError(f"{who}: input shape {i} must be a sequence of positive ints without the batch axis, got {s!r}")
    return dims


def build_parameters(module: nn.Module, input_shapes: Sequence[Sequence[int]]) -> nn.Module:
    """Creates every lazy parameter of ``module`` for inputs of ``input_shapes`` (one per forward argument,
    in order, each without the batch axis, in the layout ``forward`` takes). Returns ``module``."""
    who = type(module).__name__
    if isinstance(input_shapes, (str, bytes)) or not isinstance(input_shapes, Sequence) or not input_shapes:
        raise ConfigError(f"{who}: input_shapes must be a list of shapes, one per input, got {input_shapes!r}")
    if all(isinstance(d, int) for d in input_shapes):
        raise ConfigError(
            f"{who}: input_shapes is a list of shapes, one per input; got one shape {tuple(input_shapes)}: "
            f"pass [{tuple(input_shapes)}]"
        )
    shapes = [_shape(s, i, who) for i, s in enumerate(input_shapes)]
    if lazy_parameter_names(module):
        ref = next((p for p in module.parameters() if not isinstance(p, nn.UninitializedParameter)), None)
        device = ref.device if ref is not None else torch.empty(0).device
        training = module.training
        module.eval()
        try:
            with torch.inference_mode(False), torch.no_grad():
                module(*(torch.zeros((1, *s), device=device) for s in shapes))
        except (ShapeError, RuntimeError, TypeError) as exc:
            msg = " ".join(str(exc).split())[:300]
            raise ShapeError(f"{who}: input shapes {[list(s) for s in shapes]} do not fit the model: {msg}") from None
        finally:
            module.train(training)
    left = lazy_parameter_names(module)
    if left:  # a branch the shape pass did not reach
        raise ShapeError(f"{who}: input shapes {[list(s) for s in shapes]} left {', '.join(left)} without a shape")
    return module
