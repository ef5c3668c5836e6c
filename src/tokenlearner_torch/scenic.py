"""``from_scenic``: a PyTorch module from a Scenic class name and its constructor kwargs."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from torch import nn

from . import layers, models, token_learner  # noqa: F401  (defining the classes fills conventions' registry)
from .conventions import SCENIC_NAMES, port_class, port_classes, scenic_fields
from .folder import build_module
from .shapes import build_parameters

__all__ = ["from_scenic", "SCENIC_CLASSES"]

# Scenic's module path -> the port: conventions' registry, complete once the three modules above are imported
# (the names: conventions.SCENIC_NAMES). Short names are the last component.
SCENIC_CLASSES: dict[str, type[nn.Module]] = port_classes()
assert set(SCENIC_CLASSES) == set(SCENIC_NAMES.values()), "a port class is missing from the registry"
# Scenic fields that hold initialisers or functions: not expressible in a config.json, not accepted.
_SCENIC_ONLY = {"AddPositionEmbs": {"posemb_init"}}


def _resolve(scenic_class: str) -> type[nn.Module]:
    cls = port_class(scenic_class)  # ConfigError naming the known classes for an unknown name
    assert cls is not None  # every port module is imported above
    return cls


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
    # The checks (a mapping, unknown fields naming the closest known one, required fields): the one builder.
    model = build_module(_resolve(scenic_class), constructor_kwargs)
    if input_shapes is not None:
        build_parameters(model, input_shapes)
    return model.eval()
