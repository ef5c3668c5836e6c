"""Where eager time goes: an op-level torch.profiler breakdown of one training step (or inference call).

    python benchmarks/profile_step.py                        # B/16 TokenLearner, training, batch 8, float32
    python benchmarks/profile_step.py --dtype bfloat16       # Scenic's dtype='bfloat16' policy
    python benchmarks/profile_step.py --kind infer --batch 1
    python benchmarks/profile_step.py --quick                # the tiny smoke-test ViT (seconds)
    python benchmarks/profile_step.py --compile --layers 3   # inductor's kernels (bench_speed's training
                                                             # recipe) on B/16 widths with 3 blocks

Prints shares, not times: the self time of each op as a share of the profiled total, and the same grouped
into kinds (matmuls, attention, LayerNorm, casts and copies, ...). Shares stay meaningful on a busy machine,
where absolute times do not. A training step is ``zero_grad(set_to_none=True)``, forward, softmax
cross-entropy, backward (the optimiser is not included: see bench_speed.py's full-step rows).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

#: op-name substrings -> kind, first match wins (names as the profiler reports aten ops and autograd nodes)
KINDS = [
    ("attention", ("scaled_dot_product", "_flash_attention", "_efficient_attention", "attention")),
    ("matmul / linear", ("addmm", "aten::mm", "aten::bmm", "matmul", "linear", "baddbmm")),
    ("convolution", ("convolution", "conv2d", "conv3d", "mkldnn_conv")),
    ("LayerNorm", ("layer_norm",)),
    ("inductor fused kernels", ("cpp_fused", "CompiledFxGraph", "CompiledFunction", "inductor")),
    ("casts and copies", ("aten::to", "_to_copy", "aten::copy_", "aten::clone", "contiguous", "aten::empty_like")),
    ("gelu / softmax / sigmoid", ("gelu", "softmax", "sigmoid", "tanh")),
    ("reductions", ("aten::sum", "aten::mean", "aten::amax", "aten::max")),
    ("elementwise", ("aten::add", "aten::mul", "aten::div", "aten::sub", "aten::fill_", "aten::zero_",
                     "aten::where", "aten::rsqrt", "aten::sqrt")),
    ("views and reshapes", ("aten::view", "aten::reshape", "aten::transpose", "aten::permute", "aten::t",
                            "aten::expand", "aten::as_strided", "aten::flatten", "aten::unsqueeze",
                            "aten::squeeze", "aten::select", "aten::slice", "aten::_unsafe_view",
                            "aten::alias", "aten::detach")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("allocation", ("aten::empty", "aten::resize_")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k.lower() in low for k in keys):
            return kind
    return "other"


def build(quick: bool, dtype: str, layers=None):
    import bench_speed

    spec = (bench_speed.QUICK_WORKLOADS if quick else bench_speed.WORKLOADS)[
        "tiny TokenLearner ViT (smoke test)" if quick else "B/16 TokenLearner (16 tok @9, V1.1)"
    ]
    spec = bench_speed.with_precision(spec, "bf16" if dtype == "bfloat16" else "highest")
    if layers is not None:  # same widths, fewer blocks; the TokenLearner keeps its relative place (9 of 12)
        kw = spec["kwargs"]
        loc = max(1, round(kw["tokenizer"]["tokenlearner_loc"] * layers / kw["num_layers"]))
        spec = {**spec, "kwargs": {**kw, "num_layers": layers,
                                   "tokenizer": {**kw["tokenizer"], "tokenlearner_loc": min(loc, layers - 1)}}}
    return spec, bench_speed._port(spec, None)


def profile(model, x, y, kind: str, steps: int, compile_: bool = False):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    fn = model
    if compile_:
        from recipes import recipe

        fn = recipe("cpu", kind, "compiled").apply(model)

    def step():
        if kind == "infer":
            with torch.inference_mode():
                fn(x)
            return
        model.zero_grad(set_to_none=True)
        F.cross_entropy(fn(x).float(), y).backward()

    step()  # warm-up: compiles; allocator, oneDNN primitives
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof


def shares(prof) -> tuple[list[tuple[str, float, int]], dict[str, float]]:
    """[(op, share of total self CPU time, calls)] sorted, and shares per kind."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ops = sorted(((e.key, e.self_cpu_time_total / total, e.count) for e in events), key=lambda t: -t[1])
    by_kind: dict[str, float] = defaultdict(float)
    for name, share, _ in ops:
        by_kind[kind_of(name)] += share
    return ops, dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=("train", "infer"), default="train")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16: Scenic's dtype='bfloat16' policy (encoder blocks in bfloat16)")
    p.add_argument("--batch", type=int, default=None, help="default 8 (--quick: 2)")
    p.add_argument("--steps", type=int, default=1, help="profiled steps after one warm-up (default 1)")
    p.add_argument("--top", type=int, default=15, help="ops listed (default 15)")
    p.add_argument("--quick", action="store_true", help="the tiny smoke-test ViT instead of B/16")
    p.add_argument("--layers", type=int, default=None, help="B/16 widths with this many blocks (compiles faster)")
    p.add_argument("--compile", action="store_true",
                   help="profile the compiled model (bench_speed's CPU recipe for --kind) instead of eager")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 2 if args.quick else 8
    if args.batch < 1 or args.steps < 1 or args.top < 1 or (args.layers is not None and args.layers < 2):
        print("profile_step.py: error: --batch, --steps and --top must be positive, --layers at least 2",
              file=sys.stderr)
        return 2
    torch.manual_seed(0)
    spec, model = build(args.quick, args.dtype, args.layers)
    model = model.train() if args.kind == "train" else model.eval()
    x = torch.randn(*spec["inputs"](args.batch)[0])
    y = torch.randint(0, spec["kwargs"]["num_classes"], (args.batch,))
    prof = profile(model, x, y, args.kind, args.steps, args.compile)
    ops, by_kind = shares(prof)
    what = "training step (forward + backward)" if args.kind == "train" else "inference call"
    name = "tiny ViT" if args.quick else "B/16 TokenLearner" + (f" ({args.layers} blocks)" if args.layers else "")
    name += ", compiled" if args.compile else ", eager"
    print(f"Op-level profile: {name}, {what}, batch {args.batch}, {args.dtype}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; shares of total self CPU time over {args.steps} step(s).\n")
    print("| kind | share |\n|---|---|")
    for kind, share in by_kind.items():
        print(f"| {kind} | {share:.1%} |")
    print(f"\n| op (top {args.top}) | kind | share | calls per step |\n|---|---|---|---|")
    for op, share, calls in ops[: args.top]:
        print(f"| `{op}` | {kind_of(op)} | {share:.1%} | {calls / args.steps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
