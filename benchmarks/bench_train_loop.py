"""Speed of the training job: what ``train()`` adds to the bare step, whether data starves the step, and
Scenic's own step time on the same machine (issue 17, item 6).

One command::

    python benchmarks/bench_train_loop.py --write   # full run -> benchmarks/results/train_loop.md
    python benchmarks/bench_train_loop.py --quick   # smoke test: a tiny model, a few steps (temp folder)

Without ``--write`` (or ``--out FILE``) the table goes to a new temporary folder, whose path is printed.

The model and config are the README demo's (``configs/digits_tokenlearner.py``: TokenLearner ViT, hidden 64,
4 layers, 16x16x3 digits, batch 64, AdamW, clipping at 1.0); ``--quick`` shrinks it (hidden 16, 1 layer,
batch 8). Three measurements, each repeated in interleaved rounds (a load spike on the shared machine then hits
every column of a round alike; ratios are per round, then the median):

1. **Loop overhead.** (a) a bare loop: ``ScenicTrainer.step(batch)`` over pre-made in-memory batches;
   (b) ``train()`` over the same batches (a tiny in-memory dataset object, an in-memory writer, the demo's
   ``log_summary_steps``, no checkpoints, evaluation only at the first and the last step). Time per step over
   steps ``4 .. N-1`` of both, from a timestamp after every step (a hook in ``train()``): the window holds
   steps, train summaries at the demo's cadence and the loop's bookkeeping, not the evaluations of steps 1 and
   N; an evaluation and a checkpoint write are timed apart. Host reads: in a separate, untimed run of each
   (the patch costs time), every Python-level read of a tensor on the training device (``item``,
   ``__float__``, ``__int__``, ``__bool__``, ``__index__``, ``tolist``, ``numpy``, ``cpu``) is counted per
   step with its call site; on CUDA, ``torch.cuda.set_sync_debug_mode('warn')`` warnings are counted too.
   **Asserted in the benchmark** (it exits 1 otherwise): on a step without a summary, ``train()`` reads no more
   than the bare ``step()`` does.
2. **Data.** ``train()`` with the built-in sources of ``training.data``: ``digits`` (the demo, in-process) and
   ``image_folder`` over a folder of JPEGs the benchmark writes to a temporary folder with Pillow (decoded and
   preprocessed as Scenic's ImageNet pipeline, in background workers). Time blocked in ``next(train_iter)``
   against the time per step, over the same window.
3. **Scenic's step.** Scenic's ``classification_trainer.train_step`` for the same model, config and batch, as
   JAX: the project's Flax reference (``parity/flax_reference.py``), ``value_and_grad``, Scenic's trainer
   clipping, optax's own chain for the config (``parity.train.optax_chain``; the schedule a table of the
   config's learning rates, so it traces), ``apply_updates``, Scenic's training logs and metrics, in one
   ``jax.jit`` with params and optimiser state donated; batches already on the device (Scenic prefetches
   them). This is Scenic's STEP, not its whole ``train()`` loop. Its first step is checked against the port's
   (loss and ``l2_grads``). ``--scenic-src DIR`` (a checkout of google-research/scenic) tries to import the
   genuine ``classification_trainer``; the results say why it could not run when its imports are missing.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "digits_tokenlearner.py"
RESULTS = ROOT / "benchmarks" / "results" / "train_loop.md"
WINDOW_START = 3  # steps 1..3 are warm-up: evaluation at 1, Scenic's Chrono warm-up summaries at 1 and 2
PROG = "bench_train_loop.py"

#: The reads of a tensor that make the host wait for the device (on a GPU); counted per step.
HOST_READS = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu")


class BenchError(Exception):
    """A bad option or a missing input: one line on stderr, exit status 2."""


# -- configs and batches ---------------------------------------------------------------------------------------
def demo_config(quick: bool) -> dict[str, Any]:
    """The README demo's config as a plain dict; ``quick``: a tiny model and batch (seconds, not minutes)."""
    from tokenlearner_torch.training import load_config

    if not DEMO_CONFIG.is_file():
        raise BenchError(f"the demo config {DEMO_CONFIG.relative_to(ROOT)} is missing (expected the README demo's config)")
    cfg = json.loads(json.dumps(load_config(str(DEMO_CONFIG)), default=lambda o: o.to_dict()))
    if quick:
        # dropout off: Scenic's step is then compiled once, for its check and its timing (seconds of jit)
        cfg["model"].update(hidden_size=16, mlp_dim=32, num_heads=2, num_layers=1, dropout_rate=0.0,
                            attention_dropout_rate=0.0)
        cfg["model"]["tokenizer"].update(num_tokens=4, tokenlearner_loc=1)
        cfg["batch_size"] = 8
        cfg["eval_batch_size"] = 100
    return cfg


def job_config(cfg: Mapping[str, Any], steps: int) -> dict[str, Any]:
    """``cfg`` run for ``steps`` steps: no checkpoints, evaluation only at steps 1 and ``steps`` (Scenic's rule
    ``step % log_eval_steps == 1`` with ``log_eval_steps = steps + 1``), no gflops count (a step-0 extra)."""
    job = copy.deepcopy(dict(cfg))
    job.pop("num_training_epochs", None)
    job.update(num_training_steps=steps, checkpoint=False, count_flops=False, log_eval_steps=steps + 1)
    return job


class MemoryDataset:
    """Scenic's Dataset fields over pre-made batches (numpy dicts)."""

    def __init__(self, train: list, valid: list, meta: Mapping[str, Any]) -> None:
        self.train_iter = iter(train)
        self.valid_iter = itertools.cycle(valid)
        self.meta_data = dict(meta)


class ListWriter:
    """clu's ``write_scalars`` into a list (the loop's writes cost what the caller's writer costs)."""

    def __init__(self) -> None:
        self.calls: list = []

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self.calls.append((step, dict(scalars)))

    def flush(self) -> None:
        pass


def premade_batches(cfg: Mapping[str, Any], steps: int) -> tuple[list, list, dict]:
    """``steps`` training batches and one evaluation's batches of the digits source, in memory."""
    from tokenlearner_torch.training.data import build_dataset

    ds = build_dataset({**cfg, "dataset_configs": {**cfg.get("dataset_configs", {}), "num_workers": 0}})
    try:
        train = [next(ds.train_iter) for _ in range(steps)]
        valid = [next(ds.valid_iter) for _ in range(ds.plan.num_eval_batches)]
        return train, valid, dict(ds.meta_data)
    finally:
        ds.close()


# -- 1. loop overhead ----------------------------------------------------------------------------------------------
def run_bare(cfg: Mapping[str, Any], meta: Mapping[str, Any], batches: list, device: torch.device) -> list[float]:
    """``t[s]``: the time after step ``s`` (``t[0]``: before step 1) of a bare ``ScenicTrainer.step`` loop."""
    from tokenlearner_torch.training import ScenicTrainer

    trainer = ScenicTrainer(cfg, meta, device=device)
    sync = _sync(device)
    sync()
    t = [time.perf_counter()]
    for b in batches:
        trainer.step(b)
        t.append(time.perf_counter())
    sync()
    return t


def run_loop(cfg: Mapping[str, Any], dataset: Any, device: torch.device, workdir: str,
             extra_hook: Optional[Callable[[int], None]] = None) -> tuple[list[float], ListWriter]:
    """``t[s]`` after step ``s`` of ``train()`` (a hook); ``t[0]`` is the start of the call."""
    from tokenlearner_torch.training import train

    t = {0: time.perf_counter()}

    def hook(step: int, logs: dict) -> None:
        t[step] = time.perf_counter()
        if extra_hook is not None:
            extra_hook(step)

    writer = ListWriter()
    train(config=cfg, dataset=dataset, workdir=workdir, writer=writer, device=device, hooks=[hook])
    return [t[s] for s in range(len(t))], writer


def run_paired(cfg: Mapping[str, Any], meta: Mapping[str, Any], batches: list, valid: list, device: torch.device,
               workdir: str) -> tuple[list[float], list[float]]:
    """``train()`` with a second, bare trainer stepped inside its hook: after ``train()``'s step ``s`` the bare
    trainer takes step ``s`` on the same batch. Returns per-step seconds ``(loop, bare)`` for steps
    ``1..N``: ``loop[s-1]`` runs from the end of the previous hook to this one (the loop's work after step
    ``s-1``, ``next()``, step ``s``), ``bare[s-1]`` is the bare step. Each pair is adjacent in time, so a load
    spike of the shared machine hits both sides of a pair alike."""
    from tokenlearner_torch.training import ScenicTrainer, train

    bare_trainer = ScenicTrainer(cfg, meta, device=device)
    sync = _sync(device)
    loop_s: list[float] = []
    bare_s: list[float] = []
    last = [time.perf_counter()]

    def hook(step: int, logs: dict) -> None:
        sync()
        t0 = time.perf_counter()
        loop_s.append(t0 - last[0])
        bare_trainer.step(batches[step - 1])
        sync()
        t1 = time.perf_counter()
        bare_s.append(t1 - t0)
        last[0] = time.perf_counter()

    train(config=cfg, dataset=MemoryDataset(batches, valid, meta), workdir=workdir, writer=ListWriter(),
          device=device, hooks=[hook])
    return loop_s, bare_s


def per_step_ms(t: list[float], start: int = WINDOW_START) -> tuple[float, float]:
    """(mean, median) ms per step over steps ``start + 1 .. N - 1`` (``N`` = ``len(t) - 1``): the mean holds the
    summaries of the window; the median is the typical step, robust to a load spike."""
    end = len(t) - 2
    return 1e3 * (t[end] - t[start]) / (end - start), 1e3 * statistics.median(np.diff(t[start:end + 1]))


def _sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


class ReadCounter:
    """Counts Python-level host reads of tensors on ``device`` while active (see :data:`HOST_READS`), with their
    call sites; ``mark()`` closes a per-step bucket."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: dict[str, int] = {}
        self.buckets: list[dict[str, int]] = []
        self._saved: dict[str, Any] = {}

    def _wrap(self, name: str, fn: Callable) -> Callable:
        counter = self

        def wrapped(t: torch.Tensor, *a: Any, **k: Any) -> Any:
            if t.device.type == counter.device.type:
                f = sys._getframe(1)
                site = f"{Path(f.f_code.co_filename).name}:{f.f_lineno} {f.f_code.co_name}() {name}"
                counter.current[site] = counter.current.get(site, 0) + 1
            return fn(t, *a, **k)

        return wrapped

    def mark(self) -> None:
        self.buckets.append(self.current)
        self.current = {}

    @contextmanager
    def active(self) -> Iterator["ReadCounter"]:
        self._saved = {n: getattr(torch.Tensor, n) for n in HOST_READS}
        for n, fn in self._saved.items():
            setattr(torch.Tensor, n, self._wrap(n, fn))
        caught: Any = None
        try:
            if self.device.type == "cuda":  # the driver's view too: any synchronising call warns
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    torch.cuda.set_sync_debug_mode("warn")
                    try:
                        yield self
                    finally:
                        torch.cuda.set_sync_debug_mode("default")
            else:
                yield self
        finally:
            for n, fn in self._saved.items():
                setattr(torch.Tensor, n, fn)
        self.cuda_sync_warnings = 0 if caught is None else sum("synchroniz" in str(w.message) for w in caught)


def count_reads(cfg: Mapping[str, Any], meta: Mapping[str, Any], train_b: list, valid_b: list,
                device: torch.device) -> dict[str, Any]:
    """Host reads per step of the bare loop and of ``train()`` (untimed runs); raises AssertionError when
    ``train()`` reads more than the bare step on a step without a summary."""
    from tokenlearner_torch.training import ScenicTrainer

    bare = ReadCounter(device)
    trainer = ScenicTrainer(cfg, meta, device=device)
    with bare.active():
        for b in train_b:
            trainer.step(b)
            bare.mark()
    loop = ReadCounter(device)
    with tempfile.TemporaryDirectory() as wd, loop.active():
        # A bucket per step: from the hook of step s-1 to the hook of step s (next(), step s, and what the loop
        # did after step s-1: its summary or evaluation, if any).
        _, writer = run_loop(cfg, MemoryDataset(train_b, valid_b, meta), device, wd, extra_hook=lambda s: loop.mark())
    summary_steps = sorted({s for s, _ in writer.calls})
    n = len(train_b)
    extra = {}
    for s in range(WINDOW_START + 1, n):  # buckets index s-1 holds step s
        if (s - 1) in summary_steps:
            continue
        b_reads, l_reads = sum(bare.buckets[s - 1].values()), sum(loop.buckets[s - 1].values())
        if l_reads > b_reads:
            extra[s] = {k: v for k, v in loop.buckets[s - 1].items() if v > bare.buckets[s - 1].get(k, 0)}
    window = [s for s in range(WINDOW_START + 1, n) if (s - 1) not in summary_steps]
    after_summary = [s for s in range(WINDOW_START + 1, n) if (s - 1) in summary_steps]
    out = {
        "bare_per_step": statistics.median(sum(bare.buckets[s - 1].values()) for s in window) if window else 0,
        "bare_sites": bare.buckets[window[0] - 1] if window else {},
        "loop_per_step": statistics.median(sum(loop.buckets[s - 1].values()) for s in window) if window else 0,
        "loop_after_summary": [sum(loop.buckets[s - 1].values()) - sum(bare.buckets[s - 1].values()) for s in after_summary],
        "steps_checked": len(window),
        "cuda_sync_warnings": (bare.cuda_sync_warnings, loop.cuda_sync_warnings),
    }
    if extra:
        s, sites = next(iter(extra.items()))
        raise AssertionError(f"train() reads the host more than the bare step on {len(extra)} step(s) without a "
                             f"summary, first step {s}: {', '.join(f'{k} x{v}' for k, v in sites.items())}")
    return out


def time_eval_and_checkpoint(cfg: Mapping[str, Any], meta: Mapping[str, Any], valid_b: list,
                             device: torch.device) -> tuple[float, float]:
    """ms of one evaluation (``steps_per_eval`` batches, summed on the device, read once) and of one checkpoint
    write (Scenic's TrainState with the optimiser state, atomic)."""
    from tokenlearner_torch.training import ScenicTrainer, TrainState, write_checkpoint

    trainer = ScenicTrainer(cfg, meta, device=device)
    t0 = time.perf_counter()
    pairs = [trainer.eval_step(b) for b in valid_b]
    float(sum(p[k][0] for p in pairs for k in p))
    t1 = time.perf_counter()
    state = TrainState(global_step=1, params=trainer.params(), opt_state=trainer.opt_state_tree(), model_state={},
                       rng=np.array([0, 0], np.uint32), metadata={})
    with tempfile.TemporaryDirectory() as wd:
        write_checkpoint(wd, state, 1, keep=3)
        t2 = time.perf_counter()
    return 1e3 * (t1 - t0), 1e3 * (t2 - t1)


# -- 2. data -------------------------------------------------------------------------------------------------------
class TimedIter:
    """``next()`` of an iterator, timed: ``waits[k]`` is the k-th call's blocking time (s)."""

    def __init__(self, it: Any) -> None:
        self.it, self.waits = it, []

    def __iter__(self) -> "TimedIter":
        return self

    def __next__(self) -> Any:
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.waits.append(time.perf_counter() - t0)


class TimedDataset:
    """A built-in Dataset with its ``train_iter`` timed."""

    def __init__(self, ds: Any) -> None:
        self.ds = ds
        self.train_iter = TimedIter(ds.train_iter)
        self.valid_iter, self.meta_data = ds.valid_iter, ds.meta_data


def write_jpeg_folder(root: Path, classes: int, train_per_class: int, valid_per_class: int, side: int) -> None:
    """``root/train/<class>/*.jpg`` and ``root/valid/<class>/*.jpg``: smooth random colour images (JPEG q90)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for split, n in (("train", train_per_class), ("valid", valid_per_class)):
        for c in range(classes):
            d = root / split / f"class_{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                f = rng.uniform(1, 6, size=(3, 2))
                img = np.stack([np.sin(f[k, 0] * 6.28 * xx + f[k, 1] * 6.28 * yy + c) for k in range(3)], -1)
                img = (127.5 * (img + 1) + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)


def run_data(cfg: Mapping[str, Any], steps: int, device: torch.device, data_dir: Optional[str] = None) -> dict[str, float]:
    """``train()`` over a built-in source for ``steps`` steps: ms per step and ms waiting in ``next(train_iter)``
    over the window, the fraction waiting, and the first batch's wait (worker start-up)."""
    from tokenlearner_torch.training.data import build_dataset

    ds = build_dataset(cfg, data_dir=data_dir)
    timed = TimedDataset(ds)
    try:
        with tempfile.TemporaryDirectory() as wd:
            t, _ = run_loop(cfg, timed, device, wd)
    finally:
        ds.close()
    w = timed.train_iter.waits  # w[s-1]: the wait of step s, inside (t[s-1], t[s]]
    end = len(t) - 2
    wait = sum(w[s - 1] for s in range(WINDOW_START + 1, end + 1))
    total = t[end] - t[WINDOW_START]
    n = end - WINDOW_START
    return {"step_ms": 1e3 * total / n, "wait_ms": 1e3 * wait / n, "fraction": wait / total,
            "max_wait_ms": 1e3 * max(w[s - 1] for s in range(WINDOW_START + 1, end + 1)), "first_ms": 1e3 * w[0],
            "workers": int(ds.train_iter.num_workers)}


# -- 3. Scenic's step (JAX) ----------------------------------------------------------------------------------------
def _jax_train_step(cfg: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[Any, Any, dict, Callable]:
    """Scenic's ``classification_trainer.train_step`` for ``cfg`` in JAX, jitted with params and optimiser
    state donated: ``(port trainer, step_fn, initial state, device_batch)``; ``step_fn(params, opt_state, step,
    rng, inputs, targets, weights) -> (params, opt_state, step + 1, rng, metrics, logs)``. The parameters are
    the port trainer's initial ones (the same model)."""
    import jax
    import jax.numpy as jnp
    import optax

    from tokenlearner_torch.parity.flax_reference import TokenLearnerViT as FlaxViT
    from tokenlearner_torch.parity.train import _jax_loss, optax_chain
    from tokenlearner_torch.training import ScenicTrainer, get_num_training_steps
    from tokenlearner_torch.training.trainer import MODEL_NAMES

    trainer = ScenicTrainer(cfg, meta)
    m = cfg["model"]
    n_cls = int(meta["num_classes"])
    flax_model = FlaxViT(num_classes=n_cls, mlp_dim=m["mlp_dim"], num_layers=m["num_layers"], num_heads=m["num_heads"],
                         tokenizer=m["tokenizer"], hidden_size=m["hidden_size"],
                         representation_size=m.get("representation_size"), dropout_rate=m.get("dropout_rate", 0.1),
                         attention_dropout_rate=m.get("attention_dropout_rate", 0.1),
                         classifier=m.get("classifier", "gap"))  # fmt: skip
    params = jax.tree_util.tree_map(jnp.asarray, trainer.params())
    total, _ = get_num_training_steps(cfg, meta)
    # Scenic's lr_fn is traceable jnp code; the port's lr_fn (equal to it, tests/test_training_schedules.py) runs on
    # the host, so the jitted step reads the same values from a table: one gather, like Scenic's few scalar ops.
    lr_table = jnp.asarray(np.array([np.float32(trainer.lr_fn(i)) for i in range(total + 2)], np.float32))
    schedule = lambda count: lr_table[jnp.minimum(count, lr_table.shape[0] - 1)]  # noqa: E731
    tx = optax_chain(trainer.optimizer_config, trainer.lr_fn, params, schedule=schedule)
    kind = MODEL_NAMES[cfg["model_name"]]
    ls, l2f, max_norm = cfg.get("label_smoothing"), cfg.get("l2_decay_factor"), cfg.get("max_grad_norm")

    def l2(tree: Any) -> Any:
        return jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree_util.tree_leaves(tree)))

    def train_step(params, opt_state, step, rng, inputs, targets, weights):  # Scenic's train_step, one device
        new_rng, rng = jax.random.split(rng)

        def loss_fn(p):
            logits = flax_model.apply({"params": p}, inputs, train=True, rngs={"dropout": rng})
            return _jax_loss(kind, logits, targets, weights, ls, l2f, p), logits

        (loss, logits), grad = jax.value_and_grad(loss_fn, has_aux=True)(params)
        if max_norm is not None:  # Scenic's clip_grads
            norm = l2(grad)
            grad = jax.tree_util.tree_map(lambda g: jnp.where(norm < max_norm, g, g * (max_norm / norm)), grad)
        updates, opt_state = tx.update(grad, opt_state, params)
        params = optax.apply_updates(params, updates)
        logs = {"loss": loss, "l2_grads": l2(grad), "l2_params": l2(params), "l2_updates": l2(updates),
                "learning_rate": lr_table[step]}
        # Scenic's classification metrics: (sum, count) of the unsmoothed cross-entropy and of top-1 accuracy.
        ce = -(targets * jax.nn.log_softmax(logits)).sum(-1)
        correct = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).astype(jnp.float32)
        metrics = {"loss": ((ce * weights).sum(), weights.sum()), "accuracy": ((correct * weights).sum(), weights.sum())}
        return params, opt_state, step + 1, new_rng, metrics, logs

    def device_batch(b: Mapping[str, np.ndarray]) -> tuple:
        label = np.asarray(b["label"])
        targets = label if label.ndim == 2 else np.eye(n_cls, dtype=np.float32)[label]
        return tuple(jax.device_put(np.asarray(x, np.float32)) for x in (b["inputs"], targets, b["batch_mask"]))

    # One compiled init (eagerly, optax's init is one small XLA compile per leaf: seconds of --quick).
    state = {"params": params, "opt": jax.jit(tx.init)(params), "step": jnp.int32(0),
             "rng": jax.random.PRNGKey(int(cfg.get("rng_seed", 0) or 0))}
    return trainer, jax.jit(train_step, donate_argnums=(0, 1)), state, device_batch


def scenic_step(cfg: Mapping[str, Any], meta: Mapping[str, Any], batches: list) -> tuple[Callable[[int], float], dict]:
    """A timer ``run(n) -> seconds for n steps`` of Scenic's jitted train_step for ``cfg`` (see the module
    docstring), and the check that it is the port's computation: the first step of both with dropout off (its
    random numbers are JAX's on one side, torch's on the other), scaled differences of ``loss`` and
    ``l2_grads``."""
    import jax

    with jax.default_matmul_precision("highest"):
        det = copy.deepcopy(dict(cfg))
        det["model"] = {**det["model"], "dropout_rate": 0.0, "attention_dropout_rate": 0.0}
        trainer, step_fn, st, device_batch = _jax_train_step(det, meta)
        x, y, w = device_batch(batches[0])
        st["params"], st["opt"], st["step"], st["rng"], _, logs = step_fn(st["params"], st["opt"], st["step"], st["rng"], x, y, w)
        port = trainer.train_step(batches[0])
        check = {k: abs(float(logs[k]) - port[k]) / max(1.0, abs(port[k])) for k in ("loss", "l2_grads")}

        if det != cfg:  # with dropout: the timed step is another program
            _, step_fn, st, device_batch = _jax_train_step(cfg, meta)
        state = st
        dev_batches = [device_batch(b) for b in batches]

    def run(n: int) -> float:
        with jax.default_matmul_precision("highest"):
            t0 = time.perf_counter()
            out = None
            for i in range(n):
                x, y, w = dev_batches[i % len(dev_batches)]
                state["params"], state["opt"], state["step"], state["rng"], _, out = step_fn(
                    state["params"], state["opt"], state["step"], state["rng"], x, y, w)
            jax.block_until_ready(out)
            return time.perf_counter() - t0

    return run, check


def genuine_train_status(src: Optional[str]) -> str:
    """Whether genuine Scenic's ``classification_trainer`` imports from ``src`` (it needs clu, tensorflow...)."""
    if not src:
        return ("not tried (no `--scenic-src DIR`); the genuine `train()` needs Scenic's own imports (clu, "
                "tensorflow, tensorflow_datasets...), which this project does not install")
    if not (Path(src) / "scenic" / "train_lib" / "classification_trainer.py").is_file():
        raise BenchError(f"--scenic-src {src}: no scenic/train_lib/classification_trainer.py there (expected a "
                         f"checkout of google-research/scenic)")
    sys.path.insert(0, str(Path(src).resolve()))
    try:
        import scenic.train_lib.classification_trainer  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is the answer
        return (f"not run: importing `scenic.train_lib.classification_trainer` from `{src}` fails with "
                f"`{type(e).__name__}: {str(e).splitlines()[0]}` (Scenic's train() stack is not installed here; "
                f"the benchmark does not install it)")
    finally:
        sys.path.remove(str(Path(src).resolve()))
    return ("imports, but not run: driving the genuine `train()` needs a Scenic dataset builder and clu's writers; "
            "this benchmark times Scenic's jitted step instead")


# -- the run -------------------------------------------------------------------------------------------------------
def _load() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    device = torch.device(args.device)
    cfg = demo_config(args.quick)
    n = args.steps
    res: dict[str, Any] = {"load_before": _load(), "config": cfg, "steps": n, "rounds": args.repeats}
    job = job_config(cfg, n)
    train_b, valid_b, meta = premade_batches(job, n)

    # 2: data sources, interleaved; first, before jax is imported: the image_folder loader forks its workers,
    # and forking a process that runs JAX's threads can deadlock.
    with tempfile.TemporaryDirectory(prefix="tokenlearner-jpegs-") as jpegs:
        per_class = (2, 1) if args.quick else (40, 6)
        write_jpeg_folder(Path(jpegs), 10, *per_class, side=args.jpeg_side)
        folder_cfg = copy.deepcopy(job)
        folder_cfg["dataset_name"] = "image_folder"
        folder_cfg["dataset_configs"] = {"train_dir": str(Path(jpegs) / "train"), "valid_dir": str(Path(jpegs) / "valid"),
                                         "image_size": int(cfg["dataset_configs"].get("image_size", 16))}  # fmt: skip
        data: dict[str, list] = {"digits": [], "image_folder": []}
        for r in range(max(1, args.repeats // 2)):
            for name in (["digits", "image_folder"] if r % 2 == 0 else ["image_folder", "digits"]):
                data[name].append(run_data(job if name == "digits" else folder_cfg, n, device))
                d = data[name][-1]
                log(f"data {name}: step {d['step_ms']:.2f} ms, waiting {d['wait_ms']:.3f} ms ({100 * d['fraction']:.2f}%)")
        res["data"] = data
        res["jpegs"] = {"classes": 10, "train": 10 * per_class[0], "valid": 10 * per_class[1], "side": args.jpeg_side}
    # 1 + 3: interleaved rounds of the bare loop, train() and Scenic's jitted step.
    log("compiling Scenic's step (jax.jit)...")
    flax_run, res["scenic_check"] = scenic_step(job, meta, train_b)
    flax_run(WINDOW_START)  # warm
    times: dict[str, list[float]] = {"bare": [], "loop": [], "scenic": []}
    medians: dict[str, list[float]] = {"bare": [], "loop": []}
    ratios, median_ratios = [], []
    kinds = ["bare", "loop", "scenic"]
    for r in range(args.repeats):
        order = kinds[r % 3:] + kinds[:r % 3]
        got = {}
        for kind in order:
            if kind == "bare":
                got[kind], med = per_step_ms(run_bare(job, meta, train_b, device))
            elif kind == "loop":
                with tempfile.TemporaryDirectory() as wd:
                    got[kind], med = per_step_ms(run_loop(job, MemoryDataset(train_b, valid_b, meta), device, wd)[0])
            else:
                got[kind] = 1e3 * flax_run(n - 1 - WINDOW_START) / (n - 1 - WINDOW_START)
            times[kind].append(got[kind])
            if kind in medians:
                medians[kind].append(med)
        ratios.append(got["loop"] / got["bare"])
        median_ratios.append(medians["loop"][-1] / medians["bare"][-1])
        log(f"round {r + 1}/{args.repeats}: bare {got['bare']:.2f} ms, train() {got['loop']:.2f} ms "
            f"(x{ratios[-1]:.3f}), Scenic step {got['scenic']:.2f} ms")
    res.update(times=times, ratios=ratios, medians=medians, median_ratios=median_ratios)
    log("paired runs (a bare step inside train()'s hook)...")
    pair_sums, pair_ratios = [], []
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as wd:
            loop_s, bare_s = run_paired(job, meta, train_b, valid_b, device, wd)
        window = range(WINDOW_START, n - 1)  # steps WINDOW_START + 1 .. n - 1
        pair_sums.append(sum(loop_s[i] for i in window) / sum(bare_s[i] for i in window))
        pair_ratios += [loop_s[i] / bare_s[i] for i in window]
        log(f"paired {r + 1}/{args.repeats}: train() / bare over the window {pair_sums[-1]:.3f}")
    res.update(pair_sums=pair_sums, pair_ratios=pair_ratios)
    res["reads"] = count_reads(job, meta, train_b, valid_b, device)
    evals, ckpts = zip(*(time_eval_and_checkpoint(job, meta, valid_b, device) for _ in range(min(3, args.repeats))))
    res.update(eval_ms=_med(list(evals)), ckpt_ms=_med(list(ckpts)), eval_batches=len(valid_b))

    res["genuine"] = genuine_train_status(args.scenic_src)
    res["load_after"] = _load()
    return res


def render(res: dict[str, Any], args: argparse.Namespace, command: str) -> str:
    import jax

    cfg, t = res["config"], res["times"]
    m = cfg["model"]
    bare, loop, scenic = _med(t["bare"]), _med(t["loop"]), _med(t["scenic"])
    ratio = _med(res["ratios"])
    reads = res["reads"]
    spans = f"steps {WINDOW_START + 1}..{res['steps'] - 1} of {res['steps']}"
    lines = [
        "# Speed of the training job (`train()`)",
        "",
        f"Command: `{command}`  ",
        f"Date: {datetime.date.today().isoformat()}; {_cpu_name()}, {os.cpu_count()} cores, device `{args.device}`, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
        f"(XLA_FLAGS `{os.environ.get('XLA_FLAGS', '')}`).  ",
        f"Load average (1/5/15 min) before: {res['load_before']}; after: {res['load_after']} "
        "(the machine is shared with other jobs: absolute times move with the load; the per-round ratios are the "
        "numbers to read).",
        "",
        f"Model and config: `configs/digits_tokenlearner.py`{' shrunk by --quick' if args.quick else ''}: "
        f"TokenLearner ViT, hidden {m['hidden_size']}, {m['num_layers']} layers, {m['tokenizer']['num_tokens']} "
        f"tokens at block {m['tokenizer']['tokenlearner_loc']}, 16x16x3 digits, batch {cfg['batch_size']}, "
        f"{cfg.get('optimizer')} (optax adamw), max_grad_norm {cfg.get('max_grad_norm')}, float32. "
        f"{res['rounds']} interleaved rounds of {res['steps']} steps; time per step over {spans}.",
        "",
        "## 1. What the loop adds to the bare step",
        "",
        "| run | ms / step: window mean, median of rounds | min, max of rounds | typical step: median step of a round, median of rounds |",
        "|---|---|---|---|",
        f"| (a) bare loop: `ScenicTrainer.step(batch)` over in-memory batches | {bare:.2f} | {min(t['bare']):.2f}, "
        f"{max(t['bare']):.2f} | {_med(res['medians']['bare']):.2f} |",
        f"| (b) `train()` over the same batches (summaries every {cfg.get('log_summary_steps')} steps, in-memory writer) "
        f"| {loop:.2f} | {min(t['loop']):.2f}, {max(t['loop']):.2f} | {_med(res['medians']['loop']):.2f} |",
        "",
        f"**(b) / (a) per step: {ratio:.3f}** (window means, the summaries included; median of the per-round "
        f"ratios; target <= 1.05); typical step {_med(res['median_ratios']):.3f}. Per round, mean: "
        f"{', '.join(f'{r:.3f}' for r in res['ratios'])}; typical: "
        f"{', '.join(f'{r:.3f}' for r in res['median_ratios'])}.",
        "",
        f"**Paired** (steadier on a shared machine): {len(res['pair_sums'])} runs of `train()` with a second, bare "
        "trainer stepped inside `train()`'s hook on the same batch, so each (loop step, bare step) pair is adjacent in "
        f"time: window time of `train()` / window time of the bare steps **{_med(res['pair_sums']):.3f}** (median "
        f"of runs; runs: {', '.join(f'{r:.3f}' for r in res['pair_sums'])}); per step pair, median "
        f"{_med(res['pair_ratios']):.3f} (quartiles {np.percentile(res['pair_ratios'], 25):.3f}, "
        f"{np.percentile(res['pair_ratios'], 75):.3f}, {len(res['pair_ratios'])} pairs).",
        "",
        f"Apart (not in the window): one evaluation ({res['eval_batches']} batches of {cfg.get('eval_batch_size')}) "
        f"{res['eval_ms']:.1f} ms, one checkpoint write (params + optimiser state, fsynced) {res['ckpt_ms']:.1f} ms; "
        f"at the demo's cadence (evaluation every {cfg.get('log_eval_steps')} steps, a checkpoint every "
        f"{cfg.get('checkpoint_steps')}) that is "
        f"{100 * (res['eval_ms'] / cfg['log_eval_steps'] + res['ckpt_ms'] / cfg['checkpoint_steps']) / bare:.2f}% "
        "of the bare step time, amortised.",
        "",
        f"Host reads per step (Python-level reads of tensors on the training device, counted in a separate untimed "
        f"run over {reads['steps_checked']} steps without a summary): bare step {reads['bare_per_step']}, "
        f"`train()` {reads['loop_per_step']} (**asserted: `train()` adds none**; after a summary step: "
        f"{', '.join(f'+{x}' for x in reads['loop_after_summary']) or 'none in the window'}: the summary reads "
        f"its stacked sums once per `write_scalars` call). "
        + ("The bare step's own reads, by site: "
           + ", ".join(f"`{k}` x{v}" for k, v in sorted(reads["bare_sites"].items()))
           + (". On a CPU every tensor counts as on the training device; these read optax's int32 `count` "
              "(`_count()`) and Adam's float32 bias correction (`_bias_correction()`), tensors the port creates on "
              "the host whatever the device (on a GPU: no sync)."
              if args.device == "cpu" and all(" _count() " in k or " _bias_correction() " in k
                                              for k in reads["bare_sites"]) else ".")
           if reads["bare_sites"] else "The bare step reads nothing on the host.")
        + (f" CUDA sync-debug warnings: bare {reads['cuda_sync_warnings'][0]}, train() {reads['cuda_sync_warnings'][1]}."
           if args.device.startswith("cuda") else " Not run on a GPU here: `--device cuda` adds torch's sync-debug "
           "mode count."),
        "",
        "## 2. Does data starve the step?",
        "",
        f"`train()` with the built-in sources (`training.data`), time blocked in `next(train_iter)` over {spans}; "
        f"image_folder: {res['jpegs']['train']} train / {res['jpegs']['valid']} valid JPEGs of "
        f"{res['jpegs']['side']}x{res['jpegs']['side']} in {res['jpegs']['classes']} classes written to a temporary "
        "folder (Pillow, quality 90), decoded and preprocessed as Scenic's ImageNet pipeline (inception crop, flip, "
        "bicubic resize to 16, normalisation). The waiting column is the starvation; the loader workers also share "
        f"this machine's {os.cpu_count()} cores with the step, which shows in the ms / step of the two rows.",
        "",
        "| source | loader workers | runs | ms / step (median) | waiting ms / step (median) | share of step time waiting (median, max) | longest single wait ms | first batch ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in res["data"].items():
        lines.append(f"| {name} | {runs[0]['workers']} | {len(runs)} | {_med([r['step_ms'] for r in runs]):.2f} | "
                     f"{_med([r['wait_ms'] for r in runs]):.3f} | {100 * _med([r['fraction'] for r in runs]):.2f}%, "
                     f"{100 * max(r['fraction'] for r in runs):.2f}% | {max(r['max_wait_ms'] for r in runs):.1f} | "
                     f"{_med([r['first_ms'] for r in runs]):.0f} |")
    chk = res["scenic_check"]
    lines += [
        "",
        "## 3. Scenic's step on the same machine",
        "",
        "| step | ms / step (median) | min | max |",
        "|---|---|---|---|",
        f"| port: `ScenicTrainer.step` (eager PyTorch), = (a) | {bare:.2f} | {min(t['bare']):.2f} | {max(t['bare']):.2f} |",
        f"| port: `train()`, = (b) | {loop:.2f} | {min(t['loop']):.2f} | {max(t['loop']):.2f} |",
        f"| Scenic's `train_step`, `jax.jit` (Flax reference + optax), params and optimiser state donated | {scenic:.2f} | "
        f"{min(t['scenic']):.2f} | {max(t['scenic']):.2f} |",
        "",
        f"Port bare step / Scenic step: {_med([a / b for a, b in zip(t['bare'], t['scenic'])]):.2f}x (median of "
        f"rounds). This is Scenic's STEP (value_and_grad, clip_grads, optax's chain for the config, apply_updates, "
        "training logs and metrics: what `classification_trainer.train_step` computes, on one device, batches "
        "already on the device), not its whole `train()` loop (input pipeline, pmap, prefetch, summaries). Checked "
        f"the same computation: its first step's loss and l2_grads differ from the port's by {chk['loss']:.1e} and "
        f"{chk['l2_grads']:.1e} (scaled).",
        "",
        f"Genuine Scenic `classification_trainer.train()`: {res['genuine']}.",
        "",
    ]
    return "\n".join(lines)


def _fail(msg: str, code: int = 2) -> int:
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> None:  # one line, exit 2
            raise BenchError(message)

    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps (smoke test, seconds)")
    p.add_argument("--write", action="store_true", help=f"update the committed {RESULTS.relative_to(ROOT)}")
    p.add_argument("--out", help="write the results here instead (default: a new temporary folder)")
    p.add_argument("--steps", type=int, help="steps per run (default 100; --quick 8)")
    p.add_argument("--repeats", type=int, help="interleaved rounds (default 6; --quick 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--jpeg-side", type=int, default=96, help="side of the generated JPEGs (default 96)")
    p.add_argument("--scenic-src", help="a checkout of google-research/scenic: try its genuine train()")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads of torch and of XLA (default 1: on a shared, oversubscribed machine OpenMP's "
                        "barriers make 2-thread times swing 10x; 0 leaves both frameworks' defaults)")
    try:
        args = p.parse_args(argv)
        if args.write and args.out:
            raise BenchError("--write updates the committed table; --out writes elsewhere: give one of them")
        if args.write and args.quick:
            raise BenchError("--quick is a smoke test: it never replaces the committed table (drop --write)")
        args.steps = args.steps or (8 if args.quick else 60)
        args.repeats = args.repeats or (1 if args.quick else 10)
        if args.steps < WINDOW_START + 3:
            raise BenchError(f"--steps must be at least {WINDOW_START + 3} (steps 1..{WINDOW_START} are warm-up)")
        if args.threads < 0:
            raise BenchError(f"--threads must be >= 0, got {args.threads}")
        if args.repeats < 1 or args.jpeg_side < 16:
            raise BenchError("--repeats must be >= 1 and --jpeg-side >= 16")
        if args.device not in ("cpu", "cuda") and not args.device.startswith("cuda:"):
            raise BenchError(f"--device takes cpu or cuda, got {args.device!r}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise BenchError("--device cuda: torch sees no CUDA device")
    except BenchError as e:
        return _fail(str(e))
    out = RESULTS if args.write else Path(args.out) if args.out else \
        Path(tempfile.mkdtemp(prefix="tokenlearner-bench-")) / "train_loop.md"
    if args.threads:  # before jax is imported (XLA reads its flags once)
        torch.set_num_threads(args.threads)
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + (
            " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" if args.threads == 1
            else f" intra_op_parallelism_threads={args.threads}")).strip()
    t_start = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t_start:5.1f} s] {s}", file=sys.stderr, flush=True)  # noqa: E731
    import logging

    logging.getLogger("tokenlearner_torch").setLevel(logging.ERROR)
    try:
        res = measure(args, log)
        command = "python benchmarks/bench_train_loop.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]) if a)
        text = render(res, args, command.strip())
    except BenchError as e:
        return _fail(str(e))
    except AssertionError as e:
        return _fail(f"check failed: {e}", 1)
    except Exception as e:  # noqa: BLE001 - a benchmark's failure is one line (the traceback with --debug env)
        if os.environ.get("TOKENLEARNER_DEBUG"):
            traceback.print_exc()
        return _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # renamed into place: never a half-written table
    tmp.write_text(text)
    os.replace(tmp, out)
    print(text)
    log(f"written {out}" + ("" if args.write else f" (not the committed table: --write updates {RESULTS.relative_to(ROOT)})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
