"""EncoderMod, EncoderModFuser, TokenLearnerViT and TokenLearnerViTRepresentation, as in Scenic.

Attribute names are Scenic's parameter tree (``Transformer``, ``encoderblock_3``, ``posembed_input``,
``TokenLearnerModuleV11_0``, ``embedding``, ``pre_logits``, ``output_projection``...), so state_dict keys
map onto Flax paths mechanically.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from . import initializers as init
from .config_check import check_tokenizer
from .errors import ConfigError, ShapeError
from .conventions import HubMixin
from .layers import (
    AddPositionEmbs, Conv, Dense, Dropout, Encoder1DBlock, HeadsProjection, Identity, LayerNorm, _check_rank,
    shape_check,
)  # fmt: skip
from .shapes import build_parameters
from .token_learner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11

__all__ = ["EncoderMod", "EncoderModFuser", "TokenLearnerViT", "TokenLearnerViTRepresentation"]

TOKENIZER_TYPES = ("patch", "dynamic", "video")
CLASSIFIERS = ("gap", "gmp", "gsp")
TEMPORAL_METHODS = ("3d_conv", "temporal_sampling")
KERNEL_INIT_METHODS = (None, "central_frame_initializer", "average_frame_initializer")


def _get(cfg: Any, key: str, default: Any = ..., where: str = "tokenizer") -> Any:
    """Reads ``key`` from a dict, an ml_collections.ConfigDict or any attribute holder."""
    if isinstance(cfg, Mapping):
        if key in cfg:
            return cfg[key]
    elif cfg is not None and hasattr(cfg, key):
        return getattr(cfg, key)
    if default is ...:
        raise ConfigError(f"{where} has no '{key}' entry, which is required (got {_describe(cfg)})")
    return default


def _describe(cfg: Any) -> str:
    if isinstance(cfg, Mapping):
        return "keys " + ", ".join(sorted(map(str, cfg))) if cfg else "an empty config"
    return repr(cfg)


def _check_choice(value: Any, choices: Sequence[Any], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {what} {value!r}; expected one of {', '.join(map(repr, choices))}")


@shape_check
def _fold(x: Tensor, t: Optional[int], default_t: int, who: str) -> Tensor:
    """[n, t*hw, c] -> [n*t, hw, c]: the TokenLearner runs per frame (t None: ``default_t``)."""
    t = default_t if t is None else t
    n, thw, c = x.shape
    if thw % t:
        raise ShapeError(f"{who}: the sequence length {thw} is not divisible by temporal_dimensions={t}")
    return x.reshape(n * t, thw // t, c)


def _sample_frames(x: Tensor, n_sampled_frames: int) -> tuple[Tensor, int]:
    """[B, C, T, H, W] -> ([B, C, t*H, W], t): Scenic samples t frames and stacks them along H."""
    idx = sampled_frame_indices(int(x.shape[2]), n_sampled_frames)
    x = x[:, :, torch.as_tensor(idx, device=x.device)]
    return x.flatten(2, 3), len(idx)


@shape_check
def _grid_tokens(x: Tensor, who: str) -> Tensor:
    """Patch-embedding output [B, C, *grid] -> tokens [B, prod(grid), C]."""
    if 0 in x.shape[2:]:
        raise ShapeError(f"{who}: the input is smaller than one patch; no tokens after embedding")
    return x.flatten(2).transpose(1, 2)


_IS_EXPORTING = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.4


def _channels_first(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """A channel-last model input permuted by ``dims`` to torch's [B, C, ...] for the embedding convolution.

    Under torch.compile (not export) the view is copied: inductor with symbolic spatial sizes (``dynamic=True``)
    cannot order a permuted graph input's strides (torch 2.13: "cannot determine truth value of Relational").
    Eager mode keeps the view, which oneDNN's convolution reads directly (the copy cost ~25% of the patch
    embedding, ~0.25% of a B/16 call).
    """
    x = x.permute(*dims)
    if torch.compiler.is_compiling() and not (_IS_EXPORTING is not None and _IS_EXPORTING()):
        x = x.contiguous()
    return x


def _frames(x: Tensor, channels_first: bool) -> tuple[Tensor, int, int]:
    """TokenLearnerViTRepresentation's input as ([n*t, C, H, W], n, t)."""
    if x.ndim == 5:
        n, t = (x.shape[0], x.shape[2]) if channels_first else x.shape[:2]
        if channels_first:  # [n, c, t, h, w] -> [n*t, c, h, w]
            x = x.transpose(1, 2)
            return x.reshape(n * t, *x.shape[2:]), n, t
        return _channels_first(x.reshape(n * t, *x.shape[2:]), (0, 3, 1, 2)), n, t
    if x.ndim == 4:
        return (x if channels_first else _channels_first(x, (0, 3, 1, 2))), x.shape[0], 1
    layout = "[B, C, H, W] or [B, C, T, H, W]" if channels_first else "[B, H, W, C] or [B, T, H, W, C]"
    raise ShapeError(f"TokenLearnerViTRepresentation expects {layout}, got {tuple(x.shape)}")


# Shape checks and rank-dependent layouts: one call each in a torch.fx graph (FX cannot branch on a traced
# tensor's shape); dynamo and torch.export trace through them.
for _name in ("_fold", "_sample_frames", "_grid_tokens", "_frames", "_check_rank"):
    torch.fx.wrap(_name)


class _Encoder(nn.Module):
    """What EncoderMod and EncoderModFuser share: position embedding, dropout, blocks, final LayerNorm."""

    def __init__(
        self,
        num_layers: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float,
        attention_dropout_rate: float,
        tokenizer_type: str,
        temporal_dimensions: int,
        num_tokens: int,
        tokenlearner_loc: int,
        use_v11: bool,
        dtype: Any,
        dim: Optional[int],
    ) -> None:
        super().__init__()
        _check_choice(tokenizer_type, TOKENIZER_TYPES, "tokenizer_type")
        if temporal_dimensions < 1:
            raise ConfigError(f"temporal_dimensions must be >= 1, got {temporal_dimensions}")
        self.num_layers = num_layers
        self.dropout_rate = dropout_rate
        self.tokenizer_type = tokenizer_type
        self.temporal_dimensions = temporal_dimensions
        self.num_tokens = num_tokens
        self.tokenlearner_loc = tokenlearner_loc
        self.use_v11 = use_v11
        self.dtype = dtype
        self.posembed_input = AddPositionEmbs(None, dim)
        self.Dropout_0 = Dropout(dropout_rate)
        for lyr in range(num_layers):
            block = Encoder1DBlock(mlp_dim, num_heads, dtype, dropout_rate, attention_dropout_rate, dim=dim)
            self.add_module(f"encoderblock_{lyr}", block)
        self.encoder_norm = LayerNorm(dim)
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each encoder block in the backward pass (``torch.utils.checkpoint``, non-reentrant)
        instead of storing its activations: less memory, one more forward per block, equal gradients."""
        self.grad_checkpointing = enable

    def _block(self, lyr: int, x: Tensor) -> Tensor:
        block = getattr(self, f"encoderblock_{lyr}")
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters Scenic's optimizer leaves undecayed (``skip_scale_and_bias_regularization``:
        those of Flax rank 1: biases and LayerNorm scales, but not the attention q/k/v biases, which are
        [heads, head_dim] in Flax)."""
        return _no_weight_decay(self)

    @property
    def uses_token_learner(self) -> bool:
        return self.tokenizer_type in ("dynamic", "video")

    def _new_token_learner(self) -> nn.Module:
        if self.use_v11:
            return TokenLearnerModuleV11(self.num_tokens, dropout_rate=self.dropout_rate)
        return TokenLearnerModule(self.num_tokens)

    @property
    def _tl_name(self) -> str:
        return "TokenLearnerModuleV11" if self.use_v11 else "TokenLearnerModule"

    def _start(self, inputs: Tensor) -> Tensor:
        inputs = _check_rank(inputs, 3, f"{type(self).__name__} expects [batch, tokens, channels]")
        return self.Dropout_0(self.posembed_input(inputs))


class EncoderMod(HubMixin, _Encoder):
    """Scenic ``EncoderMod``: a ViT encoder with one TokenLearner before ``encoderblock_<tokenlearner_loc>``.

    ``forward(inputs [B, T*N, C]) -> [B, T*num_tokens, C]`` (or [B, T*N, C] when no TokenLearner applies:
    ``tokenizer_type='patch'`` or ``tokenlearner_loc >= num_layers``, as in Scenic). Video inputs are folded
    to [B*T, N, C] for the TokenLearner (``temporal_dimensions=T``).
    """

    def __init__(
        self,
        num_layers: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.1,
        tokenizer_type: str = "patch",
        temporal_dimensions: int = 1,
        num_tokens: int = 8,
        tokenlearner_loc: int = 12,
        use_v11: bool = True,
        dtype: Any = "float32",
        *,
        dim: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
    ) -> None:
        """Scenic's fields, then the port's: ``dim`` the channels C (None: from the first input);
        ``input_shape`` one example's shape (T*N, C): given it, every parameter exists on return."""
        super().__init__(
            num_layers, mlp_dim, num_heads, dropout_rate, attention_dropout_rate, tokenizer_type,
            temporal_dimensions, num_tokens, tokenlearner_loc, use_v11, dtype, dim,
        )  # fmt: skip
        if self.uses_token_learner and 0 <= tokenlearner_loc < num_layers:
            self.add_module(f"{self._tl_name}_0", self._new_token_learner())
        if input_shape is not None:
            build_parameters(self, [input_shape])

    def forward(self, inputs: Tensor, *, temporal_dimensions: Optional[int] = None) -> Tensor:
        """[B, T*N, C] -> [B, T*num_tokens, C] ([B, T*N, C] when no TokenLearner applies);
        ``temporal_dimensions`` T overrides the constructor's."""
        t = temporal_dimensions  # None: the constructor's (resolved in _fold, where torch.fx can see it)
        x = self._start(inputs)
        for lyr in range(self.num_layers):
            if self.uses_token_learner and lyr == self.tokenlearner_loc:
                n = x.shape[0]
                x = _fold(x, t, self.temporal_dimensions, type(self).__name__)
                x = getattr(self, f"{self._tl_name}_0")(x)  # [n*t, S, c]
                x = x.reshape(n, -1, x.shape[-1])  # [n, t*S, c]
            x = self._block(lyr, x)
        return self.encoder_norm(x)


class EncoderModFuser(HubMixin, _Encoder):
    """Scenic ``EncoderModFuser``: TokenLearner -> block -> TokenFuser (+ residual) at every layer >= loc.

    ``forward(inputs [B, T*N, C]) -> [B, T*N, C]``. Scenic behaviour kept: each such layer gets a fresh
    TokenLearner and TokenFuser with their default sizes (bottleneck 64, use_normalization=True), named
    ``TokenLearnerModuleV11_{i}`` / ``TokenFuser_{i}`` with ``i = layer - tokenlearner_loc``.
    """

    def __init__(
        self,
        num_layers: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.1,
        tokenizer_type: str = "patch",
        temporal_dimensions: int = 1,
        num_tokens: int = 8,
        tokenlearner_loc: int = 12,
        use_v11: bool = True,
        dtype: Any = "float32",
        *,
        dim: Optional[int] = None,
        input_shape: Optional[Sequence[int]] = None,
    ) -> None:
        """Scenic's fields, then the port's: ``dim`` the channels C (None: from the first input);
        ``input_shape`` one example's shape (T*N, C): given it, every parameter exists on return."""
        super().__init__(
            num_layers, mlp_dim, num_heads, dropout_rate, attention_dropout_rate, tokenizer_type,
            temporal_dimensions, num_tokens, tokenlearner_loc, use_v11, dtype, dim,
        )  # fmt: skip
        if self.uses_token_learner:
            for i in range(num_layers - max(tokenlearner_loc, 0)):
                self.add_module(f"{self._tl_name}_{i}", self._new_token_learner())
                self.add_module(f"TokenFuser_{i}", TokenFuser(dropout_rate=dropout_rate))
        if input_shape is not None:
            build_parameters(self, [input_shape])

    def forward(self, inputs: Tensor, *, temporal_dimensions: Optional[int] = None) -> Tensor:
        """[B, T*N, C] -> [B, T*N, C]; ``temporal_dimensions`` T overrides the constructor's."""
        t = temporal_dimensions  # None: the constructor's (resolved in _fold, where torch.fx can see it)
        x = self._start(inputs)
        for lyr in range(self.num_layers):
            if self.uses_token_learner and lyr >= self.tokenlearner_loc:
                i = lyr - max(self.tokenlearner_loc, 0)  # Flax numbers instances in creation order
                residual = _fold(x, t, self.temporal_dimensions, type(self).__name__)  # [n*t, hw, c]
                y = getattr(self, f"{self._tl_name}_{i}")(residual)  # [n*t, S, c]
                y = self._block(lyr, y.reshape(x.shape[0], -1, y.shape[-1])).reshape(y.shape)
                x = (getattr(self, f"TokenFuser_{i}")(y, residual) + residual).reshape(x.shape)
            else:
                x = self._block(lyr, x)
        return self.encoder_norm(x)


def _patch_size(tokenizer: Any, n: int, who: str) -> tuple[int, ...]:
    patches = _get(tokenizer, "patches")
    size = tuple(int(v) for v in _get(patches, "size", where="tokenizer.patches"))
    if len(size) != n:
        raise ConfigError(f"{who}: tokenizer.patches.size must have {n} entries, got {list(size)}")
    return size


def sampled_frame_indices(num_frames: int, n_sampled_frames: int) -> np.ndarray:
    """Scenic's ``sample_frames_uniformly``: round(arange(T/(n+1), T, T/(n+1))), or all frames if n >= T."""
    if n_sampled_frames < num_frames:
        start = step = num_frames / (n_sampled_frames + 1)
    else:
        start, step = 0, 1
    # JAX evaluates the arange in float32 (x64 off); numpy with dtype=float32 reproduces its values.
    idx = np.round(np.arange(start, num_frames, step, dtype=np.float32)).astype(np.int64)
    return np.minimum(idx, num_frames - 1)


class _TokenizerSpec:
    """The validated tokenizer config of TokenLearnerViT and its patch-embedding convolution."""

    def __init__(self, tokenizer: Any, hidden_size: int, channels_first: bool, who: str) -> None:
        check_tokenizer(tokenizer)  # an unknown (misspelled) field is an error, not a default silently used
        self.type = _get(tokenizer, "type")
        _check_choice(self.type, TOKENIZER_TYPES, "tokenizer.type")
        self.channels_first = channels_first
        self.method = None
        if self.type == "video":
            tec = _get(tokenizer, "temporal_encoding_config")
            self.method = _get(tec, "method", where="tokenizer.temporal_encoding_config")
            _check_choice(self.method, TEMPORAL_METHODS, "temporal_encoding_config.method")
        if self.method == "3d_conv":
            fh, fw, ft = _patch_size(tokenizer, 3, who)  # Scenic order: [fh, fw, ft]
            kim = _get(tec, "kernel_init_method", None)
            _check_choice(kim, KERNEL_INIT_METHODS, "temporal_encoding_config.kernel_init_method")
            kinit = {
                None: init.lecun_normal_,
                "central_frame_initializer": init.central_frame_,
                "average_frame_initializer": init.average_frame_,
            }[kim]
            self.embedding = Conv(hidden_size, (ft, fh, fw), strides=(ft, fh, fw), padding="VALID", kernel_init=kinit)
        else:
            fh, fw = _patch_size(tokenizer, 2, who)
            self.embedding = Conv(hidden_size, (fh, fw), strides=(fh, fw), padding="VALID")
        if self.method == "temporal_sampling":
            self.n_sampled_frames = int(
                _get(tec, "n_sampled_frames", where="tokenizer.temporal_encoding_config (temporal_sampling)")
            )


class TokenLearnerViT(HubMixin, nn.Module):
    """Scenic ``TokenLearnerViT``: patch embedding -> EncoderMod(Fuser) -> pooling -> head.

    ``forward(x) -> logits [B, num_classes]``, with ``x`` [B, H, W, C] for ``patch``/``dynamic`` tokenizers
    and [B, T, H, W, C] for ``video`` (``channels_first=True``: [B, C, H, W] / [B, C, T, H, W]).
    ``tokenizer`` is Scenic's ConfigDict as a dict (or a ConfigDict): type, patches.size, num_tokens,
    tokenlearner_loc, use_tokenfuse (required), use_v11 (default True), temporal_encoding_config (video).

    timm conventions: ``num_features`` (channels of :meth:`forward_features`), ``head_hidden_size`` (width of
    ``forward_head(x, pre_logits=True)``), :meth:`reset_classifier`, :meth:`no_weight_decay`,
    :meth:`set_grad_checkpointing`.
    """

    def __init__(
        self,
        num_classes: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        tokenizer: Any,
        hidden_size: int,
        representation_size: Optional[int],
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.1,
        classifier: str = "gap",
        dtype: Any = "float32",
        *,
        channels_first: bool = False,
        input_shape: Optional[Sequence[int]] = None,
    ) -> None:
        """Scenic's fields, then the port's: ``channels_first`` input layout; ``input_shape`` one example's
        shape as ``forward`` takes it, e.g. (224, 224, 3) (Scenic's ``dataset_meta_data['input_shape']``
        without the batch axis; (T, H, W, C) for video): given it, every parameter exists on return."""
        super().__init__()
        _check_choice(classifier, CLASSIFIERS, "classifier")
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.representation_size = representation_size
        self.classifier = classifier
        self.channels_first = channels_first
        self._tok = _TokenizerSpec(tokenizer, hidden_size, channels_first, "TokenLearnerViT")
        self.embedding = self._tok.embedding
        self.Transformer = _transformer(tokenizer, num_layers, mlp_dim, num_heads, dropout_rate,
                                        attention_dropout_rate, dtype, hidden_size)  # fmt: skip
        if representation_size is not None:
            self.pre_logits: nn.Module = Dense(representation_size, hidden_size)
            head_in = representation_size
        else:
            self.pre_logits = Identity()
            head_in = hidden_size
        self.output_projection: nn.Module = Dense(num_classes, head_in, kernel_init=init.zeros_kernel_)
        self.num_features = hidden_size
        self.head_hidden_size = head_in
        if input_shape is not None:
            build_parameters(self, [input_shape])

    def _embed(self, x: Tensor) -> tuple[Tensor, int]:
        tok = self._tok
        cf = self.channels_first
        t = 1
        if tok.type in ("patch", "dynamic"):
            layout = "[B, C, H, W]" if cf else "[B, H, W, C]"
            x = _check_rank(x, 4, f"TokenLearnerViT ({tok.type} tokenizer) expects {layout}")
            x = x if cf else _channels_first(x, (0, 3, 1, 2))
        else:
            layout = "[B, C, T, H, W]" if cf else "[B, T, H, W, C]"
            x = _check_rank(x, 5, f"TokenLearnerViT (video tokenizer) expects {layout}")
            x = x if cf else _channels_first(x, (0, 4, 1, 2, 3))  # [B, C, T, H, W]
            if tok.method == "temporal_sampling":
                # Scenic stacks the sampled frames along H and embeds them with one 2-D convolution.
                sampled = _sample_frames(x, tok.n_sampled_frames)
                x, t = sampled[0], sampled[1]
        x = self.embedding(x)  # [B, hidden, (t,) gh, gw]
        if tok.method == "3d_conv":
            t = x.shape[2]
        return _grid_tokens(x, "TokenLearnerViT"), t

    def forward_features(self, x: Tensor) -> Tensor:
        """Images [B, H, W, C] (video [B, T, H, W, C]; channels first if built so) -> the encoder's output
        tokens [B, tokens, hidden_size], before pooling."""
        x, t = self._embed(x)
        return self.Transformer(x, temporal_dimensions=t)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens [B, tokens, hidden_size] -> logits [B, num_classes]; with ``pre_logits=True`` the pooled
        (and, with a representation layer, projected and tanh'd) features [B, head_hidden_size]."""
        if self.classifier == "gap":
            x = x.mean(dim=1)
        elif self.classifier == "gmp":
            x = x.amax(dim=1)
        else:
            x = x.sum(dim=1)
        x = self.pre_logits(x)
        if self.representation_size is not None:
            x = torch.tanh(x)
        return x if pre_logits else self.output_projection(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images [B, H, W, C] (video [B, T, H, W, C]; [B, C, H, W] / [B, C, T, H, W] if channels_first)
        -> logits [B, num_classes]."""
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """A new ``output_projection`` for ``num_classes`` classes, initialised as Scenic's head (zero kernel,
        zero bias), on the old head's device and dtype; ``num_classes=0`` removes the head (timm)."""
        old = next(self.output_projection.parameters(), None)
        self.num_classes = num_classes
        if num_classes == 0:
            self.output_projection = Identity()
            return
        head = Dense(num_classes, self.head_hidden_size, kernel_init=init.zeros_kernel_)
        self.output_projection = head if old is None else head.to(device=old.device, dtype=old.dtype)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing over the encoder blocks (see ``EncoderMod.set_grad_checkpointing``)."""
        self.Transformer.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters Scenic's optimizer leaves undecayed (``skip_scale_and_bias_regularization``:
        those of Flax rank 1: biases and LayerNorm scales, but not the attention q/k/v biases, which are
        [heads, head_dim] in Flax)."""
        return _no_weight_decay(self)


def _transformer(tokenizer, num_layers, mlp_dim, num_heads, dropout_rate, attention_dropout_rate, dtype, dim):
    use_tokenfuse = _get(tokenizer, "use_tokenfuse")
    tokenizer_type = _get(tokenizer, "type")
    uses_tl = tokenizer_type in ("dynamic", "video")
    # Scenic reads num_tokens / tokenlearner_loc even for 'patch', where they are unused; we only require them
    # where they matter and fall back to EncoderMod's defaults otherwise.
    num_tokens = _get(tokenizer, "num_tokens") if uses_tl else _get(tokenizer, "num_tokens", 8)
    loc = _get(tokenizer, "tokenlearner_loc") if uses_tl else _get(tokenizer, "tokenlearner_loc", 12)
    cls = EncoderModFuser if use_tokenfuse else EncoderMod
    return cls(
        num_layers=num_layers,
        mlp_dim=mlp_dim,
        num_heads=num_heads,
        dropout_rate=dropout_rate,
        attention_dropout_rate=attention_dropout_rate,
        tokenizer_type=tokenizer_type,
        num_tokens=num_tokens,
        tokenlearner_loc=loc,
        use_v11=_get(tokenizer, "use_v11", True),
        temporal_dimensions=1,
        dtype=dtype,
        dim=dim,
    )


class TokenLearnerViTRepresentation(HubMixin, nn.Module):
    """Scenic ``TokenLearnerViTRepresentation``: the encoder's tokens, no head.

    ``forward(x [B, H, W, C] or [B, T, H, W, C]) -> [B, tokens, hidden_size]``: frames are embedded one by one
    by a 2-D patch convolution and concatenated, temporal_dimensions = T. ``target_channel_dim`` and
    ``use_concat_final`` are accepted and unused, as in Scenic. ``num_features`` = hidden_size;
    ``forward_features`` is ``forward``.
    """

    def __init__(
        self,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        tokenizer: Any,
        hidden_size: int,
        target_channel_dim: int,
        use_concat_final: bool = False,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.1,
        dtype: Any = "float32",
        *,
        channels_first: bool = False,
        input_shape: Optional[Sequence[int]] = None,
    ) -> None:
        """Scenic's fields, then the port's: ``channels_first`` input layout; ``input_shape`` one example's
        shape as ``forward`` takes it, e.g. (224, 224, 3) or (T, H, W, C): given it, every parameter exists
        on return."""
        super().__init__()
        self.hidden_size = hidden_size
        self.num_features = hidden_size
        self.target_channel_dim = target_channel_dim
        self.use_concat_final = use_concat_final
        self.channels_first = channels_first
        check_tokenizer(tokenizer)  # an unknown (misspelled) field is an error, not a default silently used
        fh, fw = _patch_size(tokenizer, 2, "TokenLearnerViTRepresentation")
        self.embedding = Conv(hidden_size, (fh, fw), strides=(fh, fw), padding="VALID")
        self.Transformer = _transformer(tokenizer, num_layers, mlp_dim, num_heads, dropout_rate,
                                        attention_dropout_rate, dtype, hidden_size)  # fmt: skip
        if input_shape is not None:
            build_parameters(self, [input_shape])

    def forward(self, x: Tensor) -> Tensor:
        """[B, H, W, C] or [B, T, H, W, C] ([B, C, H, W] / [B, C, T, H, W] if channels_first)
        -> tokens [B, T*num_tokens, hidden_size] (or [B, T*N, hidden_size] without a TokenLearner)."""
        frames = _frames(x, self.channels_first)
        x, n, t = frames[0], frames[1], frames[2]  # [n*t, C, H, W]
        x = self.embedding(x)  # [n*t, hidden, gh, gw]
        x = _grid_tokens(x, "TokenLearnerViTRepresentation").reshape(n, -1, self.hidden_size)
        return self.Transformer(x, temporal_dimensions=t)

    forward_features = forward

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing over the encoder blocks (see ``EncoderMod.set_grad_checkpointing``)."""
        self.Transformer.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters Scenic's optimizer leaves undecayed (those of Flax rank 1; see
        ``TokenLearnerViT.no_weight_decay``)."""
        return _no_weight_decay(self)


def _no_weight_decay(module: nn.Module) -> set[str]:
    # Scenic's optimizer with skip_scale_and_bias_regularization masks out leaves whose *Flax* rank is 1
    # (biases and LayerNorm scales). Scenic quirk: attention query/key/value biases are [heads, head_dim] in
    # Flax, so Scenic decays them although torch stores them flat. A still-lazy parameter raises ShapeError.
    names = set()
    for prefix, m in module.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if p.ndim == 1 and not (isinstance(m, HeadsProjection) and pname == "bias"):
                names.add(f"{prefix}.{pname}" if prefix else pname)
    return names
