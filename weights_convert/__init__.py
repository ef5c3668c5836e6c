"""Scenic/Flax checkpoints to PyTorch weights and back (installed as ``tokenlearner_torch.weights_convert``).

* :func:`flax_to_torch` / :func:`torch_to_flax`: a Flax ``params`` tree <-> a state dict, one rule per layer kind.
* :func:`read_checkpoint` / :func:`read_checkpoint_info`: the parameter tree of a checkpoint (no jax needed).
* :func:`infer_architecture`: the Scenic class and kwargs a parameter tree determines, and what it leaves open.
* :func:`convert`: a checkpoint to a folder (``model.safetensors`` + ``config.json``), as ``tokenlearner-convert``.
* :class:`ParamsMismatchError`: a tree that does not fit the model (a ``ConversionError`` with every problem).
* :func:`load_pretrained`: such a folder back as a module, loaded strictly.
* :func:`to_flax_checkpoint`: a module or folder to a Flax msgpack checkpoint Scenic restores (bitwise).
"""

from __future__ import annotations

import typing

from tokenlearner_torch._lazy import lazy_exports

from .convert import ConversionReport, convert
from .infer import infer_architecture
from .mismatch import ParamsMismatchError
from .readers import read_checkpoint, read_checkpoint_info

# The names below need torch and are imported on first access (PEP 562): reading a checkpoint needs no
# torch, and `tokenlearner-convert` imports torch in a background thread while it reads (see convert.py).
# A new public name that needs torch goes here (and into __all__ and the TYPE_CHECKING imports below).
_LAZY = {
    "flax_to_torch": ".mapping",
    "torch_to_flax": ".mapping",
    "load_pretrained": ".pretrained",
    "to_flax_checkpoint": ".export",
}

__all__ = [
    "flax_to_torch",
    "torch_to_flax",
    "read_checkpoint",
    "read_checkpoint_info",
    "infer_architecture",
    "convert",
    "ConversionReport",
    "ParamsMismatchError",
    "load_pretrained",
    "to_flax_checkpoint",
]

if typing.TYPE_CHECKING:  # pragma: no cover
    from .export import to_flax_checkpoint
    from .mapping import flax_to_torch, torch_to_flax
    from .pretrained import load_pretrained


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
del annotations, typing, lazy_exports  # the namespace holds the public API only (dir() shows nothing else either)
