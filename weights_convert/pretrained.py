"""``load_pretrained(folder)``: a converted folder (``model.safetensors`` + ``config.json``) back as a module."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from tokenlearner_torch.errors import CheckpointError, ConversionError, TokenLearnerError

from .writer import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME

__all__ = ["load_pretrained", "build_skeleton", "read_folder_config", "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT_VERSION"]


class _SkipInit(TorchFunctionMode):
    """Makes in-place initialisers no-ops on meta tensors.

    A module built under ``torch.device('meta')`` still runs its initialisers; on meta tensors some of them
    (``normal_``) go through Python reference implementations whose first use imports torch._dynamo
    (~5 s). Nothing is computed on meta tensors anyway, so they are skipped.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):
            first = args[0] if args else kwargs.get("tensor")
            if isinstance(first, torch.Tensor) and first.is_meta:
                return first
        return func(*args, **kwargs)


def build_skeleton(scenic_class: str, constructor_kwargs: Mapping[str, Any]) -> nn.Module:
    """The module of ``from_scenic`` with every parameter on the meta device: structure and shapes, no memory."""
    from tokenlearner_torch.scenic import from_scenic

    with torch.device("meta"), _SkipInit():
        return from_scenic(scenic_class, constructor_kwargs)


def read_folder_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``config.json`` of a converted folder; CheckpointError names what is wrong."""
    path = Path(folder)
    if not path.exists():
        raise CheckpointError(f"{path}: no such folder (expected a converted folder with {WEIGHTS_NAME} and {CONFIG_NAME})")
    if not path.is_dir():
        raise CheckpointError(f"{path}: is a file, not a converted folder (expected {WEIGHTS_NAME} and {CONFIG_NAME} inside)")
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME} (expected a folder written by tokenlearner-convert)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({str(exc)[:80]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("scenic_class"), str) or not isinstance(cfg.get("constructor_kwargs"), dict):
        raise CheckpointError(f"{cfg_path}: expected {{'scenic_class': str, 'constructor_kwargs': object}}")
    version = cfg.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_path}: format_version {version!r} is newer than this library reads ({FORMAT_VERSION})")
    return cfg


def _load_tensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {WEIGHTS_NAME} (expected a folder written by tokenlearner-convert)")
    device = str(map_location) if map_location is not None else "cpu"
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, ValueError, RuntimeError, OSError, OverflowError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__}); it is truncated or corrupt") from None


def load_pretrained(folder: str | os.PathLike[str], map_location: Any = "cpu") -> nn.Module:
    """Build the module described by ``folder/config.json`` and load ``folder/model.safetensors`` strictly.

    Only safetensors is read (no pickle). The tensors keep the dtype they were saved with (a bf16 conversion
    gives bf16 parameters). The module is returned in ``eval()`` mode. A missing or corrupt folder raises
    :class:`~tokenlearner_torch.errors.CheckpointError`; weights that do not fit the config raise
    :class:`~tokenlearner_torch.errors.ConversionError`.
    """
    path = Path(folder)
    cfg = read_folder_config(path)
    state = _load_tensors(path / WEIGHTS_NAME, map_location)
    try:
        model = build_skeleton(cfg["scenic_class"], cfg["constructor_kwargs"])
    except TokenLearnerError as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ConversionError(f"{path}: weights do not fit {cfg['scenic_class'].rsplit('.', 1)[-1]}: {first}") from None
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ConversionError(f"{path}: parameters not loaded: {', '.join(left[:10])}")
    return model.eval()
