"""Data-parallel throughput of Scenic's train_step (ScenicTrainer + training.distributed) on 1..N processes.

    python benchmarks/bench_distributed.py --nproc 1 2 4                       # CPU, gloo (weak scaling)
    python benchmarks/bench_distributed.py --device cuda --nproc 1 2 4 8 --model B16 --per-process-batch 64
    python benchmarks/bench_distributed.py --nproc 2 --fsdp                    # FSDP2 instead of DDP

For each process count the script launches that many copies of itself on 127.0.0.1, exactly as torchrun would
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT; gloo on CPU, nccl on CUDA, one process per GPU).
Every rank builds the model from the config, ``Context.prepare`` wraps it (DDP, or FSDP2 with ``--fsdp``),
and each runs ``--warmup`` untimed then ``--steps`` timed steps on its own ``--per-process-batch`` rows of
synthetic data (weak scaling: the global batch grows with the processes, as when Scenic adds devices). The
timed window is closed by a barrier, so a step counts when every rank has finished it.
Reported: steps/s, examples/s (global), and the speed-up in examples/s over 1 process. ``--out FILE``
appends the markdown table.

On CPU the processes share the machine's cores (``OMP_NUM_THREADS`` = cores / processes by default): the
CPU rows measure the overhead of the engine (gradient all-reduce, synchronisation), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {
    # A tiny TokenLearner ViT (the tests' size) and Scenic's im1k TokenLearner B/16 and L/16 (8 tokens at
    # layer 6 / 12, V1.1, GAP).
    "tiny": dict(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=2, patches=4, image=32, loc=1, classes=10),
    "B16": dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12, patches=16, image=224, loc=6, classes=1000),
    "L16": dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24, patches=16, image=224, loc=12, classes=1000),
}


def scenic_config(model: str, global_batch: int, fsdp: bool) -> tuple[dict, dict]:
    m = MODELS[model]
    config = {
        "model_name": "token_learner_multilabel_classification",
        "batch_size": global_batch,
        "model": {"hidden_size": m["hidden_size"], "mlp_dim": m["mlp_dim"], "num_heads": m["num_heads"],
                  "num_layers": m["num_layers"], "representation_size": None, "classifier": "gap",
                  "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
                  "tokenizer": {"type": "dynamic", "patches": {"size": [m["patches"]] * 2}, "num_tokens": 8,
                                "tokenlearner_loc": m["loc"], "use_tokenfuse": False, "use_v11": True}},
        "optimizer": "adam", "optimizer_configs": {"beta1": 0.9, "beta2": 0.999, "weight_decay": 0.1},
        "max_grad_norm": 1.0,
        "lr_configs": {"learning_rate_schedule": "compound", "factors": "constant", "base_learning_rate": 1e-3},
        "rng_seed": 0, "fsdp": fsdp,
    }  # fmt: skip
    meta = {"num_classes": m["classes"], "input_shape": [-1, m["image"], m["image"], 3], "target_is_onehot": True}
    return config, meta


def worker(args: argparse.Namespace) -> None:
    import torch

    from tokenlearner_torch.training import ScenicTrainer
    from tokenlearner_torch.training.distributed import get_context

    ctx = get_context(args.device)
    config, meta = scenic_config(args.model, args.per_process_batch * ctx.world_size, args.fsdp)
    trainer = ScenicTrainer(config, meta, device=ctx.device)
    ctx.prepare(trainer)
    gen = torch.Generator().manual_seed(1 + ctx.rank)
    shape = (args.per_process_batch, *meta["input_shape"][1:])
    batch = {
        "inputs": torch.randn(shape, generator=gen).to(ctx.device),
        "label": (torch.rand(args.per_process_batch, meta["num_classes"], generator=gen) < 0.01).float().to(ctx.device),
    }

    def sync() -> None:
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        ctx.barrier()

    for _ in range(args.warmup):
        trainer.train_step(batch)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(batch)
    sync()
    seconds = time.perf_counter() - t0
    if ctx.is_lead:
        Path(args.result).write_text(json.dumps({"nproc": ctx.world_size, "seconds": seconds, "steps": args.steps,
                                                 "global_batch": args.per_process_batch * ctx.world_size}))  # fmt: skip
    ctx.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: argparse.Namespace, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        port = _free_port()
        threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
        cmd = [sys.executable, __file__, "--worker", "--result", str(result), "--device", args.device, "--model", args.model,
               "--per-process-batch", str(args.per_process_batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]  # fmt: skip
        if args.fsdp:
            cmd.append("--fsdp")
        procs = []
        for rank in range(nproc):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)}  # fmt: skip
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            raise SystemExit(f"bench_distributed: {nproc} processes: exit codes {codes}")
        return json.loads(result.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--model", choices=sorted(MODELS), default="tiny")
    parser.add_argument("--per-process-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per process (default cores / processes)")
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--out", help="append the markdown table to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    rows = [launch(args, n) for n in args.nproc]
    base = rows[0]["global_batch"] * rows[0]["steps"] / rows[0]["seconds"] / rows[0]["nproc"]
    lines = [f"| processes | global batch | steps/s | examples/s | scaling efficiency: examples/s / (processes x 1-process examples/s) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        sps = r["steps"] / r["seconds"]
        eps = sps * r["global_batch"]
        lines.append(f"| {r['nproc']} | {r['global_batch']} | {sps:.2f} | {eps:.1f} | {eps / base / r['nproc']:.2f} |")
    head = (f"{args.model}, {args.device}, {'FSDP2' if args.fsdp else 'DDP'}, {args.per_process_batch} examples per "
            f"process, {args.steps} timed steps after {args.warmup}, {os.cpu_count()} cores")  # fmt: skip
    text = head + "\n\n" + "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
