"""Data-parallel training of a bare TokenLearnerViT with DDP or FSDP2, launched by torchrun (torch optimiser, no
Scenic loop; Scenic's pmap semantics with train() and tokenlearner-train: training/distributed.py, docs/distributed.md).

    torchrun --nproc_per_node 8 scripts/train_distributed.py --strategy fsdp2 --steps 100     # 8 GPUs (nccl)
    torchrun --nproc_per_node 2 scripts/train_distributed.py --device cpu --steps 3          # CPU, gloo

The model is built with its input shapes, so every parameter exists before DDP / ``fully_shard`` wraps it
(no warm-up forward). Each rank draws the same global batch from a fixed seed and trains on its slice, so
the run is reproducible and equal to one process training on the whole batch (tests/test_distributed.py
checks that on CPU). Replace ``batches`` with your DataLoader and a DistributedSampler for real data.
"""

from __future__ import annotations

import argparse
import os
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tokenlearner_torch as tl

IMAGE_SHAPE = (32, 32, 3)
# A tiny TokenLearner ViT (the vit_image_cls golden's sizes); dropout 0 so that every rank and a single
# process compute the same function.
CONFIG = dict(
    num_classes=10, mlp_dim=128, num_layers=4, num_heads=4, hidden_size=64, representation_size=32,
    classifier="gap", dropout_rate=0.0, attention_dropout_rate=0.0,
    tokenizer=dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=8, tokenlearner_loc=2,
                   use_tokenfuse=True, use_v11=True),
)  # fmt: skip


def build_model(seed: int = 0, device: str | torch.device = "cpu", checkpointing: bool = False) -> nn.Module:
    """The same initial model on every rank: Scenic's initialisers under one seed, built from the shapes."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = tl.from_scenic("TokenLearnerViT", CONFIG, input_shapes=[IMAGE_SHAPE]).train()
    if checkpointing:
        model.set_grad_checkpointing()
    return model


def batches(steps: int, global_batch: int, seed: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The global batches of the run (identical on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randn(global_batch, *IMAGE_SHAPE, generator=gen), torch.randint(0, CONFIG["num_classes"], (global_batch,), generator=gen)


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    # Scenic's AdamW recipe: no weight decay where Scenic's mask skips it (Flax rank-1 parameters: biases and
    # LayerNorm scales; the attention q/k/v biases are [heads, head_dim] in Flax and are decayed).
    inner = getattr(model, "module", model)  # DDP wraps the model; FSDP2 shards it in place
    skip = inner.no_weight_decay()
    decay = [p for n, p in inner.named_parameters() if n not in skip]
    no_decay = [p for n, p in inner.named_parameters() if n in skip]
    # eps 1e-6 rather than 1e-8: a few gradients are mathematically zero in Scenic's architecture (attention
    # key biases, softmax-invariant biases, the normalised TokenFuser's Dense_0 bias) and hold rounding noise,
    # which Adam divides by its own square root; a larger eps keeps that noise from moving weights by ~lr.
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, eps=1e-6)


def train(model: nn.Module, steps: int, global_batch: int, rank: int = 0, world: int = 1) -> list[float]:
    """AdamW steps on this rank's slice of each global batch; returns the local losses."""
    device = next(model.parameters()).device
    optimizer = make_optimizer(model)
    per_rank = global_batch // world
    losses = []
    for x, y in batches(steps, global_batch):
        x, y = x[rank * per_rank : (rank + 1) * per_rank].to(device), y[rank * per_rank : (rank + 1) * per_rank].to(device)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict (FSDP2's parameters are DTensors: gathered here, on every rank)."""
    out = {}
    for k, v in model.state_dict().items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k.removeprefix("module.")] = v.detach().cpu().clone()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--checkpointing", action="store_true", help="recompute encoder blocks in backward")
    parser.add_argument("--save", help="rank 0 writes the final weights here (safetensors)")
    args = parser.parse_args(argv)

    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        parser.error(f"--global-batch {args.global_batch} is not divisible by the {world} processes")
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    try:
        model = build_model(device=device, checkpointing=args.checkpointing)
        if args.strategy == "ddp":
            model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            from torch.distributed.fsdp import fully_shard  # torch >= 2.6

            for block in model.Transformer.children():
                if isinstance(block, tl.Encoder1DBlock):
                    fully_shard(block)
            fully_shard(model)
        losses = train(model, args.steps, args.global_batch, rank, world)
        state = full_state_dict(model)
        if rank == 0:
            print(f"{args.strategy}: {world} processes, {args.steps} steps, losses " + " ".join(f"{v:.6f}" for v in losses), flush=True)
            if args.save:
                from safetensors.torch import save_file

                save_file(state, args.save)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
