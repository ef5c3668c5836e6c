"""Hugging Face Hub: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` on every module.

The folder is the converter's (``tokenlearner-convert``): ``model.safetensors`` + ``config.json`` holding
``{"scenic_class", "constructor_kwargs", "format_version"}``, so ``tokenlearner_torch.load_pretrained`` reads
what ``save_pretrained`` writes and ``from_pretrained`` reads what the converter writes. The Hub side goes
through ``huggingface_hub.PyTorchModelHubMixin`` (its download, model card and upload), which is an optional
extra: ``pip install 'tokenlearner-torch[hub]'``. Without it the three methods raise one ImportError naming
the extra; nothing else in the package needs it.

The methods are :class:`~tokenlearner_torch.conventions.HubMixin`'s (a base class of every module, on the
package's ground floor, re-exported here); what they run is :mod:`tokenlearner_torch.folder` (also on the
ground floor). This module sits above the models: :func:`from_pretrained` imports every port class first
(through ``tokenlearner_torch.scenic``), so it loads whatever module a folder holds.
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from . import scenic as _scenic  # noqa: F401  (imports every port module: the class registry is complete)
from .conventions import HubMixin
from .folder import HUB_EXTRA

__all__ = ["HubMixin", "from_pretrained", "HUB_EXTRA"]


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> nn.Module:
    """Whatever module a folder or Hub repository holds (as ``load_pretrained``, plus Hub downloads).

    Keyword arguments as :meth:`HubMixin.from_pretrained` (``map_location``, ``revision``, ``token``...).
    """
    return HubMixin.from_pretrained(pretrained_model_name_or_path, **kwargs)
