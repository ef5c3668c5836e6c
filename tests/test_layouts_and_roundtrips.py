"""channels_first inputs, train/eval semantics, and bitwise Flax <-> torch round trips."""

from __future__ import annotations

import copy

import ml_dtypes
import numpy as np
import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.weights_convert import flax_to_torch, torch_to_flax
from tokenlearner_torch.weights_convert.mapping import flatten_tree

from goldens import CASES, Golden

VIT = dict(num_classes=3, mlp_dim=32, num_layers=2, num_heads=2, hidden_size=16, representation_size=8)


def _pair(make):
    """The same module twice (same weights), channel-last and channels_first."""
    torch.manual_seed(0)
    a = make(False).eval()
    b = make(True).eval()
    return a, b


def _check(a, b, x_last, x_first, *rest):
    with torch.no_grad():
        a(x_last, *rest)  # materialise the lazy parameters, then share them
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x_last, *rest), b(x_first, *rest), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda cf: tl.TokenLearnerModule(4, channels_first=cf),
        lambda cf: tl.TokenLearnerModuleV11(4, channels_first=cf),
    ],
)
def test_token_learners_accept_nchw(make):
    x = torch.randn(2, 6, 5, 8) if "V11" in repr(make(False)) else torch.randn(2, 6, 6, 8)
    _check(*_pair(make), x, x.permute(0, 3, 1, 2))


def test_fuser_accepts_nchw_original():
    a, b = _pair(lambda cf: tl.TokenFuser(channels_first=cf))
    tokens, orig = torch.randn(2, 4, 8), torch.randn(2, 3, 5, 8)
    with torch.no_grad():
        a(tokens, orig)
        b.load_state_dict(a.state_dict())
        out = b(tokens, orig.permute(0, 3, 1, 2))
        assert out.shape == (2, 15, 8)  # Scenic quirk: [B, H*W, C] even for a 4-D original
        torch.testing.assert_close(a(tokens, orig), out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "tokenizer, shape",
    [
        ({"type": "dynamic", "patches": {"size": [4, 4]}}, (2, 8, 12, 3)),
        ({"type": "patch", "patches": {"size": [4, 4]}}, (2, 8, 12, 3)),
        ({"type": "video", "patches": {"size": [4, 4, 2]}, "temporal_encoding_config": {"method": "3d_conv"}},
         (2, 4, 8, 8, 3)),
        ({"type": "video", "patches": {"size": [4, 4]},
          "temporal_encoding_config": {"method": "temporal_sampling", "n_sampled_frames": 2}}, (2, 5, 8, 8, 3)),
    ],
)
def test_vit_accepts_channels_first(tokenizer, shape):
    tok = {**tokenizer, "num_tokens": 2, "tokenlearner_loc": 1, "use_tokenfuse": True}
    x = torch.randn(shape)
    x_first = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    _check(*_pair(lambda cf: tl.TokenLearnerViT(tokenizer=tok, channels_first=cf, **VIT)), x, x_first)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 3, 8, 8, 3)])
def test_representation_accepts_channels_first(shape):
    tok = {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 2, "tokenlearner_loc": 1, "use_tokenfuse": False}
    kw = dict(mlp_dim=32, num_layers=2, num_heads=2, tokenizer=tok, hidden_size=16, target_channel_dim=7)
    x = torch.randn(shape)
    x_first = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    a, b = _pair(lambda cf: tl.TokenLearnerViTRepresentation(channels_first=cf, **kw))
    _check(a, b, x, x_first)
    with torch.no_grad():
        t = shape[1] if len(shape) == 5 else 1
        assert a(x).shape == (2, t * 2, 16)


def test_from_scenic_is_deterministic_and_train_mode_drops_out():
    m = tl.from_scenic("EncoderMod", {"num_layers": 2, "mlp_dim": 16, "num_heads": 2, "tokenizer_type": "dynamic",
                                      "tokenlearner_loc": 1})
    assert not m.training  # Scenic's default deterministic call
    x = torch.randn(2, 9, 8)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x), rtol=0, atol=0)
        m.train()  # Scenic defaults: dropout_rate 0.1 and attention_dropout_rate 0.1
        assert not torch.equal(m(x), m(x))


@pytest.mark.parametrize("name", CASES)
def test_round_trip_is_bitwise(name):
    g = Golden(name)
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"])
    sd = flax_to_torch(model, g.params)
    model.load_state_dict(sd, strict=True)
    back = flatten_tree(torch_to_flax(model))
    ref = flatten_tree(g.params)
    assert back.keys() == ref.keys()
    for k, v in ref.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and back[k].tobytes() == v.tobytes(), k
    # ... and the other way round, from the model's own state dict.
    sd2 = flax_to_torch(model, torch_to_flax(model))
    assert all(torch.equal(sd2[k], v) for k, v in model.state_dict().items())


def test_round_trip_keeps_bfloat16_bitwise():
    g = Golden("vit_image_cls")
    params = {k: v.astype(ml_dtypes.bfloat16) for k, v in flatten_tree(g.params).items()}
    from tokenlearner_torch.weights_convert.mapping import unflatten_tree

    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"])
    sd = flax_to_torch(model, unflatten_tree(params))
    assert all(t.dtype == torch.bfloat16 for t in sd.values())
    back = flatten_tree(torch_to_flax(model, sd))
    assert all(back[k].dtype == ml_dtypes.bfloat16 and back[k].tobytes() == v.tobytes() for k, v in params.items())


def test_torch_to_flax_converts_gradients_and_demands_every_key():
    g = Golden("encoder_mod_image")
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"])
    model.load_state_dict(flax_to_torch(model, g.params))
    model(torch.from_numpy(g.inputs[0])).sum().backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    tree = torch_to_flax(model, grads)
    q = tree["encoderblock_0"]["MultiHeadDotProductAttention_0"]["query"]["kernel"]
    assert q.shape == (64, 4, 16)
    partial = dict(grads)
    partial.pop("encoder_norm.bias")
    partial["bogus"] = torch.zeros(1)
    with pytest.raises(tl.ConversionError, match=r"1 missing, 1 unexpected"):
        torch_to_flax(model, partial)


def test_lazy_model_cannot_be_exported_before_shapes_are_known():
    m = tl.TokenLearnerModuleV11(4)
    with pytest.raises(tl.ConversionError, match="not initialised yet"):
        torch_to_flax(m)
