"""Host-side cost of one eager forward: B/16 TokenLearner's structure at tiny widths, so kernels cost ~nothing.

    python benchmarks/bench_overhead.py              # float32 and Scenic's bf16 policy, batch 1, one thread
    python benchmarks/bench_overhead.py --repeats 200
    python benchmarks/bench_overhead.py --device cuda   # on a GPU: host work plus launches, synchronised per call

What is left is Python, module calls and op dispatch: the time an eager forward needs before its kernels run.
On a GPU, where kernels are launched asynchronously, that is what bounds a small-batch eager call (issue 11:
bf16 batch 8 at 0.37x Scenic's jit on an H200 while one forward is ~3 ms of GPU work), so it is the CPU-side
measure of that cell. Same 12 blocks, 12 heads, TokenLearner (16 tokens at block 9, V1.1) and head as B/16;
width 24, MLP 48, 64x64 images (16 tokens).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import tokenlearner_torch as tl  # noqa: E402

TINY_B16 = dict(
    num_classes=10, mlp_dim=48, num_layers=12, num_heads=12, hidden_size=24, representation_size=None,
    classifier="gap", dropout_rate=0.0, attention_dropout_rate=0.0,
    tokenizer=dict(type="dynamic", patches=dict(size=[16, 16]), num_tokens=16, tokenlearner_loc=9,
                   use_tokenfuse=False, use_v11=True),
)


def per_forward_ms(dtype: str, repeats: int, device: str = "cpu") -> float:
    model = tl.from_scenic("TokenLearnerViT", {**TINY_B16, "dtype": dtype}, input_shapes=[(64, 64, 3)])
    model = model.to(device).eval()
    x = torch.randn(1, 64, 64, 3, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        sync()
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            sync()
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_overhead.py", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "bench_overhead.py: --device cuda needs a CUDA device (torch.cuda.is_available() is False)\n")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {args.device}, 1 thread, median of {args.repeats} eager inference calls, batch 1")
    print("| precision | ms per forward |")
    print("|---|---|")
    for dtype in ("float32", "bfloat16"):
        print(f"| {dtype} | {per_forward_ms(dtype, args.repeats, args.device):.2f} |")


if __name__ == "__main__":
    main()
