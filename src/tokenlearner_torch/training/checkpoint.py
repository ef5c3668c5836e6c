"""Scenic's training checkpoints (``train_utils.save_checkpoint`` / ``restore_checkpoint``) without JAX.

A Scenic checkpoint is ``<workdir>/checkpoint_<step>``: one Flax msgpack file holding its ``TrainState``
(``flax.serialization.to_state_dict``): ``opt_state`` (optax's state tree), ``params``, ``global_step``,
``model_state``, ``rng`` and ``metadata`` (``{'chrono': {...}}``). This module reads and writes that file
with the project's msgpack codec (``weights_convert.msgpack_io``), finds the newest one, keeps the
``max_checkpoint_keep`` newest, and maps :class:`~.optim.OptaxChain`'s per-parameter state to optax's tree
and back, for every chain ``scenic_optimizer`` builds:

============================  ====================================================================
Scenic config                 ``opt_state`` (the optimiser's own chain nested under its index)
============================  ====================================================================
adam                          ``{'0': {'0': {count, mu, nu}, '1': {count}}}``
adamw (+ mask)                ``{'0': {'0': {count, mu, nu}, '1': {} or {'inner_state': {}}, '2': {count}}}``
sgd / nesterov w/o momentum   ``{'0': {'0': {}, '1': {count}}}``
momentum / nesterov           ``{'0': {'0': {trace}, '1': {count}}}``
+ sgd weight_decay (+ mask)   a leading ``{}`` (``{'inner_state': {}}``); + grad_clip: a leading ``{}``
+ freeze_params_reg_exp       ``{'inner_state': <the optimiser's chain>}`` then ``{'inner_state': {}}``;
                              frozen parameters are ``{}`` in mu/nu/trace (optax's ``MaskedNode``)
============================  ====================================================================

Counts are int32 0-d arrays. Writes are atomic: a hidden temporary file in the same directory, fsync, rename,
fsync of the directory; a crash mid-write leaves the previous checkpoints intact and the temporary file is
never taken for a checkpoint (nor by Flax's ``checkpoint_*`` glob: it starts with a dot).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError
from ..weights_convert.readers import _fsync_dir  # the converter's: one way to make a rename durable
from .optim import AddDecayedWeights, ClipByGlobalNorm, Masked, OptaxChain, ParamSpec, ScaleByAdam, ScaleByLearningRate, SetToZero, Trace, _Identity

__all__ = [
    "TrainState",
    "CHECKPOINT_PREFIX",
    "list_checkpoints",
    "latest_checkpoint",
    "read_train_state",
    "write_checkpoint",
    "restore_newest",
    "opt_state_to_tree",
    "opt_state_from_tree",
]

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
_NAME = re.compile(r"^checkpoint_(\d+)$")
SHOWN = 4  # names shown per kind of problem in a one-line error


@dataclasses.dataclass
class TrainState:
    """Scenic's ``TrainState`` as the port keeps it: ``global_step`` (int), ``params`` (the Flax tree of numpy
    arrays), ``opt_state`` (optax's state tree, Flax-serialised, numpy), ``model_state`` (``{}``: no batch
    statistics in TokenLearner), ``rng`` (uint32 ``[2]``, carried through untouched: the port draws from torch)
    and ``metadata`` (``{'chrono': {...}}`` and the port's torch random state under ``'torch_rng'``).

    ``trainer`` (not serialised) is the live :class:`~.trainer.ScenicTrainer` of the run that returned it.
    """

    global_step: int = 0
    params: dict = dataclasses.field(default_factory=dict)
    opt_state: Any = None
    model_state: dict = dataclasses.field(default_factory=dict)
    rng: Optional[np.ndarray] = None
    metadata: dict = dataclasses.field(default_factory=dict)
    trainer: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __getitem__(self, item: str) -> Any:  # Scenic's TrainState is subscriptable
        return getattr(self, item)

    def to_state_dict(self) -> dict[str, Any]:
        """The tree Flax serialises (``flax.serialization.to_state_dict`` field order of Scenic's TrainState)."""
        return {
            "opt_state": self.opt_state if self.opt_state is not None else {},
            "params": self.params,
            "global_step": np.asarray(int(self.global_step), dtype=np.int32),
            "model_state": self.model_state or {},
            "rng": self.rng if self.rng is not None else np.zeros(2, np.uint32),
            "metadata": self.metadata or {},
        }


# ----------------------------------------------------------------------------------------------------------
# Files


def list_checkpoints(workdir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint_<int>`` file in ``workdir``, oldest first (temporary files and
    other names are ignored)."""
    d = Path(workdir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(workdir: str | os.PathLike) -> Optional[Path]:
    """The newest ``checkpoint_<step>`` of ``workdir`` (by step), or None."""
    found = list_checkpoints(workdir)
    return found[-1][1] if found else None


def _finalize(node: Any, path: str = "") -> Any:
    from ..weights_convert import msgpack_io

    if isinstance(node, dict):
        if msgpack_io.CHUNK_MARKER in node:
            return msgpack_io.unchunk(node)
        return {k: _finalize(v, f"{path}/{k}") for k, v in node.items()}
    return node


def read_train_state(path: str | os.PathLike) -> dict[str, Any]:
    """The whole state dict of a Flax msgpack checkpoint (every entry, optimiser state included), arrays as
    numpy. A file that is not one raises a one-line :class:`CheckpointError` naming it."""
    from ..weights_convert import msgpack_io

    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
    if not data:
        raise CheckpointError(f"{p}: file is empty (expected a Flax msgpack TrainState)")
    decoder = msgpack_io.MappedDecoder(memoryview(data))
    try:
        tree = _finalize(decoder.unpack())
    except (msgpack_io.DecodeError, RecursionError) as e:
        raise CheckpointError(f"{p}: not a readable Flax msgpack checkpoint ({e})") from None
    if decoder.pos != len(data):
        raise CheckpointError(f"{p}: {len(data) - decoder.pos} unexpected bytes after the checkpoint data")
    if not isinstance(tree, dict) or "params" not in tree or "global_step" not in tree:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointError(f"{p}: not a Scenic TrainState (top level: {keys}; expected params, opt_state, global_step, ...)")
    return tree


def write_checkpoint(workdir: str | os.PathLike, state: TrainState | Mapping[str, Any], step: int, *,
                     keep: Optional[int] = 3) -> Path:  # fmt: skip
    """Write ``checkpoint_<step>`` into ``workdir`` atomically and keep the ``keep`` newest checkpoints
    (counting those already there, as Flax's ``save_checkpoint(keep=...)``); return its path.

    A checkpoint of the same step is replaced (atomically). On failure no new file is left behind and the
    existing checkpoints are untouched.
    """
    from ..weights_convert import msgpack_io

    d = Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    tree = state.to_state_dict() if isinstance(state, TrainState) else dict(state)
    final = d / f"{CHECKPOINT_PREFIX}{int(step)}"
    # A hidden name: neither list_checkpoints nor Flax's `checkpoint_*` glob can take it for a checkpoint.
    tmp = d / f".{final.name}.tmp-{secrets.token_hex(6)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        with os.fdopen(fd, "wb") as fp:
            msgpack_io.write_tree(fp, tree)
            fp.flush()
            os.fsync(fp.fileno())
        os.replace(tmp, final)
        _fsync_dir(d)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(e, msgpack_io.EncodeError):
            raise CheckpointError(f"{final}: cannot write the checkpoint ({e}); nothing was written") from None
        if isinstance(e, OSError):
            raise CheckpointError(f"{final}: cannot write the checkpoint ({e.strerror or e}); nothing was written") from e
        raise
    if keep is not None and keep > 0:
        for _, old in list_checkpoints(d)[:-keep]:
            try:
                old.unlink()
            except OSError as e:  # a checkpoint we cannot prune is not worth failing the run for
                log.warning("could not remove old checkpoint %s: %s", old, e)
    return final


def restore_newest(workdir: str | os.PathLike) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest readable checkpoint of ``workdir`` as ``(path, state dict)``, or None if it has none.

    An unreadable newest checkpoint (truncated, corrupt) is reported with ``warnings.warn`` naming the file,
    and the previous one is used; if none is readable, :class:`CheckpointError` (never a silent fresh start).
    """
    found = list_checkpoints(workdir)
    errors = []
    for _, path in reversed(found):
        try:
            tree = read_train_state(path)
        except CheckpointError as e:
            errors.append(str(e))
            msg = f"skipping unreadable checkpoint {path}: {e}"
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
            log.warning(msg)
            continue
        return path, tree
    if errors:
        raise CheckpointError(f"{workdir}: no readable checkpoint among {len(found)} ({errors[0]})")
    return None


# ----------------------------------------------------------------------------------------------------------
# OptaxChain <-> optax's state tree

ToFlax = Callable[[str, Tensor], np.ndarray]
ToTorch = Callable[[str, np.ndarray], Tensor]

_OPT_START = (ScaleByAdam, Trace, _Identity)


def _outer(chain: OptaxChain) -> list[tuple[list[int], bool]]:
    """Scenic's outer ``optax.chain``: entries of (indices into chain.transforms, is the optimiser's own chain)."""
    ts, out, i = chain.transforms, [], 0
    while i < len(ts):
        if isinstance(ts[i], _OPT_START):
            j = next((k for k in range(i, len(ts)) if isinstance(ts[k], ScaleByLearningRate)), None)
            if j is None:
                raise CheckpointError(f"optimiser chain {[type(t).__name__ for t in ts]} has no learning rate after {type(ts[i]).__name__}")
            out.append((list(range(i, j + 1)), True))
            i = j + 1
        else:
            out.append(([i], False))
            i += 1
    return out


def _count(states: Sequence[dict], key: str = "count") -> np.ndarray:
    return np.asarray(int(states[0][key]) if states else 0, dtype=np.int32)


def _param_tree(all_specs: Sequence[ParamSpec], specs: Sequence[ParamSpec], states: Sequence[dict], key: str,
                to_flax: ToFlax) -> dict:  # fmt: skip
    from ..weights_convert.layouts import unflatten_tree

    own = {s.name: st[key] for s, st in zip(specs, states)}
    # optax.masked leaves the masked-out leaves as MaskedNode, which Flax serialises as {}.
    return unflatten_tree({s.name: to_flax(s.name, own[s.name]) if s.name in own else {} for s in all_specs})


def _export(t: Any, all_specs, specs, states, to_flax: ToFlax) -> dict:
    if isinstance(t, ScaleByAdam):
        return {"count": _count(states), "mu": _param_tree(all_specs, specs, states, "mu", to_flax),
                "nu": _param_tree(all_specs, specs, states, "nu", to_flax)}  # fmt: skip
    if isinstance(t, Trace):
        return {"trace": _param_tree(all_specs, specs, states, "trace", to_flax)}
    if isinstance(t, ScaleByLearningRate):
        return {"count": _count(states)}
    if isinstance(t, Masked):
        flags = t._flags(specs)
        sel = t._select(specs, flags)
        inner = [_export(u, all_specs, sel, t._sub_states(states, j, flags), to_flax) for j, u in enumerate(t.inner)]
        return {"inner_state": {str(j): x for j, x in enumerate(inner)} if t.prefix == "opt" else inner[0]}
    if isinstance(t, (AddDecayedWeights, ClipByGlobalNorm, SetToZero, _Identity)):
        return {}
    raise CheckpointError(f"no optax state layout for the port's {type(t).__name__}")


def opt_state_to_tree(chain: OptaxChain, to_flax: ToFlax) -> dict[str, Any]:
    """``chain``'s state as ``flax.serialization.to_state_dict(tx.init(params))`` lays out optax's state for
    the same chain (numpy; per-parameter tensors through ``to_flax(flax_path, tensor)``)."""
    specs = chain.specs
    out = {}
    for n, (idx, is_opt) in enumerate(_outer(chain)):
        parts = [_export(chain.transforms[i], specs, specs, chain._sub_states(i), to_flax) for i in idx]
        out[str(n)] = {str(j): p for j, p in enumerate(parts)} if is_opt else parts[0]
    return out


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, text: str) -> None:
        self.items.append(text)


def _expect_keys(node: Any, keys: Sequence[str], where: str, problems: _Problems) -> bool:
    if not isinstance(node, Mapping) or set(node) != set(keys):
        found = sorted(node) if isinstance(node, Mapping) else type(node).__name__
        problems.add(f"opt_state/{where} has {found}, expected {sorted(keys)}")
        return False
    return True


def _import_params(node: Any, all_specs, specs, states, key: str, where: str, to_torch: ToTorch, problems: _Problems) -> None:
    from ..weights_convert.layouts import flatten_tree

    if not isinstance(node, Mapping):
        problems.add(f"opt_state/{where} is a {type(node).__name__}, expected a parameter tree")
        return
    flat = {p: v for p, v in flatten_tree(node).items()}
    wanted = {s.name for s in specs}
    missing = sorted(wanted - set(flat))
    unexpected = sorted(set(flat) - wanted)
    if missing:
        problems.add(f"opt_state/{where} lacks {len(missing)} params ({', '.join(missing[:SHOWN])})")
    if unexpected:
        problems.add(f"opt_state/{where} has {len(unexpected)} params the model lacks ({', '.join(unexpected[:SHOWN])})")
    for s, st in zip(specs, states):
        if s.name not in flat:
            continue
        arr = np.asarray(flat[s.name])
        try:
            value = to_torch(s.name, arr)
        except Exception as e:  # a layout rule on a wrong shape
            problems.add(f"opt_state/{where}/{s.name}: shape {list(arr.shape)} does not fit ({e})")
            continue
        if tuple(value.shape) != tuple(st[key].shape):
            problems.add(f"opt_state/{where}/{s.name}: shape {list(arr.shape)}, the model's is {list(s.param.shape)}")
            continue
        st[key].copy_(value.to(st[key].dtype))


def _import_count(node: Any, states, where: str, problems: _Problems) -> None:
    arr = np.asarray(node)
    if arr.shape != () or arr.dtype.kind not in "iu":
        problems.add(f"opt_state/{where}/count is {arr.dtype}{list(arr.shape)}, expected an int32 scalar")
        return
    for st in states:
        st["count"] = torch.tensor(int(arr), dtype=torch.int32)


def _import(t: Any, node: Any, all_specs, specs, states, where: str, to_torch: ToTorch, problems: _Problems) -> None:
    if isinstance(t, ScaleByAdam):
        if _expect_keys(node, ["count", "mu", "nu"], where, problems):
            _import_count(node["count"], states, where, problems)
            for k in ("mu", "nu"):
                _import_params(node[k], all_specs, specs, states, k, f"{where}/{k}", to_torch, problems)
    elif isinstance(t, Trace):
        if _expect_keys(node, ["trace"], where, problems):
            _import_params(node["trace"], all_specs, specs, states, "trace", f"{where}/trace", to_torch, problems)
    elif isinstance(t, ScaleByLearningRate):
        if _expect_keys(node, ["count"], where, problems):
            _import_count(node["count"], states, where, problems)
    elif isinstance(t, Masked):
        if not _expect_keys(node, ["inner_state"], where, problems):
            return
        flags = t._flags(specs)
        sel = t._select(specs, flags)
        inner = node["inner_state"]
        if t.prefix == "opt":
            if not _expect_keys(inner, [str(j) for j in range(len(t.inner))], f"{where}/inner_state", problems):
                return
            for j, u in enumerate(t.inner):
                _import(u, inner[str(j)], all_specs, sel, t._sub_states(states, j, flags), f"{where}/inner_state/{j}", to_torch, problems)
        else:
            _import(t.inner[0], inner, all_specs, sel, t._sub_states(states, 0, flags), f"{where}/inner_state", to_torch, problems)
    else:
        _expect_keys(node, [], where, problems)


def opt_state_from_tree(chain: OptaxChain, tree: Any, to_torch: ToTorch) -> None:
    """Set ``chain``'s state from optax's state tree (the inverse of :func:`opt_state_to_tree`; bitwise).

    Everything is checked before anything is kept: a tree of another optimiser or model raises one
    :class:`CheckpointError` line naming the mismatching entries (the chain's state is then unchanged).
    """
    specs = chain.specs
    outer = _outer(chain)
    problems = _Problems()
    # Work on copies, so that a tree that does not fit leaves the optimiser as it was.
    backup = {id(st): _clone_state(st) for st in chain._states}
    if _expect_keys(tree, [str(n) for n in range(len(outer))], "", problems):
        for n, (idx, is_opt) in enumerate(outer):
            node = tree[str(n)]
            if is_opt:
                if not _expect_keys(node, [str(j) for j in range(len(idx))], str(n), problems):
                    continue
                for j, i in enumerate(idx):
                    _import(chain.transforms[i], node[str(j)], specs, specs, chain._sub_states(i), f"{n}/{j}", to_torch, problems)
            else:
                _import(chain.transforms[idx[0]], node, specs, specs, chain._sub_states(idx[0]), str(n), to_torch, problems)
    if problems.items:
        for st in chain._states:
            _restore_state(st, backup[id(st)])
        shown = "; ".join(problems.items[:SHOWN]) + (f"; ... ({len(problems.items)} problems)" if len(problems.items) > SHOWN else "")
        raise CheckpointError(f"the optimiser state does not fit this config's optimiser and model: {shown}".replace("/" * 2, "/"))


def _clone_state(st: dict) -> dict:
    return {k: _clone_state(v) if isinstance(v, dict) else v.clone() for k, v in st.items()}


def _restore_state(st: dict, saved: dict) -> None:
    for k, v in saved.items():
        if isinstance(v, dict):
            _restore_state(st[k], v)
        else:
            st[k] = v
