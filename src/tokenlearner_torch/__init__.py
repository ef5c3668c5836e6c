"""tokenlearner-torch: Google Scenic's TokenLearner in PyTorch, numerically equal to Scenic.

Modules mirror ``scenic/projects/token_learner/model.py`` (same options, defaults, initialisers and
parameter tree); :func:`from_scenic` builds one from a Scenic class name and kwargs;
``tokenlearner_torch.weights_convert`` converts Flax parameters and checkpoints.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError, ConversionError, ShapeError, TokenLearnerError

__version__ = "0.1.0"

# The public names and the submodule defining each. They are imported on first access (PEP 562) so that
# `tokenlearner-convert` can read a checkpoint while torch is still being imported in another thread:
# importing torch costs ~2 s of the command's start-up.
_LAZY = {
    "from_scenic": ".scenic",
    "load_pretrained": ".weights_convert.pretrained",
    "capture_intermediates": ".intermediates",
    "TokenLearnerModule": ".token_learner",
    "TokenLearnerModuleV11": ".token_learner",
    "TokenFuser": ".token_learner",
    "EncoderMod": ".models",
    "EncoderModFuser": ".models",
    "TokenLearnerViT": ".models",
    "TokenLearnerViTRepresentation": ".models",
    "Encoder1DBlock": ".layers",
    "MlpBlock": ".layers",
    "MultiHeadDotProductAttention": ".layers",
    "AddPositionEmbs": ".layers",
}

__all__ = [
    *_LAZY,
    "TokenLearnerError",
    "ShapeError",
    "ConfigError",
    "ConversionError",
    "CheckpointError",
]

if TYPE_CHECKING:  # pragma: no cover
    from .intermediates import capture_intermediates
    from .layers import AddPositionEmbs, Encoder1DBlock, MlpBlock, MultiHeadDotProductAttention
    from .models import EncoderMod, EncoderModFuser, TokenLearnerViT, TokenLearnerViTRepresentation
    from .scenic import from_scenic
    from .token_learner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11
    from .weights_convert.pretrained import load_pretrained


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tokenlearner_torch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
