"""Initialisers: training from scratch in PyTorch starts from Scenic's distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.weights_convert import torch_to_flax
from tokenlearner_torch.weights_convert.mapping import flatten_tree

from goldens import CASES, Golden

TRUNC_STD = 0.87962566103423978  # std of a standard normal truncated to [-2, 2]


def materialised(name: str, seed: int = 0):
    g = Golden(name)
    torch.manual_seed(seed)
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"])
    with torch.no_grad():
        model(*[torch.from_numpy(a) for a in g.inputs])
    return g, flatten_tree(torch_to_flax(model))


@pytest.mark.parametrize("name", CASES)
def test_zero_initialised_exactly_where_scenic_is(name):
    g, flat = materialised(name)
    zero = set(g.config["scenic_zero_initialized_params"])
    assert set(flat) == {k[len("params/"):] for k in g.config["param_shapes"]}
    for path, value in flat.items():
        if path in zero:
            assert not value.any(), path
        elif not path.endswith("scale"):
            assert value.std() > 0, path
        else:
            assert (value == 1).all(), path  # LayerNorm scales start at one


def _uniform_ok(w: np.ndarray, limit: float) -> None:
    assert np.abs(w).max() <= limit
    assert abs(w.std() - limit / math.sqrt(3)) < 0.05 * limit / math.sqrt(3)


def _trunc_normal_ok(w: np.ndarray, fan_in: int) -> None:
    std = math.sqrt(1.0 / fan_in)  # lecun_normal: the *truncated* distribution has variance 1/fan_in
    assert np.abs(w).max() <= 2 * std / TRUNC_STD + 1e-7
    assert abs(w.std() - std) < 0.05 * std
    assert np.abs(w).max() > 1.5 * std  # truncated at 2 sigma of the wider normal, not at 1


def test_vit_initialisers_match_scenic():
    torch.manual_seed(0)
    tokenizer = {"type": "dynamic", "patches": {"size": [8, 8]}, "num_tokens": 8, "tokenlearner_loc": 1,
                 "use_tokenfuse": True}
    model = tl.TokenLearnerViT(num_classes=10, mlp_dim=512, num_layers=2, num_heads=4, tokenizer=tokenizer,
                               hidden_size=256, representation_size=128)
    with torch.no_grad():
        model(torch.zeros(1, 64, 64, 3))
    f = flatten_tree(torch_to_flax(model))
    block = "Transformer/encoderblock_0"
    # MlpBlock: xavier-uniform kernels, N(0, 1e-6) biases.
    _uniform_ok(f[f"{block}/MlpBlock_0/Dense_0/kernel"], math.sqrt(6 / (256 + 512)))
    b = f[f"{block}/MlpBlock_0/Dense_0/bias"]
    assert 0.8e-6 < b.std() < 1.2e-6
    # Attention: xavier-uniform on the flattened DenseGeneral kernels, zero biases.
    _uniform_ok(f[f"{block}/MultiHeadDotProductAttention_0/query/kernel"], math.sqrt(6 / (256 + 256)))
    _uniform_ok(f[f"{block}/MultiHeadDotProductAttention_0/out/kernel"], math.sqrt(6 / (256 + 256)))
    assert not f[f"{block}/MultiHeadDotProductAttention_0/query/bias"].any()
    # Patch embedding and pre_logits: Flax defaults (lecun-normal, truncated), zero bias.
    _trunc_normal_ok(f["embedding/kernel"], 8 * 8 * 3)
    assert not f["embedding/bias"].any()
    _trunc_normal_ok(f["pre_logits/kernel"], 256)
    # Position embeddings N(0, 0.02), untruncated.
    pe = f["Transformer/posembed_input/pos_embedding"]
    assert abs(pe.std() - 0.02) < 0.002 and np.abs(pe).max() > 2.5 * 0.02
    # Zero-initialised: TokenFuser mixing Dense and the classifier head.
    assert not f["Transformer/TokenFuser_0/Dense_0/kernel"].any()
    assert not f["output_projection/kernel"].any() and not f["output_projection/bias"].any()
    # TokenLearner V1.1 and the fuser's mask use MlpBlocks too.
    _uniform_ok(f["Transformer/TokenLearnerModuleV11_0/token_masking/Dense_0/kernel"], math.sqrt(6 / (256 + 64)))


def test_v1_convolutions_are_lecun_normal_without_bias():
    torch.manual_seed(0)
    m = tl.TokenLearnerModule(num_tokens=64)
    with torch.no_grad():
        m(torch.zeros(1, 8, 8, 128))
    f = flatten_tree(torch_to_flax(m))
    assert set(f) == {"LayerNorm_0/scale", "LayerNorm_0/bias"} | {f"Conv_{i}/kernel" for i in range(4)}
    _trunc_normal_ok(f["Conv_0/kernel"], 3 * 3 * 128)
    _trunc_normal_ok(f["Conv_3/kernel"], 3 * 3 * 64)


@pytest.mark.parametrize("method", ["central_frame_initializer", "average_frame_initializer", None])
def test_video_embedding_initialisers(method):
    torch.manual_seed(0)
    tokenizer = {"type": "video", "patches": {"size": [4, 4, 3]}, "num_tokens": 2, "tokenlearner_loc": 0,
                 "use_tokenfuse": False, "temporal_encoding_config": {"method": "3d_conv", "kernel_init_method": method}}
    model = tl.TokenLearnerViT(num_classes=3, mlp_dim=32, num_layers=1, num_heads=2, tokenizer=tokenizer,
                               hidden_size=128, representation_size=None)
    with torch.no_grad():
        model(torch.zeros(1, 6, 8, 8, 3))
    k = flatten_tree(torch_to_flax(model))["embedding/kernel"]  # Flax [kt, kh, kw, c_in, c_out] = [3, 4, 4, 3, 128]
    assert k.shape == (3, 4, 4, 3, 128)
    if method == "central_frame_initializer":
        # Scenic quirk: zeroes along axis 2 (patch width) around index kt // 2 = 1, not along time.
        keep = 3 // 2
        assert not np.delete(k, keep, axis=2).any()
        assert k[:, :, keep].std() > 0 and all(k[t].std() > 0 for t in range(3))
    elif method == "average_frame_initializer":
        assert all(np.array_equal(k[0], k[t]) for t in range(3))
    else:
        _trunc_normal_ok(k, 3 * 4 * 4 * 3)


def test_initialisation_is_seeded_by_torch():
    a = materialised("vit_image_cls", seed=1)[1]
    b = materialised("vit_image_cls", seed=1)[1]
    c = materialised("vit_image_cls", seed=2)[1]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["embedding/kernel"], c["embedding/kernel"])
