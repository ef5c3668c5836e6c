"""Flax's LayerNorm statistics, reproduced to the bit on the measured CPUs (x86-64 AVX2 and AVX-512).

Flax computes ``var = E[x²] - E[x]²`` (``use_fast_variance``). On inputs whose mean is large against their
spread (mean = 100 x spread, say) that subtraction cancels catastrophically, so Flax's result carries
rounding noise of about 5e-3 on outputs of order 1, and the noise depends on the order in which XLA sums.
No ordinary torch LayerNorm can match it: ``F.layer_norm`` is 5e-3 to 1e-2 away, the same formula with
torch's summation order 1e-2 (measured for C from 8 to 1280; docs/numerics.md, "LayerNorm").

Measured on jaxlib 0.10.2 / flax 0.12.8 / x86-64 AVX2 (no AVX-512), from the optimized HLO, the LLVM IR
and the object code XLA emits, and checked bit for bit against jitted Flax. XLA takes one of two paths,
chosen per reduction by the number of elements of the reduced array (all of x, i.e. rows * C, for both
the sum of x and the sum of x*x):

**rows * C >= 4096 and C >= 2: YNNPACK** (``ynn_fusion`` in the HLO; ``row_sum``):

* 16 float32 lanes; the row is cut into blocks of 64 (the last one zero-padded);
* a block's partial is ``((c0 + c1) + c2) + c3`` over its four 16-wide chunks, and while 256 elements
  remain, four block partials are combined the same way into a group;
* an accumulator adds the groups, then the leftover blocks, in order; every 1024 elements it is
  Kahan-added into a second accumulator (a plain add for C <= 2048);
* the 16 lanes are then added by halves (8+8, 4+4, 2+2, 1+1);
* the squares are rounded before they are summed (x*x, then the sum).

**rows * C < 4096, or C == 1: XLA's own loop emitter** (``small_row_sum``). The threshold is exact
(C=3: 1365 rows small, 1366 YNNPACK; C=8: 511/512; C=24: 170/171; C=100: 40/41; C=768: 5/6; the same
for 2-D [rows, C] and 3-D [B, N, C] input and for the jitted ``nn.LayerNorm().apply``). There every sum
is a plain sequential scalar chain, ``((0 + v0) + v1) + ...`` (the loops are vectorized across rows
only, never within a row), and:

* C <= 32: one sequential sum over the row. The x*x reduction is fused with its multiply and the
  backend contracts it (``vfmadd`` in the object code): ``acc = fma(x0, x0, round(x1 * x1))``, then
  ``acc = fma(x_i, x_i, acc)``. Exception, C = 6 and C = 8 only (checked for every C in 2..32): LLVM
  vectorizes the loop over the innermost batch dimension of size > 1 (n entries) and its vector body
  rounds the squares and adds them in order; it takes the first ``8 * (n // 8)`` entries when n >= 16
  (C = 6, 16 <= n < 32: ``4 * (n // 4)``), all of them when n == 8 (C = 6: also n == 4), none
  otherwise; the remainder runs the fma chain;
* C > 32: XLA's ``TreeReductionRewriter`` (window 32) first rewrites the reduce into a reduce-window of
  size 32, stride 32, with "SAME" padding (``P = 32 * ceil(C / 32) - C`` zeros, ``P // 2`` on the left,
  the rest on the right; padding elements are skipped, i.e. adding zeros), each window summed
  sequentially, then reduces the ``ceil(C / 32)`` window sums the same way, recursively while more than
  32 remain (C = 2000: windows of 32 -> 63 sums -> 2 windows -> 2 sums -> 1). Here x*x is its own
  loop, so the squares are rounded before they are summed.

The mean is ``sum * float32(1 / C)`` and the variance one fused multiply-add,
``fma(sum_sq, float32(1 / C), -round(mean * mean))``, clipped at 0 (``vfmsub231ss`` in the object code),
on both paths, except for a single row (all batch dimensions 1) on the loop path, where the algebraic
simplifier turns ``mean * mean`` into ``round(sum * sum) * round(float32(1 / C)²)``.

With it the mean and variance equal jitted Flax's bit for bit on every row tested (C in
{1, 3, 8, 16, 24, 32, 48, 64, 100, 768}, rows in {1, 2, 7, 16, 111, 128, 788}, 2-D and 3-D, N(0,1),
N(100,1), N(1,0.01); plus both sides of the threshold, C = 6 and 8 with 1..511 rows, C up to 4095 in
one row, 4-D inputs); the output is within 1.5e-6 of Flax (Flax's rsqrt is a hardware approximation
plus a Newton step). On x86-64 with AVX-512 (measured on AMD EPYC Zen 4) everything above holds except
which rows LLVM vectorizes in the small C <= 32 loops (``_vector_rows``); the AVX-512 choice is detected
from /proc/cpuinfo. Elsewhere (ARM, GPU, other jaxlib) XLA sums in another order and may move the
threshold; this order is then as good as any other (an exact float32 sum with its own rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_LANES, _BLOCK, _GROUP, _SEGMENT = 16, 64, 256, 1024
YNN_MIN_ELEMENTS = 4096  # XLA offloads a reduce to YNNPACK when its input has at least this many elements
_WINDOW = 32  # TreeReductionRewriter's window on the CPU backend


def _sum4(t: Tensor) -> Tensor:
    """[..., 4, L] -> ((t0 + t1) + t2) + t3, in that order."""
    return ((t[..., 0, :] + t[..., 1, :]) + t[..., 2, :]) + t[..., 3, :]


def _fma_f32(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
    """float32 ``fma(a, b, c)`` with a single rounding, for float32 tensors.

    ``a * b`` is exact in float64; ``a * b + c`` is computed in float64 with its exact error (TwoSum), and
    when the float64 sum lands exactly on a float32 rounding midpoint the error decides the direction,
    so double rounding can never occur.
    """
    p = a.double() * b.double()
    cd = c.double()
    s = p + cd
    bp = s - cd
    err = (p - (s - bp)) + (cd - bp)  # exact: p + cd == s + err
    f = s.float()
    fd = f.double()
    # the float32 neighbour of f on the side of s; s is a midpoint iff it lies halfway between them
    toward = torch.where(s >= fd, torch.full_like(f, float("inf")), torch.full_like(f, float("-inf")))
    # nextafter has no derivative (older torch raises in backward), so it sees detached values and the
    # gradient flows through s: that of a * b + c, as for Flax's fma.
    nb = torch.nextafter(f.detach(), toward).double()
    midpoint = (s != fd) & ((fd + nb) * 0.5 == s) & (err != 0)
    sd = s.detach()
    nudged = torch.nextafter(sd, torch.where(err > 0, s.new_tensor(float("inf")), s.new_tensor(float("-inf")))) + (s - sd)
    return torch.where(midpoint, nudged, s).float()


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


def _has_avx512() -> bool:
    """Whether this x86-64 CPU has AVX-512F, for which XLA's LLVM backend vectorizes differently."""
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


AVX512 = _has_avx512()


def _vector_rows(rows: int, c: int) -> int:
    """How many leading rows LLVM's vectorizer handles (x*x rounded, no fma) in the fused C <= 32 sum of
    squares; the others run the scalar, contracted loop. The choice depends on the CPU XLA compiles for.

    AVX2 (no AVX-512), measured: only C = 6 and C = 8. AVX-512 (AMD EPYC Zen 4; jitted ``nn.LayerNorm``,
    every C in 2..31 and n in 1..129, one and three batches): C = 5 to 8, all n rows when n is 4 or 8, none
    for other n < 16, ``8 * (n // 8)`` from n = 16 on. (Flax's ``_compute_stats`` jitted alone is fused
    differently and vectorizes other rows on AVX-512; the port follows the LayerNorm.)
    """
    if AVX512:
        if not 5 <= c <= 8 or rows < 4 or 8 < rows < 16 or rows in (5, 6, 7):
            return 0
        return rows // 8 * 8 if rows >= 16 else rows
    if c == 8:
        return rows if rows == 8 else (rows // 8 * 8 if rows >= 16 else 0)
    if c == 6:
        if rows in (4, 8):
            return rows
        if rows < 16:
            return 0
        return rows // 4 * 4 if rows < 32 else rows // 8 * 8
    return 0


def _sequential(v: Tensor) -> Tensor:
    """((v0 + v1) + v2) + ... over the last axis, in that order (a leading 0 + v0 is exact)."""
    acc = v[..., 0] + 0.0
    for i in range(1, v.shape[-1]):
        acc = acc + v[..., i]
    return acc


def small_row_sum(v: Tensor, square: bool = False, inner: int | None = None) -> Tensor:
    """Float32 sums of the rows of ``v`` [R, C] (of ``v * v`` if ``square``) in the order of XLA's own
    loop emitter, used below the YNNPACK threshold (see the module docstring).

    ``inner`` is the innermost batch dimension of size > 1 of the original array (the loop LLVM
    vectorizes); it defaults to all rows, as for a 2-D input. Loops run over the (at most 32) positions
    of a window, never over rows or windows.
    """
    rows, c = v.shape
    if square and 2 <= c <= _WINDOW:  # x*x fused into the reduce and contracted
        # fma(x, x, acc) through float64: x*x is exact there, so only a float64 sum that lands exactly on a
        # float32 rounding midpoint could round twice (odds ~2^-29 per step; the exact _fma_f32 would make
        # this chain ~5x longer, which torch.compile pays for in build time).
        w = v.double()
        acc = (w[:, 0] * w[:, 0] + (v[:, 1] * v[:, 1]).double()).float()
        for i in range(2, c):
            acc = (w[:, i] * w[:, i] + acc.double()).float()
        inner = rows if inner is None else inner
        n_vec = _vector_rows(inner, c)
        if n_vec:  # rows the vectorizer took: squares rounded, then summed in order
            taken = torch.arange(rows, device=v.device) % inner < n_vec
            acc = torch.where(taken, _sequential(v * v), acc)
        return acc
    if square:  # x*x is its own loop (C > 32): squares rounded first
        v = v * v
    while c > _WINDOW:  # TreeReductionRewriter: reduce-window 32 / stride 32, SAME padding, recursively
        n = -(-c // _WINDOW)
        pad = n * _WINDOW - c
        if pad:
            v = F.pad(v, (pad // 2, pad - pad // 2))
        v, c = _sequential(v.reshape(rows, n, _WINDOW)), n
    return _sequential(v)


def uses_ynnpack(shape: tuple[int, ...] | torch.Size) -> bool:
    """Whether XLA:CPU (jaxlib 0.10.2, x86 AVX2) hands the last-axis reductions of ``shape`` to YNNPACK."""
    n = 1
    for d in shape:
        n *= d
    return shape[-1] > 1 and n >= YNN_MIN_ELEMENTS


def stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Flax's ``_compute_stats`` over the last axis (fast variance): float32 mean and variance, bit exact."""
    c = x.shape[-1]
    rows = x.reshape(-1, c).float()
    n = rows.shape[0]
    if uses_ynnpack(x.shape):
        total, total_sq = row_sum(rows), row_sum(rows * rows)
    else:
        batch = [d for d in x.shape[:-1] if d != 1]
        inner = batch[-1] if batch else 1
        total, total_sq = small_row_sum(rows), small_row_sum(rows, square=True, inner=inner)
    inv_c = torch.full_like(total, 1.0 / c)  # float32(1 / C)
    mean = total * inv_c
    if n == 1 and not uses_ynnpack(x.shape):
        # a single row: the algebraic simplifier rewrites mean * mean as (sum * sum) * float32(1/C)²
        mean_sq = (total * total) * (inv_c * inv_c)
    else:
        mean_sq = mean * mean
    var = _fma_f32(total_sq, inv_c, -mean_sq).clamp_min(0.0)
    return mean.view(x.shape[:-1]), var.view(x.shape[:-1])


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Flax ``nn.LayerNorm`` over the last axis (fast variance), statistics in float32. Returns float32."""
    mean, var = stats(x)
    shape = x.shape[:-1] + (1,)
    mul = torch.rsqrt(var + eps).view(shape) * weight.float()
    return (x.float() - mean.view(shape)) * mul + bias.float()
