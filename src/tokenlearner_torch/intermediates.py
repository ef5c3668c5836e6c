"""Record every submodule's output, keyed and laid out as Flax's ``capture_intermediates`` records them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .layers import Dropout

__all__ = ["capture_intermediates"]


def _flax_layout(module: nn.Module, out: Tensor) -> Tensor:
    # torch convolutions produce [B, C, *spatial]; Flax records [B, *spatial, C].
    if getattr(module, "channels_first_output", False):
        return out.movedim(1, -1)
    return out


def capture_intermediates(model: nn.Module, *inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Runs ``model(*inputs)`` and returns ``(output, {flax path: output of that submodule})``.

    Keys are Flax module paths (``Transformer/encoderblock_0/MlpBlock_0/Dense_0``); Dropout layers and the
    top-level output are left out, as in the goldens. A module called more than once keeps its first output.
    """
    records: dict[str, Tensor] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor) and name not in records:
                records[name] = _flax_layout(module, out)

        return fn

    for name, module in model.named_modules():
        if name and not isinstance(module, (Dropout, nn.Dropout)):
            handles.append(module.register_forward_hook(hook(name.replace(".", "/"))))
    try:
        out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return out, records
