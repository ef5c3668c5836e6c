"""layers.linear: eager float32 inference on the CPU takes oneDNN's GEMM (faster than MKL's addmm on the CI
machine kind); everywhere else ``F.linear``. The two must compute the same function."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tokenlearner_torch as tl
from tokenlearner_torch import layers
from tokenlearner_torch.weights_convert import flax_to_torch, read_checkpoint

from goldens import GOLDENS as GOLDENS_DIR

pytestmark = pytest.mark.skipif(layers._ONEDNN_LINEAR is None, reason="this torch build has no oneDNN linear")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls that take oneDNN's kernel."""
    seen = []
    real = layers._ONEDNN_LINEAR

    def spy(*args):
        seen.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(layers, "_ONEDNN_LINEAR", spy)
    return seen


@pytest.mark.parametrize("shape,out,bias", [((197, 768), 768, True), ((2, 197, 768), 3072, True),
                                            ((8, 3, 16), 5, False), ((1, 4), 3, True)])
def test_onednn_equals_f_linear(calls, shape, out, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(out, shape[-1], generator=g)
    b = torch.randn(out, generator=g) if bias else None
    with torch.no_grad():
        got = layers.linear(x, w, b)
    assert len(calls) == 1
    want = F.linear(x.double(), w.double(), None if b is None else b.double())
    # float32 rounding of a K-term dot product: well under 1e-6 relative to the output's scale
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()
    # a transposed (non-contiguous) input, as TokenFuser's Dense_0 gets it
    xt = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=g).transpose(-1, -2) if len(shape) > 1 else x
    with torch.no_grad():
        got = layers.linear(xt, w, b)
    want = F.linear(xt.double(), w.double(), None if b is None else b.double())
    assert (got.double() - want).abs().max() <= 1e-6 * want.abs().max()


def test_autograd_compile_and_tracing_keep_f_linear(calls):
    x = torch.randn(4, 8)
    w = torch.nn.Parameter(torch.randn(3, 8))
    layers.linear(x, w, None).sum().backward()  # gradients: the oneDNN op has no backward
    assert calls == [] and w.grad is not None
    with torch.no_grad():
        layers.linear(x.double(), w.double(), None)  # float64 parity mode
        layers.linear(x.to(torch.bfloat16), w.to(torch.bfloat16), None)
    assert calls == []
    dense = layers.Dense(3, 8)
    graph = torch.fx.symbolic_trace(dense)
    assert all("mkldnn" not in str(n.target) for n in graph.graph.nodes)
    with torch.no_grad():
        traced = torch.jit.trace(dense, (x,), check_trace=False)  # the check would rerun it eagerly
    assert calls == [] and "mkldnn" not in str(traced.graph)
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dense(x)
    assert calls == [] and counter.get_total_flops() == 2 * 4 * 8 * 3  # counted as the matmul it is


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
