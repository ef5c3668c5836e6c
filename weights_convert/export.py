"""Writing a converted folder (``model.safetensors`` + ``config.json``) atomically, and the way back to Flax.

The conversion is streaming: each Flax leaf is checked, turned into its torch layout and released from the
parameter tree before the next one, so peak memory stays near one copy of the parameters (the reader has
already skipped the optimizer state). Leaves whose layout is the same in both frameworks (biases, LayerNorm
scales, position embeddings) are written straight from the bytes read, without a copy.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from tokenlearner_torch.errors import CheckpointError, ConfigError, ConversionError

from .mapping import _expected_shape, _flax_rank, _heads_axis, flax_to_torch, leaf_table, torch_to_flax
from .readers import _fsync_dir
from .pretrained import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, load_pretrained

__all__ = ["DTYPE_POLICIES", "ConvertedWeights", "convert_leaves", "write_folder", "to_flax_checkpoint", "converter_version"]

DTYPE_POLICIES = ("keep", "float32", "bfloat16")


def converter_version() -> str:
    try:
        from importlib.metadata import version

        return f"tokenlearner-torch {version('tokenlearner-torch')}"
    except Exception:  # not installed as a distribution
        import tokenlearner_torch

        return f"tokenlearner-torch {getattr(tokenlearner_torch, '__version__', 'unknown')}"


@dataclass
class ConvertedWeights:
    """Torch tensors keyed like the model's state dict, plus what the conversion saw."""

    tensors: dict[str, torch.Tensor]
    leaves_total: int
    leaves_consumed: int
    parameters: int
    nbytes: int
    source_dtypes: list[str]
    output_dtypes: list[str]
    nonfinite: list[str] = field(default_factory=list)


def _pop_flat(tree: dict[str, Any], prefix: str = "") -> dict[str, tuple[dict[str, Any], str]]:
    """'a/b/c' -> (parent dict, key) for every leaf, so a leaf can be dropped from the tree once converted."""
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(_pop_flat(value, path))
        else:
            out[path] = (tree, key)
    return out


def _is_finite(arr: np.ndarray) -> bool:
    if arr.dtype.kind not in "fc" and not arr.dtype.name.startswith(("bfloat", "float8")):
        return True
    flat = arr.reshape(-1)
    block = 1 << 22
    for start in range(0, flat.size, block):
        chunk = flat[start : start + block]
        if chunk.dtype.kind not in "fc":
            chunk = chunk.astype(np.float32)
        if not np.isfinite(chunk).all():
            return False
    return True


def _as_tensor(arr: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing memory with ``arr`` when it is C-contiguous (read-only buffers included)."""
    if not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only source buffers: the tensor is only read (written to disk)
        if arr.dtype.name == "bfloat16":
            return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(arr)


_CASTS = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def convert_leaves(model: nn.Module, params: dict[str, Any], dtype: str = "keep", check_nonfinite: bool = True) -> ConvertedWeights:
    """Convert the Flax ``params`` tree into tensors for ``model`` (a meta skeleton is enough), strictly.

    Leaves are removed from ``params`` as they are converted (the tree is consumed). Any missing,
    unexpected or mis-shaped leaf raises :class:`ConversionError` with the full list, before any conversion.
    ``dtype``: 'keep' (the source's dtype), 'float32' or 'bfloat16' (floating-point leaves are cast).
    """
    if dtype not in DTYPE_POLICIES:
        raise ConfigError(f"dtype policy {dtype!r}; expected one of {', '.join(DTYPE_POLICIES)}")
    if not isinstance(params, dict):
        raise ConversionError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    flat = _pop_flat(params)
    leaves = leaf_table(model)
    # 1. Check everything first (views only, no copies); on any problem let the mapping list them all.
    problems = False
    expected = {leaf.flax_path for leaf in leaves}
    if set(flat) != expected:
        problems = True
    else:
        for leaf in leaves:
            parent, key = flat[leaf.flax_path]
            arr = parent[key]
            if not isinstance(arr, np.ndarray) or arr.ndim != _flax_rank(leaf):
                problems = True
                break
            axis = _heads_axis(leaf)
            if axis is not None and arr.shape[axis] != leaf.module.num_heads:
                problems = True
                break
            shape = _expected_shape(leaf)
            if shape is not None and tuple(leaf.rule.to_torch(arr, leaf.module).shape) != shape:
                problems = True
                break
    if problems:
        flax_to_torch(model, params)  # raises the ConversionError listing every missing/unexpected/mis-shaped leaf
        raise ConversionError("Flax params do not fit the model")  # pragma: no cover - the mapping raised above
    # 2. Convert leaf by leaf, releasing each source array as soon as it is converted.
    tensors: dict[str, torch.Tensor] = {}
    nonfinite: list[str] = []
    src_dtypes: set[str] = set()
    out_dtypes: set[str] = set()
    count = nbytes = 0
    for leaf in leaves:
        parent, key = flat.pop(leaf.flax_path)
        arr = parent.pop(key)
        src_dtypes.add(arr.dtype.name)
        if check_nonfinite and not _is_finite(arr):
            nonfinite.append(leaf.flax_path)
        t = _as_tensor(leaf.rule.to_torch(arr, leaf.module))
        del arr
        if dtype != "keep" and t.is_floating_point() and t.dtype != _CASTS[dtype]:
            t = t.to(_CASTS[dtype])
        out_dtypes.add(str(t.dtype).replace("torch.", ""))
        tensors[leaf.torch_key] = t
        count += t.numel()
        nbytes += t.numel() * t.element_size()
    _prune_empty(params)
    return ConvertedWeights(tensors, len(leaves), len(leaves), count, nbytes, sorted(src_dtypes), sorted(out_dtypes), nonfinite)


def _prune_empty(tree: dict[str, Any]) -> None:
    for k in list(tree):
        if isinstance(tree[k], dict):
            _prune_empty(tree[k])
            if not tree[k]:
                del tree[k]


# --------------------------------------------------------------------------------------------
# The output folder
# --------------------------------------------------------------------------------------------


def _disk_error(out: Path, exc: OSError) -> CheckpointError:
    reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return CheckpointError(f"{out}: cannot write the converted folder ({reason}); nothing was left behind")


def write_folder(
    out: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    scenic_class: str,
    constructor_kwargs: Mapping[str, Any],
    metadata: Mapping[str, Any],
    force: bool = False,
) -> Path:
    """Write ``out/model.safetensors`` and ``out/config.json`` atomically.

    Everything goes into a hidden temporary folder next to ``out`` which is renamed to ``out`` at the end; on
    any failure it is removed, so either the complete folder exists or nothing does. An existing ``out`` is an
    error unless ``force`` (then it is replaced, also atomically from the reader's point of view).
    """
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists (pass --force / force=True to replace it)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: exists and is not a folder; refusing to replace it")
    parent = out.parent
    if not parent.is_dir():
        raise CheckpointError(f"{out}: parent folder {parent} does not exist")
    tmp = parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    meta = {str(k): str(v) for k, v in metadata.items()}
    config = {"scenic_class": scenic_class, "constructor_kwargs": dict(constructor_kwargs), "format_version": FORMAT_VERSION}
    try:
        config_text = json.dumps(config, indent=1, sort_keys=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"constructor kwargs are not JSON-serialisable: {exc}") from None
    old = None
    try:
        tmp.mkdir()
        save_file(dict(tensors), str(tmp / WEIGHTS_NAME), metadata=meta)
        with open(tmp / WEIGHTS_NAME, "rb+") as fp:
            os.fsync(fp.fileno())
        with open(tmp / CONFIG_NAME, "w") as fp:
            fp.write(config_text)
            fp.flush()
            os.fsync(fp.fileno())
        _fsync_dir(tmp)
        if out.exists():
            old = parent / f".{out.name}.old-{secrets.token_hex(6)}"
            os.rename(out, old)
        os.rename(tmp, out)
        _fsync_dir(parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)  # put the previous folder back
            old = None
        if isinstance(exc, OSError):
            raise _disk_error(out, exc) from None
        if isinstance(exc, Exception) and type(exc).__name__ == "SafetensorError":
            raise CheckpointError(f"{out}: cannot write {WEIGHTS_NAME} ({exc}); nothing was left behind") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out


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
    an existing directory the file is ``out_path/checkpoint_<step>``. Written atomically. Parameters are
    written in their dtype, bit for bit (PyTorch -> Flax -> PyTorch is a bitwise round trip).
    Returns ``{'path', 'sha256', 'leaves', 'step', 'wrap'}``.
    """
    from .readers import write_flax_msgpack

    model = load_pretrained(model_or_folder) if not isinstance(model_or_folder, nn.Module) else model_or_folder
    params = torch_to_flax(model)
    target = Path(out_path)
    if target.is_dir():
        if step is None:
            raise ConfigError(f"{target}: is a directory; pass a step (the file is then checkpoint_<step>) or a file path")
        final = target / f"checkpoint_{step}"
    else:
        final = target
    sha = write_flax_msgpack(target, params, step=step, wrap=wrap)
    from .mapping import flatten_tree

    return {"path": str(final), "sha256": sha, "leaves": len(flatten_tree(params)), "step": step, "wrap": wrap}
