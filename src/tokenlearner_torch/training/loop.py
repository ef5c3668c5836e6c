"""The training job: Scenic's ``classification_trainer.train()`` loop around :class:`~.trainer.ScenicTrainer`.

``state, train_summary, eval_summary = train(config=..., dataset=..., workdir=...)`` runs Scenic's schedule
(``train_lib/classification_trainer.py`` and ``train_utils.py``), step for step:

* total steps: ``num_training_steps``, else ``num_training_epochs * (num_train_examples // batch_size)``;
* ``num_trainable_params`` and ``gflops`` at step 1 of a fresh run (``start_step == 0``);
* a train summary when ``step % log_summary_steps == 1``, at the last step, and on the first two steps of a
  (re)started run (Scenic's ``Chrono`` warm-up): the metrics' (sum, count) pairs summed over the steps since
  the previous summary and normalised (``train_<name>``), then the mean of ``l2_grads``, ``l2_params``,
  ``l2_updates`` and ``learning_rate`` over those steps, as two ``write_scalars`` calls;
* evaluation when ``step % log_eval_steps == 1`` and at the last step, over ``steps_per_eval`` or
  ``ceil(num_eval_examples / eval_batch_size)`` batches of ``valid_iter`` (``valid_<name>``);
* a checkpoint when ``step % checkpoint_steps == 1 and step > 1`` and at the last step, keeping the
  ``max_checkpoint_keep`` (3) newest; at the start the newest ``checkpoint_<step>`` of ``workdir`` is restored
  (``config.checkpoint`` False: neither; missing: True).

Not from Scenic: ``hooks`` (``hook(step, logs)`` after each step, logs as device tensors), Ctrl-C (the lead
writes a checkpoint of the last completed step, then ``KeyboardInterrupt`` propagates; under FSDP2 on several
processes no checkpoint is written then: see docs/distributed.md), a dead or silent peer during a step, an
evaluation or a checkpoint (one ``PeerError`` line: ``Context.peer_errors``), ``dataset.seek(step)``
after a restore, and the torch random state (dropout, mixup) in the checkpoint's ``metadata['torch_rng']``
so that a resumed run is bitwise the uninterrupted one on CPU. See docs/training.md, "The job: train()".
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import CheckpointError, ConfigError, ConversionError
from .checkpoint import TrainState, read_train_state, restore_newest, write_checkpoint
from .config import cfg_get, load_config
from .trainer import ScenicTrainer

__all__ = ["train", "get_num_training_steps", "TRAIN_LOG_KEYS"]

log = logging.getLogger(__name__)

#: Scenic's extra training logs (``train_step``'s ``training_logs``), averaged over the steps of a summary.
TRAIN_LOG_KEYS = ("l2_grads", "l2_params", "l2_updates", "learning_rate")
_CHRONO_KEYS = ("accum_program_time", "accum_train_time", "accum_pause_time", "accum_examples_seen")


class _SingleProcess:
    """The distributed context of a plain single-process run (``training.distributed`` provides the real one)."""

    rank = 0
    world_size = 1
    is_lead = True

    def __init__(self, device: Optional[torch.device] = None) -> None:
        self.device = device if device is not None else torch.device("cpu")

    def all_reduce_sum_(self, tensors: list[Tensor]) -> None:
        pass

    def barrier(self) -> None:
        pass

    def broadcast_object(self, obj: Any) -> Any:
        return obj

    def prepare(self, trainer: ScenicTrainer) -> None:
        pass


def _guard(ctx: Any, op: str) -> contextlib.AbstractContextManager[None]:
    """``ctx.peer_errors(op)``: a collective torch runs inside ``op`` (DDP's backward, FSDP2's gathers) that
    fails because a peer died becomes one ``PeerError`` line; nothing for a single process."""
    peer_errors = getattr(ctx, "peer_errors", None)
    return peer_errors(op) if peer_errors is not None else contextlib.nullcontext()


def _context(device: Optional[torch.device]) -> Any:
    try:
        from .distributed import get_context  # the "dist" engineer's module (issue 18)
    except ImportError:
        return _SingleProcess(device)
    return get_context(device)


def get_num_training_steps(config: Mapping[str, Any], meta_data: Mapping[str, Any]) -> tuple[int, Optional[int]]:
    """Scenic's ``get_num_training_steps``: ``(total_steps, steps_per_epoch or None)``."""
    batch_size = config.get("batch_size")
    if not batch_size:
        raise ConfigError("config.batch_size is required (the global batch size)")
    steps_per_epoch = int(meta_data.get("num_train_examples", 0) or 0) // int(batch_size)
    if config.get("num_training_steps") is not None:
        if config.get("num_training_epochs"):
            raise ConfigError("config sets both num_training_steps and num_training_epochs; set one")
        return int(config["num_training_steps"]), steps_per_epoch or None
    if not config.get("num_training_epochs"):
        raise ConfigError("config.num_training_steps or config.num_training_epochs is required")
    if steps_per_epoch <= 0:
        raise ConfigError("config.num_training_epochs needs dataset meta_data['num_train_examples'] >= batch_size")
    return int(steps_per_epoch * config["num_training_epochs"]), steps_per_epoch


def _gflops(trainer: ScenicTrainer) -> Optional[float]:
    """The port's stand-in for Scenic's ``gflops`` (XLA's cost analysis of a one-example forward): torch's
    FlopCounterMode count of the deterministic forward on one zero example, x1e-9. It counts only matmuls and
    convolutions (2 per multiply-add) where XLA also counts elementwise ops, so it is not Scenic's number."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:  # pragma: no cover - torch < 2.1
        return None
    shape = (1, *[int(d) for d in trainer.dataset_meta_data["input_shape"][1:]])
    was = trainer.model.training
    trainer.model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            trainer.model(torch.zeros(shape, device=trainer.device))
    finally:
        trainer.model.train(was)
    return counter.get_total_flops() / 1e9


class _Interrupts:
    """Ctrl-C during a step is held until the step completes (so that the checkpoint written for it is a
    consistent state); outside a step, or a second Ctrl-C, raises at once."""

    def __init__(self) -> None:
        self.in_step = False
        self.pending = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.in_step and not self.pending:
            self.pending = True
            log.warning("interrupted: finishing the current step, then writing a checkpoint (Ctrl-C again to abort)")
            return
        raise KeyboardInterrupt


class _Chrono:
    """The bookkeeping of Scenic's ``Chrono`` that its checkpoints carry (``metadata['chrono']``):
    accumulated program/train/pause time and examples seen. (Its timing scalars are not written.)"""

    def __init__(self, saved: Mapping[str, Any], global_batch: int) -> None:
        self.accum = {k: float(saved.get(k, 0.0)) for k in _CHRONO_KEYS}
        self.accum["accum_examples_seen"] = int(saved.get("accum_examples_seen", 0))
        self.global_batch = int(global_batch)
        self.start = time.monotonic()
        self.paused = 0.0
        self.steps = 0

    def save(self) -> dict[str, Any]:
        elapsed = time.monotonic() - self.start
        return {
            "accum_program_time": self.accum["accum_program_time"] + elapsed,
            "accum_train_time": self.accum["accum_train_time"] + max(0.0, elapsed - self.paused),
            "accum_pause_time": self.accum["accum_pause_time"] + self.paused,
            "accum_examples_seen": self.accum["accum_examples_seen"] + self.steps * self.global_batch,
        }


def _sum_pairs(pairs: Sequence[Mapping[str, tuple[Tensor, Tensor]]], ctx: Any) -> dict[str, tuple[float, float]]:
    """Sum Scenic's ``{name: (sum, count)}`` over steps/batches on the device, then over processes; to host."""
    names = sorted(pairs[0])
    flat = torch.stack([torch.stack([torch.stack([p[n][0].float(), p[n][1].float()]) for n in names]) for p in pairs]).sum(0)
    reduced = [flat]
    ctx.all_reduce_sum_(reduced)
    host = reduced[0].double().cpu().numpy()
    return {n: (float(host[i, 0]), float(host[i, 1])) for i, n in enumerate(names)}


def _normalize(summed: Mapping[str, tuple[float, float]], split: str) -> dict[str, float]:
    """Scenic's ``normalize_metrics_summary``: ``sum / (count + 1e-9)``; NaN in training is fatal."""
    out = {}
    for k, (s, n) in summed.items():
        out[k] = s / (n + 1e-9)
        if math.isnan(out[k]):
            msg = f"NaN detected in {split}_{k} (unnormalized values: {(s, n)})"
            if split == "train":
                raise FloatingPointError(f"training diverged: {msg}")
            log.error("WARNING: split %s %s", split, msg)
    return out


def _one_line(err: Exception) -> str:
    from ..weights_convert.mismatch import ParamsMismatchError

    if isinstance(err, ParamsMismatchError):
        parts = [err.summary_line()]
        for kind, items in (("missing", err.missing), ("unexpected", err.unexpected)):
            if items:
                parts.append(f"{kind}: {', '.join(items[:4])}{', ...' if len(items) > 4 else ''}")
        if err.misshaped:
            parts.append("mis-shaped: " + ", ".join(m.describe() for m in err.misshaped[:4]) + (", ..." if len(err.misshaped) > 4 else ""))
        return "; ".join(parts)
    return str(err).splitlines()[0]


def _apply_checkpoint(trainer: ScenicTrainer, tree: Mapping[str, Any], path: Any) -> TrainState:
    """Load a restored TrainState dict into the trainer; another model's checkpoint is one CheckpointError line."""
    try:
        trainer.load_params(tree["params"])
    except ConversionError as e:
        raise CheckpointError(f"{path}: a checkpoint of another model ({_one_line(e)})") from None
    try:
        trainer.load_opt_state_tree(tree.get("opt_state", {}))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    step = int(np.asarray(tree["global_step"]))
    trainer.global_step = step
    metadata = dict(tree.get("metadata") or {})
    torch_rng = metadata.get("torch_rng")
    if isinstance(torch_rng, Mapping):
        trainer.set_rng_state(torch_rng)
    rng = tree.get("rng")
    return TrainState(global_step=step, params={}, opt_state=None, model_state=dict(tree.get("model_state") or {}),
                      rng=None if rng is None else np.asarray(rng), metadata=metadata, trainer=trainer)  # fmt: skip


def _snapshot(trainer: ScenicTrainer, base: TrainState, chrono: _Chrono) -> TrainState:
    metadata = {k: v for k, v in base.metadata.items() if k not in ("chrono", "torch_rng")}
    metadata["chrono"] = chrono.save()
    # Extra metadata keys are dropped by Flax's restore into Scenic's TrainState (its target dict decides).
    metadata["torch_rng"] = trainer.rng_state()
    return TrainState(global_step=trainer.global_step, params=trainer.params(), opt_state=trainer.opt_state_tree(),
                      model_state=base.model_state, rng=base.rng, metadata=metadata, trainer=trainer)  # fmt: skip


def _seed_torch(seed: int, rank: int) -> None:
    """Seed torch's global generator (dropout) from ``config.rng_seed`` and the rank, as Scenic's main seeds
    ``PRNGKey(rng_seed)`` and its train step folds in the device index. torch seeds it randomly per process, so
    without this two fresh runs (and a killed run and its reference) would differ."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1, np.uint64)[0] >> 1))


def train(*, config: Any, dataset: Any, workdir: str, writer: Any = None, device: Any = None,
          hooks: Iterable[Callable[[int, dict], None]] = (), context: Any = None) -> tuple[TrainState, dict[str, float], dict[str, float]]:  # fmt: skip
    """Scenic's ``classification_trainer.train()``: returns ``(state, train_summary, eval_summary)``.

    ``config``: a Scenic experiment config (dict, ConfigDict, ``file.py[:arg]``, ``.json``). ``dataset``: an
    object with ``train_iter`` and ``valid_iter`` (iterators of this process's batches: ``inputs``, ``label``,
    optional ``batch_mask``, numpy or torch) and ``meta_data`` (Scenic's dataset meta data); if it has
    ``seek(step)``, that is called after a restore so that the next training batch is the one of step
    ``step + 1``. ``writer``: clu's ``write_scalars(step, scalars)`` (+ ``flush()``), default
    :class:`~.writers.MetricsWriter` in ``workdir`` (TensorBoard + ``metrics.jsonl``). ``device``: where the
    model runs (default: the context's). ``hooks``: ``hook(step, logs)`` after each step (logs: device tensors).
    ``context``: the distributed context (default: ``training.distributed.get_context()`` if present, else a
    single process). The summaries are dicts of floats under Scenic's names (``loss``, ``accuracy``...);
    both are ``{}`` when the run was already complete. ``state.trainer`` is the live trainer.
    """
    cfg = load_config(config)
    for attr in ("train_iter", "valid_iter", "meta_data"):
        if not hasattr(dataset, attr):
            raise ConfigError(f"dataset has no '{attr}' (expected Scenic's Dataset fields: train_iter, valid_iter, meta_data)")
    meta = dict(dataset.meta_data)
    ctx = context if context is not None else _context(None if device is None else torch.device(device))
    dev = torch.device(device) if device is not None else torch.device(ctx.device)

    total_steps, steps_per_epoch = get_num_training_steps(cfg, meta)
    log_eval_steps = cfg.get("log_eval_steps") or steps_per_epoch
    if not log_eval_steps:
        raise ConfigError("config.log_eval_steps is required (or meta_data['num_train_examples'] for once per epoch)")
    checkpoint_steps = cfg.get("checkpoint_steps") or log_eval_steps
    max_keep = cfg.get("max_checkpoint_keep", 3)
    log_summary_steps = cfg.get("log_summary_steps") or log_eval_steps
    eval_batch_size = cfg.get("eval_batch_size") or cfg["batch_size"]
    if "num_eval_examples" not in meta and not cfg.get("steps_per_eval"):
        raise ConfigError("dataset meta_data['num_eval_examples'] (or config.steps_per_eval) is required for evaluation")
    steps_per_eval = cfg.get("steps_per_eval") or int(math.ceil(int(meta["num_eval_examples"]) / int(eval_batch_size)))
    checkpointing = bool(cfg.get("checkpoint", True))

    trainer = ScenicTrainer(cfg, meta, device=dev)
    seed = int(cfg.get("rng_seed", 0) or 0)
    _seed_torch(seed, ctx.rank)  # a restored run replaces this state with the checkpoint's
    # jax.random.PRNGKey(rng_seed)'s raw key: carried in `rng` for Scenic; the port draws from torch.
    state = TrainState(rng=np.array([0, seed & 0xFFFFFFFF], np.uint32), metadata={"chrono": {k: 0.0 for k in _CHRONO_KEYS}},
                       trainer=trainer)  # fmt: skip
    state.metadata["chrono"]["accum_examples_seen"] = 0
    start_step = 0
    if checkpointing:
        found = restore_newest(workdir) if ctx.is_lead else None
        chosen = ctx.broadcast_object(None if found is None else str(found[0]))
        if chosen is not None:
            tree = found[1] if found is not None else read_train_state(chosen)
            state = _apply_checkpoint(trainer, tree, chosen)
            start_step = state.global_step
            log.info("restored %s (global_step %d)", chosen, start_step)
    init_from = cfg.get("init_from")
    if start_step == 0 and init_from and cfg_get(cfg, "init_from.checkpoint_path", None):
        trainer.init_from_train_state(cfg_get(cfg, "init_from.checkpoint_path"))
    if start_step > 0 and hasattr(dataset, "seek"):
        dataset.seek(start_step)
    check_agree = getattr(ctx, "check_agree", None)
    if check_agree is not None:  # every rank: the same experiment from the same step, else fail fast
        check_agree("config", json.dumps(cfg, sort_keys=True, default=repr))
        check_agree("checkpoint step", str(start_step))
    with _guard(ctx, "model preparation"):  # DDP broadcasts rank 0's parameters
        ctx.prepare(trainer)
    # FSDP2: the parameters and moments are sharded, so building a checkpoint is a collective of every rank.
    sharded = ctx.world_size > 1 and bool(getattr(trainer, "sharded", False))
    train_iter, valid_iter = iter(dataset.train_iter), iter(dataset.valid_iter)

    own_writer = writer is None and ctx.is_lead
    if not ctx.is_lead:
        from .writers import NullWriter

        writer = NullWriter()
    elif writer is None:
        from .writers import MetricsWriter

        writer = MetricsWriter(workdir)
    flush = getattr(writer, "flush", lambda: None)
    chrono = _Chrono(state.metadata.get("chrono") or {}, int(cfg["batch_size"]))
    hooks = list(hooks)

    if start_step == 0:
        step0 = {"num_trainable_params": trainer.num_trainable_params()}
        if cfg.get("count_flops", True):
            with _guard(ctx, "FLOP count"):  # FSDP2: the forward gathers the parameters
                gflops = _gflops(trainer)
            if gflops:
                step0["gflops"] = gflops
        writer.write_scalars(1, step0)

    def save(step: int) -> None:
        # DDP: every rank holds everything, rank 0 alone builds and writes. FSDP2: every rank joins the
        # gathers of the parameters and moments, rank 0 alone writes (the same file as DDP's: Scenic's format).
        if ctx.is_lead or sharded:
            t0 = time.monotonic()
            with _guard(ctx, f"checkpoint {step}"):
                snapshot = _snapshot(trainer, state, chrono)
            if ctx.is_lead:
                write_checkpoint(workdir, snapshot, step, keep=max_keep)
            chrono.paused += time.monotonic() - t0

    def evaluate(step: int) -> dict[str, float]:
        t0 = time.monotonic()
        pairs = []
        for j in range(steps_per_eval):
            try:
                batch = next(valid_iter)
            except StopIteration:
                raise ConfigError(f"dataset.valid_iter ran out after {j} batches at step {step}; an evaluation takes "
                                  f"{steps_per_eval} (ceil(num_eval_examples / eval_batch_size) or steps_per_eval)") from None  # fmt: skip
            with _guard(ctx, f"evaluation at step {step}"):  # FSDP2: the forward gathers the parameters
                pairs.append(trainer.eval_step(batch))
        summary = _normalize(_sum_pairs(pairs, ctx), "eval")
        writer.write_scalars(step, {f"valid_{k}": v for k, v in summary.items()})
        flush()
        chrono.paused += time.monotonic() - t0
        return summary

    train_pairs: list = []
    extra_logs: list = []
    train_summary: dict[str, float] = {}
    eval_summary: dict[str, float] = {}
    warmup = 2  # Scenic's Chrono(warmup=2): the first two steps of a (re)started run write train summaries
    completed = start_step
    saved = start_step  # the restored checkpoint, if any, is of this step
    interrupts = _Interrupts()
    try:
        with interrupts:
            for step in range(start_step + 1, total_steps + 1):
                try:
                    batch = next(train_iter)
                except StopIteration:
                    raise ConfigError(f"dataset.train_iter ran out at step {step} of {total_steps}") from None
                interrupts.in_step = True
                with _guard(ctx, f"training step {step}"):  # DDP's gradient all-reduce runs in backward
                    logs = trainer.step(batch)
                completed = step
                chrono.steps += 1
                interrupts.in_step = False
                train_pairs.append(logs["metrics"])
                extra_logs.append([logs[k] for k in TRAIN_LOG_KEYS])
                for hook in hooks:
                    hook(step, logs)
                if interrupts.pending:
                    raise KeyboardInterrupt
                if step % log_summary_steps == 1 or step == total_steps or warmup:
                    warmup = max(0, warmup - 1)
                    train_summary = _normalize(_sum_pairs(train_pairs, ctx), "train")
                    writer.write_scalars(step, {f"train_{k}": v for k, v in train_summary.items()})
                    means = torch.stack([torch.stack([t.float().to(dev) for t in row]) for row in extra_logs]).mean(0)
                    writer.write_scalars(step, dict(zip(TRAIN_LOG_KEYS, means.double().cpu().tolist())))
                    flush()
                    train_pairs, extra_logs = [], []
                if step % log_eval_steps == 1 or step == total_steps:
                    eval_summary = evaluate(step)
                if checkpointing and ((step % checkpoint_steps == 1 and step > 1) or step == total_steps):
                    save(step)
                    saved = step
    except KeyboardInterrupt:
        if interrupts.in_step:
            log.warning("interrupted inside step %d: its state is incomplete, no checkpoint written", completed + 1)
        elif checkpointing and completed > saved and sharded:
            # A checkpoint of FSDP2's shards is a collective; a rank interrupted at another point (inside its
            # step, in an evaluation) would never join it and the others would wait for it until the timeout.
            log.warning("interrupted: no checkpoint of step %d under FSDP2 (gathering the shards needs every rank); "
                        "the newest is checkpoint_%d", completed, saved)  # fmt: skip
        elif checkpointing and completed > saved:
            log.warning("interrupted: writing checkpoint_%d", completed)
            save(completed)
        raise
    finally:
        if own_writer:
            writer.close()
        else:
            flush()
    ctx.barrier()
    with _guard(ctx, "final state"):
        final = _snapshot(trainer, state, chrono)
    return final, train_summary, eval_summary
