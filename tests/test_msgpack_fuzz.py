"""Property tests: hostile bytes give a tree or CheckpointError, never another exception, a hang or a
huge allocation; any tree the writer accepts reads back bitwise."""

from __future__ import annotations

import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenlearner_torch.errors import CheckpointError
from tokenlearner_torch.weights_convert import msgpack_io
from tokenlearner_torch.weights_convert.readers import read_checkpoint, write_flax_msgpack

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
_WORKDIR = Path(tempfile.mkdtemp(prefix="tl_fuzz_"))


def _valid_checkpoint() -> bytes:
    params = {
        "enc": {"kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "bias": np.ones(4, np.float32)},
        "bf": np.linspace(0, 1, 6).astype(ml_dtypes.bfloat16).reshape(2, 3),
        "chunked": {
            msgpack_io.CHUNK_MARKER: True,
            "shape": {"0": 2, "1": 2},
            "chunks": {"0": np.arange(3, dtype=np.int32), "1": np.arange(1, dtype=np.int32)},
        },
    }
    state = {
        "opt_state": {"0": {"count": np.array(3, np.int32), "mu": {"w": np.zeros(3)}}, "1": {}},
        "params": params,
        "global_step": 3,
        "rng": np.array([1, 2], np.uint32),
        "metadata": {"chrono": {"t": 1.5}},
    }
    return msgpack_io.packb_tree(state)


VALID = _valid_checkpoint()


def _read_bytes(data: bytes) -> Any:
    """Read ``data`` as a checkpoint file; check the outcome and the memory it needed."""
    path = _WORKDIR / "ck"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        tree = read_checkpoint(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        # Nothing may be allocated from declared sizes: a few KB of input never needs more than ~1 MB.
        assert peak < (1 << 20) + 64 * len(data), peak
    assert isinstance(tree, dict)
    _check_tree(tree)
    return tree


def _check_tree(tree: Any, depth: int = 0) -> None:
    assert depth <= msgpack_io.MAX_DEPTH
    for key, value in tree.items():
        assert isinstance(key, str)
        if isinstance(value, dict):
            _check_tree(value, depth + 1)
        else:
            assert isinstance(value, np.ndarray) and value.dtype.name in msgpack_io.DTYPES


def test_valid_checkpoint_reads() -> None:
    tree = _read_bytes(VALID)
    assert tree is not None and tree["chunked"].tolist() == [[0, 1], [2, 0]]


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    _read_bytes(data)


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_after_map_header(data: bytes) -> None:
    _read_bytes(b"\x81\xa6params" + data)


@FUZZ
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(1, 255)), min_size=1, max_size=6))
def test_byte_flips(flips: list[tuple[int, int]]) -> None:
    data = bytearray(VALID)
    for pos, mask in flips:
        data[pos] ^= mask
    _read_bytes(bytes(data))


@FUZZ
@given(st.integers(0, len(VALID)), st.integers(0, 16), st.binary(max_size=16))
def test_splices(pos: int, cut: int, insert: bytes) -> None:
    _read_bytes(VALID[:pos] + insert + VALID[pos + cut :])


_shapes = st.lists(st.integers(-3, 2**62), max_size=6)
_names = st.sampled_from(["float32", "bfloat16", "int8", "bool", "complex64", "object", "V2", "<f4", "f4,f4", ""])


@FUZZ
@given(_shapes, _names, st.binary(max_size=64))
def test_array_payloads(shape: list[int], name: str, data: bytes) -> None:
    import msgpack

    payload = msgpack.packb([shape, name, data], use_bin_type=True)
    try:
        arr = msgpack_io.decode_ndarray_payload(payload)
    except msgpack_io.DecodeError:
        return
    assert arr.nbytes == len(data) and list(arr.shape) == shape


_DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "int32", "int64", "uint8", "uint32", "bool", "complex64", "float8_e4m3fn"]


@st.composite
def _arrays(draw: Any) -> np.ndarray:
    dtype = np.dtype(msgpack_io.DTYPES[draw(st.sampled_from(_DTYPES))])
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    raw = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize, max_size=int(np.prod(shape)) * dtype.itemsize))
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


_keys = st.text(alphabet="abcXYZ_0123/.", min_size=1, max_size=6)
_trees = st.recursive(_arrays(), lambda children: st.dictionaries(_keys, children, max_size=4), max_leaves=8)


@settings(max_examples=80, deadline=2000)
@given(st.dictionaries(_keys, _trees, max_size=4), st.sampled_from(["optax-trainstate", "variables", "bare"]), st.booleans())
def test_write_read_roundtrip_bitwise(params: dict[str, Any], wrap: str, small_chunks: bool) -> None:
    path = _WORKDIR / "rt"
    if small_chunks:
        # exercise chunking on tiny arrays without monkeypatch (not usable with @given)
        old, msgpack_io.MAX_CHUNK_SIZE = msgpack_io.MAX_CHUNK_SIZE, 8
    try:
        write_flax_msgpack(path, params, wrap=wrap, step=1)
    finally:
        if small_chunks:
            msgpack_io.MAX_CHUNK_SIZE = old
    if wrap == "bare" and (not params or set(params) & {"params", "optimizer", "opt", "global_step", "opt_state", "model_state", "rng", "metadata", "accum_train_time"}):
        return  # a bare tree using train-state key names is read as that layout; covered elsewhere
    got = read_checkpoint(path)
    _assert_same(got, params)


def _assert_same(got: Any, want: Any) -> None:
    if isinstance(want, dict):
        assert list(got) == list(want)
        for key in want:
            _assert_same(got[key], want[key])
    else:
        assert got.dtype == want.dtype and got.shape == want.shape and got.tobytes() == want.tobytes()


@pytest.fixture(scope="module", autouse=True)
def _cleanup() -> Any:
    yield
    for file in _WORKDIR.iterdir():
        file.unlink()
    _WORKDIR.rmdir()


def _valid_npz(compressed: bool) -> bytes:
    import io

    buf = io.BytesIO()
    arrays = {"params/enc/kernel": np.arange(12, dtype=np.float32).reshape(3, 4), "params/bf": np.ones(3, ml_dtypes.bfloat16).view("V2")}
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    return buf.getvalue()


NPZ = {False: _valid_npz(False), True: _valid_npz(True)}


@FUZZ
@given(st.booleans(), st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=4), st.integers(0, 10**6))
def test_npz_mutations(compressed: bool, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(NPZ[compressed])
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    _read_bytes(bytes(data[: max(1, len(data) - cut % 64)]))
