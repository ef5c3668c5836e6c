"""tokenlearner-torch: Google Scenic's TokenLearner in PyTorch, numerically equal to Scenic.

Modules mirror ``scenic/projects/token_learner/model.py`` (same options, defaults, initialisers and
parameter tree); :func:`from_scenic` builds one from a Scenic class name and kwargs;
``tokenlearner_torch.weights_convert`` converts Flax parameters and checkpoints.
"""

from __future__ import annotations

import typing

from ._lazy import lazy_exports
from .errors import CheckpointError, ConfigError, ConversionError, ShapeError, TokenLearnerError

__version__ = "0.1.0"

# The public names and the submodule defining each, imported on first access (see _lazy.py): so that
# `tokenlearner-convert` can read a checkpoint while torch is still being imported in another thread.
# A new public name goes here (and into the TYPE_CHECKING imports below); a new public subpackage into
# _SUBMODULES.
_LAZY = {
    "from_scenic": ".scenic",
    "numerics": ".numerics_mode",
    "set_layer_norm_numerics": ".numerics_mode",
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

# Public subpackages, reachable as attributes (`tokenlearner_torch.weights_convert.convert`) without an import.
_SUBMODULES = ("errors", "weights_convert", "parity", "training", "viz", "hub")

if typing.TYPE_CHECKING:  # pragma: no cover
    from .intermediates import capture_intermediates
    from .layers import AddPositionEmbs, Encoder1DBlock, MlpBlock, MultiHeadDotProductAttention
    from .models import EncoderMod, EncoderModFuser, TokenLearnerViT, TokenLearnerViTRepresentation
    from .scenic import from_scenic
    from .numerics_mode import numerics, set_layer_norm_numerics
    from .token_learner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11
    from .weights_convert.pretrained import load_pretrained


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), _SUBMODULES)
del annotations, typing, lazy_exports  # the namespace holds the public API only (dir() shows nothing else either)
