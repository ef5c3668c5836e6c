"""Scenic's in-step mixup (``dataset_utils.mixup``, applied by train_step when ``config.mixup.alpha``).

One weight ``w ~ Beta(alpha, alpha)`` per batch; ``x <- w x + (1 - w) x[::-1]`` along the batch axis, and
the same for the (one-hot) labels. Scenic draws ``w`` from its JAX random stream, which cannot be
reproduced: the port draws it from a torch generator (seeded by the trainer from ``config.rng_seed``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError

__all__ = ["mixup", "sample_mixup_weight"]


def sample_mixup_weight(alpha: float, generator: Optional[torch.Generator] = None) -> float:
    """A draw from Beta(alpha, alpha), through two Gamma(alpha) draws of ``generator``."""
    if alpha <= 0:
        raise ConfigError(f"config.mixup.alpha must be > 0, got {alpha}")
    conc = torch.full((2,), float(alpha), dtype=torch.float64)
    # torch's Gamma sampler takes no generator: draw under a forked global RNG seeded from `generator`.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else None
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        g = torch._standard_gamma(conc)
    return float(g[0] / (g[0] + g[1]))


def mixup(inputs: Tensor, labels: Tensor, weight: float, image_format: str = "NHWC") -> tuple[Tensor, Tensor]:
    """Mix a batch with its reverse: ``w * a + (1 - w) * a[::-1]`` along ``N`` for inputs and labels."""
    if labels.ndim < 2 or labels.shape[-1] == 1:
        raise ShapeError("mixup requires one-hot labels [B, C] (dataset_meta_data target_is_onehot=True)")
    if "N" not in image_format or image_format.index("N") >= inputs.ndim:
        raise ConfigError(f"config.mixup.image_format {image_format!r} must contain N (the batch axis)")
    n = image_format.index("N")
    mixed_inputs = weight * inputs + (1.0 - weight) * inputs.flip(n)
    mixed_labels = weight * labels + (1.0 - weight) * labels.flip(0)
    return mixed_inputs, mixed_labels
