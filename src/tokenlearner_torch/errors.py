"""The errors the library raises on bad input.

All derive from ``ValueError`` so that callers who only know "bad input" can catch one thing, and every
message names what was expected.
"""

from __future__ import annotations


class TokenLearnerError(ValueError):
    """Base class of every error raised on bad input by tokenlearner_torch."""


class ShapeError(TokenLearnerError):
    """An input tensor has a shape (rank, size) that the module cannot accept."""


class ConfigError(TokenLearnerError):
    """A constructor option or a Scenic config is invalid or incomplete."""


class ConversionError(TokenLearnerError):
    """Parameters could not be mapped between the Flax tree and the PyTorch module."""


class CheckpointError(TokenLearnerError):
    """A checkpoint file or directory is missing, truncated, corrupt or of an unknown format."""
