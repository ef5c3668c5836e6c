"""``load_pretrained(folder)``: a converted folder (``model.safetensors`` + ``config.json``) back as a module.

The folder code itself is on the package's ground floor (:mod:`tokenlearner_torch.folder`, which the modules'
base class uses too); this module sits above the models: it imports every port class (through
``tokenlearner_torch.scenic``) before resolving a Scenic name, so any folder the converter writes loads here.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from torch import nn

from tokenlearner_torch.folder import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, load_folder, read_folder_config
from tokenlearner_torch.folder import build_skeleton as _build_skeleton

__all__ = ["load_pretrained", "build_skeleton", "read_folder_config", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT_VERSION"]


def _resolve(scenic_class: str) -> type:
    """The port class of a Scenic name, every port module imported first (ConfigError for an unknown name)."""
    from tokenlearner_torch.scenic import _resolve as resolve

    return resolve(scenic_class)


def build_skeleton(scenic_class: str, constructor_kwargs: Mapping[str, Any]) -> nn.Module:
    """The module of ``from_scenic`` with every parameter on the meta device: structure and shapes, no memory."""
    return _build_skeleton(_resolve(scenic_class), constructor_kwargs)


def load_pretrained(folder: str | os.PathLike[str], map_location: Any = "cpu") -> nn.Module:
    """Build the module described by ``folder/config.json`` and load ``folder/model.safetensors`` strictly.

    Only safetensors is read (no pickle). The tensors keep the dtype they were saved with (a bf16 conversion
    gives bf16 parameters). The module is returned in ``eval()`` mode. A missing or corrupt folder raises
    :class:`~tokenlearner_torch.errors.CheckpointError`; weights that do not fit the config raise
    :class:`~tokenlearner_torch.errors.ConversionError`.
    """
    return load_folder(folder, _resolve, map_location=map_location)
