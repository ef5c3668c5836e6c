"""One rank of the data-parallel tests (tests/test_training_distributed.py launches it as torchrun would:
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment).

    python tests/dist_worker.py MODE OUTDIR      (the tests fork the ranks from tests/forkserver.py instead)

Modes (each rank writes OUTDIR/rank<r>.json, and rank 0 the .npz files named below):
  semantics  public_pmap2's 5 steps at the train_step level (ScenicTrainer + Context.prepare) with the
             golden's per-device batch masks and its evaluations (a fully masked eval shard on rank 1), the DDP
             gradient against the mean of per-process gradients, a 2-process vs 1-process run of the same
             unmasked global batches, check_agree on disagreeing ranks.
  fsdp       the unmasked run of ``semantics`` with config.fsdp = True (FSDP2) instead of DDP.
  kill       rank 1 dies (os._exit) after one collective; rank 0 must get an error, not hang.
  stall      rank 1 stops answering (sleeps); rank 0 must get an error after the collective timeout.
  train, train_kill, train_resume, train_disagree
             training.train() on the golden (from workdir_step0 and Scenic's ckpt_mid; a rank killed after
             step 4; the rerun; ranks with different configs).
  train_fsdp train() with config.fsdp = True from workdir_step0, then from its own checkpoint_3: interrupted
             (KeyboardInterrupt on both ranks after step 4), and resumed to the end.
  script     scripts/train_distributed.py's main() with the arguments after OUTDIR (it makes its own process
             group, as under torchrun); nothing else (no rank<r>.json).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from tokenlearner_torch.errors import ConfigError
from tokenlearner_torch.training import ScenicTrainer
from tokenlearner_torch.training.distributed import get_context

GOLDEN = Path(__file__).resolve().parent / "fixtures" / "loop_goldens" / "public_pmap2"


def _golden():
    meta = json.loads((GOLDEN / "config.json").read_text())
    batches = np.load(GOLDEN / "batches.npz")
    evals = np.load(GOLDEN / "eval_batches.npz")
    steps = [{k: batches[f"{k}_{i}"] for k in ("inputs", "label", "batch_mask")} for i in range(meta["steps"])]
    eval_batches = [{k: evals[f"{k}_{j}"] for k in ("inputs", "label", "batch_mask")} for j in range(meta["eval_batches"])]
    return meta, steps, eval_batches


def _flat_params(trainer: ScenicTrainer) -> dict[str, np.ndarray]:
    from tokenlearner_torch.weights_convert.layouts import flatten_tree

    return {k: np.asarray(v) for k, v in flatten_tree(trainer.params()).items()}


def _digest(params: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(params):
        h.update(k.encode())
        h.update(np.ascontiguousarray(params[k]).tobytes())
    return h.hexdigest()


def _evaluate(ctx, trainer: ScenicTrainer, eval_batches) -> dict[str, float]:
    """Scenic's eval: each process's metrics (sum, count) over its shard, psum-ed, summed over the eval
    batches, then normalised."""
    total: dict[str, list[float]] = {}
    model = trainer.model.eval()
    with torch.no_grad():
        for batch in eval_batches:
            local = ctx.shard(batch)
            logits = model(torch.from_numpy(local["inputs"]))
            metrics = trainer.loss_fn.metrics(logits, torch.from_numpy(local["label"]), torch.from_numpy(local["batch_mask"]))
            for k, (s, n) in ctx.all_reduce_metrics(metrics).items():
                acc = total.setdefault(k, [0.0, 0.0])
                acc[0] += s
                acc[1] += n
    trainer.model.train()
    return {k: s / n for k, (s, n) in total.items()}


def _local_grads(trainer: ScenicTrainer, batch) -> list[torch.Tensor]:
    """The gradient of this process's own loss (mean over its unmasked rows), on a plain copy of the model."""
    model = copy.deepcopy(trainer.model).train()
    logits = model(torch.from_numpy(batch["inputs"]))
    loss = trainer.loss_fn(logits, torch.from_numpy(batch["label"]), torch.from_numpy(batch["batch_mask"]), None)
    loss.backward()
    named = dict(model.named_parameters())
    return [named[trainer._torch_key[s.name]].grad.detach().clone() for s in trainer.specs]


def _unmasked_run(ctx, meta, steps, *, fsdp: bool, n: int = 3) -> tuple[dict, dict]:
    config = dict(meta["config"], fsdp=fsdp)
    trainer = ScenicTrainer(config, meta["dataset_meta_data"])
    trainer.load_params(GOLDEN / "workdir_step0" / "checkpoint_0")
    ctx.prepare(trainer)
    # What this process holds: FSDP2 keeps a shard of each parameter and of its optimiser moments.
    local = sum(getattr(s.param, "_local_tensor", s.param).numel() for s in trainer.specs)
    mu = [st[k]["mu"] for st in trainer.optimizer.state.values() for k in st if isinstance(st[k], dict) and "mu" in st[k]]
    held = {"local_param_numel": local, "total_param_numel": sum(s.param.numel() for s in trainer.specs),
            "local_mu_numel": sum(getattr(m, "_local_tensor", m).numel() for m in mu)}  # fmt: skip
    logs = []
    for batch in steps[:n]:
        batch = {k: v for k, v in batch.items() if k != "batch_mask"}
        out = trainer.train_step(ctx.shard(batch))
        logs.append({k: out[k] for k in ("learning_rate", "l2_grads", "l2_params", "l2_updates")})
    return _flat_params(trainer), {"logs": logs, "held": held}


def semantics(ctx, out: Path) -> dict:
    meta, steps, eval_batches = _golden()
    result: dict = {}
    trainer = ScenicTrainer(meta["config"], meta["dataset_meta_data"])
    trainer.load_params(GOLDEN / "workdir_step0" / "checkpoint_0")
    local0 = ctx.shard(steps[0])
    mine = _local_grads(trainer, local0)  # before any step: the same parameters as the DDP step below
    ctx.prepare(trainer)
    captured: list[torch.Tensor] = []
    trainer.grad_hook = lambda grads: captured.extend(g.detach().clone() for g in grads) if not captured else None
    per_step, evals = [], {}
    for i, batch in enumerate(steps):
        logs = trainer.train_step(ctx.shard(batch))
        metrics = ctx.all_reduce_metrics(logs["metrics"])
        per_step.append({"step": i + 1, **{k: logs[k] for k in ("learning_rate", "l2_grads", "l2_params", "l2_updates")},
                         "metrics": metrics})  # fmt: skip
        if (i + 1) % meta["config"]["log_eval_steps"] == 1 or i + 1 == meta["steps"]:
            evals[str(i + 1)] = _evaluate(ctx, trainer, eval_batches)
    result["per_step"], result["evals"] = per_step, evals
    # DDP's gradient vs the mean of the per-process gradients (gathered): bitwise for 2 processes.
    gathered = ctx.all_gather_object([g.numpy() for g in mine])
    mean = [sum(torch.from_numpy(g[k]) for g in gathered) / ctx.world_size for k in range(len(mine))]
    result["ddp_vs_mean_max_abs"] = max(float((a - b).abs().max()) for a, b in zip(captured, mean))
    result["ddp_vs_own_max_abs"] = max(float((a - b).abs().max()) for a, b in zip(captured, mine))
    params = _flat_params(trainer)
    result["params_digest"] = _digest(params)
    if ctx.is_lead:
        np.savez(out / "golden_params.npz", **params)
    # 2 processes vs 1 process on the same unmasked global batches.
    params2, logs2 = _unmasked_run(ctx, meta, steps, fsdp=False)
    result["unmasked_digest"], result["unmasked_logs"] = _digest(params2), logs2["logs"]
    if ctx.is_lead:
        np.savez(out / "unmasked_2proc.npz", **params2)
        from tokenlearner_torch.training.distributed import Context

        params1, logs1 = _unmasked_run(Context(), meta, steps, fsdp=False)  # one process, whole batch
        np.savez(out / "unmasked_1proc.npz", **params1)
        result["unmasked_logs_1proc"] = logs1["logs"]
    # Ranks that disagree: every rank gets the same one-line ConfigError.
    ctx.check_agree("config", json.dumps(meta["config"], sort_keys=True))
    try:
        ctx.check_agree("checkpoint step", str(3 + ctx.rank))
        result["disagree"] = None
    except ConfigError as e:
        result["disagree"] = str(e)
    return result


def fsdp(ctx, out: Path) -> dict:
    meta, steps, _ = _golden()
    params, logs = _unmasked_run(ctx, meta, steps, fsdp=True)
    if ctx.is_lead:
        np.savez(out / "unmasked_fsdp.npz", **params)
    return {"params_digest": _digest(params), "logs": logs["logs"], "held": logs["held"]}


def _train_once(ctx, out: Path, workdir: Path, tag: str, hooks=(), *, fsdp: bool = False) -> dict:
    """Scenic's train() on this rank's shard of the golden's batches; rank 0 records every write_scalars."""
    from loop_goldens import LoopCase, RecordingWriter

    from tokenlearner_torch.training import train

    case = LoopCase("public_pmap2")
    config = dict(case.config, fsdp=True) if fsdp else case.config
    writer = RecordingWriter() if ctx.is_lead else None
    state, train_summary, eval_summary = train(config=config, dataset=case.dataset(ctx.rank, ctx.world_size),
                                               workdir=str(workdir), writer=writer, context=ctx, hooks=hooks)  # fmt: skip
    from tokenlearner_torch.weights_convert.layouts import flatten_tree

    params = {k: np.asarray(v) for k, v in flatten_tree(state.params).items()}
    if ctx.is_lead:
        np.savez(out / f"{tag}_params.npz", **params)
    return {"digest": _digest(params), "scalars": writer.calls if writer is not None else None,
            "train_summary": train_summary, "eval_summary": eval_summary, "files": sorted(os.listdir(workdir))}


def train_runs(ctx, out: Path) -> dict:
    """From workdir_step0 and from Scenic's mid-run checkpoint (both prepared by the test in rank 0's
    workdirs; every other rank gets an empty workdir of its own and must restore rank 0's checkpoint)."""
    base = out / f"rank{ctx.rank}"
    return {tag: _train_once(ctx, out, base / tag, tag) for tag in ("full", "mid")}


def train_fsdp(ctx, out: Path) -> dict:
    """train() with config.fsdp = True from workdir_step0 ("fsdp_full", prepared by the test in rank 0's
    workdir); then, from that run's own checkpoint_3 (copied by rank 0): a run that both ranks interrupt
    (KeyboardInterrupt) after step 4 ("fsdp_int": how long until each rank is out of train(), what it
    raised), and a run to the end ("fsdp_mid")."""
    import shutil

    base = out / f"rank{ctx.rank}"
    result = {"fsdp_full": _train_once(ctx, out, base / "fsdp_full", "fsdp_full", fsdp=True)}
    for tag in ("fsdp_int", "fsdp_mid"):
        (base / tag).mkdir(parents=True)
        if ctx.is_lead:
            shutil.copy(base / "fsdp_full" / "checkpoint_3", base / tag / "checkpoint_3")
    ctx.barrier()

    def interrupt(step, logs):
        if step == 4:
            raise KeyboardInterrupt

    start = time.monotonic()
    try:
        _train_once(ctx, out, base / "fsdp_int", "fsdp_int", hooks=[interrupt], fsdp=True)
        result["fsdp_int"] = {"error": None}
    except KeyboardInterrupt:
        result["fsdp_int"] = {"error": "KeyboardInterrupt", "after_s": time.monotonic() - start}
    result["fsdp_mid"] = _train_once(ctx, out, base / "fsdp_mid", "fsdp_mid", fsdp=True)
    return result


def train_kill(ctx, out: Path) -> dict:
    """Rank 1 dies right after step 4 (checkpoint_3 is on disk); rank 0 must stop with an error."""

    def die(step, logs):
        if ctx.rank == 1 and step == 4:
            os._exit(3)

    try:
        _train_once(ctx, out, out / f"rank{ctx.rank}" / "killed", "killed", hooks=[die])
    except Exception as e:  # noqa: BLE001 - any error, no hang; its whole text (the test wants one line)
        return {"error": f"{type(e).__name__}: {e}"}
    return {"error": None}


def train_disagree(ctx, out: Path) -> dict:
    """Rank 1 runs another config (max_grad_norm 2.0): train() must fail on every rank before step 1."""
    from loop_goldens import LoopCase

    from tokenlearner_torch.training import train

    case = LoopCase("public_pmap2")
    config = dict(case.config, max_grad_norm=2.0) if ctx.rank == 1 else case.config
    try:
        train(config=config, dataset=case.dataset(ctx.rank, ctx.world_size), workdir=str(out / f"rank{ctx.rank}"), context=ctx)
    except ConfigError as e:
        return {"error": str(e)}
    return {"error": None}


def fault(ctx, out: Path, how: str) -> dict:
    t = torch.ones(4)
    ctx.all_reduce_sum_([t])
    if ctx.rank == 1:
        if how == "kill":
            os._exit(3)
        time.sleep(3600)
    start = time.monotonic()
    try:
        for _ in range(10**6):
            ctx.all_reduce_sum_([t])
    except Exception as e:  # noqa: BLE001 - the point: any error, no hang
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", "after_s": time.monotonic() - start}
    return {"error": None}


def _script():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "train_distributed.py"
    spec = importlib.util.spec_from_file_location("train_distributed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "script":
        return _script().main(sys.argv[3:])
    timeout = float(os.environ.get("WORKER_TIMEOUT_S", "60"))
    ctx = get_context("cpu", timeout_s=timeout)
    result = {"rank": ctx.rank, "world_size": ctx.world_size}
    if mode == "semantics":
        result.update(semantics(ctx, out))
    elif mode == "fsdp":
        result.update(fsdp(ctx, out))
    elif mode in ("kill", "stall"):
        result.update(fault(ctx, out, mode))
    elif mode == "train":
        result.update(train_runs(ctx, out))
    elif mode == "train_disagree":
        result.update(train_disagree(ctx, out))
    elif mode == "train_fsdp":
        result.update(train_fsdp(ctx, out))
    elif mode == "train_kill":
        result.update(train_kill(ctx, out))
    elif mode == "train_resume":
        result.update(_train_once(ctx, out, out / f"rank{ctx.rank}" / "killed", "resumed"))
    tmp = out / f"rank{ctx.rank}.json.tmp"
    tmp.write_text(json.dumps(result))
    tmp.rename(out / f"rank{ctx.rank}.json")
    if mode in ("kill", "stall", "train_kill"):
        os._exit(0)  # the group cannot be destroyed cleanly with a dead peer
    ctx.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
