"""MKL against oneDNN on the GEMMs of a B/16 ViT: the measurement behind ``tokenlearner_torch.cpu_gemm``.

    python benchmarks/bench_gemm.py              # rows 197 (batch 1) and 1576 (batch 8), float32, GFLOP/s
    python benchmarks/bench_gemm.py --rows 1576 --repeats 15

For each Dense shape of the model ([rows, in] x [in, out]: query/key/value/out 768->768, MLP 768->3072 and
3072->768), three GEMMs of a training step, each timed both ways, median of back-to-back repeats:

* forward ``x @ W.T + b``: MKL ``torch.addmm`` (what ``F.linear`` runs) vs oneDNN ``mkldnn::_linear_pointwise``;
* input gradient ``g @ W``: MKL ``torch.mm`` vs oneDNN on the transposed weight view (what cpu_gemm runs);
* weight gradient ``g.T @ x``: MKL ``torch.mm`` (what cpu_gemm runs) vs oneDNN on transposed views.

Back-to-back calls keep the operands in cache, which a model's single pass over each weight does not: the model
runs these GEMMs somewhat slower (profile_step.py). Run it on a quiet machine: torch's OpenMP threads are very
sensitive to other load.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(768, 768), (768, 3072), (3072, 768)]


def _gflops(fn, flops: float, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return flops / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="197,1576", help="comma-separated row counts (batch x tokens)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not torch.backends.mkldnn.is_available():
        parser.exit(2, "bench_gemm.py: this torch build has no oneDNN (torch.backends.mkldnn)\n")
    lp = torch.ops.mkldnn._linear_pointwise
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GFLOP/s, float32, median of {args.repeats}")
    print("| rows | in -> out | forward MKL | forward oneDNN | input grad MKL | input grad oneDNN | weight grad MKL | weight grad oneDNN |")
    print("|---|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for m in (int(r) for r in args.rows.split(",")):
        for i, o in SHAPES:
            x, w = torch.randn(m, i, generator=g), torch.randn(o, i, generator=g)
            b, gr = torch.randn(o, generator=g), torch.randn(m, o, generator=g)
            flops = 2.0 * m * i * o
            cells = [
                _gflops(lambda: torch.addmm(b, x, w.t()), flops, args.repeats),
                _gflops(lambda: lp(x, w, b, "none", [], ""), flops, args.repeats),
                _gflops(lambda: gr.mm(w), flops, args.repeats),
                _gflops(lambda: lp(gr, w.t(), None, "none", [], ""), flops, args.repeats),
                _gflops(lambda: gr.t().mm(x), flops, args.repeats),
                _gflops(lambda: lp(gr.t(), x.t(), None, "none", [], ""), flops, args.repeats),
            ]
            print(f"| {m} | {i} -> {o} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
