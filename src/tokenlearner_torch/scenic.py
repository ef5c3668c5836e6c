"""``from_scenic``: a PyTorch module from a Scenic class name and its constructor kwargs."""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Optional, Sequence

from torch import nn

from .config_check import check_constructor_kwargs
from .conventions import SCENIC_NAMES, scenic_fields
from .errors import ConfigError
from .layers import AddPositionEmbs, Encoder1DBlock, MlpBlock
from .models import EncoderMod, EncoderModFuser, TokenLearnerViT, TokenLearnerViTRepresentation
from .shapes import build_parameters
from .token_learner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11

__all__ = ["from_scenic", "SCENIC_CLASSES"]

# Scenic's module path -> the port (the names: conventions.SCENIC_NAMES). Short names are the last component.
SCENIC_CLASSES: dict[str, type[nn.Module]] = {
    SCENIC_NAMES[cls.__name__]: cls
    for cls in (
        TokenLearnerModule, TokenLearnerModuleV11, TokenFuser, EncoderMod, EncoderModFuser, TokenLearnerViT,
        TokenLearnerViTRepresentation, Encoder1DBlock, AddPositionEmbs, MlpBlock,
    )
}  # fmt: skip
_SHORT = {name.rsplit(".", 1)[1]: cls for name, cls in SCENIC_CLASSES.items()}
# Scenic fields that hold initialisers or functions: not expressible in a config.json, not accepted.
_SCENIC_ONLY = {"AddPositionEmbs": {"posemb_init"}}


def _resolve(scenic_class: str) -> type[nn.Module]:
    if scenic_class in SCENIC_CLASSES:
        return SCENIC_CLASSES[scenic_class]
    if scenic_class in _SHORT:
        return _SHORT[scenic_class]
    known = ", ".join(sorted(_SHORT))
    raise ConfigError(f"unknown Scenic class {scenic_class!r}; expected one of {known} (short or dotted name)")


# The constructor parameters that are Scenic fields (keyword-only ones are the port's own extras).
_scenic_parameters = scenic_fields


def from_scenic(
    scenic_class: str,
    constructor_kwargs: Mapping[str, Any],
    input_shapes: Optional[Sequence[Sequence[int]]] = None,
) -> nn.Module:
    """Builds the port of a Scenic module from its class name and kwargs as a golden ``config.json`` has them.

    ``scenic_class``: short (``'TokenLearnerViT'``) or dotted (``'scenic.projects.token_learner.model.
    TokenLearnerViT'``). ``constructor_kwargs``: Scenic's fields, with ``tokenizer`` as a nested dict (or an
    ml_collections ConfigDict) and ``dtype`` as a string (``'float32'``, ``'bfloat16'``).

    The module is returned in ``eval()`` mode, which is Scenic's deterministic mode (``train=False``), so
    ``model(inputs)`` computes what Scenic's ``apply`` computes; call ``.train()`` for dropout.
    Its forward takes Scenic's positional inputs: ``model(inputs)``, ``model(inputs, original)``, ``model(x)``.

    ``input_shapes``: the shape of each of those inputs without the batch axis, in Scenic's call order
    (``[(224, 224, 3)]`` for a ViT, ``[(8, 768), (196, 768)]`` for TokenFuser). Given it, every parameter
    exists on return, drawn from Scenic's initialisers (:mod:`tokenlearner_torch.shapes`); without it,
    parameters whose size comes from the input are created by the first call or by ``load_state_dict``.
    """
    cls = _resolve(scenic_class)
    if not isinstance(constructor_kwargs, Mapping):
        raise ConfigError(f"constructor_kwargs must be a dict, got {type(constructor_kwargs).__name__}")
    params = _scenic_parameters(cls)
    # Unknown fields (and unknown tokenizer fields) name the closest known one: the one checker.
    check_constructor_kwargs(cls, constructor_kwargs)
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    absent = [n for n in required if n not in constructor_kwargs]
    if absent:
        raise ConfigError(f"{cls.__name__}: missing required argument(s) {', '.join(absent)}")
    model = cls(**dict(constructor_kwargs))
    if input_shapes is not None:
        build_parameters(model, input_shapes)
    return model.eval()
