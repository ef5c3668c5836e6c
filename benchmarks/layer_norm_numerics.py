"""The README's LayerNorm numerics table: max |error| of each LayerNorm against jitted Flax and float64.

    python benchmarks/layer_norm_numerics.py

Rows: input distribution and channels C (inputs [4, 197, C], scale 1, bias 0, eps 1e-6, seed 0).
Columns: the port's default ``fused`` numerics and the opt-in ``xla_cpu`` one, each against Flax
(``nn.LayerNorm`` under jax.jit, float32) and against the exact LayerNorm (float64); Flax against float64.
"""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import linen as nn

import tokenlearner_torch as tl
from tokenlearner_torch.layers import LayerNorm


def main() -> None:
    rows = []
    for c in (768, 64, 2):
        ln = LayerNorm(c)
        params = {"params": {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}}
        flax_ln = jax.jit(nn.LayerNorm().apply)
        for mean, std in ((0.0, 1.0), (100.0, 1.0), (1.0, 0.01)):
            x = np.random.default_rng(0).normal(mean, std, (4, 197, c)).astype(np.float32)
            xt = torch.from_numpy(x)
            flax = np.asarray(flax_ln(params, x)).astype(np.float64)
            exact = torch.nn.functional.layer_norm(xt.double(), (c,), eps=1e-6).numpy()
            out = {}
            for mode in ("fused", "xla_cpu"):
                with torch.no_grad(), tl.numerics(mode):
                    out[mode] = ln(xt).double().numpy()
            err = lambda a, b: float(np.abs(a - b).max())  # noqa: E731
            rows.append((f"N({mean:g}, {std:g}²)", c, err(out["fused"], flax), err(out["fused"], exact),
                         err(out["xla_cpu"], flax), err(out["xla_cpu"], exact), err(flax, exact)))
    print("| input | C | fused vs Flax | fused vs f64 | xla_cpu vs Flax | xla_cpu vs f64 | Flax vs f64 |")
    print("|---|---|---|---|---|---|---|")
    for name, c, *errs in rows:
        print(f"| {name} | {c} | " + " | ".join(f"{e:.1e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
