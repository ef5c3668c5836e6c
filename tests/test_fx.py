"""Graph capture without data-dependent control flow: torch.fx.symbolic_trace (timm's feature extraction),
torch.jit.trace and torch.export with a dynamic batch, each equal to eager, on large-mean inputs too."""

from __future__ import annotations

import pytest
import torch

import tokenlearner_torch as tl

from goldens import CASES, Golden


@pytest.fixture(autouse=True)
def _one_gemm_kernel(monkeypatch):
    """Eager inference takes oneDNN's GEMM on the CPU (layers.linear) while captured graphs hold aten.linear:
    one kernel on both sides keeps these comparisons bitwise (tests/test_linear_kernel.py checks that the
    two kernels agree)."""
    from tokenlearner_torch import cpu_gemm

    monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", None)

_TOK = dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1, use_tokenfuse=True)
_VIT = dict(num_classes=5, mlp_dim=64, num_layers=2, num_heads=2, hidden_size=32, representation_size=None,
            dropout_rate=0.0, attention_dropout_rate=0.0)  # fmt: skip
_SAMPLING = dict(type="video", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1, use_tokenfuse=False,
                 temporal_encoding_config=dict(method="temporal_sampling", n_sampled_frames=2))  # fmt: skip

# (name, scenic class, kwargs, input shapes without batch): every golden config plus the model variants the
# goldens do not cover (fuser ViT, patch tokenizer, frame sampling, the representation model, channels first).
EXTRA = [
    ("vit_fuser", "TokenLearnerViT", {**_VIT, "tokenizer": _TOK}, [(32, 32, 3)]),
    ("vit_patch_gmp", "TokenLearnerViT", {**_VIT, "classifier": "gmp", "tokenizer": {**_TOK, "type": "patch"}},
     [(32, 32, 3)]),
    ("vit_sampling", "TokenLearnerViT", {**_VIT, "classifier": "gsp", "tokenizer": _SAMPLING}, [(5, 32, 32, 3)]),
    ("representation", "TokenLearnerViTRepresentation",
     {k: v for k, v in _VIT.items() if k not in ("num_classes", "representation_size")}
     | {"tokenizer": {**_TOK, "use_tokenfuse": False}, "target_channel_dim": 32}, [(2, 32, 32, 3)]),
    ("block", "Encoder1DBlock", {"mlp_dim": 64, "num_heads": 2, "dropout_rate": 0.0,
                                 "attention_dropout_rate": 0.0}, [(10, 32)]),
]  # fmt: skip
MODELS = [(c, Golden(c).config["scenic_class"], Golden(c).config["constructor_kwargs"],
           [tuple(s["shape"][1:]) for s in Golden(c).config["inputs"]]) for c in CASES] + EXTRA  # fmt: skip


def _build(cls: str, kwargs: dict, shapes: list) -> torch.nn.Module:
    torch.manual_seed(0)
    model = tl.from_scenic(cls, kwargs, input_shapes=shapes)
    with torch.no_grad():  # Scenic zero-initialises some kernels; make every parameter matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _inputs(shapes: list, batch: int, mean: float = 0.0, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *s, generator=g) + mean for s in shapes]


@pytest.mark.parametrize("name, cls, kwargs, shapes", MODELS, ids=[m[0] for m in MODELS])
def test_fx_symbolic_trace_equals_eager(name, cls, kwargs, shapes):
    model = _build(cls, kwargs, shapes)
    gm = torch.fx.symbolic_trace(model)
    for batch, mean in [(2, 0.0), (3, 50.0)]:
        xs = _inputs(shapes, batch, mean)
        with torch.no_grad():
            torch.testing.assert_close(gm(*xs), model(*xs), rtol=0, atol=0)


def test_fx_leaf_blocks_and_shape_checks():
    """timm-style feature extraction (blocks as leaf modules) traces; a wrong input still gets the port's error."""

    class BlockLeaves(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
            return isinstance(m, (tl.Encoder1DBlock, tl.TokenFuser)) or super().is_leaf_module(m, qualname)

    model = _build("TokenLearnerViT", {**_VIT, "tokenizer": _TOK}, [(32, 32, 3)])
    gm = torch.fx.GraphModule(model, BlockLeaves().trace(model))
    targets = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"Transformer.encoderblock_0", "Transformer.encoderblock_1", "Transformer.TokenFuser_0"} <= targets
    x = torch.randn(2, 32, 32, 3)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    with pytest.raises(tl.ShapeError, match=r"expects \[B, H, W, C\]"):
        torch.fx.symbolic_trace(model)(torch.randn(2, 32, 32))


@pytest.mark.parametrize("name", ["vit_fuser", "vit_sampling", "encoder_fuser_video_t2"])
def test_jit_trace_equals_eager_on_other_inputs(name):
    """No branch taken by the example input is baked in: other batches and large means agree with eager."""
    _, cls, kwargs, shapes = next(m for m in MODELS if m[0] == name)
    model = _build(cls, kwargs, shapes).eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, tuple(_inputs(shapes, 2)), check_trace=False)
        for batch, mean in [(2, 0.0), (2, 50.0), (5, 100.0)]:
            xs = _inputs(shapes, batch, mean, seed=batch)
            torch.testing.assert_close(traced(*xs), model(*xs), rtol=1e-6, atol=1e-6)


def test_jit_trace_warns_nothing_from_the_shape_checks():
    """Every model configuration traces with TracerWarnings as errors (the shape checks compare traced sizes,
    which warned six times per ViT although the trace is exact), and a wrong example input still gets the
    port's ShapeError, naming the sizes as numbers."""
    import warnings

    for name, cls, kwargs, shapes in MODELS:
        model = _build(cls, kwargs, shapes).eval()
        xs = tuple(_inputs(shapes, 2))
        if name == "vit_sampling":
            # Not a check: the sampled frames' indices come from the clip length T, which the trace bakes in
            # (a clip of another length would take the example's frames): that warning is true, and stays.
            with pytest.warns(torch.jit.TracerWarning) as caught, torch.no_grad():
                torch.jit.trace(model, xs, check_trace=False)
            import inspect

            from tokenlearner_torch import models

            src, first = inspect.getsourcelines(models._sample_frames)
            where = {(w.filename, w.lineno) for w in caught if w.category is torch.jit.TracerWarning}
            assert where and all(f == models.__file__ and first <= n < first + len(src) for f, n in where), where
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("error", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.trace itself is deprecated (2.9+)
            with torch.no_grad():
                traced = torch.jit.trace(model, xs)  # check_trace=True: it re-runs and compares, too
        with torch.no_grad():
            torch.testing.assert_close(traced(*xs), model(*xs), rtol=0, atol=0, msg=name)
    vit = _build("TokenLearnerViT", {**_VIT, "tokenizer": _TOK}, [(32, 32, 3)]).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises(tl.ShapeError, match=r"covers \(16, 32\) \(tokens, channels\) but the input has \(25, 32\)"):
            torch.jit.trace(vit, (torch.randn(2, 40, 40, 3),))


@pytest.mark.parametrize("name", ["vit_fuser", "vit_video_3dconv"])
def test_export_dynamic_batch_1_to_256(name):
    from torch.export import Dim, export

    _, cls, kwargs, shapes = next(m for m in MODELS if m[0] == name)
    model = _build(cls, kwargs, shapes).eval()
    batch = Dim("batch", min=1, max=256)
    ep = export(model, tuple(_inputs(shapes, 4)), dynamic_shapes=({0: batch},))
    lo, hi = ep.range_constraints[next(iter(ep.range_constraints))].lower, None
    hi = ep.range_constraints[next(iter(ep.range_constraints))].upper
    assert (lo, hi) == (1, 256)
    for n, mean in [(1, 0.0), (16, 100.0), (256, 0.0)]:
        xs = _inputs(shapes, n, mean)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(*xs), model(*xs), rtol=1e-5, atol=1e-5)


def test_fx_channels_first_models():
    torch.manual_seed(0)
    vit = tl.TokenLearnerViT(**_VIT, tokenizer=_TOK, channels_first=True, input_shape=(3, 32, 32)).eval()
    v1 = tl.TokenLearnerModule(4, channels_first=True, input_shape=(16, 6, 6))
    fuser = tl.TokenFuser(channels_first=True, input_shapes=[(4, 16), (16, 6, 6)])
    for model, shapes in ((vit, [(3, 32, 32)]), (v1, [(16, 6, 6)]), (fuser, [(4, 16), (16, 6, 6)])):
        gm = torch.fx.symbolic_trace(model)
        xs = _inputs(shapes, 3, 20.0)
        with torch.no_grad():
            torch.testing.assert_close(gm(*xs), model(*xs), rtol=0, atol=0)
