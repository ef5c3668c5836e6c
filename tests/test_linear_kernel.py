"""cpu_gemm: Dense's float32 CPU GEMM takes oneDNN (faster than MKL's on the CI machine kind) in eager inference,
eager training and torch.compile; everything that must see ``aten.linear`` keeps ``F.linear``. Both kernels
must compute the same function, forward and backward."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenlearner_torch as tl
from tokenlearner_torch import cpu_gemm, layers
from tokenlearner_torch.weights_convert import flax_to_torch, read_checkpoint

from goldens import GOLDENS as GOLDENS_DIR

pytestmark = pytest.mark.skipif(cpu_gemm._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear")
needs_op = pytest.mark.skipif(cpu_gemm._LINEAR_OP is None, reason="torch < 2.4: no torch.library.custom_op")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that reach oneDNN's kernel (directly or through the custom op), by first argument's shape."""
    seen = []
    real = cpu_gemm._ONEDNN_LINEAR

    def spy(*args):
        seen.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", spy)
    return seen


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    """float32 rounding of a K-term dot product: within ``rel`` of the float64 result's scale."""
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rel * want.abs().max().item(), f"{err:.3g} > {rel} x {want.abs().max().item():.3g}"


def _args(shape, out, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out, shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    return x, w, b


@pytest.mark.parametrize("shape,out,bias", [((197, 768), 768, True), ((2, 197, 768), 3072, True),
                                            ((8, 3, 16), 5, False), ((1, 4), 3, True)])
def test_onednn_equals_f_linear(calls, shape, out, bias):
    x, w, b = _args(shape, out, bias)
    with torch.no_grad():
        got = layers.linear(x, w, b)
    assert len(calls) == 1
    _close(got, F.linear(x.double(), w.double(), None if b is None else b.double()))
    # a transposed (non-contiguous) input, as TokenFuser's Dense_0 gets it
    g = torch.Generator().manual_seed(1)
    xt = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2) if len(shape) > 1 else x
    with torch.no_grad():
        got = layers.linear(xt, w, b)
    _close(got, F.linear(xt.double(), w.double(), None if b is None else b.double()))


@needs_op
@pytest.mark.parametrize("shape,out,bias", [((2, 197, 768), 768, True), ((7, 16), 5, False),
                                            ((3, 4, 16), 8, True)])
def test_training_gradients_equal_f_linear(calls, shape, out, bias):
    """Eager training: the custom op's forward and backward (oneDNN input gradient) against float64."""
    x, w, b = _args(shape, out, bias, seed=1)
    leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    y = layers.linear(leaves[0], leaves[1], leaves[2] if bias else None)
    assert "tokenlearner_linear" in type(y.grad_fn).__name__
    cot = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(cot)
    assert len(calls) == 2  # forward, and the input gradient
    ref = [t.double().requires_grad_() for t in (x, w) + ((b,) if bias else ())]
    want = F.linear(ref[0], ref[1], ref[2] if bias else None)
    want.backward(cot.double())
    _close(y.detach(), want.detach())
    for got, exp in zip(leaves, ref):
        _close(got.grad, exp.grad)


@needs_op
def test_partial_gradients_and_double_backward():
    x, w, b = _args((5, 6), 4, True, seed=3)
    # frozen weights, input gradient only (saliency maps)
    xg = x.clone().requires_grad_()
    layers.linear(xg, w, b).square().sum().backward()
    _close(xg.grad, (2 * F.linear(x.double(), w.double(), b.double())) @ w.double())
    # create_graph=True: the backward is built from differentiable ops, so second derivatives are right
    pairs = []
    for fn, dt in ((layers.linear, torch.float32), (F.linear, torch.float64)):
        xs, ws = x.to(dt, copy=True).requires_grad_(), w.to(dt, copy=True).requires_grad_()
        (gx,) = torch.autograd.grad(fn(xs, ws, b.to(dt)).pow(3).sum(), xs, create_graph=True)
        gx.square().sum().backward()
        pairs.append((gx.detach(), ws.grad))
    _close(pairs[0][0], pairs[1][0], 1e-5)
    _close(pairs[0][1], pairs[1][1], 1e-5)


def test_linear_gelu_fuses_flax_gelu(calls):
    x, w, b = _args((3, 50, 64), 256, True, seed=4)
    with torch.no_grad():
        got = cpu_gemm.linear_gelu(x, w * 0.1, b)
    assert calls == [(3, 50, 64)]
    want = F.gelu(F.linear(x.double(), w.double() * 0.1, b.double()), approximate="tanh")
    _close(got, want)


def test_mlp_block_fuses_only_when_nobody_watches_dense_0(calls):
    torch.manual_seed(0)
    block = layers.MlpBlock(64, dropout_rate=0.0, in_dim=32).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        fused = block(x)
    seen = []
    handle = block.Dense_0.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        hooked = block(x)
    handle.remove()
    # the hook saw Dense_0's own output (before the GELU), as Flax's capture_intermediates records it
    assert len(seen) == 1
    _close(seen[0], F.linear(x.double(), block.Dense_0.weight.double(), block.Dense_0.bias.double()))
    torch.testing.assert_close(fused, hooked, rtol=0, atol=1e-6)
    ref = F.linear(F.gelu(F.linear(x.double(), block.Dense_0.weight.double(), block.Dense_0.bias.double()),
                          approximate="tanh"), block.Dense_1.weight.double(), block.Dense_1.bias.double())
    _close(fused, ref)


def test_graphs_and_dispatch_modes_keep_f_linear(calls):
    x = torch.randn(4, 8)
    dense = layers.Dense(3, 8)
    with torch.no_grad():
        layers.linear(x.double(), dense.weight.double(), None)  # float64 parity mode
        layers.linear(x.to(torch.bfloat16), dense.weight.to(torch.bfloat16), None)
    assert calls == []
    graph = torch.fx.symbolic_trace(layers.MlpBlock(16, dropout_rate=0.0, in_dim=8))
    assert all("mkldnn" not in str(n.target) and "tokenlearner" not in str(n.target) for n in graph.graph.nodes)
    with torch.no_grad():
        traced = torch.jit.trace(dense, (x,), check_trace=False)  # the check would rerun it eagerly
    assert calls == [] and "mkldnn" not in str(traced.graph)
    exported = torch.export.export(layers.MlpBlock(16, dropout_rate=0.0, in_dim=8).eval(), (x,))
    targets = {str(n.target) for n in exported.graph.nodes}
    assert "aten.linear.default" in targets and not any("tokenlearner" in t or "mkldnn" in t for t in targets)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dense(x)
    assert calls == [] and counter.get_total_flops() == 2 * 4 * 8 * 3  # counted as the matmul it is


def test_functorch_transforms_and_forward_ad():
    """vmap, torch.func.grad and forward-mode AD see F.linear (oneDNN's op has no batching rule, no JVP)."""
    x, w, b = _args((3, 4), 5, True, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap's slow per-example fallback warns
        out = torch.func.vmap(lambda v: layers.linear(v, w, b))(x.unsqueeze(0).repeat(2, 1, 1))
    _close(out[1], F.linear(x.double(), w.double(), b.double()))
    g = torch.func.grad(lambda v: layers.linear(v, w, b).sum())(x)
    _close(g, w.double().sum(0).expand(3, 4))
    import torch.autograd.forward_ad as fwAD

    t = torch.randn(3, 4, generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), fwAD.dual_level():
        tangent = fwAD.unpack_dual(layers.linear(fwAD.make_dual(x, t), w, b)).tangent
    assert tangent is not None
    _close(tangent, t.double() @ w.double().T)


@needs_op
def test_compile_calls_the_custom_op():
    """torch.compile (not export) takes the custom op, forward and backward; one graph, eager's gradients."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = layers.MlpBlock(32, dropout_rate=0.0, in_dim=16)
    record = EagerAndRecordGraphs()
    compiled = torch.compile(block, backend=record, fullgraph=True)
    x = torch.randn(2, 5, 16)
    compiled(x).sum().backward()
    grads = [p.grad.clone() for p in block.parameters()]
    targets = [str(n.target) for gm in record.graphs for n in gm.graph.nodes]
    assert sum("tokenlearner.linear" in t for t in targets) == 2, targets
    block.zero_grad(set_to_none=True)
    block(x).sum().backward()
    for g, p in zip(grads, block.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=0, atol=0)
    with torch.no_grad():  # inference: the GELU goes into the GEMM's epilogue there too
        record.graphs.clear()
        torch._dynamo.reset()
        torch.compile(block, backend=record, fullgraph=True)(x)
    nodes = [n for gm in record.graphs for n in gm.graph.nodes if "tokenlearner.linear" in str(n.target)]
    assert [n.args[-1] for n in nodes] == ["gelu_tanh", "none"]


def test_golden_in_inference_mode(calls):
    """A genuine-Scenic golden through the oneDNN path: same tolerance as the goldens."""
    case = GOLDENS_DIR / "vit_image_cls"
    config = json.loads((case / "config.json").read_text())
    model = tl.from_scenic(config["scenic_class"], config["constructor_kwargs"])
    model.load_state_dict(flax_to_torch(model, read_checkpoint(case / "checkpoint")), strict=True)
    x = torch.from_numpy(np.load(case / "inputs.npz")["x"])
    with torch.inference_mode():
        out = model(x)
    assert len(calls) > 0
    scenic = np.load(case / "outputs.npz")["out"]
    assert np.abs(out.numpy() - scenic).max() / max(1.0, np.abs(scenic).max()) < 1e-5
    with torch.enable_grad():
        torch.testing.assert_close(out, model(x).detach(), rtol=0, atol=1e-5)
