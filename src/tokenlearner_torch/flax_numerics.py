"""Flax's LayerNorm statistics, reproduced to the bit on the CPU reference platform.

Flax computes ``var = E[x²] - E[x]²`` (``use_fast_variance``). On inputs whose mean is large against their
spread (mean = 100 x spread, say) that subtraction cancels catastrophically, so Flax's result carries
rounding noise of about 5e-3 on outputs of order 1, and the noise depends on the order in which XLA sums.
No ordinary torch LayerNorm can match it: ``F.layer_norm`` is 5e-3 to 1e-2 away, the same formula with
torch's summation order 1e-2 (measured for C from 8 to 1280; README, "LayerNorm").

Measured on jaxlib 0.10.2 / x86-64 AVX2, XLA hands both row sums (of x and x*x) to YNNPACK's float32
row-sum kernel, whose order is reproduced here with explicit slice adds (no loop over C):

* 16 float32 lanes; the row is cut into blocks of 64 (the last one zero-padded);
* a block's partial is ``((c0 + c1) + c2) + c3`` over its four 16-wide chunks, and while 256 elements
  remain, four block partials are combined the same way into a group;
* an accumulator adds the groups, then the leftover blocks, in order; every 1024 elements it is
  Kahan-added into a second accumulator (a plain add for C <= 2048);
* the 16 lanes are then added by halves (8+8, 4+4, 2+2, 1+1);
* the mean is ``sum * float32(1 / C)``, and the variance is one fused multiply-add,
  ``fma(sum_sq, float32(1 / C), -round(mean * mean))``, clipped at 0.

With it the mean and variance equal jitted Flax's bit for bit on every row tested (C in 8..1280, 2-D and
3-D, N(0,1), N(100,1), N(1,0.01)); the output is within 1.4e-6 of Flax (Flax's rsqrt is a hardware
approximation plus a Newton step). Elsewhere (AVX-512, ARM, GPU, other jaxlib) XLA sums in another order;
this order is then as good as any other (an exact float32 sum with a different rounding pattern).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_LANES, _BLOCK, _GROUP, _SEGMENT = 16, 64, 256, 1024


def _sum4(t: Tensor) -> Tensor:
    """[..., 4, L] -> ((t0 + t1) + t2) + t3, in that order."""
    return ((t[..., 0, :] + t[..., 1, :]) + t[..., 2, :]) + t[..., 3, :]


def row_sum(v: Tensor) -> Tensor:
    """Float32 sums of the rows of ``v`` [R, C] in YNNPACK's order (see the module docstring)."""
    rows, c = v.shape
    n_blocks = -(-c // _BLOCK)
    if n_blocks * _BLOCK != c:
        v = F.pad(v, (0, n_blocks * _BLOCK - c))
    blocks = _sum4(v.view(rows, n_blocks, 4, _LANES))  # [R, n_blocks, 16]
    n_groups = c // _GROUP
    parts: list[tuple[Tensor, int]] = []
    if n_groups:
        groups = _sum4(blocks[:, : 4 * n_groups].reshape(rows, n_groups, 4, _LANES))
        parts += [(groups[:, i], _GROUP) for i in range(n_groups)]
    parts += [(blocks[:, i], _BLOCK) for i in range(4 * n_groups, n_blocks)]

    total = compensation = running = None
    seen = 0
    for i, (part, size) in enumerate(parts):
        running = part if running is None else running + part
        seen += size
        if seen % _SEGMENT == 0 or i == len(parts) - 1:
            if total is None:
                total, compensation = running, torch.zeros_like(running)
            else:  # Kahan summation of the 1024-element segments
                y = running - compensation
                t = total + y
                compensation = torch.nan_to_num((t - total) - y, nan=0.0, posinf=0.0, neginf=0.0)
                total = t
            running = None
    width = _LANES
    while width > 1:
        width //= 2
        total = total[:, :width] + total[:, width : 2 * width]
    return total[:, 0]


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Flax ``nn.LayerNorm`` over the last axis (fast variance), statistics in float32. Returns float32."""
    c = x.shape[-1]
    rows = x.reshape(-1, c).float()
    sums = row_sum(torch.cat([rows, rows * rows], 0))
    inv_c = torch.tensor(1.0 / c, dtype=torch.float32, device=x.device)
    n = rows.shape[0]
    mean = sums[:n] * inv_c
    # float64 holds sum_sq * (1/C) exactly, so one rounding at the end is the fused multiply-add's.
    var = (sums[n:].double() * inv_c.double() - (mean * mean).double()).float().clamp_min(0.0)
    shape = x.shape[:-1] + (1,)
    mul = torch.rsqrt(var + eps).view(shape) * weight.float()
    return (x.float() - mean.view(shape)) * mul + bias.float()
