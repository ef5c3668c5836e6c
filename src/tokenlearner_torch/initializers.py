"""Scenic's initialisers, in torch, so that training from scratch starts from Scenic's distributions.

Each kernel initialiser takes ``(tensor, fan_in, fan_out)`` with the fans that Flax computes on the Flax
kernel (for a convolution: receptive field times channels; for attention: the flattened DenseGeneral
kernel), because torch's own fan rules read a torch weight layout that differs from Flax's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# jax.random.truncated_normal(-2, 2) has standard deviation 0.8796...; Flax divides by it so that the
# truncated distribution has the requested variance.
_TRUNC_STD = 0.87962566103423978


def lecun_normal_(t: Tensor, fan_in: int, fan_out: int) -> None:
    """Flax's default kernel init: variance_scaling(1, 'fan_in', 'truncated_normal')."""
    std = math.sqrt(1.0 / fan_in) / _TRUNC_STD
    nn.init.trunc_normal_(t, 0.0, std, -2.0 * std, 2.0 * std)


def xavier_uniform_(t: Tensor, fan_in: int, fan_out: int) -> None:
    """Flax's xavier_uniform: U(-a, a), a = sqrt(6 / (fan_in + fan_out))."""
    a = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(t, -a, a)


def zeros_kernel_(t: Tensor, fan_in: int = 0, fan_out: int = 0) -> None:
    """``nn.initializers.zeros`` for a kernel (TokenFuser ``Dense_0``, ``output_projection``)."""
    nn.init.zeros_(t)


def zeros_(t: Tensor) -> None:
    """Flax's default bias init."""
    nn.init.zeros_(t)


def normal_(t: Tensor, stddev: float) -> None:
    """``nn.initializers.normal(stddev)``: a plain (untruncated) normal."""
    nn.init.normal_(t, 0.0, stddev)


def normal_1e6_(t: Tensor) -> None:
    """Scenic MlpBlock biases: N(0, 1e-6), not zero."""
    normal_(t, 1e-6)


def central_frame_(t: Tensor, fan_in: int, fan_out: int) -> None:
    """ViViT's ``central_frame_initializer`` for the 3-D patch embedding, quirk included.

    Scenic quirk: it means to keep only the central *time* slice, but it zeroes along Flax kernel axis 2
    (patch width) using the index ``kt // 2``. torch weight [out, in, kt, kh, kw]: Flax axis 2 is torch dim 4.
    """
    lecun_normal_(t, fan_in, fan_out)
    centre = t.shape[2] // 2
    with torch.no_grad():
        t[..., :centre].zero_()
        t[..., centre + 1 :].zero_()


def average_frame_(t: Tensor, fan_in: int, fan_out: int) -> None:
    """ViViT's ``average_frame_initializer``: one lecun-normal time slice tiled over time (torch dim 2)."""
    if t.shape[2] <= 1:
        raise ValueError("average_frame_initializer needs a temporal patch size > 1")
    lecun_normal_(t, fan_in, fan_out)
    with torch.no_grad():
        t.copy_(t[:, :, :1].expand_as(t))
