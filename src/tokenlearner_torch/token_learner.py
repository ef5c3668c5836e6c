"""TokenLearnerModule (v1), TokenLearnerModuleV11 and TokenFuser, as in Scenic's token_learner/model.py.

Layouts are Scenic's: tokens [B, N, C], images channel-last [B, H, W, C]. PyTorch users who hold
[B, C, H, W] pass ``channels_first=True`` at construction; nothing is ever guessed from shapes.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import initializers as init
from .errors import ShapeError
from .conventions import HubMixin
from .layers import Conv, Dense, Dropout, LayerNorm, MlpBlock, gelu, shape_check
from .shapes import build_parameters

__all__ = ["TokenLearnerModule", "TokenLearnerModuleV11", "TokenFuser"]


def _tokens(x: Tensor, who: str, channels_first: bool) -> Tensor:
    """[B, H, W, C] (or [B, C, H, W] when channels_first) or [B, N, C] -> [B, N, C] in C order over (H, W)."""
    if x.ndim == 4:
        if channels_first:
            return x.flatten(2).transpose(1, 2)
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if x.ndim == 3:
        return x
    layout = "[B, C, H, W]" if channels_first else "[B, H, W, C]"
    raise ShapeError(f"{who} expects {layout} or [B, N, C] input, got shape {tuple(x.shape)}")


@shape_check
def _grid(inputs: Tensor, channels_first: bool) -> Tensor:
    """TokenLearnerModule's input as [B, H, W, C]: [B, H*H, C] is reshaped to a square grid."""
    if inputs.ndim == 3:
        n, hw, c = inputs.shape
        # Not math.isqrt: torch.compile(dynamic=True) cannot trace it on a symbolic size. A float64 square root
        # is exact for perfect squares (up to 2**52), and the check below rejects the rest.
        if isinstance(hw, Tensor):  # torch.jit.trace: sizes are 0-d tensors (round() takes none); N is fixed
            hw = int(hw)
        h = round(hw ** 0.5)
        if h * h != hw:
            # Scenic means to raise 'Only square inputs supported.' but reshapes first and fails with a
            # TypeError about the reshape; we raise the intended error, naming the shape.
            raise ShapeError(
                f"TokenLearnerModule (v1) needs a square token grid for [B, N, C] input: N={hw} is not a "
                "perfect square. Pass [B, H, W, C] for a non-square grid, or use TokenLearnerModuleV11."
            )
        return inputs.reshape(n, h, h, c)
    if inputs.ndim == 4:
        return inputs.permute(0, 2, 3, 1) if channels_first else inputs
    raise ShapeError(
        f"TokenLearnerModule expects [B, H, W, C] or [B, H*H, C] input, got shape {tuple(inputs.shape)}"
    )


@shape_check
def _fuser_original(inputs: Tensor, original: Tensor, channels_first: bool) -> Tensor:
    """TokenFuser's ``original`` as [B, N, C], checked against ``inputs`` [B, S, C]."""
    if inputs.ndim != 3:
        raise ShapeError(f"TokenFuser expects inputs [B, S, C], got shape {tuple(inputs.shape)}")
    original = _tokens(original, "TokenFuser (original)", channels_first)
    if original.shape[0] != inputs.shape[0] or original.shape[-1] != inputs.shape[-1]:
        # Scenic fails inside einsum for a batch mismatch and silently accepts a channel mismatch.
        raise ShapeError(
            f"TokenFuser: inputs [B, S, C] = {tuple(inputs.shape)} and original [B, N, C] = "
            f"{tuple(original.shape)} must agree in batch and channels"
        )
    return original


# Rank-dependent layouts: one call each in a torch.fx graph (FX cannot branch on a traced tensor's rank).
torch.fx.wrap("_tokens")
torch.fx.wrap("_grid")
torch.fx.wrap("_fuser_original")


class TokenLearnerModule(HubMixin, nn.Module):
    """TokenLearner v1 (the paper's module): [B, H, W, C] or square [B, H*H, C] -> [B, num_tokens, C].

    LayerNorm -> 3 x (Conv 3x3 SAME, no bias, gelu) -> Conv 3x3 -> sigmoid gives one spatial map per token;
    each token is the sum (or mean) over positions of the *raw* input weighted by its map.
    """

    def __init__(
        self,
        num_tokens: int,
        use_sum_pooling: bool = True,
        *,
        channels_first: bool = False,
        input_shape: Optional[Sequence[int]] = None,
    ) -> None:
        """Scenic's fields, then the port's: ``channels_first`` input layout; ``input_shape`` one example's
        shape as ``forward`` takes it ((H, W, C) or (H*H, C)): given it, every parameter exists on return."""
        super().__init__()
        self.num_tokens = num_tokens
        self.use_sum_pooling = use_sum_pooling
        self.channels_first = channels_first
        self.LayerNorm_0 = LayerNorm()
        for i in range(4):
            in_ch = None if i == 0 else num_tokens
            setattr(self, f"Conv_{i}", Conv(num_tokens, (3, 3), in_ch, padding="SAME", use_bias=False))
        if input_shape is not None:
            build_parameters(self, [input_shape])

    def forward(self, inputs: Tensor) -> Tensor:
        """[B, H, W, C] ([B, C, H, W] if channels_first) or [B, H*H, C] -> [B, num_tokens, C]."""
        grid = _grid(inputs, self.channels_first)  # [B, H, W, C]
        selected = self.LayerNorm_0(grid).permute(0, 3, 1, 2)  # [B, C, H, W] for torch convolutions.
        for i in range(3):
            selected = gelu(getattr(self, f"Conv_{i}")(selected))
        selected = self.Conv_3(selected)  # [B, S, H, W]
        selected = torch.sigmoid(selected.flatten(2))  # [B, S, H*W]
        feat = grid.flatten(1, 2)  # [B, H*W, C]: the raw input, not the normalised one
        out = torch.bmm(selected, feat)  # [B, S, C]
        return out if self.use_sum_pooling else out / feat.shape[1]


class TokenLearnerModuleV11(HubMixin, nn.Module):
    """TokenLearner v1.1: [B, H, W, C] (any H, W) or [B, N, C] -> [B, num_tokens, C].

    LayerNorm -> MlpBlock ``token_masking`` (C -> bottleneck_dim -> num_tokens) -> softmax over positions;
    each token is the softmax-weighted sum of the raw input.
    """

    def __init__(
        self,
        num_tokens: int,
        bottleneck_dim: int = 64,
        dropout_rate: float = 0.0,
        *,
        channels_first: bool = False,
        input_shape: Optional[Sequence[int]] = None,
    ) -> None:
        """Scenic's fields, then the port's: ``channels_first`` input layout; ``input_shape`` one example's
        shape as ``forward`` takes it ((H, W, C) or (N, C)): given it, every parameter exists on return."""
        super().__init__()
        self.num_tokens = num_tokens
        self.bottleneck_dim = bottleneck_dim
        self.dropout_rate = dropout_rate
        self.channels_first = channels_first
        self.LayerNorm_0 = LayerNorm()
        self.token_masking = MlpBlock(bottleneck_dim, num_tokens, dropout_rate)
        if input_shape is not None:
            build_parameters(self, [input_shape])

    def forward(self, inputs: Tensor) -> Tensor:
        """[B, H, W, C] ([B, C, H, W] if channels_first) or [B, N, C] -> [B, num_tokens, C]."""
        feat = _tokens(inputs, "TokenLearnerModuleV11", self.channels_first)  # [B, N, C]
        selected = self.token_masking(self.LayerNorm_0(feat))  # [B, N, S]
        selected = torch.softmax(selected.transpose(1, 2), dim=-1)  # [B, S, N]
        return torch.bmm(selected, feat)


class TokenFuser(HubMixin, nn.Module):
    """TokenFuser: mixes the learned tokens back onto the positions of ``original``.

    ``forward(inputs [B, S, C], original [B, N, C] or [B, H, W, C]) -> [B, N, C]``. Scenic quirk kept: the
    output is [B, H*W, C] even for a 4-D ``original`` (Scenic's reshape back to 4-D is dead code). The
    residual is not added here (EncoderModFuser adds it).
    """

    def __init__(
        self,
        use_normalization: bool = True,
        bottleneck_dim: int = 64,
        dropout_rate: float = 0.0,
        *,
        channels_first: bool = False,
        input_shapes: Optional[Sequence[Sequence[int]]] = None,
    ) -> None:
        """Scenic's fields, then the port's: ``channels_first`` layout of a 4-D ``original``; ``input_shapes``
        the shapes of one example of ``inputs`` and ``original``, e.g. ``[(8, 768), (196, 768)]``: given
        them, every parameter exists on return."""
        super().__init__()
        self.use_normalization = use_normalization
        self.bottleneck_dim = bottleneck_dim
        self.dropout_rate = dropout_rate
        self.channels_first = channels_first
        if use_normalization:
            self.fuser_mix_norm1 = LayerNorm()
        # Flax auto-names in creation order: Dense_0, then (fuser_mix_norm2), LayerNorm_0, token_masking.
        self.Dense_0 = Dense(None, None, kernel_init=init.zeros_kernel_, bias_init=init.zeros_)
        if use_normalization:
            self.fuser_mix_norm2 = LayerNorm()
        self.LayerNorm_0 = LayerNorm()
        self.token_masking = MlpBlock(bottleneck_dim, None, dropout_rate)
        self.Dropout_0 = Dropout(dropout_rate)
        if input_shapes is not None:
            build_parameters(self, input_shapes)

    def forward(self, inputs: Tensor, original: Tensor) -> Tensor:
        """``inputs`` [B, S, C], ``original`` [B, N, C] or [B, H, W, C] ([B, C, H, W] if channels_first)
        -> [B, N, C] (N = H*W)."""
        original = _fuser_original(inputs, original, self.channels_first)
        if self.Dense_0.out_features is None:  # lazy: a Dense over the token axis, S -> S
            s = inputs.shape[1]
            self.Dense_0.out_features = s
            self.token_masking.Dense_1.out_features = s
        if self.use_normalization:
            inputs = self.fuser_mix_norm1(inputs)
        inputs = self.Dense_0(inputs.transpose(1, 2)).transpose(1, 2)  # [B, S, C]
        if self.use_normalization:
            inputs = self.fuser_mix_norm2(inputs)
        mix = torch.sigmoid(self.token_masking(self.LayerNorm_0(original)))  # [B, N, S]
        return self.Dropout_0(torch.bmm(mix, inputs))
