"""The converter's folder (``model.safetensors`` + ``config.json``) on the package's ground floor.

What :class:`~tokenlearner_torch.conventions.HubMixin`'s ``save_pretrained`` / ``push_to_hub`` /
``from_pretrained`` run: read and check ``config.json``, build the module it names (on the meta device, then
load the tensors strictly), write a module's folder atomically, and the ``huggingface_hub.PyTorchModelHubMixin``
adapter (the optional ``hub`` extra) for downloads, model cards and uploads.

Why the class comes from the caller (a ``resolve`` function: Scenic name -> port class, or the class itself):
this module sits below the models and below conventions.py, which imports it; it imports no model, no class
registry, and not conventions (tests/test_house.py: the package's import graph has no circle). Importing it
loads no torch either (the converter imports conventions while torch loads in a thread): torch,
safetensors and huggingface_hub are imported inside the functions that use them.

Folder layout: ``config.json`` is ``{"scenic_class": dotted Scenic name, "constructor_kwargs": Scenic's
fields, "format_version": int}``; ``model.safetensors`` holds the module's ``state_dict`` in the dtype it was
saved with.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from .config_check import check_constructor_kwargs, constructor_fields
from .errors import CheckpointError, ConfigError, ConversionError, TokenLearnerError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "WEIGHTS_NAME", "CONFIG_NAME", "FORMAT_VERSION", "HUB_EXTRA", "build_module", "build_skeleton",
    "read_folder_config", "load_tensors", "load_folder", "save_pretrained", "push_to_hub", "load",
]  # fmt: skip

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# The version of the folder format (config.json's "format_version"): conventions.FOLDER_FORMAT_VERSION and
# weights_convert.writer.FORMAT_VERSION are this number.
FORMAT_VERSION = 1
HUB_EXTRA = "pip install 'tokenlearner-torch[hub]'"
_LIBRARY = "tokenlearner-torch"
_REPO_URL = "https://github.com/google-research/scenic/tree/main/scenic/projects/token_learner"
_PAPER_URL = "https://arxiv.org/abs/2106.11297"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")

# Scenic name -> port class; None for one of Scenic's classes whose module is not imported yet.
Resolver = Callable[[str], Optional[type]]


# ------------------------------------------------------------------ building a module from its fields


def build_module(cls: type, constructor_kwargs: Mapping[str, Any]) -> "nn.Module":
    """``cls(**constructor_kwargs)`` after the checks every config gets: a mapping, no unknown field (the
    closest one named), every required field present. Shapes and mode are the caller's (``from_scenic``)."""
    if not isinstance(constructor_kwargs, Mapping):
        raise ConfigError(f"constructor_kwargs must be a dict, got {type(constructor_kwargs).__name__}")
    check_constructor_kwargs(cls, constructor_kwargs)
    params = constructor_fields(cls)
    absent = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in constructor_kwargs]
    if absent:
        raise ConfigError(f"{cls.__name__}: missing required argument(s) {', '.join(absent)}")
    return cls(**dict(constructor_kwargs))


_SKIP_INIT: type | None = None


def _skip_init() -> Any:
    """A TorchFunctionMode that makes in-place initialisers no-ops on meta tensors (made on first use: torch
    is imported lazily here).

    A module built under ``torch.device('meta')`` still runs its initialisers; on meta tensors some of them
    (``normal_``) go through Python reference implementations whose first use imports torch._dynamo
    (~5 s). Nothing is computed on meta tensors anyway, so they are skipped.
    """
    global _SKIP_INIT
    if _SKIP_INIT is None:
        import torch
        from torch.overrides import TorchFunctionMode

        class _SkipInit(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                name = getattr(func, "__name__", "")
                if name.endswith("_") and not name.endswith("__"):
                    first = args[0] if args else kwargs.get("tensor")
                    if isinstance(first, torch.Tensor) and first.is_meta:
                        return first
                return func(*args, **kwargs)

        _SKIP_INIT = _SkipInit
    return _SKIP_INIT()


def build_skeleton(cls: type, constructor_kwargs: Mapping[str, Any]) -> "nn.Module":
    """The module :func:`build_module` gives, with every parameter on the meta device (structure and shapes,
    no memory), in ``eval()`` mode."""
    import torch

    with torch.device("meta"), _skip_init():
        return build_module(cls, constructor_kwargs).eval()


# ------------------------------------------------------------------ reading a folder


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


def load_tensors(path: Path, map_location: Any) -> dict[str, "torch.Tensor"]:
    """``model.safetensors`` at ``path`` (safetensors only, no pickle); CheckpointError when unreadable."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path.parent}: no {WEIGHTS_NAME} (expected a folder written by tokenlearner-convert)")
    device = str(map_location) if map_location is not None else "cpu"
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, ValueError, RuntimeError, OSError, OverflowError) as exc:
        raise CheckpointError(f"{path}: cannot read the safetensors file ({str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__}); it is truncated or corrupt") from None


def load_folder(
    folder: str | os.PathLike[str], resolve: Resolver, map_location: Any = "cpu", want: type | None = None
) -> "nn.Module":
    """The module ``folder/config.json`` describes, loaded strictly from ``folder/model.safetensors``, in ``eval()``.

    ``resolve``: Scenic class name -> port class (None: a known class whose module is not imported).
    ``want``: the class the caller asked for (``X.from_pretrained``), None for any. A missing or corrupt folder
    raises CheckpointError; weights that do not fit the config ConversionError; a folder holding another
    class than ``want`` ConfigError.
    """
    path = Path(folder)
    cfg = read_folder_config(path)
    state = load_tensors(path / WEIGHTS_NAME, map_location)
    short = cfg["scenic_class"].rsplit(".", 1)[-1]
    try:
        cls = resolve(cfg["scenic_class"])
    except TokenLearnerError as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: {exc}") from None
    if cls is None and want is not None:
        # A port class derives from HubMixin and nn.Module only, so a class not defined yet cannot be a
        # subclass of the (defined) class asked for: this folder holds another class.
        _wrong_class(path, short, want)
    if cls is None:
        raise CheckpointError(
            f"{path / CONFIG_NAME}: {short}'s module is not imported yet; import tokenlearner_torch.scenic (or use "
            "tokenlearner_torch.load_pretrained / tokenlearner_torch.from_pretrained), which imports every class"
        )
    try:
        model = build_skeleton(cls, cfg["constructor_kwargs"])
    except TokenLearnerError as exc:
        raise CheckpointError(f"{path / CONFIG_NAME}: {exc}") from None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise ConversionError(f"{path}: weights do not fit {short}: {first}") from None
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise ConversionError(f"{path}: parameters not loaded: {', '.join(left[:10])}")
    if want is not None and not isinstance(model, want):
        _wrong_class(path, type(model).__name__, want)
    return model.eval()


def _wrong_class(path: Any, held: str, want: type) -> None:
    raise ConfigError(
        f"{path}: holds a {held}, not a {want.__name__} "
        f"(load it with {held}.from_pretrained or tokenlearner_torch.from_pretrained)"
    )


# ------------------------------------------------------------------ writing a folder


def _require_hub() -> Any:
    try:
        import huggingface_hub
    except ImportError:
        raise ImportError(
            f"save_pretrained / from_pretrained / push_to_hub need huggingface_hub, which is not installed: {HUB_EXTRA} "
            "(tokenlearner_torch.load_pretrained reads local folders without it)"
        ) from None
    return huggingface_hub


def _saveable_config(module: "nn.Module") -> dict[str, Any]:
    """``module.hub_config()``, after checking that every parameter has its shape (a lazy module cannot be
    saved) and that the config still describes the module."""
    from torch import nn

    config = module.hub_config()
    lazy = [n for n, p in module.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ConfigError(
            f"{type(module).__name__}: parameters without a shape yet ({', '.join(lazy[:3])}...): build the "
            "model with its input shapes (from_scenic(..., input_shapes=...)) or run it once before saving"
        )
    _check_config_fits(module, config)
    return config


def _check_config_fits(module: "nn.Module", config: Mapping[str, Any]) -> None:
    """The module ``config`` describes has this module's parameter names and shapes (a module changed
    after construction, e.g. a removed head, would otherwise be saved as a folder that cannot load).
    ``hub_config`` names ``type(module)`` itself, so that class builds the comparison."""
    from torch import nn

    try:
        skeleton = build_skeleton(type(module), config["constructor_kwargs"])
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


def _write_folder(module: "nn.Module", save_directory: Path) -> None:
    """Write ``model.safetensors`` then ``config.json``, each through a temporary file renamed into place."""
    from safetensors.torch import save_file

    from . import __version__

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


def save_pretrained(module: "nn.Module", save_directory: str | os.PathLike[str], **kwargs: Any) -> str | None:
    """``module.save_pretrained(save_directory, **kwargs)``: see :meth:`HubMixin.save_pretrained`."""
    adapter = _adapter_class()(module)
    _saveable_config(module)  # before the mixin creates the folder: nothing is written for a module that cannot be saved
    return adapter.save_pretrained(save_directory, **kwargs)


def push_to_hub(module: "nn.Module", repo_id: str, **kwargs: Any) -> str:
    """``module.push_to_hub(repo_id, **kwargs)``: see :meth:`HubMixin.push_to_hub`."""
    adapter = _adapter_class()(module)
    _saveable_config(module)
    return adapter.push_to_hub(repo_id, **kwargs)


def load(
    want: type | None, pretrained_model_name_or_path: str | os.PathLike[str], resolve: Resolver, **kwargs: Any
) -> "nn.Module":
    """``X.from_pretrained(path, **kwargs)``: a local folder or a Hub repository id; ``want`` is X (None: any)."""
    adapter = _adapter_class()
    name = pretrained_model_name_or_path
    if not os.path.isdir(name) and (isinstance(name, os.PathLike) or os.path.exists(name) or not _REPO_ID.fullmatch(str(name))):
        read_folder_config(name)  # not a folder and not a repository id: raises CheckpointError naming the path
    model = adapter.from_pretrained(pretrained_model_name_or_path, resolve=resolve, want=want, **kwargs)
    model.__dict__.pop("_hub_mixin_config", None)  # set by the mixin; the folder's config.json is the truth
    return model


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

        def __init__(self, module: "nn.Module") -> None:
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
            resolve: Resolver,
            want: type | None = None,
            map_location: Any = "cpu",
        ) -> "nn.Module":
            if os.path.isdir(model_id):
                return load_folder(model_id, resolve, map_location=map_location, want=want)
            download = dict(repo_id=model_id, revision=revision, cache_dir=cache_dir, force_download=force_download,
                            local_files_only=local_files_only, token=token)  # fmt: skip
            hub.hf_hub_download(filename=CONFIG_NAME, **download)
            weights = hub.hf_hub_download(filename=WEIGHTS_NAME, **download)
            # Both files land in the same snapshot folder of the cache: load it as a local folder.
            return load_folder(Path(weights).parent, resolve, map_location=map_location, want=want)

    _ADAPTER = TokenLearnerHubAdapter
    return _ADAPTER
