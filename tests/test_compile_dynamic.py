"""``torch.compile(fullgraph=True, dynamic=True)``: one graph, no graph breaks, no recompiles across batch sizes.

What a training loop with a ragged last batch or a server with varying batch sizes needs: the first call
compiles, later batch sizes reuse the graph. Checked with dynamo's own counters on tiny models (aot_eager:
no C++ build), for inference and for forward + backward, with and without the TokenFuser; every model
configuration of test_fx traced with every size symbolic; and once through inductor itself (its C++ build),
training and inference. Batch 1 is left out on purpose: dynamo specialises sizes 0 and 1 by design.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import tokenlearner_torch as tl

TINY = dict(
    num_classes=10, mlp_dim=64, num_layers=2, num_heads=2, hidden_size=32, representation_size=16,
    classifier="gap", dropout_rate=0.0, attention_dropout_rate=0.0,
    tokenizer=dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1,
                   use_tokenfuse=False, use_v11=True),
)
BATCHES = (2, 3, 5)


def _model(use_tokenfuse: bool, dtype: str = "float32") -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {**TINY, "dtype": dtype, "tokenizer": {**TINY["tokenizer"], "use_tokenfuse": use_tokenfuse}}
    model = tl.from_scenic("TokenLearnerViT", kwargs, input_shapes=[(32, 32, 3)])
    with torch.no_grad():  # the zero-initialised head would make every comparison trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _compiled(model):
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    return torch.compile(model, backend=cnt, fullgraph=True, dynamic=True), cnt


def _no_breaks_no_recompiles(cnt, after_first: int) -> None:
    # The first call may hand the backend more than one graph of the same frame: under dynamic=True dynamo
    # traces Python floats (dropout rates, LayerNorm epsilon) symbolically, then restarts once to specialise
    # them (_tensorify_python_scalars). What matters is that later batch sizes compile nothing.
    assert after_first >= 1
    assert cnt.frame_count == after_first, f"later batch sizes compiled {cnt.frame_count - after_first} more"
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not counters["recompiles"], dict(counters["recompiles"])


@pytest.mark.parametrize("use_tokenfuse, dtype", [(False, "float32"), (True, "float32"), (False, "bfloat16")])
def test_inference_one_graph_across_batches(use_tokenfuse, dtype):
    model = _model(use_tokenfuse, dtype).eval()
    compiled, cnt = _compiled(model)
    after_first = None
    for b in BATCHES:
        x = torch.randn(b, 32, 32, 3)
        with torch.inference_mode():
            out, ref = compiled(x), model(x)
        after_first = after_first or cnt.frame_count
        assert out.shape == (b, 10)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _no_breaks_no_recompiles(cnt, after_first)


def _same_gradients(compiled, model: torch.nn.Module, batch: int, rtol: float) -> None:
    """One forward + backward of a cross-entropy loss through ``compiled`` and through ``model``: equal gradients."""
    x, y = torch.randn(batch, 32, 32, 3), torch.randint(0, 10, (batch,))
    grads = []
    for fn in (compiled, model):
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(fn(x), y).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], rtol=rtol, atol=1e-6, msg=k)


def test_training_one_graph_across_batches():
    """Forward + backward of a loss (the benchmark's B/16 structure: TokenLearner, no fuser): the same
    gradients as eager, one graph for every batch size."""
    model = _model(False).train()
    compiled, cnt = _compiled(model)
    after_first = None
    for b in BATCHES:
        _same_gradients(compiled, model, b, rtol=1e-5)
        after_first = after_first or cnt.frame_count
    _no_breaks_no_recompiles(cnt, after_first)


def _every_model():
    from test_fx import MODELS  # every golden configuration and the variants the goldens do not cover

    return MODELS


@pytest.mark.parametrize("name, cls, kwargs, shapes", _every_model(), ids=[m[0] for m in _every_model()])
def test_every_model_traces_once_with_dynamic_shapes(name, cls, kwargs, shapes):
    """dynamic=True marks every size symbolic, not just the batch: square-grid reshapes and the like must trace
    (TokenLearnerModule's [B, H*W, C] input once failed here). Dynamo's own backend: what fails is tracing."""
    from test_fx import _build, _inputs

    model = _build(cls, kwargs, shapes).eval()
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("eager")
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    after_first = None
    # Batch sizes unlike every other size of these inputs: dynamo's duck sizing would otherwise assume that a
    # batch of 2 stays equal to 2 frames, and recompile when it does not (a guard of the test, not the model).
    for b in (6, 9, 11):
        xs = _inputs(shapes, b)
        with torch.inference_mode():
            torch.testing.assert_close(compiled(*xs), model(*xs), rtol=0, atol=0)
        after_first = after_first or cnt.frame_count
    _no_breaks_no_recompiles(cnt, after_first)


@pytest.mark.slow
def test_inductor_static_and_dynamic():
    """Inductor itself, the default backend (its C++ build), in one test: a process's first inductor compile
    pays its start-up (compile workers, precompiled header), ~15 s of CPU, as much as a whole static graph.

    1. dynamic=False, fullgraph: a V1.1 ViT with blocks and the TokenFuser, inference equal to eager.
    2. dynamic=True: a channel-last image reaches the patch embedding as a permuted view of the graph input,
       whose symbolic strides inductor could not order (compiled graphs now copy it). Forward + backward and
       inference at three batch sizes, equal to eager, without graph breaks."""
    from test_compile import _check_vit

    _check_vit(True, "inductor")
    model = _model(False).train()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for b in BATCHES:
        _same_gradients(compiled, model, b, rtol=1e-4)
    model.eval()
    with torch.inference_mode():
        for b in BATCHES:
            x = torch.randn(b, 32, 32, 3)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
