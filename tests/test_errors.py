"""Bad input gets a clear error naming what was expected (where Scenic is confusing or silent)."""

from __future__ import annotations

import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.errors import ConfigError, ConversionError, ShapeError, TokenLearnerError

VIT = dict(num_classes=3, mlp_dim=32, num_layers=2, num_heads=2, hidden_size=16, representation_size=None)
TOK = {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 4, "tokenlearner_loc": 1, "use_tokenfuse": False}


def test_errors_are_value_errors():
    assert issubclass(TokenLearnerError, ValueError)


@pytest.mark.parametrize("shape", [(2, 50, 16), (1, 15, 8)])
def test_v1_non_square_tokens(shape):
    # Scenic: TypeError from a reshape ("cannot reshape array of shape (2, 50, 16)...").
    with pytest.raises(ShapeError, match=rf"N={shape[1]} is not a perfect square"):
        tl.TokenLearnerModule(4)(torch.zeros(shape))


@pytest.mark.parametrize(
    "module, shape, expected",
    [
        (tl.TokenLearnerModule(4), (2, 3, 4, 5, 6), r"\[B, H, W, C\] or \[B, H\*H, C\]"),
        (tl.TokenLearnerModuleV11(4), (2, 16), r"\[B, H, W, C\] or \[B, N, C\]"),
        (tl.TokenLearnerModuleV11(4, channels_first=True), (2, 3, 4, 5, 6), r"\[B, C, H, W\] or \[B, N, C\]"),
        (tl.EncoderMod(1, 8, 2), (2, 4, 4, 8), r"\[batch, tokens, channels\]"),
    ],
)
def test_wrong_rank(module, shape, expected):
    with pytest.raises(ShapeError, match=expected):
        module(torch.zeros(shape))


def test_vit_wrong_rank_names_layout():
    with pytest.raises(ShapeError, match=r"expects \[B, H, W, C\]"):
        tl.TokenLearnerViT(tokenizer=TOK, **VIT)(torch.zeros(1, 2, 8, 8, 3))
    video = {**TOK, "type": "video", "patches": {"size": [4, 4, 2]}, "temporal_encoding_config": {"method": "3d_conv"}}
    with pytest.raises(ShapeError, match=r"expects \[B, T, H, W, C\]"):
        tl.TokenLearnerViT(tokenizer=video, **VIT)(torch.zeros(1, 8, 8, 3))


def test_sequence_not_divisible_by_temporal_dimensions():
    # Scenic: TypeError from a reshape into [6, 5, 16].
    for cls in (tl.EncoderMod, tl.EncoderModFuser):
        m = cls(num_layers=2, mlp_dim=8, num_heads=2, tokenizer_type="video", temporal_dimensions=3, tokenlearner_loc=0)
        with pytest.raises(ShapeError, match="16 is not divisible by temporal_dimensions=3"):
            m(torch.zeros(2, 16, 16))


def test_unknown_classifier():
    # Scenic: KeyError: 'token' at call time.
    with pytest.raises(ConfigError, match=r"unknown classifier 'token'; expected one of 'gap', 'gmp', 'gsp'"):
        tl.TokenLearnerViT(tokenizer=TOK, classifier="token", **VIT)


def test_unknown_tokenizer_type():
    with pytest.raises(ConfigError, match=r"unknown tokenizer.type 'foo'; expected one of 'patch', 'dynamic', 'video'"):
        tl.TokenLearnerViT(tokenizer={**TOK, "type": "foo"}, **VIT)
    with pytest.raises(ConfigError, match="unknown tokenizer_type 'dynamc'"):
        tl.EncoderMod(1, 8, 2, tokenizer_type="dynamc")


def test_unknown_temporal_method():
    # Scenic: AssertionError: Unknown temporal encoding method.
    video = {**TOK, "type": "video", "temporal_encoding_config": {"method": "x"}}
    with pytest.raises(ConfigError, match=r"unknown temporal_encoding_config.method 'x'; expected one of '3d_conv', 'temporal_sampling'"):
        tl.TokenLearnerViT(tokenizer=video, **VIT)


def test_missing_use_tokenfuse_and_patch_size():
    tok = {k: v for k, v in TOK.items() if k != "use_tokenfuse"}
    with pytest.raises(ConfigError, match="tokenizer has no 'use_tokenfuse' entry"):
        tl.TokenLearnerViT(tokenizer=tok, **VIT)
    with pytest.raises(ConfigError, match="patches.size must have 3 entries"):
        video = {**TOK, "type": "video", "temporal_encoding_config": {"method": "3d_conv"}}
        tl.TokenLearnerViT(tokenizer=video, **VIT)
    with pytest.raises(ConfigError, match="needs 'n_sampled_frames'|no 'n_sampled_frames' entry"):
        video = {**TOK, "type": "video", "temporal_encoding_config": {"method": "temporal_sampling"}}
        tl.TokenLearnerViT(tokenizer=video, **VIT)


@pytest.mark.parametrize(
    "inputs, original",
    [((2, 4, 16), (3, 9, 16)), ((2, 4, 16), (2, 9, 24)), ((2, 4, 16), (2, 3, 3, 24))],
)
def test_tokenfuser_mismatched_inputs(inputs, original):
    # Scenic: a ValueError from einsum for the batch, and silently [2, 9, 16] for the channels.
    with pytest.raises(ShapeError, match="must agree in batch and channels"):
        tl.TokenFuser()(torch.zeros(inputs), torch.zeros(original))


def test_input_size_must_match_position_embedding():
    m = tl.EncoderMod(1, 8, 2)
    m(torch.zeros(1, 6, 8))
    with pytest.raises(ShapeError, match=r"position embedding covers \(6, 8\).*input has \(7, 8\)"):
        m(torch.zeros(1, 7, 8))


def test_heads_must_divide_channels():
    with pytest.raises(ShapeError, match=r"channels \(10\) must be divisible by num_heads \(4\)"):
        tl.Encoder1DBlock(16, 4)(torch.zeros(1, 3, 10))


def test_from_scenic_errors():
    with pytest.raises(ConfigError, match="unknown Scenic class 'TokenLearner'"):
        tl.from_scenic("TokenLearner", {})
    with pytest.raises(ConfigError, match=r"unknown constructor argument 'num_token'; did you mean 'num_tokens'\?"):
        tl.from_scenic("TokenLearnerModuleV11", {"num_token": 8})
    with pytest.raises(ConfigError, match="missing required argument.* num_tokens"):
        tl.from_scenic("TokenLearnerModuleV11", {})
    with pytest.raises(ConfigError, match="dtype must be one of"):
        tl.from_scenic("EncoderMod", {"num_layers": 1, "mlp_dim": 8, "num_heads": 2, "dtype": "int8"})


def test_conversion_lists_every_problem():
    from tokenlearner_torch.weights_convert import flax_to_torch

    m = tl.from_scenic("TokenLearnerModuleV11", {"num_tokens": 4})
    params = {
        "LayerNorm_0": {"scale": torch.ones(8).numpy()},  # bias missing
        "token_masking": {
            "Dense_0": {"kernel": torch.zeros(8, 64).numpy(), "bias": torch.zeros(64).numpy()},
            "Dense_1": {"kernel": torch.zeros(64, 4, 1).numpy(), "bias": torch.zeros(4).numpy()},  # wrong rank
        },
        "extra": {"kernel": torch.zeros(1).numpy()},
    }
    with pytest.raises(ConversionError) as info:
        flax_to_torch(m, params)
    text = str(info.value)
    assert "1 missing, 1 unexpected, 1 mis-shaped" in text
    assert "LayerNorm_0/bias" in text and "extra/kernel" in text and "token_masking/Dense_1/kernel" in text
    with pytest.raises(ConversionError, match="variables\\['params'\\]"):
        flax_to_torch(m, {"params": params})
