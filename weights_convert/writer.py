"""The converted folder (``model.safetensors`` + ``config.json``), written atomically and without torch.

A conversion is planned first: every Flax leaf becomes a :class:`PlannedLeaf`, a view of the source array in
its torch layout (no copy yet). Writing then puts each leaf into ``model.safetensors`` in turn: leaves whose
layout is the same in both frameworks (biases, LayerNorm scales, position embeddings) straight from the bytes
read, transposed leaves through one reused buffer; the reader's ``release`` then drops the source pages of
the leaf written, so peak memory stays near one leaf of the source, not a copy of the parameters.

Everything is written into a hidden temporary folder next to the output, which :class:`StagedFolder`
renames into place only when the conversion has succeeded; on any failure it is removed, so either the
complete folder exists or nothing does. No torch here: the converter writes while torch is being imported.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from tokenlearner_torch.conventions import FOLDER_FORMAT_VERSION
from tokenlearner_torch.errors import CheckpointError, ConfigError, ConversionError

from .layouts import LeafRule, rule_from_flax
from .readers import OutputError, _fsync_dir, all_finite

__all__ = ["OutputError", "DTYPE_POLICIES", "PlannedLeaf", "Plan", "make_plan", "plan_from_flax", "StagedFolder", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT_VERSION"]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = FOLDER_FORMAT_VERSION  # one number for the converter and save_pretrained
DTYPE_POLICIES = ("keep", "float32", "bfloat16")

# safetensors dtype codes (the format's spec) for what Flax checkpoints hold.
_SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
# Room left in the safetensors header for metadata only known after the weights are written (the Scenic
# class, resolved once torch is imported); a header that outgrows it is rewritten with the whole file.
_HEADER_SLACK = 1024


@dataclass
class PlannedLeaf:
    """One leaf on its way out: its names, its layout rule and its source array in torch layout."""

    torch_key: str
    flax_path: str
    rule: LeafRule
    view: np.ndarray  # rule.to_torch(source): a view where numpy can make one
    out_dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(self.view.size) * self.out_dtype.itemsize

    def same_layout(self, other: PlannedLeaf) -> bool:
        """Whether both produce the same bytes (same source, same layout function, shape and dtype)."""
        return (
            (self.torch_key, self.flax_path, self.view.shape, self.out_dtype) == (other.torch_key, other.flax_path, other.view.shape, other.out_dtype)
            and self.rule.to_torch is other.rule.to_torch
        )


@dataclass
class Plan:
    """What will be written: the leaves, and what the conversion saw in them."""

    leaves: list[PlannedLeaf]
    source_dtypes: list[str]
    nonfinite: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return sum(int(p.view.size) for p in self.leaves)

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.leaves)

    @property
    def output_dtypes(self) -> list[str]:
        return sorted({p.out_dtype.name for p in self.leaves})

    def same_layout(self, other: Plan) -> bool:
        mine = {p.torch_key: p for p in self.leaves}
        return len(mine) == len(other.leaves) and all(k.torch_key in mine and mine[k.torch_key].same_layout(k) for k in other.leaves)


def _out_dtype(src: np.dtype, dtype: str) -> np.dtype:
    if dtype == "keep" or not (src.kind == "f" or src.name == "bfloat16"):
        return src
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(np.float32)


def make_plan(entries: Iterable[tuple[str, str, LeafRule, np.ndarray]], dtype: str = "keep", check_nonfinite: bool = True) -> Plan:
    """A plan from ``(torch key, Flax path, rule, source array)``; nothing is copied."""
    if dtype not in DTYPE_POLICIES:
        raise ConfigError(f"dtype policy {dtype!r}; expected one of {', '.join(DTYPE_POLICIES)}")
    leaves, nonfinite, src_dtypes = [], [], set()
    for torch_key, flax_path, rule, arr in entries:
        if arr.dtype.name not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{flax_path}: dtype {arr.dtype.name} cannot be stored in safetensors (expected one of {', '.join(_SAFETENSORS_DTYPES)})")
        src_dtypes.add(arr.dtype.name)
        if check_nonfinite and not all_finite(arr):
            nonfinite.append(flax_path)
        leaves.append(PlannedLeaf(torch_key, flax_path, rule, rule.to_torch(arr, None), _out_dtype(arr.dtype, dtype)))
    return Plan(leaves, sorted(src_dtypes), nonfinite)


def plan_from_flax(flat: Mapping[str, Any], dtype: str = "keep") -> Plan | None:
    """Plan a flat Flax tree (``{'a/b/kernel': array}``) from its names and ranks alone (see
    ``layouts.rule_from_flax``); None if a leaf's name does not tell its layout or is not an array.

    No value is read yet: :meth:`StagedFolder.write_weights` looks for NaN/Inf as it writes each leaf, so
    that the source is read once, one leaf at a time.
    """
    entries = []
    for path, arr in flat.items():
        found = rule_from_flax(path, arr.ndim) if isinstance(arr, np.ndarray) else None
        if found is None:
            return None
        entries.append((found[0], path, found[1], arr))
    return make_plan(entries, dtype, check_nonfinite=False)


# --------------------------------------------------------------------------------------------
# model.safetensors
# --------------------------------------------------------------------------------------------


def _header_json(leaves: list[PlannedLeaf], metadata: Mapping[str, str]) -> bytes:
    entries: dict[str, Any] = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    offset = 0
    for p in leaves:
        entries[p.torch_key] = {"dtype": _SAFETENSORS_DTYPES[p.out_dtype.name], "shape": list(p.view.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    return json.dumps(entries, separators=(",", ":")).encode()


def _leaf_bytes(p: PlannedLeaf, scratch: np.ndarray) -> memoryview:
    """The leaf in torch layout and output dtype, C-contiguous, as bytes (no copy when it already is)."""
    view = p.view
    if view.dtype != p.out_dtype:
        return memoryview(view.astype(p.out_dtype, order="C").reshape(-1).view(np.uint8))
    if view.flags.c_contiguous:
        return memoryview(view.reshape(-1).view(np.uint8))
    out = scratch[: p.nbytes].view(view.dtype).reshape(view.shape)
    np.copyto(out, view)  # the transpose; numpy releases the GIL for it
    return memoryview(scratch[: p.nbytes])


class StagedFolder:
    """The output folder, staged under a hidden temporary name next to it until :meth:`commit`.

    Use as a context manager: leaving it with an exception removes everything written (and an OSError
    such as a full disk becomes one :class:`OutputError`). An existing ``out`` is an error unless
    ``force``; then it is replaced at commit, atomically from a reader's point of view.
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not force:
            raise ConfigError(f"{self.out}: already exists (pass force=True to replace it)")
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"{self.out}: exists and is not a folder; refusing to replace it")
        if not self.out.parent.is_dir():
            raise CheckpointError(f"{self.out}: parent folder {self.out.parent} does not exist")
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{secrets.token_hex(6)}"
        self._leaves: list[PlannedLeaf] = []  # in file order, once written
        self._header_room = 0
        self._committed = False

    def __enter__(self) -> StagedFolder:
        with self._writing():
            self.tmp.mkdir()
        return self

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if not self._committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _disk_error(self, exc: OSError) -> OutputError:
        reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        return OutputError(f"{self.out}: cannot write the converted folder ({reason}); nothing was left behind")

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """OSErrors while writing (a full disk, permissions) become one OutputError naming the output."""
        try:
            yield
        except OSError as exc:
            raise self._disk_error(exc) from None

    def write_weights(
        self, plan: Plan, metadata: Mapping[str, str], release: Callable[[np.ndarray], None] | None = None, check_nonfinite: bool = False
    ) -> None:
        """Write ``model.safetensors``: the header (with room for :meth:`set_metadata`), then each leaf.

        Tensors go largest element size first (8-byte alignment for every tensor, as safetensors' own
        writer does), in the plan's order otherwise. ``check_nonfinite``: record the leaves holding NaN/Inf
        in ``plan.nonfinite`` while writing them. ``release(view)`` is called on each leaf once written
        (the reader's ``release``: the source pages under it leave the process's memory).
        """
        leaves = sorted(plan.leaves, key=lambda p: -p.out_dtype.itemsize)
        header = _header_json(leaves, metadata)
        self._header_room = len(header) + _HEADER_SLACK + (-(len(header) + _HEADER_SLACK) % 8)
        scratch = np.empty(max((p.nbytes for p in leaves), default=0), np.uint8)
        self._leaves = leaves
        if check_nonfinite:
            plan.nonfinite = []
        with self._writing(), open(self.tmp / WEIGHTS_NAME, "wb") as fp:
            fp.write(struct.pack("<Q", self._header_room) + header.ljust(self._header_room))
            for p in leaves:
                data = _leaf_bytes(p, scratch)
                # Checked on the bytes being written (the source's values, in torch layout) where the dtype
                # is kept; on the source where it is cast, so that a cast's overflow is not reported as NaN/Inf.
                if check_nonfinite and not all_finite(np.frombuffer(data, p.out_dtype) if p.view.dtype == p.out_dtype else p.view):
                    plan.nonfinite.append(p.flax_path)
                fp.write(data)
                del data
                if release is not None:
                    release(p.view)

    def set_metadata(self, metadata: Mapping[str, str]) -> bool:
        """Replace the metadata in the written header in place; False if it does not fit the room left."""
        header = _header_json(self._leaves, metadata)
        if len(header) > self._header_room:
            return False
        with self._writing(), open(self.tmp / WEIGHTS_NAME, "r+b") as fp:
            fp.seek(8)
            fp.write(header.ljust(self._header_room))
        return True

    def commit(self, config: Mapping[str, Any]) -> Path:
        """Write ``config.json``, flush everything to disk and rename the folder into place."""
        try:
            config_text = json.dumps(dict(config), indent=1, sort_keys=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"constructor kwargs are not JSON-serialisable: {exc}") from None
        with self._writing():
            return self._commit(config_text)

    def _commit(self, config_text: str) -> Path:
        with open(self.tmp / WEIGHTS_NAME, "rb+") as fp:
            os.fsync(fp.fileno())
        with open(self.tmp / CONFIG_NAME, "w") as fp:
            fp.write(config_text)
            fp.flush()
            os.fsync(fp.fileno())
        _fsync_dir(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{secrets.token_hex(6)}"
            os.rename(self.out, old)
        try:
            os.rename(self.tmp, self.out)
        except BaseException:
            if old is not None:
                os.rename(old, self.out)  # put the previous folder back
            raise
        self._committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.out.parent)
        return self.out

