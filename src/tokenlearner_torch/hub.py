"""Hugging Face Hub: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` on every module.

The folder is the converter's (``tokenlearner-convert``): ``model.safetensors`` + ``config.json`` holding
``{"scenic_class", "constructor_kwargs", "format_version"}``, so ``tokenlearner_torch.load_pretrained`` reads
what ``save_pretrained`` writes and ``from_pretrained`` reads what the converter writes. The Hub side goes
through ``huggingface_hub.PyTorchModelHubMixin`` (its download, model card and upload), which is an optional
extra: ``pip install 'tokenlearner-torch[hub]'``. Without it the three methods raise one ImportError naming
the extra; nothing else in the package needs it.

The methods are :class:`~tokenlearner_torch.conventions.HubMixin`'s (a base class of every module, on the
package's ground floor); this module holds what they run, which builds models (re-exported here: ``HubMixin``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from .conventions import HubMixin
from .errors import ConfigError

__all__ = ["HubMixin", "from_pretrained", "HUB_EXTRA"]

HUB_EXTRA = "pip install 'tokenlearner-torch[hub]'"
_LIBRARY = "tokenlearner-torch"
_REPO_URL = "https://github.com/google-research/scenic/tree/main/scenic/projects/token_learner"
_PAPER_URL = "https://arxiv.org/abs/2106.11297"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _require_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            f"save_pretrained / from_pretrained / push_to_hub need huggingface_hub, which is not installed: {HUB_EXTRA} "
            "(tokenlearner_torch.load_pretrained reads local folders without it)"
        ) from None
    return huggingface_hub


def _saveable_config(module: nn.Module) -> dict[str, Any]:
    """``module.hub_config()``, after checking that every parameter has its shape (a lazy module cannot be
    saved) and that the config still describes the module."""
    config = module.hub_config()
    lazy = [n for n, p in module.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ConfigError(
            f"{type(module).__name__}: parameters without a shape yet ({', '.join(lazy[:3])}...): build the "
            "model with its input shapes (from_scenic(..., input_shapes=...)) or run it once before saving"
        )
    _check_config_fits(module, config)
    return config


def _check_config_fits(module: nn.Module, config: Mapping[str, Any]) -> None:
    """The module ``config`` describes has this module's parameter names and shapes (a module changed
    after construction, e.g. a removed head, would otherwise be saved as a folder that cannot load)."""
    from .weights_convert.pretrained import build_skeleton

    try:
        skeleton = build_skeleton(config["scenic_class"], config["constructor_kwargs"])
    except ValueError as exc:
        raise ConfigError(f"{type(module).__name__}: its constructor arguments no longer describe it ({exc})") from None
    mine = dict(module.named_parameters())
    theirs = dict(skeleton.named_parameters())
    differ = sorted(set(mine) ^ set(theirs)) or [
        k for k, p in theirs.items()
        if not isinstance(p, nn.parameter.UninitializedParameter) and tuple(p.shape) != tuple(mine[k].shape)
    ]  # fmt: skip
    if differ:
        raise ConfigError(
            f"{type(module).__name__}: changed since construction; config.json would describe another module "
            f"(parameters that differ: {', '.join(differ[:4])}); the folder format holds Scenic's "
            "constructor fields only"
        )


def _write_folder(module: nn.Module, save_directory: Path) -> None:
    """Write ``model.safetensors`` then ``config.json``, each through a temporary file renamed into place."""
    from safetensors.torch import save_file

    from . import __version__
    from .weights_convert.writer import CONFIG_NAME, WEIGHTS_NAME

    config = _saveable_config(module)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
    metadata = {
        "format": "pt",
        "scenic_class": config["scenic_class"],
        "converter_version": f"tokenlearner-torch {__version__} (save_pretrained)",
        "dtype_policy": "keep",
    }
    staged = []
    try:
        for name, write in (
            (WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata=metadata)),
            (CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=1) + "\n")),
        ):
            tmp = save_directory / f".{name}.tmp-{os.getpid()}"
            staged.append(tmp)
            write(tmp)
        for tmp, name in zip(staged, (WEIGHTS_NAME, CONFIG_NAME)):
            os.replace(tmp, save_directory / name)
    finally:
        for tmp in staged:
            tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------ what HubMixin's methods run


def save_pretrained(module: nn.Module, save_directory: str | os.PathLike[str], **kwargs: Any) -> str | None:
    """``module.save_pretrained(save_directory, **kwargs)``: see :meth:`HubMixin.save_pretrained`."""
    adapter = _adapter(module)
    _saveable_config(module)  # before the mixin creates the folder: nothing is written for a module that cannot be saved
    return adapter.save_pretrained(save_directory, **kwargs)


def push_to_hub(module: nn.Module, repo_id: str, **kwargs: Any) -> str:
    """``module.push_to_hub(repo_id, **kwargs)``: see :meth:`HubMixin.push_to_hub`."""
    adapter = _adapter(module)
    _saveable_config(module)
    return adapter.push_to_hub(repo_id, **kwargs)


def load(cls: type, pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path, **kwargs)`` (``cls`` HubMixin itself: whatever module the folder holds)."""
    adapter = _adapter_class()
    name = pretrained_model_name_or_path
    if not os.path.isdir(name) and (isinstance(name, os.PathLike) or os.path.exists(name) or not _REPO_ID.fullmatch(str(name))):
        from .weights_convert.pretrained import load_pretrained

        load_pretrained(name)  # not a folder and not a repository id: raises CheckpointError naming the path
    model = adapter.from_pretrained(pretrained_model_name_or_path, **kwargs)
    model.__dict__.pop("_hub_mixin_config", None)  # set by the mixin; the folder's config.json is the truth
    if cls is not HubMixin and not isinstance(model, cls):
        raise ConfigError(
            f"{pretrained_model_name_or_path}: holds a {type(model).__name__}, not a {cls.__name__} "
            f"(load it with {type(model).__name__}.from_pretrained or tokenlearner_torch.from_pretrained)"
        )
    return model


def from_pretrained(pretrained_model_name_or_path: str | os.PathLike[str], **kwargs: Any) -> nn.Module:
    """Whatever module a folder or Hub repository holds (as ``load_pretrained``, plus Hub downloads).

    Keyword arguments as :meth:`HubMixin.from_pretrained` (``map_location``, ``revision``, ``token``...).
    """
    return HubMixin.from_pretrained(pretrained_model_name_or_path, **kwargs)


# ------------------------------------------------------------------ the PyTorchModelHubMixin adapter

_ADAPTER: type | None = None


def _adapter_class() -> type:
    """A ``PyTorchModelHubMixin`` subclass wrapping one module: made on first use (huggingface_hub is optional)."""
    global _ADAPTER
    if _ADAPTER is not None:
        return _ADAPTER
    hub = _require_hub()

    class TokenLearnerHubAdapter(
        hub.PyTorchModelHubMixin,
        library_name=_LIBRARY,
        repo_url=_REPO_URL,
        paper_url=_PAPER_URL,
        license="apache-2.0",
        tags=["tokenlearner", "scenic", "vision"],
    ):
        """The mixin's save / push / download paths around a port module (stored as ``module``)."""

        def __init__(self, module: nn.Module) -> None:
            self.module = module

        def _save_pretrained(self, save_directory: Path) -> None:
            _write_folder(self.module, Path(save_directory))

        @classmethod
        def _from_pretrained(
            cls,
            *,
            model_id: str,
            revision: str | None,
            cache_dir: str | Path | None,
            force_download: bool,
            local_files_only: bool,
            token: str | bool | None,
            map_location: Any = "cpu",
        ) -> nn.Module:
            from .weights_convert.pretrained import load_pretrained
            from .weights_convert.writer import CONFIG_NAME, WEIGHTS_NAME

            if os.path.isdir(model_id):
                return load_pretrained(model_id, map_location=map_location)
            download = dict(repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                            local_files_only=local_files_only, token=token)  # fmt: skip
            hub.hf_hub_download(filename=CONFIG_NAME, **download)
            weights = hub.hf_hub_download(filename=WEIGHTS_NAME, **download)
            # Both files land in the same snapshot folder of the cache: load it as a local folder.
            return load_pretrained(Path(weights).parent, map_location=map_location)

    _ADAPTER = TokenLearnerHubAdapter
    return _ADAPTER


def _adapter(module: nn.Module) -> Any:
    return _adapter_class()(module)
