"""``torch.compile(fullgraph=True)`` works on the port (no graph breaks) and matches eager."""

from __future__ import annotations

import pytest
import torch

import tokenlearner_torch as tl

SMALL_VIT = dict(
    num_classes=10,
    mlp_dim=64,
    num_layers=2,
    num_heads=2,
    hidden_size=32,
    representation_size=16,
    classifier="gap",
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    tokenizer=dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1,
                   use_tokenfuse=False, use_v11=True),
)


def _randomise(model: torch.nn.Module) -> None:
    # output_projection is zero-initialised (as in Scenic): make every parameter non-trivial.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)


def _check_vit(use_tokenfuse: bool, backend: str) -> None:
    torch.manual_seed(0)
    kwargs = {**SMALL_VIT, "tokenizer": {**SMALL_VIT["tokenizer"], "use_tokenfuse": use_tokenfuse}}
    model = tl.from_scenic("TokenLearnerViT", kwargs, input_shapes=[(32, 32, 3)])  # no warm-up call needed
    x = torch.randn(2, 32, 32, 3)
    _randomise(model)
    with torch.inference_mode():
        eager = model(x)
    torch._dynamo.reset()
    # fullgraph: a graph break is an error
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
    with torch.inference_mode():
        out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_tokenfuse", [False, True])
def test_fullgraph_capture(use_tokenfuse):
    """Dynamo captures the whole forward in one graph (aot_eager: no C++ build, a few seconds)."""
    _check_vit(use_tokenfuse, "aot_eager")


# The real thing, inductor's C++ build of this graph (V1.1, blocks and TokenFuser), runs in
# test_compile_dynamic.test_inductor_static_and_dynamic: one process pays inductor's start-up once.


def test_fullgraph_compile_token_fuser():
    torch.manual_seed(0)
    model = tl.from_scenic("TokenFuser", {}, input_shapes=[(4, 32), (36, 32)])
    inputs, original = torch.randn(2, 4, 32), torch.randn(2, 36, 32)
    _randomise(model)
    with torch.inference_mode():
        eager = model(inputs, original)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend="aot_eager")
    with torch.inference_mode():
        out = compiled(inputs, original)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)



def test_dynamic_batch_compiles_once():
    """No guard on the batch size (the old LayerNorm branched on rows * C): one graph for batches 2..64."""
    torch.manual_seed(0)
    model = tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=[(32, 32, 3)])
    _randomise(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for batch in (2, 7, 64):
            x = torch.randn(batch, 32, 32, 3) + 50
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
