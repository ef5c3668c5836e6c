"""Flax parameter trees <-> PyTorch state dicts, by one rule per layer kind.

Module names equal Flax names, so a torch key is ``<module path>.<torch name>`` and its Flax path is
``<module path with '/'>/<flax name>``. What differs is only the layout of each kind of leaf; the table
:data:`LAYOUT_RULES` lists every kind, and a module with parameters of a kind not in the table is an error,
so nothing is converted by accident.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch
from torch import Tensor, nn

from tokenlearner_torch.errors import ConversionError
from tokenlearner_torch.layers import (
    AddPositionEmbs,
    Conv,
    Dense,
    HeadsOutput,
    HeadsProjection,
    LayerNorm,
)

from .layouts import KIND_RULES, LeafRule, flatten_tree, rule_from_flax, unflatten_tree
from .mismatch import MisshapedLeaf, ParamsMismatchError, structure_hints

__all__ = ["flax_to_torch", "torch_to_flax", "LAYOUT_RULES", "leaf_table", "rule_from_flax", "flatten_tree", "unflatten_tree"]

FlaxTree = dict  # nested dicts of numpy arrays


# The one exhaustive table of layout transforms: which layout kind (weights_convert/layouts.py) each
# module class has, most specific class first.
LAYOUT_RULES: list[tuple[type, tuple[LeafRule, ...]]] = [
    (HeadsProjection, KIND_RULES["attention_projection"]),  # attention query/key/value (Flax DenseGeneral)
    (HeadsOutput, KIND_RULES["attention_output"]),  # attention out (Flax DenseGeneral over two axes)
    (Dense, KIND_RULES["dense"]),
    (Conv, KIND_RULES["conv"]),
    (LayerNorm, KIND_RULES["layer_norm"]),
    (AddPositionEmbs, KIND_RULES["position_embedding"]),
]


@dataclass(frozen=True)
class Leaf:
    """One parameter: its torch key, its Flax path, the module holding it and the rule between them."""

    torch_key: str
    flax_path: str
    module: nn.Module
    rule: LeafRule

    @property
    def param(self) -> Tensor:
        return getattr(self.module, self.rule.torch_name)


def _rules_for(module: nn.Module) -> Optional[tuple[LeafRule, ...]]:
    for cls, rules in LAYOUT_RULES:
        if isinstance(module, cls):
            return rules
    return None


def leaf_table(model: nn.Module) -> list[Leaf]:
    """Every parameter of ``model`` with its Flax path; raises if a module's kind has no rule."""
    leaves: list[Leaf] = []
    for name, module in model.named_modules():
        own = [n for n, p in module.named_parameters(recurse=False) if p is not None]
        if not own:
            continue
        rules = _rules_for(module)
        if rules is None:
            raise ConversionError(f"no Flax layout rule for module '{name}' of type {type(module).__name__}")
        by_name = {r.torch_name: r for r in rules}
        for pname in own:
            if pname not in by_name:
                raise ConversionError(f"no Flax layout rule for parameter '{name}.{pname}'")
            torch_key = f"{name}.{pname}" if name else pname
            flax_path = "/".join([*name.split("."), by_name[pname].flax_name]) if name else by_name[pname].flax_name
            leaves.append(Leaf(torch_key, flax_path, module, by_name[pname]))
    return leaves


def _to_numpy(t: Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _to_tensor(a: np.ndarray) -> Tensor:
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:  # e.g. arrays viewing a read-only file buffer; torch wants writable memory
        a = a.copy()
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _expected_shape(leaf: Leaf) -> Optional[tuple[int, ...]]:
    p = leaf.param
    return None if isinstance(p, nn.UninitializedParameter) else tuple(p.shape)


def _expected_rank(leaf: Leaf) -> int:
    # Ranks of the torch tensor for each kind of leaf (used when the model's parameter is still lazy).
    m, name = leaf.module, leaf.rule.torch_name
    if isinstance(m, Conv) and name == "weight":
        return 2 + len(m.kernel_size)
    if isinstance(m, (Dense,)) and name == "weight":
        return 2
    if isinstance(m, AddPositionEmbs):
        return 3
    return 1


def _flax_rank(leaf: Leaf) -> int:
    m, name = leaf.module, leaf.rule.torch_name
    if isinstance(m, HeadsProjection):
        return 3 if name == "weight" else 2
    if isinstance(m, HeadsOutput) and name == "weight":
        return 3
    return _expected_rank(leaf)


def _heads_axis(leaf: Leaf) -> Optional[int]:
    """The axis of the Flax leaf that counts attention heads, if it has one."""
    if isinstance(leaf.module, HeadsProjection):
        return 1 if leaf.rule.torch_name == "weight" else 0
    if isinstance(leaf.module, HeadsOutput) and leaf.rule.torch_name == "weight":
        return 0
    return None


def flax_to_torch(model: nn.Module, params: Mapping[str, Any]) -> dict[str, Tensor]:
    """The Flax ``params`` collection (nested dicts of arrays) as a state dict for ``model``.

    The result loads with ``model.load_state_dict(sd, strict=True)``. Any missing, unexpected or mis-shaped
    leaf raises one :class:`ConversionError` that lists them all; nothing partial is returned.
    """
    if not isinstance(params, Mapping):
        raise ConversionError(f"params must be a nested dict of arrays (the Flax 'params' collection), got {type(params).__name__}")
    flat = flatten_tree(params)
    leaves = leaf_table(model)
    missing: list[str] = []
    misshaped: list[MisshapedLeaf] = []
    state: dict[str, Tensor] = {}
    for leaf in leaves:
        if leaf.flax_path not in flat:
            missing.append(leaf.flax_path)
            continue
        arr = np.asarray(flat[leaf.flax_path])
        bad = partial(MisshapedLeaf, leaf.flax_path, tuple(arr.shape), _expected_flax_shape(leaf))
        if arr.ndim != _flax_rank(leaf):
            misshaped.append(bad(f"rank {arr.ndim}, expected {_flax_rank(leaf)}"))
            continue
        heads_axis = _heads_axis(leaf)
        if heads_axis is not None:
            if arr.shape[heads_axis] != leaf.module.num_heads:
                misshaped.append(bad(f"{arr.shape[heads_axis]} heads, the model has num_heads={leaf.module.num_heads}"))
                continue
        tensor = _to_tensor(leaf.rule.to_torch(arr, leaf.module))
        expected = _expected_shape(leaf)
        if expected is not None and tuple(tensor.shape) != expected:
            misshaped.append(bad())
            continue
        state[leaf.torch_key] = tensor
    expected_paths = {leaf.flax_path for leaf in leaves}
    unexpected = sorted(p for p in flat if p not in expected_paths)
    if missing or unexpected or misshaped:
        notes = []
        if unexpected and all(p.startswith("params/") for p in flat):
            notes.append("pass the content of the 'params' collection (variables['params']), not the variables dict")
        tree_shapes = {p: tuple(np.shape(v)) for p, v in flat.items()}
        model_shapes = {leaf.flax_path: _expected_flax_shape(leaf) for leaf in leaves}
        hints = [] if notes else structure_hints(tree_shapes, model_shapes)
        raise ParamsMismatchError("Flax params do not fit the model", missing, unexpected, misshaped, hints, notes)
    return state


def _expected_flax_shape(leaf: Leaf) -> Optional[tuple[Optional[int], ...]]:
    """The Flax shape the model expects for the leaf; a lazy parameter's unknown sizes are None (and a
    lazy one whose layout is not a plain transpose gives None)."""
    shape = _expected_shape(leaf)
    if shape is not None:
        stand_in = np.broadcast_to(np.zeros((), np.uint8), shape)  # no memory: the layout rule only reshapes it
        return tuple(leaf.rule.to_flax(stand_in, leaf.module).shape)
    m, name = leaf.module, leaf.rule.torch_name
    if isinstance(m, (HeadsProjection, HeadsOutput)):
        return None
    if isinstance(m, Conv):
        known: tuple[Optional[int], ...] = (m.out_channels, m.in_channels, *m.kernel_size) if name == "weight" else (m.out_channels,)
    elif isinstance(m, Dense):
        known = (m.out_features, m.in_features) if name == "weight" else (m.out_features,)
    else:
        return None
    # Which torch axis each Flax axis is: the rule applied to a probe whose sizes are all different.
    probe = (2, 3, 5, 7, 11, 13)[: len(known)]
    flax = leaf.rule.to_flax(np.broadcast_to(np.zeros((), np.uint8), probe), m).shape
    return tuple(known[probe.index(d)] for d in flax)


def torch_to_flax(model: nn.Module, state_dict: Optional[Mapping[str, Tensor]] = None) -> FlaxTree:
    """The model's parameters (or ``state_dict``, any tensors keyed like them) as a Flax ``params`` tree.

    The exact inverse of :func:`flax_to_torch` (bitwise). Pass gradients or optimiser moments keyed like
    ``model.named_parameters()`` to convert those instead; every key must be present and no other.
    """
    leaves = leaf_table(model)
    source: Mapping[str, Any] = state_dict if state_dict is not None else {l.torch_key: l.param for l in leaves}
    by_key = {leaf.torch_key: leaf for leaf in leaves}
    unexpected = sorted(k for k in source if k not in by_key)
    missing, misshaped = [], []
    flat: dict[str, np.ndarray] = {}
    for key, leaf in by_key.items():
        value = source.get(key)
        if value is None:
            missing.append(key)
            continue
        if isinstance(value, nn.UninitializedParameter):
            missing.append(f"{key} (not initialised yet: run the model once or load weights)")
            continue
        expected = _expected_shape(leaf)
        if expected is not None and tuple(value.shape) != expected:
            misshaped.append(MisshapedLeaf(key, tuple(value.shape), expected))
            continue
        arr = _to_numpy(value) if isinstance(value, Tensor) else np.asarray(value)
        flat[leaf.flax_path] = np.ascontiguousarray(leaf.rule.to_flax(arr, leaf.module))
    if missing or unexpected or misshaped:
        raise ParamsMismatchError("tensors do not fit the model", missing, unexpected, misshaped)
    return unflatten_tree(flat)


def iter_leaves(model: nn.Module) -> Iterator[tuple[str, str]]:
    """(torch key, Flax path) for every parameter of ``model``."""
    for leaf in leaf_table(model):
        yield leaf.torch_key, leaf.flax_path
