"""Read Scenic/Flax checkpoints into plain numpy trees, and write Flax msgpack checkpoints.

No jax or flax is needed. Sources: legacy Flax msgpack files (``checkpoint_<step>``), directories
of them, Orbax directories (tensorstore, an optional extra, is imported only when an array lives
in tensorstore), big_vision ``.npz`` files and ``flax.serialization.to_bytes`` files. The wrapping
train state (optax TrainState, flax.optim Optimizer, variables dict) is removed and the parameter
tree returned. Every failure raises :class:`~tokenlearner_torch.errors.CheckpointError` with a
one-line message naming the file. See docs/checkpoint_formats.md.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import mmap
import os
import re
import secrets
import struct
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable, Protocol

import numpy as np

from tokenlearner_torch.errors import CheckpointError

from . import msgpack_io
from .msgpack_io import DTYPES, DecodeError, EncodeError

__all__ = [
    "CheckpointInfo",
    "OutputError",
    "find_nonfinite",
    "read_checkpoint",
    "read_checkpoint_info",
    "write_flax_msgpack",
]

#: Top-level entries of a Scenic TrainState that are not parameters. They are skipped while
#: streaming, so e.g. the Adam moments never reach memory.
TRAINSTATE_EXTRAS = ("opt_state", "model_state", "rng", "metadata", "accum_train_time")
#: flax.optim era (``optimizer``) and big_vision (``opt``) wrappers: params live under ``target``.
OPTIMIZER_KEYS = ("optimizer", "opt")
STEP_KEY = "global_step"

WRAPS = ("optax-trainstate", "variables", "bare")

_CKPT_FILE_RE = re.compile(r"^checkpoint_([-+]?\d+(?:\.\d+)?)$")
_STEP_DIR_RE = re.compile(r"^(\d+)$")
_ORBAX_MARKERS = ("checkpoint", "_METADATA", "manifest.ocdbt")
_ORBAX_PLACEHOLDER = "PLACEHOLDER://"
_MAX_JSON_BYTES = 256 << 20
# An Orbax array may not declare more bytes than this multiple of the directory's size (plus a
# floor): zstd cannot realistically compress weights further, and tensorstore allocates from the
# declared shape.
_MAX_TS_EXPANSION = 4096
_TS_FLOOR_BYTES = 1 << 30
# Deflate cannot exceed ~1032:1, so a zip member claiming more than this is corrupt.
_MAX_DEFLATE_RATIO = 1100


@dataclasses.dataclass
class CheckpointInfo:
    """What was read: ``format``, ``layout``, ``step``, ``source_sha256``, ``skipped`` paths, ``path``."""

    format: str
    layout: str
    step: int | None
    source_sha256: str
    skipped: list[str]
    path: str

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class _RawState:
    """A decoded top-level state before the parameter tree is picked out of it."""

    top: dict[str, Any]
    skipped: list[str]
    sha256: _Digest
    format: str
    resolve: Callable[[str, Any], np.ndarray | None] | None = None
    release: Callable[[np.ndarray], None] = lambda array: None  # see _MappedPages.release


class OutputError(CheckpointError):
    """An output (converted folder, Flax checkpoint) could not be written: a full disk, permissions.

    Nothing is left behind. The command line exits 1 for it (the conversion failed), 2 for the other
    CheckpointErrors (the input cannot be read).
    """


def _fail(path: Path | str, problem: str) -> CheckpointError:
    """Build the one-line CheckpointError ``<path>: <problem>``."""
    return CheckpointError(f"{path}: {problem}".replace("\n", " "))


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike[str], step: int | None = None, subtree: str | None = None) -> dict[str, Any]:
    """Return the parameter tree (nested dicts of numpy arrays, str keys) of a checkpoint.

    ``path`` is a file, a directory of ``checkpoint_<step>`` files / step directories (latest
    step unless ``step`` is given) or an Orbax directory. ``subtree='a/b'`` returns
    ``params['a']['b']``. Arrays decoded from msgpack are read-only views; copy before mutating.
    """
    params, _, digest, _ = read_checkpoint_deferred(path, step=step, subtree=subtree)
    digest.close()  # nobody asked for the sha256
    return params


def read_checkpoint_info(
    path: str | os.PathLike[str], step: int | None = None, subtree: str | None = None
) -> tuple[dict[str, Any], CheckpointInfo]:
    """Return ``(params, info)``: the tree of :func:`read_checkpoint` and a :class:`CheckpointInfo`."""
    params, info, digest, _ = read_checkpoint_deferred(path, step=step, subtree=subtree)
    try:
        info.source_sha256 = digest.hexdigest()
    finally:
        digest.close()
    return params, info


def read_checkpoint_deferred(
    path: str | os.PathLike[str], step: int | None = None, subtree: str | None = None
) -> tuple[dict[str, Any], CheckpointInfo, _Digest, Callable[[np.ndarray], None]]:
    """:func:`read_checkpoint_info`, but the sha256 of a msgpack file may still be computing.

    Returns ``(params, info, digest, release)``. ``info.source_sha256`` is empty; ``digest.hexdigest()``
    waits for it, ``digest.close()`` stops it (call it on every path: the converter writes the weights while
    the hash runs). ``release(array)`` tells that the caller is done with an array of the tree for now: the
    pages of a memory-mapped file it views leave the process's memory (they stay in the page cache; reading
    the array again maps them again). A no-op for arrays that do not view a mapped file.
    """
    source = Path(path)
    if not source.exists():
        raise _fail(source, "no such file or directory (expected a checkpoint file or directory)")
    try:
        target, from_listing, name_step = _resolve(source, step, depth=0)
        raw = _read_source(target)
    except OSError as exc:  # permissions, a vanished file, an I/O error: the source cannot be read
        raise _fail(source, f"cannot be read ({exc.strerror or exc}; expected a readable checkpoint file or directory)") from None
    if from_listing and raw.format in ("flax-msgpack", "flax-bytes"):
        raw.format = "flax-msgpack-dir"
    try:
        params, layout, skipped = _select_params(raw, target)
        content_step = _content_step(raw, target)
        if subtree:
            params = _select_subtree(params, subtree, target)
        try:
            params = msgpack_io.finalize_params(params, subtree.strip("/") if subtree else "", 0, raw.resolve)
        except DecodeError as exc:
            raise _fail(target, str(exc)) from None
        if not isinstance(params, dict):
            what = f"subtree '{subtree}'" if subtree else "the parameter entry"
            raise _fail(target, f"{what} is an array, not a tree (expected a dict of arrays)")
    except BaseException:
        raw.sha256.close()
        raise
    info = CheckpointInfo(
        format=raw.format,
        layout=layout,
        step=content_step if content_step is not None else name_step,
        source_sha256="",
        skipped=skipped,
        path=str(target),
    )
    return params, info, raw.sha256, raw.release


def find_nonfinite(params: Any, _prefix: str = "") -> list[str]:
    """Return the '/'-joined paths of the floating-point arrays in ``params`` that contain NaN or Inf."""
    if isinstance(params, dict):
        found: list[str] = []
        for key, value in params.items():
            found += find_nonfinite(value, f"{_prefix}/{key}" if _prefix else str(key))
        return found
    return [] if all_finite(np.asarray(params)) else [_prefix]


def all_finite(arr: np.ndarray) -> bool:
    """False if a floating-point array (bfloat16 and float8 included) holds a NaN or an Inf."""
    if not _is_inexact(arr.dtype):
        return True
    flat = arr.reshape(-1)
    # Blockwise, so a huge array does not need an equally huge boolean temporary.
    block = 1 << 22
    return all(np.isfinite(flat[start : start + block]).all() for start in range(0, flat.size, block))


def _is_inexact(dtype: np.dtype) -> bool:
    """True for float/complex dtypes, including ml_dtypes' bfloat16 and float8 (numpy kind 'V')."""
    return dtype.kind in "fc" or (dtype.name in DTYPES and dtype.name.startswith(("float", "bfloat")))


def write_flax_msgpack(
    path: str | os.PathLike[str],
    params: dict[str, Any],
    *,
    step: int | None = None,
    wrap: str = "optax-trainstate",
) -> str:
    """Write ``params`` as a Flax msgpack checkpoint atomically; return the file's sha256 (hex).

    ``wrap``: 'optax-trainstate' (Scenic's current TrainState, ``global_step=step``),
    'variables' (``{'params': params}``, like ``flax.serialization.to_bytes``) or 'bare'.
    If ``path`` is an existing directory the file is ``path/checkpoint_<step>``. The data goes
    to a hidden temporary file in the same directory, is fsynced and renamed over ``path``; on
    any failure the temporary file is removed and CheckpointError raised.
    """
    final = _writer_target(Path(path), step)
    tree = _wrap_for_writing(params, wrap, step, final)
    tmp = final.parent / f".{final.name}.tmp-{secrets.token_hex(6)}"
    try:
        sha = _write_file_atomically(tmp, final, tree)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, (EncodeError, TypeError, ValueError, OverflowError)):
            raise _fail(final, f"cannot write checkpoint: {exc}; no file was left behind") from None
        if isinstance(exc, OSError):
            reason = "disk full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
            raise OutputError(f"{final}: cannot write checkpoint ({reason}); no file was left behind") from exc
        raise
    return sha


# --------------------------------------------------------------------------------------------
# Locating the checkpoint
# --------------------------------------------------------------------------------------------


def _name_step(name: str) -> int | float | None:
    """The step encoded in a ``checkpoint_<step>`` or ``<step>`` name, or None."""
    match = _CKPT_FILE_RE.match(name) or _STEP_DIR_RE.match(name)
    if not match:
        return None
    value = float(match.group(1))
    return int(value) if value.is_integer() else value


def _is_orbax_dir(path: Path) -> bool:
    """True if ``path`` holds one Orbax PyTree checkpoint (flax's own detection rule)."""
    return any((path / marker).exists() for marker in _ORBAX_MARKERS)


def _list_steps(directory: Path) -> list[tuple[int | float, Path]]:
    """Checkpoints in a directory as (step, path), sorted by step; temporary entries ignored."""
    found = []
    for entry in directory.iterdir():
        if "tmp" in entry.name or entry.name.endswith("_gda"):
            continue  # half-written saves (flax checkpoint_tmp, orbax *.orbax-checkpoint-tmp-*)
        step = _name_step(entry.name)
        if step is None:
            continue
        if _STEP_DIR_RE.match(entry.name) and not entry.is_dir():
            continue  # a bare number is a CheckpointManager step only as a directory
        found.append((step, entry))
    return sorted(found, key=lambda item: item[0])


def _manager_item(step_dir: Path) -> Path | None:
    """The item directory inside an Orbax CheckpointManager step directory, or None."""
    if not (step_dir / "_CHECKPOINT_METADATA").is_file():
        return None
    items = sorted(p for p in step_dir.iterdir() if p.is_dir() and "tmp" not in p.name and _is_orbax_dir(p))
    if not items:
        return None
    named = [p for p in items if p.name == "default"]
    if named or len(items) == 1:
        return (named or items)[0]
    names = ", ".join(p.name for p in items)
    raise _fail(step_dir, f"Orbax step directory holds several items ({names}); pass the item directory itself")


def _resolve(source: Path, step: int | None, depth: int) -> tuple[Path, bool, int | float | None]:
    """Find the file or Orbax directory to read; return (path, chosen from a listing, name step)."""
    name_step = _name_step(source.name)
    if source.is_file() or _is_orbax_dir(source):
        if step is not None and name_step is not None and name_step != step:
            raise _fail(source, f"step={step} was requested but this checkpoint is step {name_step}")
        return source, depth > 0, name_step
    if not source.is_dir():
        raise _fail(source, "is neither a regular file nor a directory")
    item = _manager_item(source)
    if item is not None:
        if step is not None and name_step is not None and name_step != step:
            raise _fail(source, f"step={step} was requested but this checkpoint is step {name_step}")
        return item, depth > 0, name_step
    if depth > 0:
        raise _fail(source, "no checkpoint inside this step directory (expected a file, or an Orbax checkpoint directory)")
    candidates = _list_steps(source)
    if not candidates:
        shown = ", ".join(sorted(p.name for p in source.iterdir())[:10]) or "nothing"
        raise _fail(
            source,
            f"no checkpoint found (contains: {shown}; expected checkpoint_<step> files, step directories or an Orbax checkpoint)",
        )
    chosen = _pick_step(source, candidates, step)
    resolved = _resolve(chosen, None, depth + 1)[0]
    return resolved, True, _name_step(chosen.name)


def _pick_step(directory: Path, candidates: list[tuple[int | float, Path]], step: int | None) -> Path:
    """The latest candidate, or the one for ``step``; a missing step lists the available ones."""
    if step is None:
        return candidates[-1][1]
    for value, entry in candidates:
        if value == step:
            return entry
    available = ", ".join(str(value) for value, _ in candidates)
    raise _fail(directory, f"no checkpoint for step {step} (available steps: {available})")


# --------------------------------------------------------------------------------------------
# Dispatch by content
# --------------------------------------------------------------------------------------------


def _read_source(target: Path) -> _RawState:
    """Decode the file or Orbax directory at ``target`` into a _RawState."""
    if target.is_dir():
        return _read_orbax_dir(target)
    with open(target, "rb") as fp:
        head = fp.read(64)
    kind = _sniff(head, target)
    if kind == "zip":
        return _read_npz(target)
    raw = _read_msgpack_file(target)
    train_state = any(k in raw.top for k in OPTIMIZER_KEYS + (STEP_KEY,)) or bool(raw.skipped)
    raw.format = "flax-msgpack" if train_state else "flax-bytes"
    return raw


_KNOWN_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\x93NUMPY", "a single .npy array"),
    (b"\x89HDF", "an HDF5 file"),
    (b"\x1f\x8b", "a gzip/tar archive (extract it first)"),
    (b"\x28\xb5\x2f\xfd", "a zstd-compressed file"),
    (b"GIF8", "a GIF image"),
    (b"\xff\xd8\xff", "a JPEG image"),
)


def _sniff(head: bytes, path: Path) -> str:
    """Classify a file by its first bytes: 'zip' or 'msgpack'; raise for anything else."""
    expected = "expected a Flax msgpack checkpoint, an .npz file or an Orbax directory"
    if not head:
        raise _fail(path, f"file is empty ({expected})")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:
        raise _fail(path, f"this is a Python pickle, which is never loaded ({expected})")
    if 0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF):
        return "msgpack"
    for magic, what in _KNOWN_MAGIC:
        if head.startswith(magic):
            raise _fail(path, f"this is {what} ({expected})")
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < (1 << 32):
        raise _fail(path, f"this looks like a safetensors file ({expected})")
    if head.lstrip()[:1] in (b"{", b"["):
        raise _fail(path, f"this is JSON/text; if it is an Orbax _METADATA file, pass its directory ({expected})")
    raise _fail(path, f"does not start with a msgpack map (first byte 0x{head[0]:02x}; {expected})")


# --------------------------------------------------------------------------------------------
# Flax msgpack (streaming)
# --------------------------------------------------------------------------------------------


class _Digest(Protocol):
    """A sha256 that may still be computing: ``hexdigest()`` waits for it, ``close()`` abandons it."""

    def hexdigest(self) -> str: ...

    def close(self) -> None: ...


class _Done:
    """A sha256 already computed."""

    def __init__(self, value: str) -> None:
        self._value = value

    def hexdigest(self) -> str:
        return self._value

    def close(self) -> None:
        pass


class _MappedPages:
    """The read-only shared mapping that a msgpack checkpoint's arrays view, and a way to drop their pages.

    Every page of the mapping that has been read counts in the process's resident memory until it is
    unmapped, which for the arrays' mapping is only when the last array goes. :meth:`release` drops the
    pages under one array (``MADV_DONTNEED``): the data stays in the page cache (a clean, read-only, shared
    file mapping loses nothing), and reading the array again maps its pages again. So the converter, which
    releases each leaf once written, holds about one leaf of the source at a time instead of all of them.
    """

    _PAGE = mmap.PAGESIZE

    def __init__(self, mapped: mmap.mmap) -> None:
        self._mapped = mapped
        probe = np.frombuffer(mapped, np.uint8)  # only to learn the mapping's address (no copy)
        self._base, self._size = int(probe.ctypes.data), probe.size
        del probe  # a live export would keep the mapping from closing

    def release(self, array: np.ndarray) -> None:
        if not hasattr(mmap, "MADV_DONTNEED") or array.size == 0:
            return
        lo = hi = int(array.ctypes.data)
        for n, stride in zip(array.shape, array.strides):
            lo, hi = lo + min(0, (n - 1) * stride), hi + max(0, (n - 1) * stride)
        hi += array.itemsize
        if lo < self._base or hi > self._base + self._size:
            return  # not a view of this mapping: never advise memory that is not the file's
        start = (lo - self._base) // self._PAGE * self._PAGE
        try:
            self._mapped.madvise(mmap.MADV_DONTNEED, start, hi - self._base - start)
        except (OSError, ValueError):  # closed, or refused: the pages just stay until the mapping goes
            pass


class _FileHasher:
    """sha256 of a file, computed in a second thread while the caller decodes it.

    The thread hashes its own read-only memory map of the file, one window at a time: each window is one
    C call that releases the GIL (few hand-offs, so hashing a 1 GB checkpoint overlaps the decoding and the
    import of torch instead of queueing behind them), and the window's pages are unmapped once hashed, so
    the hash adds one window to the resident memory, not the whole file.
    """

    _WINDOW = 8 << 20

    def __init__(self, path: Path) -> None:
        self._path = path
        self._sha = hashlib.sha256()
        self._stop = threading.Event()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._hash, name="tokenlearner-sha256", daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        try:
            with open(self._path, "rb") as fp, mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                for start in range(0, len(mapped), self._WINDOW):
                    if self._stop.is_set():
                        return
                    end = min(len(mapped), start + self._WINDOW)
                    with memoryview(mapped)[start:end] as window:
                        self._sha.update(window)
                    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError) as exc:
            self._error = OSError(f"cannot hash {self._path}: {exc}")

    def close(self) -> None:
        """Stop hashing (idempotent); for error paths."""
        self._stop.set()
        self._thread.join()

    def hexdigest(self) -> str:
        """Wait for the whole file to be hashed; return the hex digest."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._sha.hexdigest()


def _read_msgpack_file(path: Path) -> _RawState:
    """Decode a Flax msgpack file through a read-only memory map, skipping optimizer state.

    Arrays are views of the mapped file (no copy; the pages of skipped entries are never touched).
    """
    size = path.stat().st_size
    if size == 0:
        raise _fail(path, "file is empty (expected a Flax msgpack checkpoint)")
    hasher = _FileHasher(path)
    try:
        with open(path, "rb") as fp:
            try:
                mapped = mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ)
            except (OSError, ValueError) as exc:
                raise _fail(path, f"cannot be memory-mapped ({exc}); expected a regular file") from None
        decoder = msgpack_io.MappedDecoder(memoryview(mapped))
        try:
            top, skipped = _stream_top(decoder)
        except DecodeError as exc:
            raise _fail(path, str(exc)) from None
        except RecursionError:
            raise _fail(path, "corrupt msgpack data (nested too deeply; expected a Flax msgpack checkpoint)") from None
        if decoder.pos != size:
            raise _fail(path, f"{size - decoder.pos} unexpected bytes after the end of the checkpoint data (expected one msgpack map)")
    except BaseException:
        hasher.close()
        raise
    return _RawState(top=top, skipped=skipped, sha256=hasher, format="flax-msgpack", release=_MappedPages(mapped).release)


def _read_key(decoder: msgpack_io.MappedDecoder) -> str:
    """Read one map key and require it to be a str (Flax state dicts only have str keys)."""
    key = decoder.unpack()
    if not isinstance(key, str):
        raise DecodeError(f"top-level key {key!r:.40} is a {type(key).__name__} (expected str)")
    return key


def _stream_top(decoder: msgpack_io.MappedDecoder) -> tuple[dict[str, Any], list[str]]:
    """Decode the top-level map, skipping (without decoding) the train-state entries that are not params."""
    count = decoder.map_header("the top-level msgpack object is not a map (expected a Flax state dict)")
    top: dict[str, Any] = {}
    skipped: list[str] = []
    for _ in range(count):
        key = _read_key(decoder)
        if key in TRAINSTATE_EXTRAS:
            decoder.skip()
            skipped.append(key)
        elif key in OPTIMIZER_KEYS:
            top[key] = _stream_optimizer(decoder, key, skipped)
        else:
            top[key] = decoder.unpack()
    return top, skipped


def _stream_optimizer(decoder: msgpack_io.MappedDecoder, name: str, skipped: list[str]) -> dict[str, Any]:
    """Decode a flax.optim ``Optimizer`` map: keep ``target``, skip ``state`` and anything else."""
    count = decoder.map_header(f"'{name}' is not a map (expected the flax.optim {{state, target}} dict)")
    kept: dict[str, Any] = {}
    for _ in range(count):
        key = _read_key(decoder)
        if key == "target":
            kept[key] = decoder.unpack()
        else:
            decoder.skip()
            skipped.append(f"{name}/{key}")
    return kept


# --------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------


def _select_params(raw: _RawState, path: Path) -> tuple[Any, str, list[str]]:
    """Pick the parameter tree out of a decoded state; return (params, layout, skipped paths)."""
    top, skipped = raw.top, list(raw.skipped)
    for key in OPTIMIZER_KEYS:
        node = top.get(key)
        if isinstance(node, dict) and "target" in node:
            target = node["target"]
            skipped += [k for k in top if k != key]
            if isinstance(target, dict) and isinstance(target.get("params"), dict):
                # Some flax.optim-era states kept a whole variables dict as the target.
                skipped += [f"{key}/target/{k}" for k in target if k != "params"]
                target = target["params"]
            return target, "flax-optim", skipped
    if "params" in top:
        is_state = bool(raw.skipped) or STEP_KEY in top or any(k in top for k in OPTIMIZER_KEYS)
        params = top["params"]
        if is_state and isinstance(params, dict) and list(params) == ["params"]:
            params = params["params"]  # a TrainState built around a whole variables dict
        skipped += [k for k in top if k != "params"]
        return params, "optax-trainstate" if is_state else "variables", skipped
    if raw.skipped or STEP_KEY in top or any(k in top for k in OPTIMIZER_KEYS):
        found = ", ".join(list(top) + raw.skipped)
        raise _fail(path, f"a train state without parameters (top-level keys: {found}; expected 'params' or 'optimizer/target')")
    return top, "bare", skipped


def _content_step(raw: _RawState, path: Path) -> int | None:
    """The ``global_step`` stored in the state as an int, or None if absent."""
    value = raw.top.get(STEP_KEY)
    if value is None:
        return None
    if raw.resolve is not None and not isinstance(value, (int, float, np.ndarray, np.generic)):
        value = raw.resolve(STEP_KEY, value)
    try:
        arr = np.asarray(value)
        if arr.shape == () and arr.dtype.kind in "iuf" and float(arr) == int(arr):
            return int(arr)
    except (TypeError, ValueError, OverflowError):
        pass
    raise _fail(path, f"global_step is {type(value).__name__} {str(value)[:40]} (expected an integer)")


def _select_subtree(params: Any, subtree: str, path: Path) -> Any:
    """Return ``params[a][b]...`` for ``subtree='a/b/...'``; a missing key lists what is there."""
    node = params
    walked: list[str] = []
    for part in (p for p in subtree.split("/") if p):
        if not isinstance(node, dict) or msgpack_io.CHUNK_MARKER in node:
            raise _fail(path, f"subtree '{subtree}': '{'/'.join(walked)}' is an array, not a sub-tree")
        if part not in node:
            keys = sorted(map(str, node))
            shown = ", ".join(keys[:40]) + (f", ... ({len(keys)} keys)" if len(keys) > 40 else "")
            where = "/".join(walked) or "the top of the params"
            raise _fail(path, f"subtree '{subtree}': no key '{part}' at {where} (available: {shown or 'none'})")
        node = node[part]
        walked.append(part)
    return node


def _wanted(keys: tuple[str, ...]) -> str | None:
    """None if a state path should be read; else the skipped entry it belongs to."""
    if keys[0] in TRAINSTATE_EXTRAS:
        return keys[0]
    if keys[0] in OPTIMIZER_KEYS and (len(keys) < 2 or keys[1] != "target"):
        return "/".join(keys[:2])
    return None


def _set_path(tree: dict[str, Any], keys: tuple[str, ...], value: Any, path: Path) -> None:
    """Store ``value`` at ``keys`` in a nested dict; a path that is already taken is an error."""
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise _fail(path, f"'{'/'.join(keys)}' is both an array and a sub-tree")
    if keys[-1] in node:
        raise _fail(path, f"'{'/'.join(keys)}' appears twice, or both as an array and a sub-tree")
    node[keys[-1]] = value


# --------------------------------------------------------------------------------------------
# .npz (big_vision / vit_jax)
# --------------------------------------------------------------------------------------------


def _read_npz(path: Path) -> _RawState:
    """Read an .npz of '/'-joined keys without pickle, skipping optimizer entries before decoding them."""
    top: dict[str, Any] = {}
    skipped: list[str] = []
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                keys = _npz_keys(info.filename, path)
                skip = _wanted(keys)
                if skip is not None:
                    if skip not in skipped:
                        skipped.append(skip)
                    continue
                _set_path(top, keys, _read_npz_member(archive, info, path), path)
    except zipfile.BadZipFile as exc:
        raise _fail(path, f"corrupt zip/npz archive ({exc})") from None
    except CheckpointError:
        raise
    except (EOFError, OSError, ValueError, RuntimeError, NotImplementedError, zlib.error, struct.error) as exc:
        # zipfile/zlib report damaged members in many ways (CRC, deflate stream, encryption, ...)
        raise _fail(path, f"corrupt npz member ({type(exc).__name__}: {str(exc)[:80]})") from None
    if not top and not skipped:
        raise _fail(path, "npz archive holds no arrays (expected '/'-joined parameter names)")
    return _RawState(top=top, skipped=skipped, sha256=_Done(_sha256_file(path)), format="npz")


def _npz_keys(member: str, path: Path) -> tuple[str, ...]:
    """Split an npz member name 'a/b/c.npy' into ('a', 'b', 'c')."""
    if not member.endswith(".npy"):
        hint = " (this looks like a PyTorch file)" if member.endswith(".pkl") else ""
        raise _fail(path, f"zip member '{member[:80]}' is not a .npy array{hint} (expected an .npz of arrays)")
    keys = tuple(member[:-4].split("/"))
    if not all(keys):
        raise _fail(path, f"npz key '{member[:80]}' has an empty path component")
    return keys


def _npz_dtype(dtype: np.dtype, member: str, path: Path) -> np.dtype:
    """Map a stored .npy dtype to what we return: bf16 saved as '|V2' (big_vision) becomes bfloat16."""
    if dtype.hasobject:
        raise _fail(path, f"'{member}' is an object array; pickled data is never loaded")
    if dtype.kind == "V" and dtype.fields is None and dtype.itemsize == 2 and dtype.subdtype is None:
        return DTYPES["bfloat16"]
    if dtype.fields is not None or dtype.subdtype is not None or dtype.name not in DTYPES:
        raise _fail(path, f"'{member}' has dtype {dtype} (expected a numeric dtype)")
    return dtype


def _read_npz_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> np.ndarray:
    """Read one .npy member, checking the declared shape against the member's real size first."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 4096:
        raise _fail(path, f"'{info.filename}' claims {info.file_size} bytes from {info.compress_size} compressed (corrupt archive)")
    with archive.open(info) as member:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(member)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(member)
        else:
            raise _fail(path, f"'{info.filename}' uses .npy format version {version} (expected 1.0 or 2.0)")
        out_dtype = _npz_dtype(dtype, info.filename, path)
        nbytes = math.prod(shape) * dtype.itemsize
        if member.tell() + nbytes != info.file_size:
            raise _fail(path, f"'{info.filename}' declares shape {shape} {dtype} but holds {info.file_size - member.tell()} data bytes")
        data = member.read(nbytes)
    if len(data) != nbytes:
        raise _fail(path, f"'{info.filename}' is truncated")
    order = "F" if fortran else "C"
    arr = np.frombuffer(data, dtype=out_dtype).reshape(shape, order=order)
    return np.ascontiguousarray(arr) if fortran else arr


# --------------------------------------------------------------------------------------------
# Orbax directories
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ArrayRef:
    """A tensorstore array of an Orbax checkpoint, read only if its leaf is returned."""

    name: str


def _load_json(path: Path) -> Any:
    """Parse a small JSON file of an Orbax checkpoint, with a size cap."""
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise _fail(path, f"JSON file is larger than {_MAX_JSON_BYTES} bytes (corrupt checkpoint)")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _fail(path, f"corrupt JSON ({str(exc)[:80]})") from None


def _metadata_entries(meta: Any, path: Path) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """The (key path, value_metadata) pairs of an Orbax ``_METADATA`` file, validated."""
    tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
    if not isinstance(tree, dict):
        raise _fail(path, "_METADATA has no 'tree_metadata' dict (expected an Orbax PyTree checkpoint)")
    entries = []
    for entry in tree.values():
        try:
            keys = tuple(str(k["key"]) for k in entry["key_metadata"])
            value_meta = dict(entry["value_metadata"])
        except (KeyError, TypeError, ValueError):
            raise _fail(path, "_METADATA entry lacks key_metadata/value_metadata") from None
        if keys:
            entries.append((keys, value_meta))
    return entries


def _read_orbax_dir(directory: Path) -> _RawState:
    """Read an Orbax PyTree checkpoint directory of any generation (see docs/checkpoint_formats.md)."""
    top: dict[str, Any] = {}
    skipped: list[str] = []
    inner = None
    if (directory / "checkpoint").is_file():
        inner = _read_msgpack_file(directory / "checkpoint")
        top, skipped = inner.top, list(inner.skipped)
    meta_path = directory / "_METADATA"
    meta = _load_json(meta_path) if meta_path.is_file() else {}
    strings_path = directory / "_strings.json"
    strings = _load_json(strings_path) if strings_path.is_file() else {}
    if meta:
        _merge_metadata(top, skipped, _metadata_entries(meta, meta_path), strings, directory)
    if not top and not skipped:
        raise _fail(directory, "Orbax directory holds no tree (expected a 'checkpoint' file or '_METADATA')")
    reader = _TensorstoreReader(directory, bool(meta.get("use_zarr3", False)) if isinstance(meta, dict) else False)
    fmt = "orbax-ocdbt" if reader.ocdbt else ("orbax-zarr" if _has_refs(top) else "orbax-msgpack")
    raw = _RawState(top=top, skipped=skipped, sha256=_Done(_sha256_dir(directory)), format=fmt, resolve=reader.resolve)
    if inner is not None:
        inner.sha256.close()
        raw.release = inner.release
    return raw


def _merge_metadata(
    top: dict[str, Any], skipped: list[str], entries: list[tuple[tuple[str, ...], dict[str, Any]]], strings: Any, directory: Path
) -> None:
    """Add the leaves listed in ``_METADATA`` to ``top``: arrays as _ArrayRef, strings from _strings.json."""
    for keys, value_meta in entries:
        skip = _wanted(keys)
        if skip is not None:
            if skip not in skipped:
                skipped.append(skip)
            continue
        value_type = str(value_meta.get("value_type", ""))
        if value_meta.get("skip_deserialize"):
            # Orbax keeps these out of tensorstore: empty containers, or values aggregated into
            # the 'checkpoint' msgpack file that was already read.
            if value_type in ("Dict", "List", "Tuple", "dict", "list", "tuple") and not _has_path(top, keys):
                _set_path(top, keys, {}, directory)
            continue
        if _has_path(top, keys) and not _is_placeholder(_get_path(top, keys)):
            continue
        if value_type == "string":
            name = ".".join(keys)
            if not isinstance(strings, dict) or name not in strings:
                raise _fail(directory, f"string leaf '{name}' is missing from _strings.json")
            _set_path(top, keys, strings[name], directory)
        else:
            _replace_path(top, keys, _ArrayRef(".".join(keys)))


def _has_path(tree: Any, keys: tuple[str, ...]) -> bool:
    """True if ``tree[k0][k1]...`` exists."""
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _get_path(tree: Any, keys: tuple[str, ...]) -> Any:
    """Return ``tree[k0][k1]...`` (the path must exist)."""
    for key in keys:
        tree = tree[key]
    return tree


def _replace_path(tree: dict[str, Any], keys: tuple[str, ...], value: Any) -> None:
    """Set ``tree[k0]...[kn] = value``, creating dicts on the way."""
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def _is_placeholder(value: Any) -> bool:
    """True for an Orbax ``PLACEHOLDER://<name>`` string (the array lives in tensorstore)."""
    return isinstance(value, str) and value.startswith(_ORBAX_PLACEHOLDER)


def _has_refs(tree: Any) -> bool:
    """True if any leaf of the tree must be read from tensorstore."""
    if isinstance(tree, dict):
        return any(_has_refs(v) for v in tree.values())
    return isinstance(tree, _ArrayRef) or _is_placeholder(tree)


class _TensorstoreReader:
    """Reads the per-leaf zarr arrays of an Orbax checkpoint (OCDBT or plain files) on demand."""

    def __init__(self, directory: Path, zarr3: bool) -> None:
        self.directory = directory.resolve()
        self.ocdbt = (directory / "manifest.ocdbt").is_file()
        self.zarr3 = zarr3
        self._dir_bytes: int | None = None

    def resolve(self, path: str, leaf: Any) -> np.ndarray | None:
        """Return the array behind an _ArrayRef or placeholder leaf; None for other leaves."""
        if isinstance(leaf, _ArrayRef):
            return self.read(leaf.name)
        if _is_placeholder(leaf):
            return self.read(leaf[len(_ORBAX_PLACEHOLDER) :])
        return None

    def _spec(self, name: str) -> dict[str, Any]:
        """The tensorstore spec of array ``name``."""
        if self.ocdbt:
            kvstore: dict[str, Any] = {
                "driver": "ocdbt",
                "base": {"driver": "file", "path": str(self.directory) + "/"},
                "path": name + "/",
            }
        else:
            kvstore = {"driver": "file", "path": str(self.directory / name) + "/"}
        return {"driver": "zarr3" if self.zarr3 else "zarr", "kvstore": kvstore}

    def read(self, name: str) -> np.ndarray:
        """Read array ``name`` after checking its declared size and dtype."""
        ts = _import_tensorstore(self.directory)
        if "/" in name or name.startswith(".") or not name:
            raise _fail(self.directory, f"bad array name '{name[:80]}'")
        try:
            store = ts.open(self._spec(name), open=True, read=True).result()
            dtype = np.dtype(store.dtype.numpy_dtype)
            shape = tuple(int(d) for d in store.shape)
            if dtype.name not in DTYPES:
                raise _fail(self.directory, f"array '{name}' has dtype {dtype} (expected a numeric dtype)")
            self._check_size(name, math.prod(shape) * dtype.itemsize)
            arr = np.asarray(store.read().result())
        except CheckpointError:
            raise
        except Exception as exc:  # tensorstore raises ValueError/RuntimeError/... for missing or corrupt data
            raise _fail(self.directory, f"cannot read array '{name}' ({type(exc).__name__}: {str(exc)[:120]})") from None
        if arr.shape != shape:
            raise _fail(self.directory, f"array '{name}' read as {arr.shape}, declared {shape}")
        return arr

    def _check_size(self, name: str, nbytes: int) -> None:
        """Refuse arrays whose declared size is absurd next to the bytes on disk."""
        if self._dir_bytes is None:
            self._dir_bytes = sum(p.stat().st_size for p in self.directory.rglob("*") if p.is_file())
        limit = max(_TS_FLOOR_BYTES, _MAX_TS_EXPANSION * self._dir_bytes)
        if nbytes > limit:
            raise _fail(self.directory, f"array '{name}' declares {nbytes} bytes, absurd for a {self._dir_bytes}-byte checkpoint")


def _import_tensorstore(directory: Path) -> Any:
    """Import tensorstore lazily; raise CheckpointError naming the extra when it is missing."""
    try:
        import tensorstore
    except ImportError:
        raise _fail(
            directory, "this Orbax checkpoint stores arrays with tensorstore, which is not installed (pip install tokenlearner-torch[orbax])"
        ) from None
    return tensorstore


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


def _sha256_file(path: Path) -> str:
    """sha256 of one file, read in 1 MiB blocks."""
    sha = hashlib.sha256()
    with open(path, "rb") as fp:
        for block in iter(lambda: fp.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _sha256_dir(directory: Path) -> str:
    """sha256 over every file of a directory: 'relative/path\\0<file sha256>\\n' lines in sorted order."""
    sha = hashlib.sha256()
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for file in files:
        rel = file.relative_to(directory).as_posix()
        sha.update(f"{rel}\0{_sha256_file(file)}\n".encode())
    return sha.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _writer_target(path: Path, step: int | None) -> Path:
    """The file to write: ``path`` itself, or ``path/checkpoint_<step>`` when ``path`` is a directory."""
    if path.is_dir():
        if step is None:
            raise _fail(path, "is a directory; pass step= to write checkpoint_<step> inside it, or a file path")
        return path / f"checkpoint_{int(step)}"
    if not path.parent.is_dir():
        raise _fail(path, "parent directory does not exist")
    return path


def _wrap_for_writing(params: dict[str, Any], wrap: str, step: int | None, path: Path) -> dict[str, Any]:
    """Put ``params`` in the requested state layout."""
    if not isinstance(params, dict):
        raise _fail(path, f"params is a {type(params).__name__} (expected a dict)")
    if wrap == "bare":
        return params
    if wrap == "variables":
        return {"params": params}
    if wrap == "optax-trainstate":
        # Scenic's TrainState fields in their declaration order; no optimizer state is invented.
        return {
            "opt_state": {},
            "params": params,
            "global_step": int(step or 0),
            "model_state": {},
            "rng": np.zeros(2, np.uint32),
            "metadata": {},
        }
    raise _fail(path, f"unknown wrap {wrap!r} (expected one of {', '.join(WRAPS)})")


class _HashingWriter:
    """Writes to a file and hashes what was written."""

    def __init__(self, fp: BinaryIO) -> None:
        self._fp = fp
        self.sha = hashlib.sha256()

    def write(self, data: Any) -> int:
        """Write ``data`` (bytes or a uint8 array view) and hash it."""
        self.sha.update(data)
        return self._fp.write(data)


def _write_file_atomically(tmp: Path, final: Path, tree: Any) -> str:
    """Write ``tree`` to ``tmp``, fsync, rename to ``final``; return the sha256 of the bytes."""
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as fp:
        writer = _HashingWriter(fp)
        msgpack_io.write_tree(writer, tree)  # type: ignore[arg-type]
        fp.flush()
        os.fsync(fp.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return writer.sha.hexdigest()


def _fsync_dir(directory: Path) -> None:
    """fsync a directory so the rename survives a crash (not possible on every platform)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    """Delete a temporary file if it exists."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass
