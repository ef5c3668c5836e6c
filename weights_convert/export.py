"""The torch side of a conversion: the strict check of a Flax tree against the model, and the way back.

:func:`plan_leaves` checks a Flax ``params`` tree against a model skeleton (every leaf present, none extra,
ranks, head counts and shapes as the model expects) and plans the output (``writer.make_plan``);
:func:`to_flax_checkpoint` writes a module's parameters as a Flax msgpack checkpoint Scenic restores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from tokenlearner_torch.errors import ConfigError, ConversionError

from .mapping import _expected_shape, _flax_rank, _heads_axis, flatten_tree, flax_to_torch, leaf_table, torch_to_flax
from .pretrained import load_pretrained
from .writer import Plan, make_plan

__all__ = ["plan_leaves", "to_flax_checkpoint"]


def plan_leaves(model: nn.Module, params: dict[str, Any], dtype: str = "keep", check_nonfinite: bool = True) -> Plan:
    """Check the Flax ``params`` tree against ``model`` (a meta skeleton is enough) and plan the output.

    Strict: any missing, unexpected or mis-shaped leaf raises :class:`ConversionError` listing them all.
    Nothing is copied: each planned leaf is a view of the source array in the torch layout. ``dtype``:
    'keep' (the source's dtype), 'float32' or 'bfloat16' (floating-point leaves are cast when written).
    """
    if not isinstance(params, dict):
        raise ConversionError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    flat = flatten_tree(params)
    leaves = leaf_table(model)
    entries = []
    fits = set(flat) == {leaf.flax_path for leaf in leaves}
    for leaf in leaves if fits else ():
        arr = flat[leaf.flax_path]
        axis = _heads_axis(leaf)
        shape = _expected_shape(leaf)
        if (
            not isinstance(arr, np.ndarray)
            or arr.ndim != _flax_rank(leaf)
            or (axis is not None and arr.shape[axis] != leaf.module.num_heads)
            or (shape is not None and tuple(leaf.rule.to_torch(arr, leaf.module).shape) != shape)
        ):
            fits = False
            break
        entries.append((leaf.torch_key, leaf.flax_path, leaf.rule, arr))
    if not fits:
        flax_to_torch(model, params)  # raises the ConversionError listing every missing/unexpected/mis-shaped leaf
        raise ConversionError("Flax params do not fit the model")  # pragma: no cover - the mapping raised above
    return make_plan(entries, dtype, check_nonfinite)


# --------------------------------------------------------------------------------------------
# The way back
# --------------------------------------------------------------------------------------------


def to_flax_checkpoint(
    model_or_folder: nn.Module | str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    step: int | None = None,
    wrap: str = "optax-trainstate",
) -> dict[str, Any]:
    """Write a module's (or a converted folder's) parameters as a Flax msgpack checkpoint.

    The file is what ``flax.training.checkpoints.restore_checkpoint(path, target=None)`` reads, in Scenic's
    TrainState layout by default (``{'params': ..., 'global_step': step, ...}``; ``wrap='variables'`` writes
    ``{'params': ...}`` like ``flax.serialization.to_bytes``, ``'bare'`` the tree alone). If ``out_path`` is
    an existing directory, or a path ending in ``/`` (created then), the file is ``out_path/checkpoint_<step>``.
    Written atomically. Parameters are written in their dtype, bit for bit (PyTorch -> Flax -> PyTorch is a
    bitwise round trip). Returns ``{'path', 'sha256', 'leaves', 'step', 'wrap'}``.
    """
    from .readers import write_flax_msgpack

    text = os.fspath(out_path)
    target = Path(text)
    # Path() drops a trailing slash: read it from the text ("workdir/" is a folder, as Scenic's workdir).
    as_dir = target.is_dir() or text.endswith(("/", os.sep))
    if as_dir and step is None:
        raise ConfigError(f"{text}: a folder; pass a step (the file is then checkpoint_<step>) or a file path")
    if as_dir and target.exists() and not target.is_dir():
        raise ConfigError(f"{text}: names a folder (trailing '/') but {target} is a file")
    final = target / f"checkpoint_{step}" if as_dir else target
    model = load_pretrained(model_or_folder) if not isinstance(model_or_folder, nn.Module) else model_or_folder
    params = torch_to_flax(model)
    if as_dir:
        target.mkdir(parents=True, exist_ok=True)  # only once the weights are read: no empty folder on error
    sha = write_flax_msgpack(final, params, step=step, wrap=wrap)

    return {"path": str(final), "sha256": sha, "leaves": len(flatten_tree(params)), "step": step, "wrap": wrap}
