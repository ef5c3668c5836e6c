"""Data parallelism as Scenic's ``jax.pmap``: one process per device on ``torch.distributed``.

Scenic shards each GLOBAL batch over the devices (device ``d`` gets rows ``[d*B/n, (d+1)*B/n)``); each
device's loss is the mean over ITS OWN unmasked examples; the gradients are averaged over devices
(``jax.lax.pmean``) before clipping and the optimiser, so every device takes the same step; metrics are
``(sum, count)`` pairs summed over devices (``jax.lax.psum``) before they are normalised; one host writes
checkpoints and summaries. This module maps that onto the engine PyTorch users already launch with
(``torchrun``): DDP's gradient average is exactly ``pmean`` (each process's gradient of its own mean loss,
summed and divided by the number of processes), FSDP2 (``fully_shard``) computes the same mean with
sharded parameters.

``get_context()`` returns a :class:`Context` for the current process: the user's own process group when one
is initialised, else one made from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``; gloo on CPU, nccl on CUDA, one process per GPU), else a single-process
context whose collectives are no-ops. Collectives time out (``timeout_s``, default 600 s, or the
environment variable ``TOKENLEARNER_DIST_TIMEOUT``), so a dead rank is an error, not a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["Context", "PeerError", "get_context", "shard_rows", "DEFAULT_TIMEOUT_S"]

DEFAULT_TIMEOUT_S = 600.0
_TIMEOUT_ENV = "TOKENLEARNER_DIST_TIMEOUT"


class PeerError(RuntimeError):
    """Another process of the job died or stopped answering: a collective failed or timed out."""


# Markers of a collective that failed because a peer died, hung up or timed out (gloo and nccl's texts);
# torch >= 2.1 raises DistError subclasses for most of them, gloo's transport errors stay plain RuntimeErrors.
_PEER_MARKERS = ("connection reset", "connection closed", "closed by peer", "broken pipe", "timed out", "timeout",
                 "gloo", "nccl", "socket", "processgroup", "connection refused")  # fmt: skip
# How long a failed rank waits for its peers to say "I saw it too" before naming the silent ones.
_PROBE_S = 2.0
_PROBE_KEY = "tokenlearner/peer_failure/"


def _is_peer_failure(e: BaseException) -> bool:
    """A torch.distributed failure (a dead or silent peer), not an error of the work itself (an OOM, a bug)."""
    dist_error = getattr(_dist(), "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e).lower()
    return any(m in text for m in _PEER_MARKERS)


def _silent_peers(ctx: "Context") -> Optional[list[int]]:
    """The ranks that did not report a failure within a few seconds, through the rendezvous store (not a
    collective: it works while the process group is broken). None when the store cannot be reached.

    Every rank whose collective fails writes its key, then waits up to ``min(2 s, timeout)`` for the others':
    a dead rank never writes, a stuck one writes only once its own collective times out."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set(f"{_PROBE_KEY}{ctx.rank}", "1")
        others = [r for r in range(ctx.world_size) if r != ctx.rank]
        deadline = time.monotonic() + min(_PROBE_S, ctx.timeout_s)
        while True:
            silent = [r for r in others if not store.check([f"{_PROBE_KEY}{r}"])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.05)
    except Exception:  # noqa: BLE001 - the store's host may be the dead process: then nobody can be named
        return None


def _first_sentence(e: BaseException) -> str:
    """torch's error text cut to what says what happened: its first line, without gloo's source location
    ('[.../pair.cc:537] ') and the generic advice that follows the first sentence."""
    import re

    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    first = re.sub(r"^\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", first)
    cut = first.find(". ", 20)
    return (first[:cut] if cut > 0 else first)[:200]


@contextlib.contextmanager
def _peer_errors(op: str, ctx: "Context", *, any_runtime_error: bool = True) -> Iterator[None]:
    """torch.distributed's errors of a failed collective (gloo: 'Connection closed by peer', 'Timed out ...';
    nccl: DistBackendError) as one :class:`PeerError` line naming this rank, the operation, the peers that
    did not answer and the collective timeout. ``any_runtime_error`` False: only errors that look like a
    collective's failure (:func:`_is_peer_failure`) are converted, others (an OOM, a bug) pass unchanged."""
    try:
        yield
    except RuntimeError as e:  # DistBackendError / DistNetworkError derive from RuntimeError
        if isinstance(e, PeerError) or not (any_runtime_error or _is_peer_failure(e)):
            raise
        ctx.failed = True
        first = _first_sentence(e)
        silent = _silent_peers(ctx)
        if silent:
            who = f"rank{'s' if len(silent) > 1 else ''} {', '.join(map(str, silent))} died or did not answer"
        elif silent is None:
            who = "another process died or did not answer"
        else:  # every peer reported the same failure: the fault was elsewhere (network, store)
            who = "the collective broke on every rank"
        raise PeerError(f"rank {ctx.rank}/{ctx.world_size}: {op} failed: {who} (collective timeout "
                        f"{ctx.timeout_s:g} s; {first[:200]})") from None  # fmt: skip


def _dist():
    import torch.distributed as dist

    return dist


def _timeout_s(timeout_s: Optional[float]) -> float:
    if timeout_s is not None:
        return float(timeout_s)
    raw = os.environ.get(_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{_TIMEOUT_ENV}={raw!r}: expected a number of seconds") from None
    if value <= 0:
        raise ConfigError(f"{_TIMEOUT_ENV}={raw!r}: expected a positive number of seconds")
    return value


def shard_rows(global_batch: int, rank: int, world_size: int) -> slice:
    """Scenic's shard of a global batch: rows ``[rank*B/n, (rank+1)*B/n)`` (``reshape([n, B/n, ...])``).

    A global batch that the number of processes does not divide is a :class:`ConfigError`, as in Scenic
    (``batch_size`` must be divisible by the device count).
    """
    if global_batch % world_size:
        raise ConfigError(f"the global batch size {global_batch} is not divisible by the {world_size} processes; "
                          f"expected a multiple of {world_size}")  # fmt: skip
    per = global_batch // world_size
    return slice(rank * per, (rank + 1) * per)


@dataclass
class Context:
    """Where this process stands in a data-parallel job, and the few collectives training needs.

    ``rank`` / ``world_size``: this process and the number of processes (Scenic's devices);
    ``local_rank``: its index on its machine (its GPU); ``device``: where its model lives;
    ``is_lead``: rank 0, the only one that writes checkpoints, summaries and the progress bar.
    With ``world_size == 1`` every collective is a no-op and nothing of ``torch.distributed`` is touched.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: Optional[str] = None
    owns_group: bool = False  # True when get_context() initialised the process group (it then destroys it)
    timeout_s: float = DEFAULT_TIMEOUT_S
    failed: bool = False  # a collective failed (PeerError): the group cannot be torn down collectively

    @property
    def is_lead(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # -- collectives -------------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        # nccl moves only CUDA tensors; gloo only CPU ones.
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def all_reduce_sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum each tensor over the processes, in place (Scenic's ``psum``); one collective per dtype."""
        if not self.distributed or not tensors:
            return
        dist = _dist()
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for dtype, group in by_dtype.items():
            flat = torch.cat([t.detach().reshape(-1).to(self._comm_device()) for t in group])
            with _peer_errors("all_reduce", self):
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in group:
                n = t.numel()
                t.copy_(flat[offset : offset + n].view_as(t))
                offset += n

    def all_reduce_metrics(self, metrics: Mapping[str, tuple[Any, Any]]) -> dict[str, tuple[float, float]]:
        """Scenic's ``psum`` of a ``{name: (sum, count)}`` dict (float64 on the wire): the global pairs."""
        names = sorted(metrics)
        values = torch.tensor([[float(metrics[k][0]), float(metrics[k][1])] for k in names], dtype=torch.float64)
        self.all_reduce_sum_([values])
        return {k: (float(values[i, 0]), float(values[i, 1])) for i, k in enumerate(names)}

    def barrier(self) -> None:
        """Wait for every process (a no-op for one process)."""
        if self.distributed:
            dist = _dist()
            with _peer_errors("barrier", self):
                if self.backend == "nccl":
                    dist.barrier(device_ids=[self.device.index])
                else:
                    dist.barrier()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` of rank ``src`` on every process (pickled by torch.distributed: small Python objects only,
        never weights)."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        with _peer_errors("broadcast", self):
            _dist().broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with _peer_errors("all_gather", self):
            _dist().all_gather_object(out, obj)
        return out

    def check_agree(self, name: str, value: str) -> None:
        """Fail fast, on every rank, when the processes disagree on ``value`` (a config's JSON, a checkpoint
        step, ...): one :class:`ConfigError` naming ``name``, the ranks and where the values first differ."""
        values = self.all_gather_object(str(value))
        first = values[0]
        for rank, other in enumerate(values):
            if other != first:
                raise ConfigError(f"the processes disagree on {name}: {_first_difference(first, other, 0, rank)}; "
                                  "expected the same on every rank (same command, same files)")  # fmt: skip

    def peer_errors(self, op: str = "training step") -> contextlib.AbstractContextManager[None]:
        """Wrap work whose collectives torch runs itself (DDP's gradient all-reduce in backward, FSDP2's
        gathers): a dead or silent peer becomes one :class:`PeerError` line naming the operation, the ranks
        that did not answer and the timeout, instead of torch's multi-line report. Other errors of the work
        (an out-of-memory, a bug) pass unchanged."""
        if not self.distributed:
            return contextlib.nullcontext()
        return _peer_errors(op, self, any_runtime_error=False)

    # -- models --------------------------------------------------------------------------------------------
    def prepare(self, trainer: Any, *, fsdp: Optional[bool] = None) -> Any:
        """Make ``trainer``'s gradients the MEAN of the per-process gradients (Scenic's ``pmean``).

        DDP by default: ``trainer.forward_module = DistributedDataParallel(trainer.model)`` (DDP broadcasts
        rank 0's parameters once, then averages gradients during backward: sum / world_size). With
        ``fsdp=True`` (default: ``trainer.config.fsdp``) FSDP2's ``fully_shard`` shards the parameters, the
        gradients and the optimiser state over the processes (see :func:`_prepare_fsdp`).
        One process: nothing changes. Returns ``trainer``.
        """
        if fsdp is None:
            config = getattr(trainer, "config", None) or {}
            fsdp = bool(config.get("fsdp", False)) if hasattr(config, "get") else False
        if not self.distributed:
            trainer.forward_module = trainer.model
            return trainer
        if fsdp:
            _prepare_fsdp(self, trainer)
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            trainer.forward_module = DistributedDataParallel(trainer.model, device_ids=ids)
        return trainer

    def shard(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """This process's rows of a GLOBAL batch (every array sliced on its first axis; Scenic's shard)."""
        sizes = {k: len(v) for k, v in batch.items() if hasattr(v, "__len__")}
        if len(set(sizes.values())) > 1:
            raise ShapeError(f"batch: every entry must share the batch size, got {sizes}")
        rows = shard_rows(next(iter(sizes.values())), self.rank, self.world_size)
        return {k: (v[rows] if k in sizes else v) for k, v in batch.items()}

    def close(self) -> None:
        """Destroy the process group if :func:`get_context` made it (a user's own group is left alone).

        After a :class:`PeerError` the group is left to the process's exit: tearing it down waits for the
        peers, and one of them is dead."""
        if self.owns_group and self.distributed and not self.failed:
            dist = _dist()
            if dist.is_initialized():
                dist.destroy_process_group()
        self.owns_group = False


def _first_difference(a: str, b: str, rank_a: int, rank_b: int) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(0, i - 30)
    return f"rank {rank_a} has ...{a[lo:i + 40]!r}..., rank {rank_b} has ...{b[lo:i + 40]!r}... (from character {i})"


def _prepare_fsdp(ctx: Context, trainer: Any) -> None:
    """FSDP2: each encoder block, then the whole model, ``fully_shard``-ed (torch >= 2.6).

    The parameters become DTensors sharded on their first axis over the processes; FSDP2's reduce-scatter
    averages the gradients (``ReduceOp.AVG``: the same mean as DDP's, Scenic's ``pmean``), so each process
    holds its shard of the mean gradient. The trainer's optax chain is rebuilt on the sharded parameters, its
    state (restored moments included) sharded the same way: every elementwise step runs on the local shard,
    and the global norms (clipping, ``l2_*`` logs) are DTensor reductions over all shards.
    ``trainer.params()`` and ``trainer.opt_state_tree()`` gather the full trees (collectives: EVERY rank must
    call them, in the same order; ``trainer.sharded`` says so, and ``train()`` then builds each checkpoint on
    every rank and writes it, in Scenic's format, on rank 0). A checkpoint is restored BEFORE this runs:
    every rank loads the full tree, then keeps its shard of the parameters and moments.
    """
    try:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor, distribute_tensor
        from torch.distributed.tensor.experimental import implicit_replication
    except ImportError as e:  # pragma: no cover - torch < 2.6
        raise ConfigError(f"config.fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard): {e}") from None
    from ..layers import Encoder1DBlock
    from .optim import ParamSpec, scenic_optimizer

    model = trainer.model
    old_specs = list(trainer.specs)
    old_states = [trainer.optimizer.state[s.param] for s in old_specs]
    step_count = trainer.global_step
    for module in list(model.modules()):
        if isinstance(module, Encoder1DBlock):
            fully_shard(module)
    fully_shard(model)
    named = dict(model.named_parameters())
    specs = [ParamSpec(s.name, named[trainer._torch_key[s.name]], s.flax_ndim) for s in old_specs]
    optimizer = scenic_optimizer(trainer.optimizer_config, trainer.lr_fn, specs)
    for old, new, state in zip(old_specs, specs, old_states):
        target = optimizer.state[new.param]
        for index, sub in state.items():
            for key, value in sub.items():
                if isinstance(value, Tensor) and value.shape == old.param.shape and value.dim() > 0:
                    value = distribute_tensor(value.detach(), new.param.device_mesh, new.param.placements)
                elif isinstance(value, Tensor):
                    value = value.detach().clone()
                target.setdefault(index, {})[key] = value
    trainer.specs, trainer.optimizer, trainer.global_step = specs, optimizer, step_count
    trainer.forward_module = model

    def _plain(value: Any) -> Any:
        # The logs (global norms of sharded tensors) come back as DTensors; the loop stacks and reads them as
        # plain tensors. full_tensor() of a replicated 0-d DTensor is its local value (no communication).
        if isinstance(value, DTensor):
            return value.full_tensor()
        if isinstance(value, dict):
            return {k: _plain(v) for k, v in value.items()}
        if isinstance(value, tuple):
            return tuple(_plain(v) for v in value)
        return value

    def _wrap(fn: Any) -> Any:
        # The optax chain mixes DTensors with plain 0-d tensors (learning rate, clipping scale): replicated.
        def run(*args: Any, **kwargs: Any) -> Any:
            with implicit_replication():
                return _plain(fn(*args, **kwargs))

        return run

    for name in ("step", "train_step", "eval_step"):
        if hasattr(trainer, name):
            setattr(trainer, name, _wrap(getattr(trainer, name)))

    def full_params() -> dict[str, Any]:
        from ..weights_convert.layouts import flatten_tree, unflatten_tree
        from ..weights_convert.mapping import torch_to_flax

        state = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}
        tree = torch_to_flax(model, state)
        return unflatten_tree({k: np.array(v, copy=True) for k, v in flatten_tree(tree).items()})

    trainer.params = full_params
    to_flax = trainer._leaf_to_flax

    def leaf_to_flax(flax_path: str, t: Tensor) -> np.ndarray:
        # opt_state_tree() walks the moments in the same order on every rank: one all-gather per leaf.
        return to_flax(flax_path, t.full_tensor() if isinstance(t, DTensor) else t)

    trainer._leaf_to_flax = leaf_to_flax
    # params() and opt_state_tree() are now collectives: train() builds checkpoints on every rank.
    trainer.sharded = True


def get_context(device: Optional[str | torch.device] = None, *, timeout_s: Optional[float] = None) -> Context:
    """The data-parallel context of this process.

    1. A process group the caller initialised: used as it is (its timeout is the caller's).
    2. Else torchrun's environment (``WORLD_SIZE`` > 1 with ``RANK``): a process group is initialised,
       nccl when ``device`` is CUDA (default: CUDA when available), gloo otherwise, with a collective timeout
       of ``timeout_s`` seconds (default 600, or ``TOKENLEARNER_DIST_TIMEOUT``); one process per GPU
       (``cuda:LOCAL_RANK``).
    3. Else one process: rank 0 of 1 on ``device`` (default CPU).
    """
    dist = _dist()
    timeout = _timeout_s(timeout_s)
    env_world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    want = torch.device(device) if device is not None else None
    initialised = dist.is_available() and dist.is_initialized()
    if not initialised and env_world <= 1:
        return Context(device=want or torch.device("cpu"), timeout_s=timeout)
    if not dist.is_available():  # pragma: no cover - torch built without distributed
        raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    owns = False
    if not initialised:
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise ConfigError(f"WORLD_SIZE={env_world} but {key} is not set; launch with torchrun "
                                  "(or initialise torch.distributed yourself)")  # fmt: skip
        if want is None:
            want = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
        backend = "nccl" if want.type == "cuda" else "gloo"
        if want.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        owns = True
    backend = str(dist.get_backend())
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank if world <= max(1, torch.cuda.device_count()) else 0))
    if want is None:
        want = torch.device("cuda") if backend == "nccl" else torch.device("cpu")
    if want.type == "cuda":
        want = torch.device("cuda", want.index if want.index is not None else local)
        torch.cuda.set_device(want)
    return Context(rank=rank, world_size=world, local_rank=local, device=want, backend=backend,
                   owns_group=owns, timeout_s=timeout)  # fmt: skip
