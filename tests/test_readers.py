"""Checkpoint readers and the Flax msgpack writer (weights_convert/readers.py, msgpack_io.py).

Reference results come from real flax (and orbax/tensorstore where installed): the goldens, files
written by ``flax.training.checkpoints.save_checkpoint``, Orbax directories, hand-built legacy
layouts. Then round trips, corrupt inputs and the atomic writer.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import msgpack
import numpy as np
import pytest

from tokenlearner_torch.errors import CheckpointError
from tokenlearner_torch.weights_convert import msgpack_io, readers
from tokenlearner_torch.weights_convert.readers import (
    find_nonfinite,
    read_checkpoint,
    read_checkpoint_info,
    write_flax_msgpack,
)

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"
PARAM_FILES = sorted(GOLDENS.glob("*/params.msgpack"))
CKPT_DIRS = sorted(GOLDENS.glob("vit_*/checkpoint"))
BF16 = np.dtype(ml_dtypes.bfloat16)


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def assert_tree_equal(got: Any, want: Any, path: str = "", ordered: bool = False) -> None:
    """Bitwise equality of two trees: same keys (in the same order if ``ordered``), and per leaf the
    same dtype, shape and bytes. Key order is only checked where the writer kept it (jax and
    orbax re-sort dict keys)."""
    if isinstance(want, dict):
        assert isinstance(got, dict), path
        assert (list(got) if ordered else sorted(got)) == (list(want) if ordered else sorted(want)), path
        for key in want:
            assert_tree_equal(got[key], want[key], f"{path}/{key}", ordered)
        return
    want_arr, got_arr = np.asarray(want), np.asarray(got)
    assert got_arr.dtype == want_arr.dtype, path
    assert got_arr.shape == want_arr.shape, path
    assert got_arr.tobytes() == want_arr.tobytes(), path


def sample_params() -> dict[str, Any]:
    """A small params tree covering the dtypes and shapes that matter."""
    rng = np.random.default_rng(0)
    return {
        "TokenLearnerModuleV11_0": {
            "LayerNorm_0": {"scale": rng.normal(size=(8,)).astype(np.float32), "bias": np.zeros(8, np.float32)},
            "token_masking": {"Dense_0": {"kernel": rng.normal(size=(8, 4)).astype(np.float32)}},
        },
        "bf16": {"kernel": rng.normal(size=(3, 5)).astype(BF16)},
        "f8": np.arange(6, dtype=np.float32).astype(ml_dtypes.float8_e4m3fn).reshape(2, 3),
        "f64": rng.normal(size=(2, 2)),
        "i64": np.arange(4, dtype=np.int64),
        "u8": np.arange(3, dtype=np.uint8),
        "flag": np.array([True, False]),
        "scalar": np.array(2.5, np.float32),
        "empty_array": np.zeros((0, 3), np.float32),
        "empty_dict": {},
        "c64": np.array([1 + 2j], np.complex64),
    }


def scenic_state(params: dict[str, Any], step: int = 7) -> dict[str, Any]:
    """The state dict of Scenic's optax TrainState with an Adam state (what save_checkpoint writes)."""
    zeros = _map(lambda a: np.zeros_like(a), params)
    return {
        "opt_state": {"0": {"count": np.array(step, np.int32), "mu": zeros, "nu": zeros}, "1": {}},
        "params": params,
        "global_step": step,
        "model_state": {},
        "rng": np.array([0, 42], np.uint32),
        "metadata": {"chrono": {"accum_train_time": 1.5, "note": "x"}},
    }


def _map(fn: Any, tree: Any) -> Any:
    return {k: _map(fn, v) for k, v in tree.items()} if isinstance(tree, dict) else fn(tree)


@pytest.fixture()
def flax_ser():
    """flax.serialization (skips if flax is missing)."""
    return pytest.importorskip("flax.serialization")


@pytest.fixture()
def flax_ckpts():
    """flax.training.checkpoints in legacy (non-orbax) mode, restored afterwards."""
    flax = pytest.importorskip("flax")
    from flax.training import checkpoints

    old = flax.config.flax_use_orbax_checkpointing
    flax.config.update("flax_use_orbax_checkpointing", False)
    yield checkpoints
    flax.config.update("flax_use_orbax_checkpointing", old)


def one_line_error(excinfo: pytest.ExceptionInfo, path: Any) -> str:
    """The error message, checked to be one line naming the file."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg
    return msg


# ------------------------------------------------------------------------------------------
# goldens against flax
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PARAM_FILES, ids=lambda p: p.parent.name)
def test_golden_params_msgpack_equals_flax(path: Path, flax_ser: Any) -> None:
    params, info = read_checkpoint_info(path)
    want = flax_ser.msgpack_restore(path.read_bytes())
    assert_tree_equal(params, want["params"], ordered=True)
    assert (info.format, info.layout, info.step, info.skipped) == ("flax-bytes", "variables", None, [])
    import hashlib

    assert info.source_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("ckpt_dir", CKPT_DIRS, ids=lambda p: p.parent.name)
def test_golden_trainstate_dir_and_file_equal_flax(ckpt_dir: Path, flax_ckpts: Any, flax_ser: Any) -> None:
    want = flax_ckpts.restore_checkpoint(str(ckpt_dir), target=None)["params"]
    from_dir, info_dir = read_checkpoint_info(ckpt_dir)
    from_file, info_file = read_checkpoint_info(ckpt_dir / "checkpoint_7")
    assert_tree_equal(from_dir, want, ordered=True)
    assert_tree_equal(from_file, want, ordered=True)
    assert_tree_equal(from_file, flax_ser.msgpack_restore((ckpt_dir / "checkpoint_7").read_bytes())["params"], ordered=True)
    assert info_dir.format == "flax-msgpack-dir" and info_file.format == "flax-msgpack"
    assert info_dir.layout == info_file.layout == "optax-trainstate"
    assert info_dir.step == info_file.step == 7
    assert {"opt_state", "rng", "global_step", "metadata", "model_state"} <= set(info_dir.skipped)
    assert info_dir.path == str(ckpt_dir / "checkpoint_7")
    # the same params as the variables file next to it
    assert_tree_equal(from_dir, read_checkpoint(ckpt_dir.parent / "params.msgpack"))


def test_writer_is_byte_identical_to_flax(flax_ser: Any) -> None:
    for path in [*PARAM_FILES, *(d / "checkpoint_7" for d in CKPT_DIRS)]:
        tree = flax_ser.msgpack_restore(path.read_bytes())
        assert msgpack_io.packb_tree(tree) == path.read_bytes(), path
    state = scenic_state(sample_params())
    state["params"]["npscalar"] = np.float32(3.0)
    state["metadata"]["c"] = 1 + 2j
    # in_place=True is what flax's to_bytes/save_checkpoint use; without it jax re-sorts the keys
    assert msgpack_io.packb_tree(state) == flax_ser.msgpack_serialize(_map(lambda a: a, state), in_place=True)


def test_subtree_of_golden() -> None:
    ckpt = GOLDENS / "vit_image_cls" / "checkpoint"
    full = read_checkpoint(ckpt)
    sub = read_checkpoint(ckpt, subtree="Transformer/TokenLearnerModuleV11_0")
    assert_tree_equal(sub, full["Transformer"]["TokenLearnerModuleV11_0"])
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(ckpt, subtree="Transformer/TokenLearnerModuleV11_9/LayerNorm_0")
    msg = one_line_error(excinfo, ckpt)
    assert "TokenLearnerModuleV11_9" in msg and "TokenLearnerModuleV11_0" in msg and "encoderblock_0" in msg
    with pytest.raises(CheckpointError, match="not a tree|array"):
        read_checkpoint(ckpt, subtree="Transformer/encoder_norm/scale")
    with pytest.raises(CheckpointError, match="is an array"):
        read_checkpoint(ckpt, subtree="Transformer/encoder_norm/scale/x")


# ------------------------------------------------------------------------------------------
# files written by flax itself
# ------------------------------------------------------------------------------------------


def test_flax_save_checkpoint_steps_and_tmp_files(tmp_path: Path, flax_ckpts: Any) -> None:
    params = sample_params()
    for step in (1, 5, 10):
        state = scenic_state(_map(lambda a, s=step: a, params), step)
        state["params"] = dict(params, step_marker=np.array(step, np.int32))
        flax_ckpts.save_checkpoint(str(tmp_path), state, step, keep=10)
    # leftovers that flax ignores: a pre-empted save and an orbax temporary directory
    (tmp_path / "checkpoint_tmp").write_bytes(b"\x85garbage")
    (tmp_path / "checkpoint_99.orbax-checkpoint-tmp-123").mkdir()
    assert_tree_equal(read_checkpoint(tmp_path), flax_ckpts.restore_checkpoint(str(tmp_path), target=None)["params"])
    (tmp_path / "checkpoint_77_tmp").write_bytes(b"")  # flax itself would pick this one up and fail
    latest, info = read_checkpoint_info(tmp_path)
    assert int(latest["step_marker"]) == 10 and info.step == 10
    assert info.path == str(tmp_path / "checkpoint_10")
    assert int(read_checkpoint(tmp_path, step=5)["step_marker"]) == 5
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(tmp_path, step=4)
    assert "available steps: 1, 5, 10" in one_line_error(excinfo, tmp_path)
    with pytest.raises(CheckpointError, match="step=5 was requested"):
        read_checkpoint(tmp_path / "checkpoint_10", step=5)


def test_flax_chunked_arrays_and_bf16(tmp_path: Path, flax_ckpts: Any, flax_ser: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flax_ser, "MAX_CHUNK_SIZE", 1024)
    params = {
        "big": np.arange(1000, dtype=np.float32).reshape(10, 100),
        "big_bf16": np.linspace(-3, 3, 1500).astype(BF16).reshape(3, 500),
        "odd": np.arange(257, dtype=np.int64),  # last chunk shorter
        "small": np.ones(3, np.float32),
    }
    flax_ckpts.save_checkpoint(str(tmp_path), scenic_state(params), 3)
    raw = msgpack.unpackb((tmp_path / "checkpoint_3").read_bytes(), raw=False, strict_map_key=False)
    assert raw["params"]["big"][msgpack_io.CHUNK_MARKER] is True  # the file really is chunked
    assert_tree_equal(read_checkpoint(tmp_path), params)
    # our writer chunks exactly like flax does (byte-identical at the same threshold)
    monkeypatch.setattr(msgpack_io, "MAX_CHUNK_SIZE", 1024)
    write_flax_msgpack(tmp_path / "ours", params, wrap="bare")
    assert (tmp_path / "ours").read_bytes() == flax_ser.msgpack_serialize(_map(lambda a: a, params), in_place=True)
    assert_tree_equal(read_checkpoint(tmp_path / "ours"), params)


def test_flax_optim_layout(tmp_path: Path, flax_ser: Any) -> None:
    params = sample_params()
    zeros = _map(np.zeros_like, params)
    state = {
        "global_step": 12,
        "optimizer": {"state": {"step": np.array(12), "param_states": _map(lambda a: {"grad_ema": a, "grad_sq_ema": a}, zeros)}, "target": params},
        "model_state": {},
        "rng": np.array([1, 2], np.uint32),
        "accum_train_time": 3.0,
    }
    (tmp_path / "checkpoint_12").write_bytes(flax_ser.msgpack_serialize(state))
    got, info = read_checkpoint_info(tmp_path)
    assert_tree_equal(got, params)
    assert info.layout == "flax-optim" and info.step == 12
    assert {"optimizer/state", "global_step", "rng", "model_state", "accum_train_time"} <= set(info.skipped)
    # a target that is a variables dict ('params' plus other collections)
    state["optimizer"]["target"] = {"params": params, "batch_stats": {"mean": np.zeros(2)}}
    (tmp_path / "checkpoint_13").write_bytes(flax_ser.msgpack_serialize(state))
    got, info = read_checkpoint_info(tmp_path)
    assert_tree_equal(got, params)
    assert "optimizer/target/batch_stats" in info.skipped


def test_layouts_bare_and_variables(tmp_path: Path) -> None:
    params = sample_params()
    for wrap, layout, fmt in (("bare", "bare", "flax-bytes"), ("variables", "variables", "flax-bytes"), ("optax-trainstate", "optax-trainstate", "flax-msgpack")):
        path = tmp_path / f"w_{wrap}"
        write_flax_msgpack(path, params, wrap=wrap, step=4)
        got, info = read_checkpoint_info(path)
        assert_tree_equal(got, params)
        assert (info.layout, info.format) == (layout, fmt)
        assert info.step == (4 if wrap == "optax-trainstate" else None)
    write_flax_msgpack(tmp_path / "v", {"params": params, "batch_stats": {"m": np.ones(2)}}, wrap="bare")
    got, info = read_checkpoint_info(tmp_path / "v")
    assert info.layout == "variables" and info.skipped == ["batch_stats"]
    write_flax_msgpack(tmp_path / "nop", {"opt_state": {}, "global_step": 1}, wrap="bare")
    with pytest.raises(CheckpointError, match="without parameters"):
        read_checkpoint(tmp_path / "nop")


def test_roundtrip_write_read_and_flax_restore(tmp_path: Path, flax_ckpts: Any) -> None:
    params = sample_params()
    params["noncontig"] = np.arange(12, dtype=np.float32).reshape(3, 4).T
    params["bigendian"] = np.arange(4, dtype=">i4")
    sha = write_flax_msgpack(tmp_path, params, step=21)
    path = tmp_path / "checkpoint_21"
    import hashlib

    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    got, info = read_checkpoint_info(path)
    assert info.source_sha256 == sha
    want = dict(params, noncontig=np.ascontiguousarray(params["noncontig"]), bigendian=params["bigendian"].astype("<i4"))
    assert_tree_equal(got, want)
    restored = flax_ckpts.restore_checkpoint(str(tmp_path), target=None)
    assert restored["global_step"] == 21
    assert_tree_equal(restored["params"], want)
    # rewrite what was read: identical bytes
    write_flax_msgpack(tmp_path / "again", got, step=21)
    assert (tmp_path / "again").read_bytes() == path.read_bytes()


def test_numpy_and_python_scalars_become_arrays(tmp_path: Path) -> None:
    write_flax_msgpack(tmp_path / "s", {"a": np.float32(1.5), "b": 3, "c": 2.0, "d": True}, wrap="variables")
    got = read_checkpoint(tmp_path / "s")
    assert got["a"].dtype == np.float32 and got["a"].shape == () and float(got["a"]) == 1.5
    assert got["b"].dtype == np.int64 and got["c"].dtype == np.float64 and got["d"].dtype == bool


# ------------------------------------------------------------------------------------------
# npz
# ------------------------------------------------------------------------------------------


def _savez(path: Path, flat: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fp:
        np.savez(fp, **flat)


def test_npz_big_vision_layouts(tmp_path: Path) -> None:
    kernel = np.arange(6, dtype=np.float32).reshape(2, 3)
    bf = np.linspace(0, 1, 4).astype(BF16)
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    _savez(tmp_path / "bare.npz", {"embedding/kernel": kernel, "embedding/bf": bf.view("V2"), "f": fortran})
    got, info = read_checkpoint_info(tmp_path / "bare.npz")
    assert_tree_equal(got, {"embedding": {"kernel": kernel, "bf": bf}, "f": np.ascontiguousarray(fortran)})
    assert (info.format, info.layout) == ("npz", "bare")
    _savez(tmp_path / "opt.npz", {"opt/target/embedding/kernel": kernel, "opt/state/mu/embedding/kernel": kernel})
    got, info = read_checkpoint_info(tmp_path / "opt.npz")
    assert_tree_equal(got, {"embedding": {"kernel": kernel}})
    assert info.layout == "flax-optim" and info.skipped == ["opt/state"]
    _savez(tmp_path / "tt.npz", {"params/img/embedding/kernel": kernel, "params/txt/x": kernel})
    assert_tree_equal(read_checkpoint(tmp_path / "tt.npz", subtree="img"), {"embedding": {"kernel": kernel}})


def test_npz_refuses_pickles_and_lies(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with open(tmp_path / "obj.npz", "wb") as fp:
        np.savez(fp, a=np.array([_Boom(marker)], dtype=object))
    with pytest.raises(CheckpointError, match="object array"):
        read_checkpoint(tmp_path / "obj.npz")
    assert not marker.exists()
    # a member whose header declares far more data than it holds
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as archive:
        archive.writestr("a.npy", buf.getvalue() + b"\0" * 16)
    with pytest.raises(CheckpointError, match="declares shape"):
        read_checkpoint(tmp_path / "lie.npz")
    with zipfile.ZipFile(tmp_path / "torch.pt", "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(_Boom(marker)))
    with pytest.raises(CheckpointError, match="PyTorch"):
        read_checkpoint(tmp_path / "torch.pt")
    assert not marker.exists()
    _savez(tmp_path / "clash.npz", {"a/b": np.ones(1), "a": np.ones(1)})
    with pytest.raises(CheckpointError, match="appears twice"):
        read_checkpoint(tmp_path / "clash.npz")


class _Boom:
    """Unpickling this creates a marker file; a reader that unpickles fails the test."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (Path.touch, (self.marker,))


# ------------------------------------------------------------------------------------------
# Orbax
# ------------------------------------------------------------------------------------------


def _orbax_tree() -> dict[str, Any]:
    params = {
        "enc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bf": np.arange(4).astype(BF16)},
        "empty": {},
        "scalar": np.array(3, np.int32),
    }
    return scenic_state(params, 7) | {"metadata": {"chrono": {"x": 1.5}}}


def test_orbax_written_by_flax(tmp_path: Path) -> None:
    pytest.importorskip("orbax.checkpoint")
    flax = pytest.importorskip("flax")
    from flax.training import checkpoints

    old = flax.config.flax_use_orbax_checkpointing
    flax.config.update("flax_use_orbax_checkpointing", True)
    try:
        tree = _orbax_tree()
        checkpoints.save_checkpoint(str(tmp_path), tree, 7)
        restored = checkpoints.restore_checkpoint(str(tmp_path), target=None)
    finally:
        flax.config.update("flax_use_orbax_checkpointing", old)
    assert (tmp_path / "checkpoint_7" / "manifest.ocdbt").is_file()
    got, info = read_checkpoint_info(tmp_path)
    assert_tree_equal(got, _map(np.asarray, restored["params"]))
    assert_tree_equal(got, tree["params"])
    assert (info.format, info.layout, info.step) == ("orbax-ocdbt", "optax-trainstate", 7)
    assert {"opt_state", "rng", "metadata"} <= set(info.skipped)
    assert_tree_equal(read_checkpoint(tmp_path / "checkpoint_7", subtree="enc"), tree["params"]["enc"])


@pytest.mark.parametrize(("kwargs", "fmt"), [({"use_ocdbt": False}, "orbax-zarr"), ({"use_zarr3": True}, "orbax-ocdbt")])
def test_orbax_handler_variants(tmp_path: Path, kwargs: dict[str, bool], fmt: str) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = _orbax_tree()
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(**kwargs)).save(tmp_path / "ck", tree)
    got, info = read_checkpoint_info(tmp_path / "ck")
    assert_tree_equal(got, tree["params"])
    assert info.format == fmt


def test_orbax_checkpoint_manager(tmp_path: Path) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = _orbax_tree()
    with ocp.CheckpointManager(tmp_path) as manager:
        for step in (5, 9):
            state = dict(tree, params=dict(tree["params"], step_marker=np.array(step)), global_step=step)
            manager.save(step, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    got, info = read_checkpoint_info(tmp_path)
    assert int(got["step_marker"]) == 9 and info.step == 9 and info.path == str(tmp_path / "9" / "default")
    assert int(read_checkpoint(tmp_path, step=5)["step_marker"]) == 5
    assert int(read_checkpoint(tmp_path / "5")["step_marker"]) == 5
    with pytest.raises(CheckpointError, match="available steps: 5, 9"):
        read_checkpoint(tmp_path, step=6)


def _metadata_json(entries: dict[tuple[str, ...], dict[str, Any]], **extra: Any) -> str:
    tree = {
        str(keys): {"key_metadata": [{"key": k, "key_type": 2} for k in keys], "value_metadata": value}
        for keys, value in entries.items()
    }
    return json.dumps({"tree_metadata": tree, **extra})


def test_orbax_old_aggregated_msgpack_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flax 0.6.11-0.10 + orbax < 0.6: every value inside the 'checkpoint' msgpack file."""
    tree = _orbax_tree()
    ckpt = tmp_path / "checkpoint_7"
    ckpt.mkdir()
    write_flax_msgpack(ckpt / "checkpoint", tree, wrap="bare")
    entries = {("params", "enc", "kernel"): {"value_type": "np.ndarray", "skip_deserialize": True}}
    (ckpt / "_METADATA").write_text(_metadata_json(entries))
    monkeypatch.setitem(__import__("sys").modules, "tensorstore", None)  # not needed here
    got, info = read_checkpoint_info(tmp_path)
    assert_tree_equal(got, tree["params"])
    assert (info.format, info.step) == ("orbax-msgpack", 7)


def test_orbax_old_placeholder_layouts(tmp_path: Path) -> None:
    """orbax <= 0.5: 'checkpoint' msgpack with PLACEHOLDER:// leaves, arrays in zarr (files or OCDBT)."""
    ts = pytest.importorskip("tensorstore")
    tree = _orbax_tree()
    for ocdbt in (False, True):
        ckpt = tmp_path / f"ocdbt_{ocdbt}"
        ckpt.mkdir()
        state = _map(lambda a: a, tree)
        for name, arr in (("params.enc.kernel", tree["params"]["enc"]["kernel"]), ("params.enc.bf", tree["params"]["enc"]["bf"])):
            if ocdbt:
                kv: dict[str, Any] = {"driver": "ocdbt", "base": {"driver": "file", "path": str(ckpt) + "/"}, "path": name + "/"}
            else:
                kv = {"driver": "file", "path": str(ckpt / name) + "/"}
            spec = {"driver": "zarr", "kvstore": kv, "metadata": {"shape": list(arr.shape), "dtype": "bfloat16" if arr.dtype == BF16 else "<f4"}}
            store = ts.open(spec, create=True, open=True).result()
            store.write(arr).result()
            *parents, leaf = name.split(".")
            node = state
            for key in parents:
                node = node[key]
            node[leaf] = "PLACEHOLDER://" + name
        write_flax_msgpack(ckpt / "checkpoint", state, wrap="bare")
        got, info = read_checkpoint_info(ckpt)
        assert_tree_equal(got, tree["params"])
        assert info.format == ("orbax-ocdbt" if ocdbt else "orbax-zarr")


def test_orbax_without_tensorstore_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ocp = pytest.importorskip("orbax.checkpoint")
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).save(tmp_path / "ck", _orbax_tree())
    monkeypatch.setitem(__import__("sys").modules, "tensorstore", None)
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(tmp_path / "ck")
    assert "tokenlearner-torch[orbax]" in one_line_error(excinfo, tmp_path / "ck")


def test_orbax_corrupt_metadata_and_missing_array(tmp_path: Path) -> None:
    pytest.importorskip("tensorstore")
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "_METADATA").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt JSON"):
        read_checkpoint(ckpt)
    (ckpt / "_METADATA").write_text(_metadata_json({("params", "w"): {"value_type": "np.ndarray", "skip_deserialize": False}}))
    with pytest.raises(CheckpointError, match="cannot read array 'params.w'"):
        read_checkpoint(ckpt)


# ------------------------------------------------------------------------------------------
# directories and errors
# ------------------------------------------------------------------------------------------


def test_missing_and_empty_locations(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint(tmp_path / "nope")
    (tmp_path / "README").write_text("hi")
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(tmp_path)
    assert "no checkpoint found" in one_line_error(excinfo, tmp_path)
    (tmp_path / "checkpoint_3").mkdir()  # a step entry holding nothing readable
    with pytest.raises(CheckpointError, match="no checkpoint inside"):
        read_checkpoint(tmp_path)


def test_unreadable_source_is_one_checkpoint_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "checkpoint_1"
    path.write_bytes(_valid_bytes())

    def denied(target: Path) -> Any:  # what open() raises without read permission (root would not see it)
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(readers, "_read_source", denied)
    with pytest.raises(CheckpointError) as excinfo:
        read_checkpoint(path)
    assert one_line_error(excinfo, path).endswith("cannot be read (Permission denied; expected a readable checkpoint file or directory)")


def _valid_bytes() -> bytes:
    return msgpack_io.packb_tree(scenic_state({"a": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}, "b": np.ones(2, BF16)}))


def test_truncated_at_every_offset(tmp_path: Path) -> None:
    data = _valid_bytes()
    path = tmp_path / "checkpoint_1"
    for cut in range(len(data)):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError) as excinfo:
            read_checkpoint(path)
        one_line_error(excinfo, path)


def test_flipped_bytes_give_tree_or_checkpoint_error(tmp_path: Path) -> None:
    data = _valid_bytes()
    path = tmp_path / "ck"
    rng = np.random.default_rng(1)
    for pos in range(len(data)):
        mutated = bytearray(data)
        mutated[pos] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(mutated))
        try:
            tree = read_checkpoint(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
        else:
            assert isinstance(tree, dict)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"", "empty"),
        (b"hello world, this is plain text\n", "msgpack map"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 32, "PNG"),
        (b"\x93NUMPY\x01\x00", ".npy"),
        (b'{"tree_metadata": {}}', "JSON"),
        (b"\x85", "truncated"),
        (b"\x80\x00", "unexpected bytes"),
        (b"\x92\x01\x02", "msgpack map"),
        (b"\x81\xa1a\xc7\x03\x09abc", "unknown msgpack ext type 9"),
        (b"\x81\x01\x02", "expected str"),
        (b"\x81\xa1a\xa3abc", "expected a dict or an array"),
        (b"\x81\xa1a\x92\x01\x02", "expected a dict or an array"),
        (b"\x81\xa1a\xc0", "expected a dict or an array"),
        (b"\x81\xa1a\xb4//GDAPlaceholder:a/b", "_gda"),
        (b"\xdf\x7f\xff\xff\xff", "corrupt|truncated"),  # 2**31 entries declared
        (b"\x81\xa1a\xc6\xff\xff\xff\xff\x00", "corrupt|truncated"),  # 4 GiB bin declared
        (b"\x81\xa1a\xdd\x7f\xff\xff\xff", "corrupt|truncated"),  # huge array declared
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as excinfo:
        read_checkpoint(path)
    one_line_error(excinfo, path)


def test_pickle_is_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"model_{protocol}.pkl"
        path.write_bytes(pickle.dumps({"params": _Boom(marker)}, protocol=protocol))
        with pytest.raises(CheckpointError, match="pickle"):
            read_checkpoint(path)
    for protocol in (0, 1):
        path = tmp_path / f"model_{protocol}.pkl"
        path.write_bytes(pickle.dumps({"params": _Boom(marker)}, protocol=protocol))
        with pytest.raises(CheckpointError):
            read_checkpoint(path)
    assert not marker.exists()


def _ext_array(shape: list[int], dtype: str, data: bytes) -> bytes:
    payload = msgpack.packb([shape, dtype, data], use_bin_type=True)
    return msgpack.packb({"params": {"w": msgpack.ExtType(1, payload)}}, use_bin_type=True)


@pytest.mark.parametrize(
    ("shape", "dtype", "data", "match"),
    [
        ([2**40], "float32", b"\0" * 4, "needs 4398046511104 bytes but the file holds 4"),
        ([3], "float32", b"\0" * 8, "needs 12 bytes"),
        ([-1], "float32", b"\0" * 4, "bad dimension"),
        ([1] * 40, "float32", b"\0" * 4, "at most 32|malformed"),
        ([1], "object", b"\0" * 8, "unsupported array dtype"),
        ([1], "f4,i4", b"\0" * 8, "unsupported array dtype"),
        ([1], "(2,)f4", b"\0" * 8, "unsupported array dtype"),
    ],
)
def test_lying_array_headers(tmp_path: Path, shape: list[int], dtype: str, data: bytes, match: str) -> None:
    path = tmp_path / "lie"
    path.write_bytes(_ext_array(shape, dtype, data))
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint(path)


def test_bad_chunk_dicts(tmp_path: Path) -> None:
    path = tmp_path / "chunks"
    good = {"__msgpack_chunked_array__": True, "shape": {"0": 4}, "chunks": {"0": np.ones(2, np.float32), "1": np.ones(2, np.float32)}}
    path.write_bytes(msgpack_io.packb_tree({"params": {"w": good}}))
    assert_tree_equal(read_checkpoint(path)["w"], np.ones(4, np.float32))
    for bad, match in (
        (dict(good, shape={"0": 5}), "needs 5"),
        (dict(good, chunks={"0": np.ones(2, np.float32), "2": np.ones(2, np.float32)}), "keys are not"),
        (dict(good, chunks={"0": np.ones(2, np.float32), "1": np.ones(2, np.int32)}), "mixes dtypes"),
        (dict(good, extra=1), "expected __msgpack_chunked_array__"),
    ):
        path.write_bytes(msgpack_io.packb_tree({"params": {"w": bad}}))
        with pytest.raises(CheckpointError, match=match):
            read_checkpoint(path)


def test_deep_nesting_is_capped(tmp_path: Path) -> None:
    for depth in (100, 5000):
        blob = b"\x81\xa1a" * depth + b"\x80"
        path = tmp_path / f"deep{depth}"
        path.write_bytes(b"\x81\xa6params" + blob)
        with pytest.raises(CheckpointError, match="nested deeper|corrupt"):
            read_checkpoint(path)


# ------------------------------------------------------------------------------------------
# writer reliability
# ------------------------------------------------------------------------------------------


def test_full_disk_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "checkpoint_1").write_bytes(b"old")
    written = {"n": 0}
    real_write = readers._HashingWriter.write

    def full_after_some_bytes(self: Any, data: Any) -> int:
        written["n"] += 1
        if written["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, data)

    monkeypatch.setattr(readers._HashingWriter, "write", full_after_some_bytes)
    with pytest.raises(CheckpointError) as excinfo:
        write_flax_msgpack(tmp_path, sample_params(), step=1)
    assert "disk full" in one_line_error(excinfo, tmp_path / "checkpoint_1")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1"]
    assert (tmp_path / "checkpoint_1").read_bytes() == b"old"
    monkeypatch.undo()

    def fsync_full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync_full)
    with pytest.raises(CheckpointError, match="disk full"):
        write_flax_msgpack(tmp_path / "new", sample_params())
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_1"]


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"a": np.array([object()], dtype=object)}, "dtype object"),
        ({"a": np.zeros(2, dtype=[("x", "f4")])}, "dtype"),
        ({1: np.ones(1)}, "expected str"),
        ({"a": [1, 2]}, "expected a dict, an array"),
        ({"a": {"b": 2**70}}, "cannot be packed"),
        ([np.ones(1)], "expected a dict"),
    ],
)
def test_writer_rejects_bad_trees(tmp_path: Path, params: Any, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        write_flax_msgpack(tmp_path / "out", params, wrap="bare")
    assert os.listdir(tmp_path) == []


def test_writer_arguments(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="pass step="):
        write_flax_msgpack(tmp_path, {"a": np.ones(1)})
    with pytest.raises(CheckpointError, match="unknown wrap"):
        write_flax_msgpack(tmp_path / "x", {"a": np.ones(1)}, wrap="nope")
    with pytest.raises(CheckpointError, match="parent directory"):
        write_flax_msgpack(tmp_path / "no" / "x", {"a": np.ones(1)})
    assert os.listdir(tmp_path) == []


def test_find_nonfinite() -> None:
    params = {
        "ok": np.ones(3, np.float32),
        "nan": {"k": np.array([1.0, np.nan])},
        "inf_bf16": np.array([np.inf, 1], dtype=BF16),
        "int": np.arange(3),
        "big": np.zeros(5_000_000, np.float32),
    }
    params["big"][-1] = -np.inf
    assert find_nonfinite(params) == ["nan/k", "inf_bf16", "big"]
    assert find_nonfinite(read_checkpoint(GOLDENS / "vit_image_cls" / "params.msgpack")) == []


def test_info_to_dict_is_json() -> None:
    _, info = read_checkpoint_info(CKPT_DIRS[0])
    assert json.loads(json.dumps(info.to_dict()))["layout"] == "optax-trainstate"


# VmHWM, not getrusage: ru_maxrss survives execve, so it would report the pytest parent's size.
_MEMORY_SCRIPT = r"""
import sys
from tokenlearner_torch.weights_convert.readers import read_checkpoint
def status_kb(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1])
base = status_kb('VmRSS')
params = read_checkpoint(sys.argv[1])
print((status_kb('VmHWM') - base) * 1024, sum(a.nbytes for a in params.values()))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for RSS")
def test_streaming_read_skips_optimizer_state_memory(tmp_path: Path) -> None:
    """Peak memory of a read stays near the params size although the file is 3x larger (Adam mu, nu)."""
    import subprocess
    import sys

    params = {f"w{i}": np.full((1024, 1024), i, np.float32) for i in range(8)}  # 32 MiB
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    state = scenic_state({}, 1)
    state["opt_state"]["0"].update(mu=zeros, nu=zeros)
    state["params"] = params
    write_flax_msgpack(tmp_path / "ck", state, wrap="bare")
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(tmp_path / "ck")], capture_output=True, text=True, check=True)
    peak_above_base, params_bytes = map(int, out.stdout.split())
    assert params_bytes == 32 << 20
    assert peak_above_base < 1.5 * params_bytes, (peak_above_base, params_bytes)
