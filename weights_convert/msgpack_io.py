"""Low-level encoding and decoding of the Flax msgpack checkpoint format, without jax or flax.

The wire format (see docs/checkpoint_formats.md) is plain msgpack maps with str keys. Arrays are
msgpack ext objects whose payload is itself msgpack: ``[shape, dtype_name, raw C-order bytes]``.
Ext code 1 is an ndarray, 3 a numpy scalar (same payload, shape ``[]``), 2 a python complex
``[real, imag]``. Arrays larger than :data:`MAX_CHUNK_SIZE` bytes are split into a dict of 1-D chunks
marked with :data:`CHUNK_MARKER`.

Everything here works on untrusted bytes: sizes are checked against the bytes actually present
before anything is allocated, nesting depth is capped, and every failure raises
:class:`DecodeError` carrying a one-line description. The caller adds the file name.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO, Callable, Iterator

import msgpack
import numpy as np

EXT_NDARRAY = 1
EXT_COMPLEX = 2
EXT_NPSCALAR = 3

#: Arrays whose byte size exceeds this are written as chunk dicts (msgpack objects max out at 4 GiB;
#: the Flax writer uses the same threshold, so files we write chunk exactly where Flax's would).
#: Tests monkeypatch it to a small number to exercise chunking cheaply.
MAX_CHUNK_SIZE = 2**30

CHUNK_MARKER = "__msgpack_chunked_array__"

#: Deepest nesting accepted in a decoded tree. Real parameter trees are < 15 levels deep; the cap
#: keeps the recursive walkers far from Python's recursion limit on hostile files.
MAX_DEPTH = 64

#: numpy refuses more dimensions than this; anything larger in a header is corrupt.
MAX_NDIM = 32

#: Limits on msgpack containers and strings. A declared map/array length is walked entry by entry,
#: so without a cap a 5-byte header could keep the decoder busy for billions of steps.
MAX_CONTAINER_LEN = 1 << 20
MAX_STR_LEN = 1 << 24

_NUMPY_DTYPE_NAMES = (
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64", "complex64", "complex128",
)  # fmt: skip
_ML_DTYPE_NAMES = (
    "bfloat16", "float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn",
    "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "float4_e2m1fn",
    "float6_e2m3fn", "float6_e3m2fn", "int2", "int4", "uint2", "uint4",
)  # fmt: skip


class _DtypeTable(Mapping):
    """Every accepted dtype name -> its numpy dtype (only what this ml_dtypes version has).

    numpy's names are there at once; ml_dtypes' (bfloat16, float8, ...) join at the first lookup of
    another name: importing ml_dtypes costs about a second of CPU (it registers its types with numpy),
    which every command-line run would pay for float32 files that never need it."""

    def __init__(self) -> None:
        self._table = {name: np.dtype(name) for name in _NUMPY_DTYPE_NAMES}
        self._complete = False

    def _all(self) -> dict[str, np.dtype]:
        if not self._complete:
            import ml_dtypes

            for name in _ML_DTYPE_NAMES:
                scalar_type = getattr(ml_dtypes, name, None)
                if scalar_type is not None:
                    self._table[name] = np.dtype(scalar_type)
            self._complete = True
        return self._table

    def __getitem__(self, name: str) -> np.dtype:
        if name in self._table:
            return self._table[name]
        return self._all()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._table or name in self._all()

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


#: The dtype names accepted on read and write. An explicit allow-list, because ``np.dtype(name)``
#: on an attacker-chosen string can build object, structured or sub-array dtypes.
DTYPES: Mapping[str, np.dtype] = _DtypeTable()


class DecodeError(Exception):
    """Internal: the bytes are not a valid Flax msgpack stream. The message is one line."""


class EncodeError(Exception):
    """Internal: a tree cannot be written in the Flax msgpack format. The message is one line."""


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


def resolve_dtype(name: Any) -> np.dtype:
    """Return the numpy dtype for a Flax dtype name (str or bytes); raise DecodeError if not allowed."""
    if isinstance(name, bytes):
        try:
            name = name.decode("ascii")
        except UnicodeDecodeError:
            raise DecodeError("array dtype name is not ASCII") from None
    if not isinstance(name, str) or name not in DTYPES:
        shown = repr(name)[:60]
        raise DecodeError(f"unsupported array dtype {shown} (expected a numeric dtype such as float32 or bfloat16)")
    return DTYPES[name]


def _raw_header(data: bytes, off: int) -> tuple[int, int]:
    """Parse a msgpack bin/str header at ``off``; return (header length, payload length)."""
    if off >= len(data):
        raise DecodeError("array payload ends before its data block")
    tag = data[off]
    if 0xA0 <= tag <= 0xBF:  # fixstr (very old writers packed the buffer as str)
        return 1, tag & 0x1F
    widths = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
    width = widths.get(tag)
    if width is None:
        raise DecodeError(f"array data block has msgpack type 0x{tag:02x} (expected bin)")
    if off + 1 + width > len(data):
        raise DecodeError("array payload ends inside its data header")
    return 1 + width, int.from_bytes(data[off + 1 : off + 1 + width], "big")


def _check_shape(shape: Any) -> tuple[int, ...]:
    """Validate a decoded shape (list of non-negative ints) and return it as a tuple."""
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise DecodeError(f"array shape is {type(shape).__name__} of length {len(shape) if isinstance(shape, list) else '?'} (expected a list of at most {MAX_NDIM} ints)")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise DecodeError(f"array shape {shape!r:.80} has a bad dimension (expected ints >= 0)")
    return tuple(shape)


def decode_ndarray_payload(data: bytes) -> np.ndarray:
    """Decode an ext-1/ext-3 payload into a read-only numpy array sharing memory with ``data``.

    The declared shape and dtype are only used to *check* the byte count; the array is built from
    the bytes that are actually present, so a lying header cannot cause an allocation.
    """
    head = msgpack.Unpacker(
        None, raw=True, max_buffer_size=4096, max_array_len=MAX_NDIM + 1, max_map_len=0,
        max_str_len=256, max_bin_len=4096, max_ext_len=0,
    )  # fmt: skip
    # Only a short prefix is fed: shape and dtype name fit in a few hundred bytes, and feeding the
    # whole payload would copy the array data once more.
    head.feed(memoryview(data)[:4096])
    try:
        if head.read_array_header() != 3:
            raise DecodeError("array payload is not a 3-element [shape, dtype, data] list")
        shape = _check_shape(head.unpack())
        dtype = resolve_dtype(head.unpack())
        offset = head.tell()
    except DecodeError:
        raise
    except (msgpack.UnpackException, ValueError, TypeError) as exc:
        raise DecodeError(f"array payload header is malformed ({type(exc).__name__})") from None
    hdr_len, nbytes = _raw_header(data, offset)
    start = offset + hdr_len
    if start + nbytes != len(data):
        raise DecodeError(f"array payload length {len(data)} disagrees with its data header ({nbytes} bytes at offset {start})")
    expected = math.prod(shape) * dtype.itemsize
    if expected != nbytes:
        raise DecodeError(f"array of shape {shape} and dtype {dtype.name} needs {expected} bytes but the file holds {nbytes}")
    return np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=start).reshape(shape)


def _decode_complex(data: bytes) -> complex:
    """Decode an ext-2 payload ``[real, imag]`` into a python complex."""
    try:
        parts = msgpack.unpackb(data, raw=True, max_array_len=2, max_map_len=0, max_str_len=0, max_bin_len=0, max_ext_len=0)
    except (msgpack.UnpackException, ValueError, TypeError):
        raise DecodeError("complex payload is malformed") from None
    if not isinstance(parts, list) or len(parts) != 2 or not all(type(p) in (int, float) for p in parts):
        raise DecodeError("complex payload is not [real, imag]")
    return complex(parts[0], parts[1])


def ext_hook(code: int, data: bytes) -> Any:
    """msgpack ext hook: return the ndarray / 0-d array / complex encoded by a Flax ext object."""
    if code == EXT_NDARRAY:
        return decode_ndarray_payload(data)
    if code == EXT_NPSCALAR:
        arr = decode_ndarray_payload(data)
        if arr.shape != ():
            raise DecodeError(f"numpy-scalar ext object has shape {arr.shape} (expected ())")
        return arr
    if code == EXT_COMPLEX:
        return _decode_complex(data)
    raise DecodeError(f"unknown msgpack ext type {code} (expected 1, 2 or 3 as written by Flax)")


# --------------------------------------------------------------------------------------------
# Zero-copy decoding of a mapped file
# --------------------------------------------------------------------------------------------

#: Most msgpack objects one file may hold. Real checkpoints hold a few thousand; the cap keeps a hostile
#: file of millions of one-byte objects from keeping the Python-level decoder busy for minutes.
MAX_OBJECTS = 1 << 22

_INT, _FLOAT, _NIL, _BOOL, _STR, _BIN, _ARRAY, _MAP, _EXT = range(9)
# tag -> (kind, width of the length/value field, whether a signed int / an ext type byte follows)
_TAGS: dict[int, tuple[int, int, bool]] = {
    0xC0: (_NIL, 0, False), 0xC2: (_BOOL, 0, False), 0xC3: (_BOOL, 0, True),
    0xC4: (_BIN, 1, False), 0xC5: (_BIN, 2, False), 0xC6: (_BIN, 4, False),
    0xC7: (_EXT, 1, True), 0xC8: (_EXT, 2, True), 0xC9: (_EXT, 4, True),
    0xCA: (_FLOAT, 4, False), 0xCB: (_FLOAT, 8, False),
    0xCC: (_INT, 1, False), 0xCD: (_INT, 2, False), 0xCE: (_INT, 4, False), 0xCF: (_INT, 8, False),
    0xD0: (_INT, 1, True), 0xD1: (_INT, 2, True), 0xD2: (_INT, 4, True), 0xD3: (_INT, 8, True),
    0xD9: (_STR, 1, False), 0xDA: (_STR, 2, False), 0xDB: (_STR, 4, False),
    0xDC: (_ARRAY, 2, False), 0xDD: (_ARRAY, 4, False), 0xDE: (_MAP, 2, False), 0xDF: (_MAP, 4, False),
}  # fmt: skip
_FIXEXT = {0xD4: 1, 0xD5: 2, 0xD6: 4, 0xD7: 8, 0xD8: 16}
_KIND_NAMES = {_INT: "int", _FLOAT: "float", _NIL: "nil", _BOOL: "bool", _STR: "str", _BIN: "bin", _ARRAY: "array", _MAP: "map", _EXT: "ext"}


class MappedDecoder:
    """Decode msgpack from a buffer (a memory-mapped checkpoint) without copying array data.

    Only object headers are parsed (in Python: a checkpoint holds a few thousand objects); arrays come back
    as read-only numpy views of the buffer, and :meth:`skip` steps over an object by its lengths without
    touching its payload, so skipped optimizer state is never read into memory. Why not the msgpack
    library's Unpacker: it copies every byte of the file into its buffer and every array into a new bytes
    object while holding the GIL (0.5 s and 330 MB of fresh memory for a ViT-B/16 TrainState), which
    stalls the converter's parallel import of torch. Limits: :data:`MAX_CONTAINER_LEN`, :data:`MAX_STR_LEN`, :data:`MAX_DEPTH`,
    :data:`MAX_OBJECTS`; no length may exceed the bytes left.
    """

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self._objects = 0

    def _take(self, n: int) -> int:
        start = self.pos
        if start + n > self.size:
            raise DecodeError(f"file is truncated or a length field is corrupt (an object at byte {start} needs {n} bytes, {self.size - start} are left)")
        self.pos = start + n
        return start

    def _int(self, width: int, signed: bool = False) -> int:
        start = self._take(width)
        return int.from_bytes(self.buf[start : start + width], "big", signed=signed)

    def _head(self) -> tuple[int, Any]:
        """Read one header: (kind, value for scalars / length for str, bin, array, map / (code, length) for ext)."""
        self._objects += 1
        if self._objects > MAX_OBJECTS:
            raise DecodeError(f"corrupt msgpack data: more than {MAX_OBJECTS} objects (a checkpoint holds a few thousand)")
        tag = self.buf[self._take(1)]
        if tag <= 0x7F:
            return _INT, tag
        if tag >= 0xE0:
            return _INT, tag - 0x100
        if tag <= 0x8F:
            return self._checked(_MAP, tag & 0x0F)
        if tag <= 0x9F:
            return self._checked(_ARRAY, tag & 0x0F)
        if tag <= 0xBF:
            return self._checked(_STR, tag & 0x1F)
        if tag in _FIXEXT:
            return _EXT, (self._int(1, signed=True), _FIXEXT[tag])
        spec = _TAGS.get(tag)
        if spec is None:
            raise DecodeError(f"corrupt msgpack data: invalid type byte 0x{tag:02x} at {self.pos - 1}")
        kind, width, flag = spec
        if kind in (_NIL, _BOOL):
            return kind, (None if kind == _NIL else flag)
        if kind == _FLOAT:
            start = self._take(width)
            return kind, struct.unpack(">f" if width == 4 else ">d", self.buf[start : start + width])[0]
        if kind == _INT:
            return kind, self._int(width, signed=flag)
        length = self._int(width)
        if kind == _EXT:
            return _EXT, (self._int(1, signed=True), length)
        return self._checked(kind, length)

    def _checked(self, kind: int, length: int) -> tuple[int, int]:
        if kind in (_ARRAY, _MAP) and length > MAX_CONTAINER_LEN:
            raise DecodeError(f"corrupt msgpack data: a {_KIND_NAMES[kind]} declares {length} entries (at most {MAX_CONTAINER_LEN} accepted)")
        if kind == _STR and length > MAX_STR_LEN:
            raise DecodeError(f"corrupt msgpack data: a str declares {length} bytes (at most {MAX_STR_LEN} accepted)")
        return kind, length

    def map_header(self, not_a_map: str) -> int:
        """Read a map header and return its number of entries; DecodeError(``not_a_map``) for another object."""
        kind, length = self._head()
        if kind != _MAP:
            raise DecodeError(not_a_map)
        return length

    def unpack(self, depth: int = 0) -> Any:
        """Decode the next object (arrays as views of the buffer)."""
        if depth > MAX_DEPTH:
            raise DecodeError(f"msgpack objects nested deeper than {MAX_DEPTH} levels")
        kind, value = self._head()
        if kind in (_INT, _FLOAT, _NIL, _BOOL):
            return value
        if kind == _STR:
            start = self._take(value)
            try:
                return str(self.buf[start : self.pos], "utf-8")
            except UnicodeDecodeError:
                raise DecodeError(f"corrupt msgpack data: the str at byte {start} is not UTF-8") from None
        if kind == _BIN:
            start = self._take(value)
            return bytes(self.buf[start : self.pos])
        if kind == _ARRAY:
            return [self.unpack(depth + 1) for _ in range(value)]
        if kind == _MAP:
            out: dict[Any, Any] = {}
            for _ in range(value):
                key = self.unpack(depth + 1)
                if isinstance(key, (list, dict, np.ndarray)):  # unhashable
                    raise DecodeError(f"a msgpack map key is a {type(key).__name__} (expected str)")
                out[key] = self.unpack(depth + 1)
            return out
        code, length = value
        start = self._take(length)
        return ext_hook(code, self.buf[start : self.pos])

    def skip(self, depth: int = 0) -> None:
        """Step over the next object without decoding it."""
        if depth > MAX_DEPTH:
            raise DecodeError(f"msgpack objects nested deeper than {MAX_DEPTH} levels")
        kind, value = self._head()
        if kind in (_STR, _BIN):
            self._take(value)
        elif kind == _EXT:
            self._take(value[1])
        elif kind in (_ARRAY, _MAP):
            for _ in range(value * (2 if kind == _MAP else 1)):
                self.skip(depth + 1)


def _chunk_index_dict(value: Any, what: str) -> list[Any]:
    """Return the values of a ``{'0': v0, '1': v1, ...}`` dict in index order (Flax's tuple encoding)."""
    if not isinstance(value, dict) or not value:
        raise DecodeError(f"chunked array has no '{what}' dict")
    if set(value) != {str(i) for i in range(len(value))}:
        raise DecodeError(f"chunked array '{what}' keys are not '0'..'{len(value) - 1}'")
    return [value[str(i)] for i in range(len(value))]


def unchunk(node: dict[str, Any]) -> np.ndarray:
    """Rebuild an array from a Flax chunk dict ``{marker: True, 'shape': {...}, 'chunks': {...}}``."""
    if set(node) != {CHUNK_MARKER, "shape", "chunks"}:
        raise DecodeError(f"chunked array dict has keys {sorted(map(str, node))} (expected {CHUNK_MARKER}, shape, chunks)")
    shape = _check_shape(_chunk_index_dict(node["shape"], "shape"))
    chunks = _chunk_index_dict(node["chunks"], "chunks")
    if not all(isinstance(c, np.ndarray) and c.ndim == 1 for c in chunks):
        raise DecodeError("chunked array has a chunk that is not a 1-D array")
    dtypes = {c.dtype for c in chunks}
    if len(dtypes) != 1:
        raise DecodeError(f"chunked array mixes dtypes {sorted(d.name for d in dtypes)}")
    total = sum(c.size for c in chunks)
    if total != math.prod(shape):
        raise DecodeError(f"chunked array holds {total} elements but its shape {shape} needs {math.prod(shape)}")
    return np.concatenate(chunks).reshape(shape)


def _leaf_to_array(value: Any, path: str) -> np.ndarray:
    """Turn a decoded parameter leaf into a numpy array, or raise DecodeError naming the path."""
    if isinstance(value, np.ndarray):
        return value
    if type(value) in (bool, int, float, complex):
        try:
            return np.asarray(value)
        except OverflowError:
            raise DecodeError(f"integer at '{path}' does not fit in int64") from None
    if isinstance(value, str) and value.startswith("//GDAPlaceholder:"):
        raise DecodeError(f"'{path}' is a multi-process array placeholder; its data lives in a separate '_gda' directory, which is not supported")
    shown = type(value).__name__
    raise DecodeError(f"'{path}' is a {shown} (expected a dict or an array)")


def finalize_params(
    node: Any,
    path: str = "",
    depth: int = 0,
    resolve: Callable[[str, str], np.ndarray | None] | None = None,
) -> Any:
    """Validate a decoded parameter tree in place and return it: str keys, dict nodes, array leaves.

    Chunk dicts become arrays, python scalars become 0-d arrays. ``resolve(path, leaf)`` may turn a
    non-array leaf (an Orbax placeholder or array reference) into an array; returning None leaves
    the leaf to the usual checks.
    """
    if depth > MAX_DEPTH:
        raise DecodeError(f"tree is nested deeper than {MAX_DEPTH} levels at '{path}'")
    if not isinstance(node, dict):
        if resolve is not None and not isinstance(node, np.ndarray):
            resolved = resolve(path, node)
            if resolved is not None:
                return resolved
        return _leaf_to_array(node, path)
    if CHUNK_MARKER in node:
        return unchunk(node)
    for key in list(node):
        if not isinstance(key, str):
            raise DecodeError(f"key {key!r:.40} under '{path}' is a {type(key).__name__} (expected str)")
        child = f"{path}/{key}" if path else key
        # Replace in place so that chunk lists are freed as soon as their array is rebuilt.
        node[key] = finalize_params(node[key], child, depth + 1, resolve)
    return node


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------

_PACKER_OPTS = {"use_bin_type": True, "strict_types": True, "autoreset": True}


def _ext_header(code: int, length: int) -> bytes:
    """The msgpack ext header msgpack itself would emit for a payload of ``length`` bytes."""
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if length in fixed:
        return bytes((fixed[length], code))
    if length < 2**8:
        return bytes((0xC7, length, code))
    if length < 2**16:
        return b"\xc8" + length.to_bytes(2, "big") + bytes((code,))
    if length < 2**32:
        return b"\xc9" + length.to_bytes(4, "big") + bytes((code,))
    raise EncodeError(f"array of {length} bytes is too large for one msgpack object (chunking should have split it)")


def _bin_header(length: int) -> bytes:
    """The msgpack bin header for ``length`` bytes of data."""
    if length < 2**8:
        return bytes((0xC4, length))
    if length < 2**16:
        return b"\xc5" + length.to_bytes(2, "big")
    return b"\xc6" + length.to_bytes(4, "big")


def as_writable_array(value: Any, path: str) -> np.ndarray:
    """Return ``value`` as a native-byte-order C-contiguous array of an allowed dtype, or raise EncodeError."""
    arr = np.asarray(value)
    if arr.dtype.name not in DTYPES or arr.dtype.fields is not None:
        raise EncodeError(f"'{path}' has dtype {arr.dtype} (expected one of {', '.join(DTYPES)})")
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "<" and not np.little_endian):
        # Flax stores no byte order: the data must be in the machine's order.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    return arr


def ndarray_ext_parts(arr: np.ndarray, code: int = EXT_NDARRAY) -> list[Any]:
    """Return the byte pieces of one array ext object; the data piece is a view, not a copy."""
    inner = b"\x93" + msgpack.packb(list(arr.shape)) + msgpack.packb(arr.dtype.name) + _bin_header(arr.nbytes)
    data = arr.reshape(-1).view(np.uint8)
    return [_ext_header(code, len(inner) + arr.nbytes), inner, data]


def _chunk_parts(arr: np.ndarray, packer: msgpack.Packer) -> Iterator[Any]:
    """Yield the pieces of a Flax chunk dict for an array larger than MAX_CHUNK_SIZE bytes."""
    per_chunk = max(1, int(MAX_CHUNK_SIZE / arr.dtype.itemsize))
    flat = arr.reshape(-1)
    starts = range(0, flat.size, per_chunk)
    yield packer.pack_map_header(3)
    yield packer.pack(CHUNK_MARKER)
    yield packer.pack(True)
    yield packer.pack("shape")
    yield packer.pack({str(i): d for i, d in enumerate(arr.shape)})
    yield packer.pack("chunks")
    yield packer.pack_map_header(len(starts))
    for i, start in enumerate(starts):
        yield packer.pack(str(i))
        yield from ndarray_ext_parts(flat[start : start + per_chunk])


def _is_array_like(value: Any) -> bool:
    """True for numpy arrays/scalars and foreign arrays (jax) exposing ``__array__``."""
    return isinstance(value, (np.ndarray, np.generic)) or (hasattr(value, "__array__") and not isinstance(value, (str, bytes, dict)))


def encode_parts(tree: Any, packer: msgpack.Packer | None = None, path: str = "", depth: int = 0) -> Iterator[Any]:
    """Yield the bytes (and zero-copy array views) of ``tree`` in the Flax msgpack encoding.

    Dicts need str keys; leaves may be arrays, numpy scalars, bool/int/float/complex/str/bytes/None.
    The concatenation equals ``flax.serialization.msgpack_serialize(tree)``.
    """
    packer = packer or msgpack.Packer(**_PACKER_OPTS)
    if depth > MAX_DEPTH:
        raise EncodeError(f"tree is nested deeper than {MAX_DEPTH} levels at '{path}'")
    if isinstance(tree, dict):
        yield packer.pack_map_header(len(tree))
        for key, value in tree.items():
            if not isinstance(key, str):
                raise EncodeError(f"key {key!r:.40} under '{path}' is a {type(key).__name__} (expected str)")
            yield packer.pack(key)
            yield from encode_parts(value, packer, f"{path}/{key}" if path else key, depth + 1)
    elif isinstance(tree, np.generic):
        yield from ndarray_ext_parts(as_writable_array(tree, path), EXT_NPSCALAR)
    elif _is_array_like(tree):
        arr = as_writable_array(tree, path)
        if arr.nbytes > MAX_CHUNK_SIZE:
            yield from _chunk_parts(arr, packer)
        else:
            yield from ndarray_ext_parts(arr)
    elif type(tree) is complex:
        yield packer.pack(msgpack.ExtType(EXT_COMPLEX, msgpack.packb((tree.real, tree.imag))))
    elif tree is None or type(tree) in (bool, int, float, str, bytes):
        try:
            yield packer.pack(tree)
        except (OverflowError, ValueError) as exc:
            raise EncodeError(f"'{path}' cannot be packed: {exc}") from None
    else:
        raise EncodeError(f"'{path}' is a {type(tree).__name__} (expected a dict, an array or a python scalar)")


def write_tree(fp: BinaryIO, tree: Any) -> int:
    """Write ``tree`` to the binary file ``fp`` in the Flax msgpack encoding; return the byte count."""
    total = 0
    for piece in encode_parts(tree):
        fp.write(piece)
        total += len(piece) if isinstance(piece, bytes) else piece.nbytes
    return total


def packb_tree(tree: Any) -> bytes:
    """Return the Flax msgpack encoding of ``tree`` as bytes (for small trees and tests)."""
    return b"".join(bytes(p) for p in encode_parts(tree))
