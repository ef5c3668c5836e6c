"""LayerNorm against live jitted Flax on this machine's own CPU, including inputs whose mean is 100 times
their spread (where Flax's ``E[x²] - E[x]²`` cancels and its rounding noise depends on XLA's summation order).

``numerics("xla_cpu")`` (opt-in) is checked against jitted ``nn.LayerNorm`` at a tolerance that only
bitwise-equal statistics meet (see the test), where XLA:CPU's order was measured (x86-64 with AVX2, with or
without AVX-512, jaxlib 0.10). On every platform, a check shows the mode computes Flax's formula rather than
the fused kernel. The default ``"fused"`` numerics (torch's ``F.layer_norm``) is checked against Flax on
well-conditioned inputs and against float64 elsewhere.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.layers import LayerNorm

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")


def _measured_platform() -> str | None:
    """"avx2" / "avx512" where XLA:CPU's summation order was measured (tokenlearner_torch.flax_numerics:
    x86-64 with AVX2, jaxlib 0.10); None elsewhere (ARM, other jaxlib), where XLA may sum in another order."""
    if platform.machine() not in ("x86_64", "AMD64") or not jax.__version__.startswith("0.10."):
        return None
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return None
    if " avx2" not in flags:
        return None
    return "avx512" if " avx512f" in flags else "avx2"


PLATFORM = _measured_platform()

# Both of XLA's paths: its own loops below 4096 elements, YNNPACK's row sums above (flax_numerics); C = 6 and
# 8 with 37 or 197 rows reach the loops LLVM vectorizes (differently with AVX-512).
SHAPES = [(1, 1), (2, 5), (3, 37), (4, 197), (2, 20)]
# N(1, 1): mean² = var, where Flax's cancellation starts to matter; N(100, 1) and N(1, 0.01²): the
# statistics are mostly Flax's rounding noise, so only the same summation order gives the same bits.
DISTRIBUTIONS = [(0.0, 1.0), (1.0, 1.0), (3.0, 1.0), (100.0, 1.0), (1.0, 0.01)]


@pytest.mark.skipif(PLATFORM is None, reason="XLA:CPU's summation order is measured for x86-64 AVX2/AVX-512 "
                    "with jaxlib 0.10 only; test_xla_cpu_mode_computes_flax_formula covers other platforms")
@pytest.mark.parametrize("c", [1, 5, 6, 8, 32, 48, 100, 768, 1280])
@pytest.mark.parametrize("lead", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_xla_cpu_numerics_are_bitwise_jitted_flax(c, lead):
    """Mean and variance bit for bit those of jitted ``nn.LayerNorm``, live on this CPU; the output within
    2e-6 * max(1, |Flax|), the difference of torch's rsqrt from XLA's (an approximation plus a Newton step).

    Why 2e-6 on the output is a bitwise test of the statistics (hand-derived): on N(100, 1) rows the sums
    of squares are ~C * 1e4, whose float32 ulp (>= 2^-10) moves the variance (~1) by >= 1e-3 / C and the
    output by >= 1e-4 for the C here; one ulp of the mean (7.6e-6 at 100) moves every output by 7.6e-6; on
    N(1, 0.01²) one ulp of the mean (1.2e-7) over a spread of 0.01 moves it by 1.2e-5. Any other summation
    order, a missing or extra fma, the fused kernel (1e-3 to 4e1 away, docs/numerics.md table) fail by orders of
    magnitude. (Flax's ``_compute_stats`` jitted on its own is fused differently by XLA, so it is not the
    reference: the LayerNorm is.)
    """
    rng = np.random.default_rng(c)
    scale = (1 + 0.1 * rng.normal(size=c)).astype(np.float32)
    bias = (0.05 * rng.normal(size=c)).astype(np.float32)
    flax_ln = jax.jit(nn.LayerNorm().apply)
    ln = LayerNorm(c)
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(scale))
        ln.bias.copy_(torch.from_numpy(bias))
    for mean, std in DISTRIBUTIONS:
        x = rng.normal(mean, std, (*lead, c)).astype(np.float32)
        ref = np.asarray(flax_ln({"params": {"scale": scale, "bias": bias}}, x))
        with torch.no_grad(), tl.numerics("xla_cpu"):
            out = ln(torch.from_numpy(x)).numpy()
        assert np.abs(out - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max()), (mean, std, np.abs(out - ref).max())


@pytest.mark.parametrize("c", [8, 64, 768])
def test_xla_cpu_mode_computes_flax_formula(c):
    """On any platform: the mode computes ``E[x²] - E[x]²`` in float32 (as Flax), not the fused kernel.

    Hand-derived, order-independent: for N(100, 1) inputs E[x²] is about 1e4, where a float32 ulp is 2^-10
    ~ 1e-3, so the fast variance (about 1) carries an absolute error of that order whatever the summation
    order, and the normalised output a relative error of ~5e-4 on some of the 788 rows. The exact variance
    of the fused kernel is good to ~1e-5 (docs/numerics.md table). So the mode must be far from the float64 result,
    like Flax and at most as far as Flax's own noise allows (2e-2), while the default stays near it.
    """
    rng = np.random.default_rng(100 + c)
    x = rng.normal(100.0, 1.0, (4, 197, c)).astype(np.float32)
    exact = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (c,), eps=1e-6).numpy()
    flax = np.asarray(jax.jit(nn.LayerNorm().apply)({"params": {"scale": np.ones(c, np.float32),
                                                               "bias": np.zeros(c, np.float32)}}, x))
    ln = LayerNorm(c)
    with torch.no_grad():
        fused = ln(torch.from_numpy(x)).numpy()
        with tl.numerics("xla_cpu"):
            xla = ln(torch.from_numpy(x)).numpy()
    assert np.abs(flax - exact).max() > 2e-4  # the premise: Flax's cancellation shows on this input
    assert np.abs(fused - exact).max() < 1e-4
    assert np.abs(xla - exact).max() > 2e-4
    assert np.abs(xla - flax).max() < 2e-2
    if PLATFORM is not None:  # where the order is XLA's own: Flax's noise reproduced, not just its size
        assert np.abs(xla - flax).max() <= 2e-6


@pytest.mark.parametrize("c", [2, 8, 100, 768])
def test_default_fused_numerics(c):
    """Default: within 1e-5 of Flax where Flax is accurate; closer to float64 than Flax where it is not."""
    rng = np.random.default_rng(c)
    flax_ln = jax.jit(nn.LayerNorm().apply)
    params = {"params": {"scale": np.ones(c, np.float32), "bias": np.zeros(c, np.float32)}}
    ln = LayerNorm(c)
    for mean, std in [(0.0, 1.0), (100.0, 1.0), (1.0, 0.01)]:
        x = rng.normal(mean, std, (4, 37, c)).astype(np.float32)
        ref = np.asarray(flax_ln(params, x))
        exact = torch.nn.functional.layer_norm(torch.from_numpy(x).double(), (c,), eps=1e-6).numpy()
        with torch.no_grad():
            out = ln(torch.from_numpy(x)).numpy()
        if mean == 0.0 and c > 2:  # C = 2: rows with two near-equal values are ill-conditioned for Flax too
            assert np.abs(out - ref).max() <= 1e-5
        assert np.abs(out - exact).max() <= max(1e-4, 0.1 * np.abs(ref - exact).max()), (mean, std)


def test_default_is_the_fused_kernel():
    """The default numerics is torch's fused ``F.layer_norm`` (docs/numerics.md, "LayerNorm: two numerics"): the port's
    LayerNorm equals it bit for bit, and on shifted inputs it is ~5e-3 away from Flax (closer to float64)."""
    rng = np.random.default_rng(0)
    x = rng.normal(100.0, 1.0, (3, 37, 768)).astype(np.float32)
    ref = np.asarray(jax.jit(nn.LayerNorm().apply)({"params": {"scale": np.ones(768, np.float32),
                                                             "bias": np.zeros(768, np.float32)}}, x))
    with torch.no_grad():
        out = LayerNorm(768)(torch.from_numpy(x)).numpy()
    plain = torch.nn.functional.layer_norm(torch.from_numpy(x), (768,), eps=1e-6).numpy()
    assert out.tobytes() == plain.tobytes()
    assert np.abs(out - ref).max() > 1e-3


def test_compiled_xla_cpu_layer_norm_equals_eager():
    ln = LayerNorm(192)
    torch._dynamo.reset()
    compiled = torch.compile(ln, fullgraph=True, backend="aot_eager")
    for mean in (0.0, 100.0):
        x = torch.randn(4, 50, 192, generator=torch.Generator().manual_seed(1)) + mean
        with torch.no_grad(), tl.numerics("xla_cpu"):
            torch.testing.assert_close(compiled(x), ln(x), rtol=0, atol=2e-6)


def test_numerics_mode_is_restored_and_checked():
    from tokenlearner_torch.numerics_mode import get_layer_norm_numerics

    assert get_layer_norm_numerics() == "fused"
    with tl.numerics("xla_cpu"):
        assert get_layer_norm_numerics() == "xla_cpu"
    assert get_layer_norm_numerics() == "fused"
    with pytest.raises(ValueError, match="'fused', 'xla_cpu'"):
        tl.set_layer_norm_numerics("xla_gpu")


def test_bfloat16_output_dtype_and_float32_statistics():
    ln = LayerNorm(16, dtype=torch.bfloat16)
    x = torch.randn(2, 5, 16) + 100
    y = ln(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), LayerNorm(16)(x).to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["fused", "xla_cpu"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_keeps_its_dtype(mode, dtype):
    """A LayerNorm converted with ``.to(dtype)`` returns that dtype, statistics computed in float32 (Flax)."""
    ln = LayerNorm(16).to(dtype)
    x = (torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)) + 3).to(dtype)
    with tl.numerics(mode):
        y = ln(x)
    assert y.dtype == dtype
    ref = torch.nn.functional.layer_norm(x.double(), (16,), eps=1e-6).to(dtype)
    torch.testing.assert_close(y, ref, rtol=0, atol=float(torch.finfo(dtype).eps) * 8)


def test_parity_harness_selects_the_layer_norm_numerics():
    from parity.modes import precision

    from tokenlearner_torch import flax_numerics

    ln, x = LayerNorm(48), torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(2)) + 100
    with precision("f32", layer_norm="xla_cpu") as settings:
        assert settings["tokenlearner.layer_norm_numerics"] == "xla_cpu"
        torch.testing.assert_close(ln(x), flax_numerics.layer_norm(x, ln.weight, ln.bias, 1e-6), rtol=0, atol=0)
    with precision("f32") as settings:
        assert settings["tokenlearner.layer_norm_numerics"] == "fused"
        torch.testing.assert_close(ln(x), torch.nn.functional.layer_norm(x, (48,), ln.weight, ln.bias, 1e-6),
                                   rtol=0, atol=0)  # fmt: skip


def test_compiled_graph_follows_a_mode_switch():
    """torch.compile guards on the numerics mode: switching it recompiles instead of reusing the old graph."""
    from tokenlearner_torch import flax_numerics

    ln = LayerNorm(48)
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(4)) + 100
    torch._dynamo.reset()
    compiled = torch.compile(ln, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        fused = compiled(x)
        with tl.numerics("xla_cpu"):
            xla = compiled(x)
    torch.testing.assert_close(fused, torch.nn.functional.layer_norm(x, (48,), eps=1e-6), rtol=0, atol=1e-6)
    torch.testing.assert_close(xla, flax_numerics.layer_norm(x, ln.weight, ln.bias, 1e-6), rtol=0, atol=2e-6)
    assert (fused - xla).abs().max() > 1e-4  # the two modes differ on this input, so the check can fail
