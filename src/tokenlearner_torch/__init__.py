"""tokenlearner-torch: Google Scenic's TokenLearner in PyTorch, numerically equal to Scenic.

Modules mirror ``scenic/projects/token_learner/model.py`` (same options, defaults, initialisers and
parameter tree); :func:`from_scenic` builds one from a Scenic class name and kwargs;
``tokenlearner_torch.weights_convert`` converts Flax parameters and checkpoints.
"""

from .errors import CheckpointError, ConfigError, ConversionError, ShapeError, TokenLearnerError
from .intermediates import capture_intermediates
from .layers import AddPositionEmbs, Encoder1DBlock, MlpBlock, MultiHeadDotProductAttention
from .models import EncoderMod, EncoderModFuser, TokenLearnerViT, TokenLearnerViTRepresentation
from .scenic import from_scenic
from .token_learner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11

from .weights_convert.pretrained import load_pretrained  # noqa: E402  (needs the modules above)

__version__ = "0.1.0"

__all__ = [
    "from_scenic",
    "load_pretrained",
    "capture_intermediates",
    "TokenLearnerModule",
    "TokenLearnerModuleV11",
    "TokenFuser",
    "EncoderMod",
    "EncoderModFuser",
    "TokenLearnerViT",
    "TokenLearnerViTRepresentation",
    "Encoder1DBlock",
    "MlpBlock",
    "MultiHeadDotProductAttention",
    "AddPositionEmbs",
    "TokenLearnerError",
    "ShapeError",
    "ConfigError",
    "ConversionError",
    "CheckpointError",
]
