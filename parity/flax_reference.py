"""The project's own Flax reference of Scenic's TokenLearner modules.

This file holds ``flax.linen`` modules that compute what Scenic's
``scenic/projects/token_learner/model.py`` (and the ViT / attention layers it imports) computes, with the
same parameter tree and the same Flax auto-naming (``TokenLearnerModuleV11_0``, ``TokenFuser_1``,
``MlpBlock_0``, ``StochasticDepth_1``, ...). It exists so that the parity harness can run its Flax side
without Scenic installed (Scenic is not on PyPI; the PyPI package called ``scenic`` is unrelated).

It is an independent implementation: it was written from the behaviour recorded in the golden cases
(``tests/fixtures/goldens``: ``param_shapes``, ``intermediates``, ``notes``) and in
``SCENIC_BEHAVIOUR.md``, not from Scenic's source. The goldens tie it to genuine Scenic:
``tests/test_flax_reference.py`` checks that every golden's parameter tree, output, every captured
intermediate and every gradient are reproduced.

Public API
----------
* the modules: ``MlpBlock``, ``AddPositionEmbs``, ``StochasticDepth``, ``IdentityLayer``,
  ``Encoder1DBlock``, ``TokenLearnerModule``, ``TokenLearnerModuleV11``, ``TokenFuser``, ``EncoderMod``,
  ``EncoderModFuser``, ``TokenLearnerViT``, ``TokenLearnerViTRepresentation``;
* ``build_flax_module(scenic_class, constructor_kwargs)``: this project's reference from a golden's
  ``config.json`` fields;
* ``genuine_scenic_available()`` / ``build_reference_module(...)``: genuine Scenic when it is importable,
  this reference otherwise (``genuine_scenic_origin()``: the file it came from;
  ``genuine_scenic_unavailable_reason()``: why an installed ``scenic`` was not used;
  ``forget_genuine_scenic()``: drop the cached answer);
* ``apply_reference(...)`` / ``reference_grads(...)``: run a module the way the goldens were produced
  (``jax.jit``, ``jax_default_matmul_precision='highest'``, float32, deterministic).

Conventions: NHWC images, ``[n, t, h, w, c]`` videos, tokens ``[batch, tokens, channels]``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tokenlearner_torch.weights_convert.mapping import flatten_tree

Array = jax.Array
Initializer = Callable[..., Array]

__all__ = [
    "AddPositionEmbs",
    "Encoder1DBlock",
    "EncoderMod",
    "EncoderModFuser",
    "IdentityLayer",
    "MlpBlock",
    "StochasticDepth",
    "TokenFuser",
    "TokenLearnerModule",
    "TokenLearnerModuleV11",
    "TokenLearnerViT",
    "TokenLearnerViTRepresentation",
    "apply_reference",
    "average_frame_initializer",
    "build_flax_module",
    "build_reference_module",
    "central_frame_initializer",
    "forget_genuine_scenic",
    "genuine_scenic_available",
    "genuine_scenic_origin",
    "genuine_scenic_unavailable_reason",
    "reference_grads",
    "reference_outputs",
    "sample_frames_uniformly",
]

# The dropout / stochastic-depth rates are the Scenic defaults; the goldens always pass them explicitly.
_DEFAULT_DROPOUT = 0.1


# ----------------------------------------------------------------------------------------------------------
# Config access: Scenic's `tokenizer` is an ml_collections.ConfigDict; accept plain (nested) dicts too.
# ----------------------------------------------------------------------------------------------------------
class _Config:
    """Read-only attribute access over a (nested) mapping, like ``ml_collections.ConfigDict``.

    A missing field raises ``AttributeError`` (as ConfigDict does), ``get`` gives a default.
    """

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]):
        object.__setattr__(self, "_data", dict(data))

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name not in data:
            raise AttributeError(f"tokenizer config has no field {name!r} (fields: {sorted(data)})")
        return _as_config(data[name])

    def __getitem__(self, name: str) -> Any:
        return _as_config(self._data[name])

    def __contains__(self, name: object) -> bool:
        return name in self._data

    def get(self, name: str, default: Any = None) -> Any:
        return _as_config(self._data[name]) if name in self._data else default

    def __repr__(self) -> str:
        return f"_Config({self._data!r})"


def _as_config(value: Any) -> Any:
    """Wrap mappings (dict, FrozenDict) for attribute access; leave ConfigDicts and scalars alone."""
    if isinstance(value, _Config):
        return value
    if isinstance(value, Mapping):
        return _Config(value)
    return value


# ----------------------------------------------------------------------------------------------------------
# Generic layers (Scenic's attention_layers / nn_layers / baselines.vit)
# ----------------------------------------------------------------------------------------------------------
class IdentityLayer(nn.Module):
    """Returns its input. Exists so that ``capture_intermediates`` records a named point (``mlp1``,
    ``mlp2``, ``pre_logits``) and so that a parameter-free ``pre_logits`` keeps Scenic's tree."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return x


class StochasticDepth(nn.Module):
    """Drop-path on whole examples. Identity when ``deterministic`` or ``rate == 0``.

    Scenic's Encoder1DBlock holds two of these (``StochasticDepth_0/1``, captured as intermediates in the
    goldens) and, in TokenLearner models, always runs them with rate 0.
    """

    rate: float = 0.0

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = False) -> Array:
        if deterministic or not self.rate:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MlpBlock(nn.Module):
    """Dense -> act -> ``mlp1`` -> Dropout -> Dense -> ``mlp2`` -> Dropout.

    inputs ``[..., c]`` -> ``[..., out_dim or c]``. ``mlp1`` / ``mlp2`` are identity layers so that the
    captured intermediates carry the post-activation and the pre-dropout output, as in Scenic.
    """

    mlp_dim: int
    out_dim: int | None = None
    dropout_rate: float = _DEFAULT_DROPOUT
    use_bias: bool = True
    kernel_init: Initializer = nn.initializers.xavier_uniform()
    bias_init: Initializer = nn.initializers.normal(stddev=1e-6)
    activation_fn: Callable[[Array], Array] = nn.gelu  # tanh approximation
    precision: Any = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
        out_dim = inputs.shape[-1] if self.out_dim is None else self.out_dim
        dense = functools.partial(
            nn.Dense,
            dtype=self.dtype,
            use_bias=self.use_bias,
            kernel_init=self.kernel_init,
            bias_init=self.bias_init,
            precision=self.precision,
        )
        x = dense(self.mlp_dim)(inputs)
        x = IdentityLayer(name="mlp1")(self.activation_fn(x))
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = dense(out_dim)(x)
        x = IdentityLayer(name="mlp2")(x)
        return nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)


class AddPositionEmbs(nn.Module):
    """Adds a learned position embedding: ``[b, n, c] + pos_embedding[1, n, c]``."""

    posemb_init: Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        if inputs.ndim != 3:
            raise ValueError(f"AddPositionEmbs expects [batch, tokens, channels], got {inputs.shape}")
        shape = (1, inputs.shape[1], inputs.shape[2])
        return inputs + self.param("pos_embedding", self.posemb_init, shape, inputs.dtype)


class Encoder1DBlock(nn.Module):
    """Pre-LN ViT block. ``[b, n, c]`` -> ``[b, n, c]``.

    ``dtype`` is the computation dtype of the LayerNorms, attention and MLP; the residual additions
    promote back to the dtype of ``inputs`` (this is how Scenic's bf16 models keep a float32 stream).
    """

    mlp_dim: int
    num_heads: int
    dtype: Any = jnp.float32
    dropout_rate: float = _DEFAULT_DROPOUT
    attention_dropout_rate: float = _DEFAULT_DROPOUT
    stochastic_depth: float = 0.0

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool) -> Array:
        if inputs.ndim != 3:
            raise ValueError(f"Encoder1DBlock expects [batch, tokens, channels], got {inputs.shape}")
        x = nn.LayerNorm(dtype=self.dtype)(inputs)
        x = nn.MultiHeadDotProductAttention(
            num_heads=self.num_heads,
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            broadcast_dropout=False,
            dropout_rate=self.attention_dropout_rate,
        )(x, x, deterministic=deterministic)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)
        x = StochasticDepth(rate=self.stochastic_depth)(x, deterministic)
        x = x + inputs

        y = nn.LayerNorm(dtype=self.dtype)(x)
        y = MlpBlock(
            mlp_dim=self.mlp_dim,
            dtype=self.dtype,
            dropout_rate=self.dropout_rate,
            activation_fn=nn.gelu,
            kernel_init=nn.initializers.xavier_uniform(),
            bias_init=nn.initializers.normal(stddev=1e-6),
        )(y, deterministic=deterministic)
        y = StochasticDepth(rate=self.stochastic_depth)(y, deterministic)
        return y + x


# ----------------------------------------------------------------------------------------------------------
# TokenLearner and TokenFuser
# ----------------------------------------------------------------------------------------------------------
class TokenLearnerModule(nn.Module):
    """TokenLearner v1: ``[b, h, w, c]`` or square ``[b, h*w, c]`` -> ``[b, num_tokens, c]``.

    LayerNorm -> 3 x (Conv3x3 SAME, no bias -> gelu) -> Conv3x3 -> sigmoid gives one spatial mask per
    token; each token pools the *raw* (un-normalized) input with its mask (sum, or mean over h*w).
    """

    num_tokens: int
    use_sum_pooling: bool = True

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        if inputs.ndim == 3:
            n, hw, c = inputs.shape
            h = int(np.sqrt(hw))
            # Scenic quirk: Scenic reshapes to [n, h, h, c] before its squareness check, so a non-square
            # input dies in the reshape with a TypeError. The reference raises the intended error instead.
            if h * h != hw:
                raise ValueError(
                    f"TokenLearnerModule (v1) needs a square token grid; got {hw} tokens "
                    f"(input shape {inputs.shape})."
                )
            inputs = jnp.reshape(inputs, (n, h, h, c))
        if inputs.ndim != 4:
            raise ValueError(f"TokenLearnerModule expects [b, h, w, c] or [b, h*w, c], got {inputs.shape}")
        n, h, w, c = inputs.shape

        selected = nn.LayerNorm()(inputs)
        for _ in range(3):
            selected = nn.Conv(self.num_tokens, (3, 3), strides=(1, 1), padding="SAME", use_bias=False)(
                selected
            )
            selected = nn.gelu(selected)
        selected = nn.Conv(self.num_tokens, (3, 3), strides=(1, 1), padding="SAME", use_bias=False)(selected)
        selected = jnp.reshape(selected, (n, h * w, self.num_tokens))
        selected = jnp.transpose(selected, (0, 2, 1))  # [n, num_tokens, h*w]
        selected = nn.sigmoid(selected)[..., None]  # [n, num_tokens, h*w, 1]

        feat = jnp.reshape(inputs, (n, h * w, c))[:, None, ...]  # [n, 1, h*w, c]
        if self.use_sum_pooling:
            return jnp.sum(feat * selected, axis=2)
        return jnp.mean(feat * selected, axis=2)


class TokenLearnerModuleV11(nn.Module):
    """TokenLearner v1.1: ``[b, h, w, c]`` or ``[b, n, c]`` (any n) -> ``[b, num_tokens, c]``.

    LayerNorm -> MlpBlock ``token_masking`` (c -> bottleneck -> num_tokens) -> softmax over positions;
    tokens are the mask-weighted sums of the raw (un-normalized) inputs.
    """

    num_tokens: int
    bottleneck_dim: int = 64
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, inputs: Array, deterministic: bool) -> Array:
        if inputs.ndim == 4:
            n, h, w, c = inputs.shape
            inputs = jnp.reshape(inputs, (n, h * w, c))
        if inputs.ndim != 3:
            raise ValueError(f"TokenLearnerModuleV11 expects 3D or 4D input, got {inputs.shape}")
        batch, _, channels = inputs.shape

        selected = nn.LayerNorm()(inputs)
        selected = MlpBlock(
            mlp_dim=self.bottleneck_dim,
            out_dim=self.num_tokens,
            dropout_rate=self.dropout_rate,
            activation_fn=nn.gelu,
            name="token_masking",
        )(selected, deterministic=deterministic)  # [b, n, num_tokens]
        selected = jnp.reshape(selected, (batch, -1, self.num_tokens))
        selected = jnp.transpose(selected, (0, 2, 1))  # [b, num_tokens, n]
        selected = jax.nn.softmax(selected, axis=-1)

        feat = jnp.reshape(inputs, (batch, -1, channels))
        return jnp.einsum("...si,...id->...sd", selected, feat)


class TokenFuser(nn.Module):
    """Maps tokens back onto the positions of ``original``.

    inputs ``[b, s, c]`` (tokens), original ``[b, h*w, c]`` or ``[b, h, w, c]`` -> ``[b, h*w, c]``.
    Tokens are mixed by a Dense over the token axis (zero-initialized); a sigmoid mask computed from
    LayerNorm(original) by the MlpBlock ``token_masking`` gives, per position, the weight of each token.
    """

    use_normalization: bool = True
    bottleneck_dim: int = 64
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, inputs: Array, original: Array, deterministic: bool) -> Array:
        num_tokens = inputs.shape[-2]
        if original.ndim == 4:
            n, h, w, c = original.shape
            original = jnp.reshape(original, (n, h * w, c))
        # Scenic quirk: Scenic promises the shape of `original` but its reshape-back-to-4D test looks at the
        # already flattened tensor, so the output is always [b, h*w, c]. Reproduced. Likewise there is no
        # check that the channels of `inputs` and `original` agree (the output follows `inputs`).

        if self.use_normalization:
            inputs = nn.LayerNorm(name="fuser_mix_norm1")(inputs)
        inputs = jnp.transpose(inputs, (0, 2, 1))  # [b, c, s]
        inputs = nn.Dense(num_tokens, kernel_init=nn.initializers.zeros)(inputs)
        inputs = jnp.transpose(inputs, (0, 2, 1))  # [b, s, c]
        if self.use_normalization:
            inputs = nn.LayerNorm(name="fuser_mix_norm2")(inputs)

        original = nn.LayerNorm()(original)
        mix = MlpBlock(
            mlp_dim=self.bottleneck_dim,
            out_dim=num_tokens,
            dropout_rate=self.dropout_rate,
            name="token_masking",
        )(original, deterministic=deterministic)  # [b, h*w, s]
        mix = nn.sigmoid(mix)

        fused = jnp.einsum("...sc,...hs->...hc", inputs, mix)
        return nn.Dropout(rate=self.dropout_rate)(fused, deterministic=deterministic)


# ----------------------------------------------------------------------------------------------------------
# Encoders
# ----------------------------------------------------------------------------------------------------------
def _fold_frames(x: Array, tokenizer_type: str, temporal_dimensions: int) -> Array:
    """Video: ``[n, t*hw, c]`` -> ``[n*t, hw, c]`` so a TokenLearner runs per frame; otherwise identity."""
    if tokenizer_type != "video":
        return x
    n, thw, c = x.shape
    # Scenic quirk: no divisibility check; an indivisible token count fails inside the reshape.
    return jnp.reshape(x, (n * temporal_dimensions, thw // temporal_dimensions, c))


def _unfold_frames(x: Array, tokenizer_type: str, temporal_dimensions: int) -> Array:
    """Video: ``[n*t, s, c]`` -> ``[n, t*s, c]``; otherwise identity."""
    if tokenizer_type != "video":
        return x
    nt, s, c = x.shape
    return jnp.reshape(x, (nt // temporal_dimensions, temporal_dimensions * s, c))


class EncoderMod(nn.Module):
    """ViT encoder with one TokenLearner before ``encoderblock_<tokenlearner_loc>``.

    ``[b, n, c]`` -> ``[b, t*num_tokens, c]`` (``[b, n, c]`` when no TokenLearner runs: ``tokenizer_type``
    'patch' or ``tokenlearner_loc >= num_layers``).
    """

    # Scenic's field order and defaults (tokenizer_type 'patch', tokenlearner_loc 12).
    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = _DEFAULT_DROPOUT
    attention_dropout_rate: float = _DEFAULT_DROPOUT
    tokenizer_type: str = "patch"
    temporal_dimensions: int = 1
    num_tokens: int = 8
    tokenlearner_loc: int = 12
    use_v11: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, *, train: bool) -> Array:
        if inputs.ndim != 3:
            raise ValueError(f"EncoderMod expects [batch, tokens, channels], got {inputs.shape}")
        deterministic = not train
        x = AddPositionEmbs(name="posembed_input")(inputs)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)

        # Scenic quirk: a single TokenLearner location; a location >= num_layers silently applies none.
        tl_locs = [] if self.tokenizer_type == "patch" else [self.tokenlearner_loc]
        for lyr in range(self.num_layers):
            if lyr in tl_locs:
                x = _fold_frames(x, self.tokenizer_type, self.temporal_dimensions)
                if self.use_v11:
                    # Scenic quirk: the TokenLearner's dropout is the encoder's dropout_rate.
                    x = TokenLearnerModuleV11(self.num_tokens, dropout_rate=self.dropout_rate)(
                        x, deterministic=deterministic
                    )
                else:
                    x = TokenLearnerModule(self.num_tokens)(x)
                x = _unfold_frames(x, self.tokenizer_type, self.temporal_dimensions)
            x = Encoder1DBlock(
                mlp_dim=self.mlp_dim,
                num_heads=self.num_heads,
                dtype=self.dtype,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                name=f"encoderblock_{lyr}",
            )(x, deterministic=deterministic)
        return nn.LayerNorm(name="encoder_norm")(x)


class EncoderModFuser(nn.Module):
    """ViT encoder with a TokenLearner + TokenFuser around every block from ``tokenlearner_loc`` on.

    ``[b, n, c]`` -> ``[b, n, c]``: at layer ``lyr >= tokenlearner_loc``,
    ``x = TokenFuser(block(TL(x)), x) + x`` (per frame for video).
    """

    # Scenic's field order and defaults (tokenizer_type 'patch', tokenlearner_loc 12).
    num_layers: int
    mlp_dim: int
    num_heads: int
    dropout_rate: float = _DEFAULT_DROPOUT
    attention_dropout_rate: float = _DEFAULT_DROPOUT
    tokenizer_type: str = "patch"
    temporal_dimensions: int = 1
    num_tokens: int = 8
    tokenlearner_loc: int = 12
    use_v11: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, *, train: bool) -> Array:
        if inputs.ndim != 3:
            raise ValueError(f"EncoderModFuser expects [batch, tokens, channels], got {inputs.shape}")
        deterministic = not train
        x = AddPositionEmbs(name="posembed_input")(inputs)
        x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=deterministic)

        first = self.num_layers if self.tokenizer_type == "patch" else self.tokenlearner_loc
        for lyr in range(self.num_layers):
            block = Encoder1DBlock(
                mlp_dim=self.mlp_dim,
                num_heads=self.num_heads,
                dtype=self.dtype,
                dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                name=f"encoderblock_{lyr}",
            )
            if lyr < first:
                x = block(x, deterministic=deterministic)
                continue
            # Scenic quirk: a *fresh* TokenLearner and TokenFuser at every such layer (auto-named
            # TokenLearnerModuleV11_{lyr-loc} / TokenFuser_{lyr-loc}), always with their default sizes
            # (bottleneck 64, use_normalization=True) whatever the model size; both take the encoder's
            # dropout_rate (scenic/projects/token_learner/model.py, EncoderModFuser).
            residual = _fold_frames(x, self.tokenizer_type, self.temporal_dimensions)  # [n*t, hw, c]
            if self.use_v11:
                y = TokenLearnerModuleV11(self.num_tokens, dropout_rate=self.dropout_rate)(
                    residual, deterministic=deterministic)
            else:
                y = TokenLearnerModule(self.num_tokens)(residual)
            y = _unfold_frames(y, self.tokenizer_type, self.temporal_dimensions)  # [n, t*s, c]
            y = block(y, deterministic=deterministic)
            y = _fold_frames(y, self.tokenizer_type, self.temporal_dimensions)  # [n*t, s, c]
            y = TokenFuser(dropout_rate=self.dropout_rate)(y, residual, deterministic=deterministic)  # [n*t, hw, c]
            x = _unfold_frames(y + residual, self.tokenizer_type, self.temporal_dimensions)
        return nn.LayerNorm(name="encoder_norm")(x)


# ----------------------------------------------------------------------------------------------------------
# Video tokenization (ViViT's temporal encodings, as TokenLearnerViT uses them)
# ----------------------------------------------------------------------------------------------------------
def sample_frames_uniformly(x: Array, n_sampled_frames: int) -> Array:
    """Picks ``n_sampled_frames`` evenly spaced frames: ``[n, t, h, w, c]`` -> ``[n, t_s, h, w, c]``.

    Indices ``round(arange(t/(k+1), t, t/(k+1)))`` clipped to ``t-1`` (e.g. t=5, k=2 -> frames [2, 3]),
    or every frame when ``k >= t``. ``round`` is round-half-to-even, as in numpy / jax.
    """
    t = x.shape[1]
    if n_sampled_frames < t:
        start = step = t / (n_sampled_frames + 1)
    else:
        start, step = 0.0, 1.0
    indices = np.minimum(np.round(np.arange(start, t, step)).astype(np.int32), t - 1)
    return x[:, indices]


def central_frame_initializer(base: Initializer = nn.initializers.lecun_normal()) -> Initializer:
    """Init of a ``(kt, kh, kw, c_in, c_out)`` kernel that keeps one slice, zeroing the rest.

    Scenic quirk: the slice kept is index ``shape[0] // 2`` (half the *time* size) but it is taken along
    axis 2 (the patch *width*), so e.g. for ``(2, 8, 8, 3, 64)`` only width column 1 stays nonzero, in
    every time slice (87.5% zeros). Init only; the goldens record the nonzero indices.
    """

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        if len(shape) != 5:
            raise ValueError(f"central_frame_initializer needs a 5D kernel, got shape {tuple(shape)}")
        kernel = base(key, shape, dtype)
        keep = shape[0] // 2
        mask = (jnp.arange(shape[2]) == keep).reshape(1, 1, shape[2], 1, 1)
        return jnp.where(mask, kernel, jnp.zeros_like(kernel))

    return init


def average_frame_initializer(base: Initializer = nn.initializers.lecun_normal()) -> Initializer:
    """Init of a ``(kt, kh, kw, c_in, c_out)`` kernel: ``base`` on the whole 5D shape (fans include kt),
    then its first time slice repeated over time (ViViT's average-frame initializer; init only)."""

    def init(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
        if len(shape) != 5 or shape[0] < 2:
            raise ValueError(f"average_frame_initializer needs a 5D kernel with kt > 1, got shape {tuple(shape)}")
        kernel = base(key, tuple(shape), dtype)
        return jnp.broadcast_to(kernel[:1], tuple(shape)).astype(dtype)

    return init


def _temporal_encode(
    x: Array, config: Any, patch_size: Sequence[int], hidden_size: int
) -> tuple[Array, int]:
    """Embeds a video ``[n, t, h, w, c]``; returns the ``embedding`` conv output and the time steps.

    '3d_conv': ``patch_size = (fh, fw, ft)`` -> Conv kernel ``(ft, fh, fw)``, stride = kernel, VALID ->
    ``[n, t', h', w', hidden]``. 'temporal_sampling': ``n_sampled_frames`` frames stacked along H, one 2D
    patch conv -> ``[n, t_s*h', w', hidden]``.
    """
    method = config.method
    if method == "temporal_sampling":
        x = sample_frames_uniformly(x, config.n_sampled_frames)
        n, t_s, h, w, c = x.shape
        # Scenic quirk: frames are stacked along H and embedded by one 2D conv; with h not divisible by
        # the patch height some patches straddle two frames.
        x = jnp.reshape(x, (n, t_s * h, w, c))
        fh, fw = patch_size[0], patch_size[1]
        x = nn.Conv(hidden_size, (fh, fw), strides=(fh, fw), padding="VALID", name="embedding")(x)
        return x, t_s
    if method == "3d_conv":
        # Scenic quirk: patches.size is read as (fh, fw, ft) but the kernel is laid out (ft, fh, fw).
        fh, fw, ft = patch_size
        init_method = config.get("kernel_init_method", None)
        if init_method is None:
            kernel_init = nn.initializers.lecun_normal()
        elif init_method == "central_frame_initializer":
            kernel_init = central_frame_initializer()
        elif init_method == "average_frame_initializer":
            kernel_init = average_frame_initializer()
        else:
            raise ValueError(f"Unknown kernel_init_method {init_method!r}")
        x = nn.Conv(
            hidden_size,
            (ft, fh, fw),
            strides=(ft, fh, fw),
            padding="VALID",
            kernel_init=kernel_init,
            name="embedding",
        )(x)
        return x, x.shape[1]
    raise AssertionError("Unknown temporal encoding method.")


# ----------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------
def _transformer(
    tokenizer: Any,
    *,
    num_layers: int,
    mlp_dim: int,
    num_heads: int,
    temporal_dimensions: int,
    dropout_rate: float,
    attention_dropout_rate: float,
    dtype: Any,
) -> nn.Module:
    """The ``Transformer`` submodule of the ViT models: EncoderModFuser if ``use_tokenfuse`` else
    EncoderMod. ``use_tokenfuse`` is required (AttributeError when missing); ``use_v11`` defaults to True.
    For 'patch', ``num_tokens`` / ``tokenlearner_loc`` are unused and may be absent."""
    use_tokenfuse = tokenizer.use_tokenfuse
    is_patch = tokenizer.type == "patch"
    cls = EncoderModFuser if use_tokenfuse else EncoderMod
    return cls(
        num_layers=num_layers,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        tokenizer_type=tokenizer.type,
        temporal_dimensions=temporal_dimensions,
        num_tokens=tokenizer.get("num_tokens", 8) if is_patch else tokenizer.num_tokens,
        tokenlearner_loc=tokenizer.get("tokenlearner_loc", num_layers) if is_patch else tokenizer.tokenlearner_loc,
        use_v11=tokenizer.get("use_v11", True),
        dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate,
        # Scenic quirk (bf16): only the Encoder1DBlocks receive the dtype; embedding, TokenLearner,
        # TokenFuser, encoder_norm and head stay float32.
        dtype=dtype,
        name="Transformer",
    )


_POOLING = {"gap": jnp.mean, "gmp": jnp.max, "gsp": jnp.sum}


class TokenLearnerViT(nn.Module):
    """ViT classifier with TokenLearner. Image ``[n, h, w, c]`` or video ``[n, t, h, w, c]`` ->
    logits ``[n, num_classes]``.

    ``tokenizer`` (ConfigDict or nested dict): ``type`` 'patch' | 'dynamic' | 'video', ``patches.size``,
    ``num_tokens``, ``tokenlearner_loc``, ``use_tokenfuse`` (required), ``use_v11`` (default True) and for
    video ``temporal_encoding_config`` (``method`` '3d_conv' | 'temporal_sampling', ...).
    """

    num_classes: int
    mlp_dim: int
    num_layers: int
    num_heads: int
    tokenizer: Any
    hidden_size: int
    representation_size: int | None
    dropout_rate: float = _DEFAULT_DROPOUT
    attention_dropout_rate: float = _DEFAULT_DROPOUT
    classifier: str = "gap"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool, debug: bool = False) -> Array:
        del debug  # Scenic quirk: accepted and unused.
        tokenizer = _as_config(self.tokenizer)
        temporal_dimensions = 1
        if tokenizer.type in ("patch", "dynamic"):
            fh, fw = tokenizer.patches.size
            x = nn.Conv(self.hidden_size, (fh, fw), strides=(fh, fw), padding="VALID", name="embedding")(x)
        elif tokenizer.type == "video":
            x, temporal_dimensions = _temporal_encode(
                x, tokenizer.temporal_encoding_config, tokenizer.patches.size, self.hidden_size
            )
        else:
            raise ValueError("Unknown tokenizer type")
        n, c = x.shape[0], x.shape[-1]
        x = jnp.reshape(x, (n, -1, c))  # [n, t*h'*w', hidden], frame-major

        x = _transformer(
            tokenizer,
            num_layers=self.num_layers,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            temporal_dimensions=temporal_dimensions,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
        )(x, train=train)

        # Scenic quirk: only gap/gmp/gsp exist; 'token' (named in Scenic's docstring) is a KeyError.
        x = _POOLING[self.classifier](x, axis=1)
        if self.representation_size is not None:
            x = nn.Dense(self.representation_size, name="pre_logits")(x)
            x = nn.tanh(x)
        else:
            x = IdentityLayer(name="pre_logits")(x)
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="output_projection",
        )(x)


class TokenLearnerViTRepresentation(nn.Module):
    """TokenLearner ViT without a head: image ``[n, h, w, c]`` or video ``[n, t, h, w, c]`` ->
    encoded tokens ``[n, tokens, hidden]``.

    A video is embedded frame by frame with the 2D patch conv (``[n*t, h, w, c]`` -> ``[n, t*h'w', c]``,
    ``temporal_dimensions = t``). ``target_channel_dim`` and ``use_concat_final`` are accepted and unused,
    as in Scenic. Not covered by a golden.
    """

    mlp_dim: int
    num_layers: int
    num_heads: int
    tokenizer: Any
    hidden_size: int
    target_channel_dim: int
    use_concat_final: bool = False
    dropout_rate: float = _DEFAULT_DROPOUT
    attention_dropout_rate: float = _DEFAULT_DROPOUT
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, train: bool, debug: bool = False) -> Array:
        del debug
        tokenizer = _as_config(self.tokenizer)
        n, t = x.shape[0], 1
        if x.ndim == 5:
            t = x.shape[1]
            x = jnp.reshape(x, (n * t,) + x.shape[2:])
        fh, fw = tokenizer.patches.size[0], tokenizer.patches.size[1]
        x = nn.Conv(self.hidden_size, (fh, fw), strides=(fh, fw), padding="VALID", name="embedding")(x)
        x = jnp.reshape(x, (n, -1, x.shape[-1]))  # [n, t*h'*w', hidden]
        return _transformer(
            tokenizer,
            num_layers=self.num_layers,
            mlp_dim=self.mlp_dim,
            num_heads=self.num_heads,
            temporal_dimensions=t,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            dtype=self.dtype,
        )(x, train=train)


# ----------------------------------------------------------------------------------------------------------
# Factories
# ----------------------------------------------------------------------------------------------------------
_REFERENCE_CLASSES: dict[str, type[nn.Module]] = {
    cls.__name__: cls
    for cls in (
        MlpBlock,
        AddPositionEmbs,
        Encoder1DBlock,
        TokenLearnerModule,
        TokenLearnerModuleV11,
        TokenFuser,
        EncoderMod,
        EncoderModFuser,
        TokenLearnerViT,
        TokenLearnerViTRepresentation,
    )
}

# Where each class lives in genuine Scenic (its real layout: token_learner/model.py defines the TokenLearner
# modules and imports the others from these two modules). Any other class is looked up in model.py.
_SCENIC_MODULES = {
    "MlpBlock": "scenic.model_lib.layers.attention_layers",
    "AddPositionEmbs": "scenic.projects.baselines.vit",
    "Encoder1DBlock": "scenic.projects.baselines.vit",
}
_SCENIC_TOKEN_LEARNER = "scenic.projects.token_learner.model"

_DTYPES = {
    "float32": jnp.float32,
    "bfloat16": jnp.bfloat16,
    "float16": jnp.float16,
    "float64": jnp.float64,
}


def _short_name(scenic_class: str) -> str:
    return scenic_class.rsplit(".", 1)[-1]


def _parse_dtype(value: Any) -> Any:
    if isinstance(value, str):
        name = value.rsplit(".", 1)[-1]  # accept 'jnp.bfloat16', 'jax.numpy.float32'
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {value!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    return value


def build_flax_module(scenic_class: str, constructor_kwargs: Mapping[str, Any]) -> nn.Module:
    """This project's Flax reference of a Scenic class, from a golden ``config.json``'s fields.

    ``scenic_class``: a short ('TokenLearnerViT') or dotted ('scenic.projects.token_learner.model.
    TokenLearnerViT') name. ``constructor_kwargs``: as in config.json (``tokenizer`` a nested dict,
    ``dtype`` a string such as 'float32' / 'bfloat16').
    """
    name = _short_name(scenic_class)
    if name not in _REFERENCE_CLASSES:
        raise ValueError(f"unknown Scenic class {scenic_class!r}; known: {sorted(_REFERENCE_CLASSES)}")
    kwargs = dict(constructor_kwargs)
    if "dtype" in kwargs:
        kwargs["dtype"] = _parse_dtype(kwargs["dtype"])
    return _REFERENCE_CLASSES[name](**kwargs)


@functools.lru_cache(maxsize=1)
def _probe_genuine_scenic() -> tuple[str | None, str]:
    """``(file of scenic.projects.token_learner.model, "")`` when genuine Scenic imports, else
    ``(None, why not)``. Cached: the import is slow, and its answer only changes with sys.path."""
    try:
        module = importlib.import_module(_SCENIC_TOKEN_LEARNER)
    except Exception as exc:  # ImportError, or an unrelated `scenic` failing on import
        return None, f"{type(exc).__name__}: {exc}"
    missing = [n for n in ("TokenLearnerViT", "TokenLearnerModuleV11") if not hasattr(module, n)]
    if missing:  # the PyPI `scenic` (a different project) or a partial tree
        return None, f"{_SCENIC_TOKEN_LEARNER} has no {', '.join(missing)}"
    return str(getattr(module, "__file__", None) or _SCENIC_TOKEN_LEARNER), ""


def genuine_scenic_available() -> bool:
    """True when genuine Scenic's TokenLearner can be imported (the PyPI ``scenic`` is a different
    project and does not count). The answer is cached; :func:`forget_genuine_scenic` drops it."""
    return _probe_genuine_scenic()[0] is not None


def genuine_scenic_origin() -> str | None:
    """The file genuine Scenic's ``token_learner/model.py`` was imported from, or None when unavailable."""
    return _probe_genuine_scenic()[0]


def genuine_scenic_unavailable_reason() -> str:
    """Why genuine Scenic is not used: '' when it is available or when no ``scenic`` package is installed
    at all; else the import error (e.g. a Scenic checkout without tensorflow, or the PyPI ``scenic``)."""
    if genuine_scenic_available():
        return ""
    try:
        installed = importlib.util.find_spec("scenic") is not None
    except (ImportError, ValueError, AttributeError):  # e.g. sys.modules['scenic'] is None: import blocked
        installed = False
    if not installed:
        return ""
    return _probe_genuine_scenic()[1]


def forget_genuine_scenic() -> None:
    """Drop the cached answer of :func:`genuine_scenic_available` (after sys.path or sys.modules changed)."""
    _probe_genuine_scenic.cache_clear()


def _to_config_dict(value: Any) -> Any:
    import ml_collections  # genuine Scenic depends on it

    return ml_collections.ConfigDict(dict(value)) if isinstance(value, Mapping) else value


def build_reference_module(
    scenic_class: str, constructor_kwargs: Mapping[str, Any], *, prefer_genuine: bool = True
) -> nn.Module:
    """The Flax module the harness compares against: genuine Scenic when importable (and
    ``prefer_genuine``), else this project's reference (``build_flax_module``).

    For genuine Scenic, a ``tokenizer`` dict becomes an ``ml_collections.ConfigDict`` and a dtype string
    a jnp dtype.
    """
    if not (prefer_genuine and genuine_scenic_available()):
        return build_flax_module(scenic_class, constructor_kwargs)
    name = _short_name(scenic_class)
    if name not in _REFERENCE_CLASSES:  # the same one-line error as the project's reference
        raise ValueError(f"unknown Scenic class {scenic_class!r}; known: {sorted(_REFERENCE_CLASSES)}")
    module = importlib.import_module(_SCENIC_MODULES.get(name, _SCENIC_TOKEN_LEARNER))
    kwargs = dict(constructor_kwargs)
    if "dtype" in kwargs:
        kwargs["dtype"] = _parse_dtype(kwargs["dtype"])
    if "tokenizer" in kwargs:
        kwargs["tokenizer"] = _to_config_dict(kwargs["tokenizer"])
    return getattr(module, name)(**kwargs)


# ----------------------------------------------------------------------------------------------------------
# Running a reference the way the goldens were produced
# ----------------------------------------------------------------------------------------------------------
def _variables(params: Mapping[str, Any]) -> dict[str, Any]:
    """Accept ``{'params': tree}`` (as in params.msgpack) or the bare tree."""
    if set(params) == {"params"}:
        return {"params": params["params"]}
    return {"params": params}


def _input_names(module: nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` positional parameters of ``module.__call__`` (e.g. inputs, original)."""
    signature = inspect.signature(type(module).__call__)
    names = [
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(names) < count:
        raise ValueError(f"{type(module).__name__} takes {len(names)} positional inputs, got {count}")
    return names[:count]


def _split_inputs(
    module: nn.Module, inputs: Sequence[Any] | Mapping[str, Any]
) -> tuple[list[str], list[Array]]:
    if isinstance(inputs, Mapping):
        return list(inputs), [jnp.asarray(v) for v in inputs.values()]
    arrays = [jnp.asarray(v) for v in inputs]
    return _input_names(module, len(arrays)), arrays


def _capture_filter(module: nn.Module, method_name: str) -> bool:
    """Capture what the goldens hold: every submodule's ``__call__`` output except Dropout layers and
    the top-level module (whose output is ``out``)."""
    return (
        method_name == "__call__"
        and not isinstance(module, nn.Dropout)
        and module.scope is not None
        and len(module.scope.path) > 0
    )


def _flatten_intermediates(tree: Mapping[str, Any], as_float32: bool) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for path, values in flatten_tree(tree).items():
        if not path.endswith("/__call__"):
            continue
        key = path[: -len("/__call__")]
        values = list(values)
        for i, value in enumerate(values):
            array = np.asarray(value.astype(jnp.float32) if as_float32 else value)
            out[key if len(values) == 1 else f"{key}[{i}]"] = array
    return out


def apply_reference(
    module: nn.Module,
    params: Mapping[str, Any],
    inputs: Sequence[Any] | Mapping[str, Any],
    call_kwargs: Mapping[str, Any],
    capture_intermediates: bool = True,
    *,
    as_float32: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
    jit: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Runs ``jax.jit(module.apply)`` under ``jax_default_matmul_precision='highest'``.

    ``inputs`` in call order (a list, or a name -> array mapping); ``call_kwargs`` e.g. ``{'train': False}``
    or ``{'deterministic': True}``. Returns ``(out, intermediates)`` with the intermediates keyed like the
    goldens' ``inter/<path>`` keys without the ``inter/`` prefix (Dropout layers and the top-level output
    left out). Intermediates (and ``out``) are cast to float32 unless ``as_float32=False``.
    ``compiler_options`` go to ``jax.jit`` (e.g. a lower XLA optimization level to save compile time in
    tests); the default is what produced the goldens. ``jit=False`` runs eagerly (op by op), which is
    what the goldens' ``eager_vs_jit_max_abs_diff`` compares with, and is cheaper for tiny models.
    """
    variables = _variables(params)
    _, arrays = _split_inputs(module, inputs)
    kwargs = dict(call_kwargs)
    if capture_intermediates:
        def fn(v: Any, *xs: Array) -> tuple[Array, Any]:
            out, state = module.apply(
                v, *xs, capture_intermediates=_capture_filter, mutable=["intermediates"], **kwargs
            )
            return out, state.get("intermediates", {})
    else:
        def fn(v: Any, *xs: Array) -> tuple[Array, Any]:
            return module.apply(v, *xs, **kwargs), {}
    if jit:
        fn = jax.jit(fn, compiler_options=compiler_options)
    with jax.default_matmul_precision("highest"):
        out, inter_tree = fn(variables, *arrays)
    inter = _flatten_intermediates(inter_tree, as_float32)
    out = np.asarray(out.astype(jnp.float32) if as_float32 else out)
    return out, inter


def reference_grads(
    module: nn.Module,
    params: Mapping[str, Any],
    inputs: Sequence[Any] | Mapping[str, Any],
    call_kwargs: Mapping[str, Any],
    cotangent: Any,
    *,
    compiler_options: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Gradients of ``loss = sum(out.astype(f32) * cotangent)``, keyed like the goldens' grads.npz:
    ``params/<path>`` for every parameter and ``input/<name>`` for every input (names from a mapping, or
    from the positional parameter names of ``module.__call__``). Jitted under
    ``jax_default_matmul_precision='highest'``; ``compiler_options`` as in ``apply_reference``."""
    variables = _variables(params)
    names, arrays = _split_inputs(module, inputs)
    kwargs = dict(call_kwargs)

    def loss(v: Any, xs: list[Array], cot: Array) -> Array:
        out = module.apply(v, *xs, **kwargs)
        return jnp.sum(out.astype(jnp.float32) * cot)

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1)), compiler_options=compiler_options)
    with jax.default_matmul_precision("highest"):
        grad_vars, grad_inputs = grad_fn(variables, arrays, jnp.asarray(cotangent, jnp.float32))
    grads = {key: np.asarray(value) for key, value in flatten_tree(grad_vars).items()}
    grads.update({f"input/{name}": np.asarray(g) for name, g in zip(names, grad_inputs)})
    return grads


def reference_outputs(
    module: nn.Module,
    params: Mapping[str, Any],
    inputs: Sequence[Any] | Mapping[str, Any],
    call_kwargs: Mapping[str, Any],
    cotangent: Any,
    *,
    as_float32: bool = True,
    compiler_options: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(out, intermediates, grads)`` as ``apply_reference`` and ``reference_grads`` give them, from a
    single jit compile (the forward pass of the gradient computation also captures the intermediates).
    Compiling is most of the cost on CPU, so this halves it when all three are wanted."""
    variables = _variables(params)
    names, arrays = _split_inputs(module, inputs)
    kwargs = dict(call_kwargs)

    def loss(v: Any, xs: list[Array], cot: Array) -> tuple[Array, tuple[Array, Any]]:
        out, state = module.apply(
            v, *xs, capture_intermediates=_capture_filter, mutable=["intermediates"], **kwargs
        )
        return jnp.sum(out.astype(jnp.float32) * cot), (out, state.get("intermediates", {}))

    grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True), compiler_options=compiler_options)
    with jax.default_matmul_precision("highest"):
        (grad_vars, grad_inputs), (out, inter) = grad_fn(
            variables, arrays, jnp.asarray(cotangent, jnp.float32)
        )
    grads = {key: np.asarray(value) for key, value in flatten_tree(grad_vars).items()}
    grads.update({f"input/{name}": np.asarray(g) for name, g in zip(names, grad_inputs)})
    out = np.asarray(out.astype(jnp.float32) if as_float32 else out)
    return out, _flatten_intermediates(inter, as_float32), grads
