"""tokenlearner-torch: Google Scenic's TokenLearner in PyTorch, numerically equal to Scenic.

Where to start: README.md (five minutes), then docs/ (converter.md, parity.md, training.md, viz.md, deploy.md).

Commands (installed with the package):

* ``tokenlearner-convert``: a Scenic/Flax checkpoint to a folder (``model.safetensors`` + ``config.json``) and
  back (``--to-flax``); no JAX needed.
* ``tokenlearner-parity``: prove, on your model, that the port computes what Scenic computes
  (``check`` stored cases, ``live`` against Flax, ``train`` a training step).
* ``tokenlearner-viz``: draw the token maps of a model over its input images or video frames.
* ``tokenlearner-train``: run a Scenic experiment config as a training job.

Python:

* ``load_pretrained(folder)``: the module a converted folder holds, weights loaded strictly.
* ``from_scenic(scenic_class, constructor_kwargs, input_shapes=None)``: a module from Scenic's class name and
  kwargs (as a golden ``config.json`` holds them).
* The modules, Scenic's classes with Scenic's fields and parameter names: ``TokenLearnerModule``,
  ``TokenLearnerModuleV11``, ``TokenFuser``, ``EncoderMod``, ``EncoderModFuser``, ``TokenLearnerViT``,
  ``TokenLearnerViTRepresentation``, ``Encoder1DBlock``, ``MlpBlock``, ``MultiHeadDotProductAttention``,
  ``AddPositionEmbs`` (attributes of this package; each documented in its module:
  ``help(tokenlearner_torch.TokenLearnerViT)``).
* ``tokenlearner_torch.weights_convert``: ``flax_to_torch`` / ``torch_to_flax`` and checkpoint readers.
* ``tokenlearner_torch.training``: Scenic's losses, optimisers, schedules, surgery, ``ScenicTrainer`` and ``train``.
* ``tokenlearner_torch.viz``: ``token_maps`` / ``token_diversity`` (the numbers behind ``tokenlearner-viz``).
* ``tokenlearner_torch.parity``: the parity harness as a library (``check_case``, the pytest plugin).
* ``tokenlearner_torch.hub``: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (every module has them).
* ``numerics(...)`` / ``set_layer_norm_numerics``: LayerNorm's numerics (fused, or XLA:CPU's order).
* ``capture_intermediates(model)``: every submodule's output, keyed by Flax module path.
* Errors: ``TokenLearnerError`` and its kinds ``ConfigError``, ``ShapeError``, ``ConversionError``, ``CheckpointError``.
"""

from __future__ import annotations

import typing

from ._lazy import lazy_exports
from .errors import TokenLearnerError

__version__ = "0.1.0"

# The modules defining the public functions (the others define classes).
_FUNCTION_MODULES = (".scenic", ".numerics_mode", ".weights_convert.pretrained", ".intermediates")
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
    "ShapeError": ".errors",
    "ConfigError": ".errors",
    "ConversionError": ".errors",
    "CheckpointError": ".errors",
}

# `from tokenlearner_torch import *` and help(): the functions and the base error. The classes (modules, the
# kinds of error) are attributes too, listed by dir(), but not in __all__: help() would print each one's
# inherited methods (every nn.Module method once per module class: 13,000 lines); each is documented in its
# own module.
__all__ = [*(name for name, module in _LAZY.items() if module in _FUNCTION_MODULES), "TokenLearnerError"]

# Public subpackages, reachable as attributes (`tokenlearner_torch.weights_convert.convert`) without an import.
_SUBMODULES = ("errors", "weights_convert", "parity", "training", "viz", "hub")

if typing.TYPE_CHECKING:  # pragma: no cover
    from .intermediates import capture_intermediates
    from .errors import CheckpointError, ConfigError, ConversionError, ShapeError
    from .layers import AddPositionEmbs, Encoder1DBlock, MlpBlock, MultiHeadDotProductAttention
    from .models import EncoderMod, EncoderModFuser, TokenLearnerViT, TokenLearnerViTRepresentation
    from .scenic import from_scenic
    from .numerics_mode import numerics, set_layer_norm_numerics
    from .token_learner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11
    from .weights_convert.pretrained import load_pretrained


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), _SUBMODULES)
del annotations, typing, lazy_exports, _FUNCTION_MODULES  # the namespace holds the public API only (dir() shows nothing else either)
