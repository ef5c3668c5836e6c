"""Parameters that exist once the input shapes are known; clear errors while they are not."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch import nn

import tokenlearner_torch as tl
from tokenlearner_torch.errors import ConfigError, ShapeError
from tokenlearner_torch.shapes import lazy_parameter_names
from tokenlearner_torch.weights_convert import flax_to_torch

from goldens import CASES, Golden, scaled_error

SMALL_VIT = dict(
    num_classes=10, mlp_dim=64, num_layers=2, num_heads=2, hidden_size=32, representation_size=16,
    classifier="gap", dropout_rate=0.0, attention_dropout_rate=0.0,
    tokenizer=dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1,
                   use_tokenfuse=True, use_v11=True),
)  # fmt: skip


def _shapes(g: Golden) -> list[tuple[int, ...]]:
    return [tuple(spec["shape"][1:]) for spec in g.config["inputs"]]


@pytest.mark.parametrize("case", CASES)
def test_input_shapes_create_every_parameter_with_scenic_shapes(case):
    """Every golden config: built with its input shapes, the parameters exist and the Scenic checkpoint
    loads strictly into them (same names, same shapes), giving Scenic's output."""
    g = Golden(case)
    cfg = g.config
    model = tl.from_scenic(cfg["scenic_class"], cfg["constructor_kwargs"], input_shapes=_shapes(g))
    assert lazy_parameter_names(model) == []
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    converted = flax_to_torch(model, g.params)
    assert {k: tuple(v.shape) for k, v in converted.items()} == before
    model.load_state_dict(converted, strict=True)
    with torch.no_grad():
        out = model(*(torch.from_numpy(a) for a in g.inputs))
    assert scaled_error(out.numpy(), g.outputs["out"]) < 1e-4


@pytest.mark.parametrize("case", ["vit_image_cls", "fuser_4d_original", "encoder_fuser_video_t2", "v1_sum4d"])
def test_same_draws_as_a_lazy_first_call(case):
    """Built with shapes == built lazily then called once, under the same seed (documented RNG order)."""
    g = Golden(case)
    cfg = g.config
    xs = [torch.from_numpy(a) for a in g.inputs]
    torch.manual_seed(3)
    built = tl.from_scenic(cfg["scenic_class"], cfg["constructor_kwargs"], input_shapes=_shapes(g))
    torch.manual_seed(3)
    lazy = tl.from_scenic(cfg["scenic_class"], cfg["constructor_kwargs"])
    with torch.no_grad():
        lazy(*xs)
    a, b = built.state_dict(), lazy.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_constructor_forms():
    vit = tl.TokenLearnerViT(**SMALL_VIT, input_shape=(32, 32, 3))
    rep_kwargs = {k: v for k, v in SMALL_VIT.items() if k not in ("num_classes", "representation_size", "classifier")}
    rep = tl.TokenLearnerViTRepresentation(**rep_kwargs, target_channel_dim=32, input_shape=(2, 32, 32, 3))
    enc = tl.EncoderModFuser(2, 64, 2, tokenizer_type="video", temporal_dimensions=2, num_tokens=4,
                             tokenlearner_loc=1, input_shape=(2 * 16, 32))  # fmt: skip
    v11 = tl.TokenLearnerModuleV11(8, input_shape=(7, 7, 32))
    v1 = tl.TokenLearnerModule(4, channels_first=True, input_shape=(32, 6, 6))
    fuser = tl.TokenFuser(input_shapes=[(8, 32), (49, 32)])
    for m in (vit, rep, enc, v11, v1, fuser):
        assert lazy_parameter_names(m) == [], type(m).__name__
        assert sum(p.numel() for p in m.parameters()) > 0
    assert v1.Conv_0.weight.shape == (4, 32, 3, 3)
    assert fuser.Dense_0.weight.shape == (8, 8)
    assert rep(torch.randn(1, 2, 32, 32, 3)).shape == (1, 2 * 16, 32)  # with a fuser: every position
    # Scenic's initialisers: zero head, zero fuser mixing kernel, N(0, 0.02) position embedding.
    assert not vit.output_projection.weight.any() and not fuser.Dense_0.weight.any()
    pos = tl.TokenLearnerViT(**{**SMALL_VIT, "hidden_size": 256}, input_shape=(64, 64, 3)).Transformer.posembed_input
    assert 0.018 < float(pos.pos_embedding.detach().std()) < 0.022


def test_bad_input_shapes_are_named():
    with pytest.raises(ConfigError, match="positive ints"):
        tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=[(32, -1, 3)])
    with pytest.raises(ConfigError, match=r"list of shapes, one per input; got one shape \(32, 32, 3\): pass \[\(32, 32, 3\)\]"):
        tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=(32, 32, 3))
    with pytest.raises(ShapeError, match=r"input shapes \[\[32, 32\]\] do not fit.*\[B, H, W, C\]"):
        tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=[(32, 32)])
    with pytest.raises(ShapeError, match="do not fit"):
        tl.TokenFuser(input_shapes=[(8, 32), (49, 16)])


def test_lazy_model_errors_name_the_fix():
    model = tl.from_scenic("TokenFuser", {})
    hint = r"input_shapes=\[\.\.\.\]"
    with pytest.raises(ShapeError, match=r"fuser_mix_norm1\.weight.*" + hint):
        model.state_dict()
    # optimiser grouping by rank (timm, Scenic's `ndim != 1` mask) must not silently misfile lazy weights
    with pytest.raises(ShapeError, match=hint):
        [p for p in model.parameters() if p.ndim <= 1]
    with pytest.raises(ShapeError, match=hint):
        sum(p.numel() for p in model.parameters())
    with pytest.raises(ShapeError, match=hint):
        model.Dense_0.weight.shape
    vit = tl.from_scenic("TokenLearnerViT", SMALL_VIT)
    with pytest.raises(ShapeError, match=hint):
        vit.no_weight_decay()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_wrapping_of_a_lazy_model_fails_clearly():
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        # DDP checks for lazy parameters itself, before asking any shape: torch's own message, which names the fix
        with pytest.raises(RuntimeError, match="uninitialized parameters.*dummy forward"):
            nn.parallel.DistributedDataParallel(tl.from_scenic("TokenLearnerViT", SMALL_VIT))
        with pytest.raises(ShapeError, match=r"input_shapes=\[\.\.\.\]"):
            fully_shard(tl.from_scenic("TokenLearnerViT", SMALL_VIT))
        # built with shapes: both wrap without a warm-up forward
        nn.parallel.DistributedDataParallel(tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=[(32, 32, 3)]))
        fully_shard(tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=[(32, 32, 3)]))
    finally:
        dist.destroy_process_group()


def test_first_call_under_inference_mode_leaves_a_trainable_model():
    model = tl.from_scenic("TokenLearnerViT", SMALL_VIT).train()
    x = torch.randn(2, 32, 32, 3)
    with torch.inference_mode():
        model(x)
    assert not any(p.is_inference() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(x).square().sum().backward()
    opt.step()


def test_meta_build_to_empty_and_reinitialise():
    """meta -> to_empty -> reset_parameters: every parameter overwritten (the empty memory is filled with NaN
    first, so one that reset_parameters misses stays NaN) and drawn from its initialiser: constants exactly,
    random ones with the spread of a model built normally (same initialisers, another draw)."""
    with torch.device("meta"):
        model = tl.TokenLearnerViT(**SMALL_VIT, input_shape=(32, 32, 3))
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(1)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    torch.manual_seed(2)
    ref = tl.TokenLearnerViT(**SMALL_VIT, input_shape=(32, 32, 3))
    got, want = model.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    for name, w in want.items():
        g = got[name]
        assert torch.isfinite(g).all(), f"{name} was not reinitialised"
        if w.numel() == 1 or torch.all(w == w.flatten()[0]):  # a constant initialiser (zeros, ones)
            assert torch.equal(g, w), name
        else:  # the same distribution, another draw: spread within a factor 1.5 (2 or 4 for small tensors)
            ratio = (g.double().std() / w.double().std()).item()
            bound = 1.5 if w.numel() >= 64 else (2.0 if w.numel() >= 16 else 4.0)
            assert 1 / bound < ratio < bound, f"{name}: std {g.std():.3g} vs {w.std():.3g}"
            assert not torch.equal(g, w), name
    assert model(torch.randn(1, 32, 32, 3)).shape == (1, 10)


def test_ema_and_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_model, save_model

    model = tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=[(32, 32, 3)])
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
    ema.update_parameters(model)  # the first update copies the parameters
    first = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ema.update_parameters(model)  # then ema = 0.9 * ema + 0.1 * model, by hand
    averaged = dict(ema.module.named_parameters())
    assert len(averaged) == len(first)
    for k, p in model.named_parameters():
        torch.testing.assert_close(averaged[k], 0.9 * first[k] + 0.1 * p.detach(), rtol=1e-6, atol=1e-6)
    x = torch.randn(2, 32, 32, 3)
    assert ema(x).shape == (2, 10)
    save_model(model, str(tmp_path / "m.safetensors"))
    fresh = tl.from_scenic("TokenLearnerViT", SMALL_VIT, input_shapes=[(32, 32, 3)])
    load_model(fresh, str(tmp_path / "m.safetensors"))
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_bfloat16_folder_runs_via_load_pretrained(tmp_path):
    from tokenlearner_torch.weights_convert.convert import convert

    g = Golden("vit_image_cls")
    convert(g.dir / "params.msgpack", tmp_path / "bf16", config=g.dir / "config.json", dtype="bfloat16")
    model = tl.load_pretrained(tmp_path / "bf16")
    assert lazy_parameter_names(model) == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = model(torch.from_numpy(g.inputs[0]).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    ref = g.outputs["out"]
    assert np.abs(out.float().numpy() - ref).max() <= 0.05 * max(1.0, np.abs(ref).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_models_run_after_to_dtype(dtype):
    g = Golden("vit_image_cls")
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"], input_shapes=_shapes(g))
    model.load_state_dict(flax_to_torch(model, g.params))
    model.to(dtype)
    with torch.no_grad():
        out = model(torch.from_numpy(g.inputs[0]).to(dtype))
    assert out.dtype == dtype
    ref = g.outputs["out"]
    # test_deploy's tolerances for the same dtypes: 1e-2 for float16 (10 mantissa bits), 5e-2 for bfloat16 (7)
    tol = 1e-2 if dtype == torch.float16 else 5e-2
    assert np.abs(out.float().numpy() - ref).max() <= tol * max(1.0, np.abs(ref).max())


def test_laziness_is_remembered_only_once_every_parameter_exists():
    """is_lazy() runs in every forward, so a module remembers that it has no lazy parameter left; a module
    that still has one keeps answering True, and a load_state_dict or first call turns it False."""
    from tokenlearner_torch.layers import Dense

    d = Dense(4)
    assert d.is_lazy() and d.is_lazy()  # asked twice: nothing remembered while lazy
    d.load_state_dict({"weight": torch.ones(4, 3), "bias": torch.zeros(4)})
    assert not d.is_lazy() and d.__dict__.get("_materialized") is True
    model = tl.from_scenic("TokenLearnerViT", SMALL_VIT)
    dense = [m for m in model.modules() if isinstance(m, Dense)]
    assert any(m.is_lazy() for m in dense)
    model(torch.randn(2, 32, 32, 3))
    assert not any(m.is_lazy() for m in dense) and not lazy_parameter_names(model)


def test_dropout_outside_training_is_the_identity():
    from tokenlearner_torch.layers import Dropout

    drop, x = Dropout(0.5), torch.randn(3, 4)
    assert drop.eval()(x) is x and Dropout(0.0).train()(x) is x
    out = drop.train()(x)
    assert out is not x and ((out == 0) | torch.isclose(out, 2 * x)).all()
