"""Hugging Face Hub: ``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` on every module.

The folder is the converter's (``tokenlearner-convert``): ``model.safetensors`` + ``config.json`` holding
``{"scenic_class", "constructor_kwargs", "format_version"}``, so ``tokenlearner_torch.load_pretrained`` reads
what ``save_pretrained`` writes and ``from_pretrained`` reads what the converter writes. The Hub side goes
through ``huggingface_hub.PyTorchModelHubMixin`` (its download, model card and upload), which is an optional
extra: ``pip install 'tokenlearner-torch[hub]'``. Without it the three methods raise one ImportError naming
the extra; nothing else in the package needs it.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, TypeVar

import torch
from torch import nn

from .errors import ConfigError

__all__ = ["HubMixin", "from_pretrained", "HUB_EXTRA"]

HUB_EXTRA = "pip install 'tokenlearner-torch[hub]'"
_LIBRARY = "tokenlearner-torch"
_REPO_URL = "https://github.com/google-research/scenic/tree/main/scenic/projects/token_learner"
_PAPER_URL = "https://arxiv.org/abs/2106.11297"
# Keyword-only port options that change what the inputs mean or how the module computes (MlpBlock's compute
# dtype; elsewhere ``dtype`` is a Scenic field and is stored). The folder format holds Scenic's fields only,
# so a module built with one of them set cannot be saved faithfully; the other keyword-only arguments
# (dim, in_dim, input_shape(s)) give shapes, which the weights carry.
_UNSTORED_OPTIONS = ("channels_first", "dtype")

M = TypeVar("M", bound=nn.Module)
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


class HubMixin:
    """``save_pretrained``, ``push_to_hub`` and the class method ``from_pretrained`` for the port's modules.

    The constructor arguments are recorded when the module is created (as ``PyTorchModelHubMixin`` does), so
    that the saved ``config.json`` rebuilds the same module.
    """

    def __new__(cls, *args: Any, **kwargs: Any):
        instance = super().__new__(cls)
        if args or kwargs:  # (copy / pickle call __new__ without arguments, then restore __dict__)
            try:
                bound = inspect.signature(cls.__init__).bind(None, *args, **kwargs)
            except TypeError:
                return instance  # __init__ raises the real error
            arguments = dict(bound.arguments)
            arguments.pop(next(iter(inspect.signature(cls.__init__).parameters)), None)  # self
            instance.__dict__["_hub_init_arguments"] = arguments
        return instance

    # ------------------------------------------------------------------ folder config

    def hub_config(self) -> dict[str, Any]:
        """The ``config.json`` of this module's folder: Scenic class, Scenic constructor fields, format version."""
        from .scenic import SCENIC_CLASSES, _scenic_parameters
        from .weights_convert.writer import FORMAT_VERSION

        cls = type(self)
        dotted = next((name for name, c in SCENIC_CLASSES.items() if c is cls), None)
        if dotted is None:
            raise ConfigError(f"{cls.__name__} is not one of the Scenic classes the folder format describes")
        arguments = self.__dict__.get("_hub_init_arguments", {})
        fields = _scenic_parameters(cls)
        params = inspect.signature(cls.__init__).parameters
        for name in _UNSTORED_OPTIONS:
            if name in arguments and name not in fields and arguments[name] != params[name].default:
                raise ConfigError(
                    f"{cls.__name__}: {name}={arguments[name]!r} is a port option the folder format does not "
                    f"store (config.json holds Scenic's fields); save a model built without it and pass {name} "
                    "when you build the model that loads the weights"
                )
        if "num_classes" in arguments and isinstance(getattr(self, "num_classes", None), int):
            arguments = {**arguments, "num_classes": self.num_classes}  # reset_classifier() changes the head
        kwargs = {name: _jsonable(value, name) for name, value in arguments.items() if name in fields}
        return {"scenic_class": dotted, "constructor_kwargs": kwargs, "format_version": FORMAT_VERSION}

    def _check_config_fits(self, config: Mapping[str, Any]) -> None:
        """The module ``config`` describes has this module's parameter names and shapes (a module changed
        after construction, e.g. a removed head, would otherwise be saved as a folder that cannot load)."""
        from .weights_convert.pretrained import build_skeleton

        assert isinstance(self, nn.Module)
        try:
            skeleton = build_skeleton(config["scenic_class"], config["constructor_kwargs"])
        except ValueError as exc:
            raise ConfigError(f"{type(self).__name__}: its constructor arguments no longer describe it ({exc})") from None
        mine = dict(self.named_parameters())
        theirs = dict(skeleton.named_parameters())
        differ = sorted(set(mine) ^ set(theirs)) or [
            k for k, p in theirs.items()
            if not isinstance(p, nn.parameter.UninitializedParameter) and tuple(p.shape) != tuple(mine[k].shape)
        ]  # fmt: skip
        if differ:
            raise ConfigError(
                f"{type(self).__name__}: changed since construction; config.json would describe another module "
                f"(parameters that differ: {', '.join(differ[:4])}); the folder format holds Scenic's "
                "constructor fields only"
            )

    def _saveable_config(self) -> dict[str, Any]:
        """:meth:`hub_config`, after checking that every parameter has its shape (a lazy module cannot be saved)."""
        assert isinstance(self, nn.Module)
        config = self.hub_config()
        lazy = [n for n, p in self.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
        if lazy:
            raise ConfigError(
                f"{type(self).__name__}: parameters without a shape yet ({', '.join(lazy[:3])}...): build the "
                "model with its input shapes (from_scenic(..., input_shapes=...)) or run it once before saving"
            )
        self._check_config_fits(config)
        return config

    def _write_folder(self, save_directory: Path) -> None:
        """Write ``model.safetensors`` then ``config.json``, each through a temporary file renamed into place."""
        from safetensors.torch import save_file

        from . import __version__
        from .weights_convert.writer import CONFIG_NAME, WEIGHTS_NAME

        config = self._saveable_config()
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
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

    # ------------------------------------------------------------------ the Hub methods

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> str | None:
        """Write the converter's folder (``model.safetensors`` + ``config.json``) and a model card ``README.md``.

        Keyword arguments are ``PyTorchModelHubMixin.save_pretrained``'s (``push_to_hub=True, repo_id=...``,
        ``model_card_kwargs``); returns the commit URL when pushing, else None.
        """
        adapter = _adapter(self)
        self._saveable_config()  # before the mixin creates the folder: nothing is written for a module that cannot be saved
        return adapter.save_pretrained(save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the folder ``save_pretrained`` writes to the Hub repository ``repo_id`` (one commit).

        Keyword arguments are ``PyTorchModelHubMixin.push_to_hub``'s (``private``, ``token``, ``branch``,
        ``commit_message``, ``create_pr``...). Returns the commit URL.
        """
        adapter = _adapter(self)
        self._saveable_config()
        return adapter.push_to_hub(repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls: type[M],
        pretrained_model_name_or_path: str | os.PathLike[str],
        *,
        map_location: Any = "cpu",
        revision: str | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> M:
        """Load a folder or a Hub repository (``"user/name"``) written by ``save_pretrained`` or the converter.

        The module is built from ``config.json``, loaded strictly from ``model.safetensors`` (the dtype it was
        saved in) and returned in ``eval()`` mode. Called on a class, the folder must hold that class.
        """
        adapter = _adapter_class()
        name = pretrained_model_name_or_path
        if not os.path.isdir(name) and (isinstance(name, os.PathLike) or os.path.exists(name) or not _REPO_ID.fullmatch(str(name))):
            from .weights_convert.pretrained import load_pretrained

            load_pretrained(name)  # not a folder and not a repository id: raises CheckpointError naming the path
        model = adapter.from_pretrained(
            pretrained_model_name_or_path,
            map_location=map_location,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
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
    return HubMixin.from_pretrained.__func__(HubMixin, pretrained_model_name_or_path, **kwargs)  # type: ignore[attr-defined]


def _jsonable(value: Any, name: str) -> Any:
    """A constructor argument as JSON: ConfigDicts become dicts, torch dtypes their names."""
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, torch.dtype):
        return str(value).rsplit(".", 1)[-1]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, name) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"constructor argument {name}={value!r} cannot be written to config.json (expected JSON values)")


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
            self.module._write_folder(Path(save_directory))

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
