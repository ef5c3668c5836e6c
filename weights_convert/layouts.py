"""The layout transforms between Flax leaves and torch parameters, one set per layer kind (numpy only).

Flax and PyTorch store the same numbers in different layouts: a Dense kernel is ``[in, out]`` in Flax and
``weight [out, in]`` in torch, a Conv kernel ``[*window, in, out]`` vs ``[out, in, *window]``, attention
projections keep separate head axes in Flax (``[C, H, D]``) and fold them in torch (``[H*D, C]``).
:data:`KIND_RULES` lists every kind; ``mapping.LAYOUT_RULES`` says which module class has which kind.
This module imports no torch: the converter writes weights with it while torch is still being imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

__all__ = ["LeafRule", "KIND_RULES", "rule_from_flax", "flatten_tree", "unflatten_tree"]


@dataclass(frozen=True)
class LeafRule:
    """How one torch parameter of a layer kind relates to its Flax leaf.

    ``to_torch(array, module)`` and ``to_flax(array, module)`` act on numpy arrays and are exact inverses
    (pure transposes/reshapes: bitwise round trip). ``to_torch`` returns a view where numpy can (no copy);
    only ``to_flax`` of attention leaves reads the module (its ``num_heads``).
    """

    torch_name: str
    flax_name: str
    to_torch: Callable[[np.ndarray, Any], np.ndarray]
    to_flax: Callable[[np.ndarray, Any], np.ndarray]


def _same(a: np.ndarray, m: Any) -> np.ndarray:
    return a


def _t(a: np.ndarray, m: Any) -> np.ndarray:
    return a.T


def _conv_to_torch(a: np.ndarray, m: Any) -> np.ndarray:
    # Flax [*kernel, in, out] -> torch [out, in, *kernel]
    n = a.ndim
    return a.transpose(n - 1, n - 2, *range(n - 2))


def _conv_to_flax(a: np.ndarray, m: Any) -> np.ndarray:
    n = a.ndim
    return a.transpose(*range(2, n), 1, 0)


def _heads_in_to_torch(a: np.ndarray, m: Any) -> np.ndarray:
    # kernel [C, H, D] -> weight [H*D, C]
    return a.reshape(a.shape[0], -1).T


def _heads_in_to_flax(a: np.ndarray, m: Any) -> np.ndarray:
    h = m.num_heads
    return a.T.reshape(a.shape[1], h, a.shape[0] // h)


def _heads_bias_to_torch(a: np.ndarray, m: Any) -> np.ndarray:
    return a.reshape(-1)  # [H, D] -> [H*D]


def _heads_bias_to_flax(a: np.ndarray, m: Any) -> np.ndarray:
    h = m.num_heads
    return a.reshape(h, a.shape[0] // h)


def _heads_out_to_torch(a: np.ndarray, m: Any) -> np.ndarray:
    # kernel [H, D, C] -> weight [C, H*D]
    return a.reshape(-1, a.shape[-1]).T


def _heads_out_to_flax(a: np.ndarray, m: Any) -> np.ndarray:
    h = m.num_heads
    return a.T.reshape(h, a.shape[1] // h, a.shape[0])


_BIAS = LeafRule("bias", "bias", _same, _same)

#: Every layer kind and the rules of its parameters.
KIND_RULES: dict[str, tuple[LeafRule, ...]] = {
    "attention_projection": (
        LeafRule("weight", "kernel", _heads_in_to_torch, _heads_in_to_flax),
        LeafRule("bias", "bias", _heads_bias_to_torch, _heads_bias_to_flax),
    ),
    "attention_output": (LeafRule("weight", "kernel", _heads_out_to_torch, _heads_out_to_flax), _BIAS),
    "dense": (LeafRule("weight", "kernel", _t, _t), _BIAS),
    "conv": (LeafRule("weight", "kernel", _conv_to_torch, _conv_to_flax), _BIAS),
    "layer_norm": (LeafRule("weight", "scale", _same, _same), _BIAS),
    "position_embedding": (LeafRule("pos_embedding", "pos_embedding", _same, _same),),
}

_ATTENTION_INPUTS = ("query", "key", "value")


def _kind_from_flax(parent: str, name: str, ndim: int) -> Optional[str]:
    if name == "kernel":
        if ndim == 3 and parent in _ATTENTION_INPUTS:
            return "attention_projection"
        if ndim == 3 and parent == "out":
            return "attention_output"
        return {2: "dense", 4: "conv", 5: "conv"}.get(ndim)
    if name == "bias":
        return "attention_projection" if ndim == 2 and parent in _ATTENTION_INPUTS else ("dense" if ndim == 1 else None)
    if name == "scale" and ndim == 1:
        return "layer_norm"
    if name == "pos_embedding":
        return "position_embedding"
    return None


def rule_from_flax(path: str, ndim: int) -> Optional[tuple[str, LeafRule]]:
    """(torch key, rule) of a Flax leaf from its path and rank alone, or None when they do not tell.

    Module names equal Flax names, so the torch key is the path with '.' and the leaf renamed; the layer
    kind follows from Flax's own naming (``query``/``key``/``value``/``out`` kernels of rank 3 are attention
    projections, other kernels Dense (rank 2) or Conv (rank 4, 5), ``scale`` is a LayerNorm's). The
    converter writes weights this way while torch is still being imported, then checks every leaf against
    the real model's ``mapping.leaf_table``: same key, same layout function, expected shape.
    """
    *modules, name = path.split("/")
    kind = _kind_from_flax(modules[-1] if modules else "", name, ndim)
    if kind is None or not modules:
        return None
    rule = next((r for r in KIND_RULES[kind] if r.flax_name == name), None)
    return None if rule is None else (".".join([*modules, rule.torch_name]), rule)


def flatten_tree(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {'a/b/c': leaf}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_tree(value, path))
        else:
            flat[path] = value
    return flat


def unflatten_tree(flat: Mapping[str, Any]) -> dict:
    """{'a/b/c': leaf} -> nested dicts."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return tree
