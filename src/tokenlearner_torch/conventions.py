"""The conventions every module of the port shares, on the package's ground floor: this file imports no model.

* ``SCENIC_NAMES``: each port class's Scenic name (dotted), keyed by the port's class name. Strings only, so
  that the base class below can name its subclasses without importing them.
* :func:`scenic_fields`: the constructor parameters of a port class that are Scenic fields (what a
  ``config.json`` stores); keyword-only parameters are the port's own options (shapes, layout).
* :func:`port_class` / :func:`port_classes`: the class registry, Scenic name -> port class. ``HubMixin``'s
  ``__init_subclass__`` fills it as the port's modules (:data:`PORT_MODULES`) define their classes, so
  resolving a name imports nothing; ``tokenlearner_torch.scenic`` imports every port module, so through it
  (``from_scenic``, ``load_pretrained``) every name resolves.
* :class:`HubMixin`: a base class of every module: records the constructor arguments, and gives
  ``hub_config()``, ``save_pretrained``, ``push_to_hub`` and ``from_pretrained``, which run the folder and Hub
  code of :mod:`tokenlearner_torch.folder` (below this file: it takes the class from here, imports no model).

Why a ground floor: ``models.py``, ``layers.py`` and ``token_learner.py`` derive from ``HubMixin``; if its file
imported the models, or anything that does (``scenic.py``, ``hub.py``, ``weights_convert``), the package's
import graph would be a circle (tests/test_house.py checks that it has none, with no exception).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping, Optional, TypeVar

from . import folder as _folder
from .config_check import constructor_fields as scenic_fields
from .errors import ConfigError

__all__ = ["HubMixin", "SCENIC_NAMES", "PORT_MODULES", "scenic_fields", "scenic_name", "port_class", "port_classes"]

_MODEL = "scenic.projects.token_learner.model"
# Port class name -> Scenic's dotted class name: the one table of which Scenic class each port class is.
SCENIC_NAMES: dict[str, str] = {
    "TokenLearnerModule": f"{_MODEL}.TokenLearnerModule",
    "TokenLearnerModuleV11": f"{_MODEL}.TokenLearnerModuleV11",
    "TokenFuser": f"{_MODEL}.TokenFuser",
    "EncoderMod": f"{_MODEL}.EncoderMod",
    "EncoderModFuser": f"{_MODEL}.EncoderModFuser",
    "TokenLearnerViT": f"{_MODEL}.TokenLearnerViT",
    "TokenLearnerViTRepresentation": f"{_MODEL}.TokenLearnerViTRepresentation",
    "Encoder1DBlock": "scenic.projects.baselines.vit.Encoder1DBlock",
    "AddPositionEmbs": "scenic.projects.baselines.vit.AddPositionEmbs",
    "MlpBlock": "scenic.model_lib.layers.attention_layers.MlpBlock",
}
# The modules that define the classes above (a user's subclass elsewhere is not one of Scenic's classes).
PORT_MODULES = ("tokenlearner_torch.token_learner", "tokenlearner_torch.models", "tokenlearner_torch.layers")

# Keyword-only port options that change what the inputs mean or how the module computes (MlpBlock's compute
# dtype; elsewhere ``dtype`` is a Scenic field and is stored). The folder format holds Scenic's fields only,
# so a module built with one of them set cannot be saved faithfully; the other keyword-only arguments
# (dim, in_dim, input_shape(s)) give shapes, which the weights carry.
UNSTORED_OPTIONS = ("channels_first", "dtype")

# The version of the converter's folder format (config.json's "format_version"); weights_convert.writer's
# FORMAT_VERSION is this number.
FOLDER_FORMAT_VERSION = _folder.FORMAT_VERSION

M = TypeVar("M")


def scenic_name(cls: type) -> str | None:
    """Scenic's dotted name of the port class ``cls``; None for any other class (a subclass included)."""
    if cls.__module__ in PORT_MODULES:
        return SCENIC_NAMES.get(cls.__name__)
    return None


# The registry: dotted Scenic name -> port class, filled by HubMixin.__init_subclass__ as the classes are defined.
_PORT_CLASSES: dict[str, type] = {}
_SHORT_NAMES = {dotted.rsplit(".", 1)[1]: dotted for dotted in SCENIC_NAMES.values()}


def port_class(scenic_class: str) -> Optional[type]:
    """The port class of ``scenic_class`` (short ``'TokenLearnerViT'`` or dotted name).

    None for one of Scenic's classes whose port module is not imported yet (``import tokenlearner_torch.scenic``
    imports them all); ConfigError, naming the known classes, for any other name.
    """
    dotted = _SHORT_NAMES.get(scenic_class, scenic_class)
    if dotted not in _SHORT_NAMES.values():
        known = ", ".join(sorted(_SHORT_NAMES))
        raise ConfigError(f"unknown Scenic class {scenic_class!r}; expected one of {known} (short or dotted name)")
    return _PORT_CLASSES.get(dotted)


def port_classes() -> dict[str, type]:
    """The registry so far, dotted Scenic name -> port class, in the order the classes were defined."""
    return dict(_PORT_CLASSES)


def _jsonable(value: Any, name: str) -> Any:
    """A constructor argument as JSON: ConfigDicts become dicts, torch dtypes their names."""
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        value = value.to_dict()
    if type(value).__name__ == "dtype" and type(value).__module__ == "torch":
        return str(value).rsplit(".", 1)[-1]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, f"{name}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, name) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ConfigError(f"constructor argument {name}={value!r} cannot be written to config.json (expected JSON values)")


class HubMixin:
    """``save_pretrained``, ``push_to_hub`` and the class method ``from_pretrained`` for the port's modules.

    The constructor arguments are recorded when the module is created (as ``PyTorchModelHubMixin`` does), so
    that the saved ``config.json`` rebuilds the same module. The Hub side needs the ``hub`` extra
    (``pip install 'tokenlearner-torch[hub]'``); see :mod:`tokenlearner_torch.hub`.
    Called on ``HubMixin`` itself, ``from_pretrained`` returns whatever module the folder holds, provided its
    port module is imported (``tokenlearner_torch.from_pretrained`` imports them all).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        dotted = scenic_name(cls)
        if dotted is not None:  # one of the port's classes (a user's subclass is not registered)
            _PORT_CLASSES[dotted] = cls

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

    def hub_config(self) -> dict[str, Any]:
        """The ``config.json`` of this module's folder: Scenic class, Scenic constructor fields, format version."""
        cls = type(self)
        dotted = scenic_name(cls)
        if dotted is None:
            raise ConfigError(f"{cls.__name__} is not one of the Scenic classes the folder format describes")
        arguments = self.__dict__.get("_hub_init_arguments", {})
        fields = scenic_fields(cls)
        params = inspect.signature(cls.__init__).parameters
        for name in UNSTORED_OPTIONS:
            if name in arguments and name not in fields and arguments[name] != params[name].default:
                raise ConfigError(
                    f"{cls.__name__}: {name}={arguments[name]!r} is a port option the folder format does not "
                    f"store (config.json holds Scenic's fields); save a model built without it and pass {name} "
                    "when you build the model that loads the weights"
                )
        if "num_classes" in arguments and isinstance(getattr(self, "num_classes", None), int):
            arguments = {**arguments, "num_classes": self.num_classes}  # reset_classifier() changes the head
        kwargs = {name: _jsonable(value, name) for name, value in arguments.items() if name in fields}
        return {"scenic_class": dotted, "constructor_kwargs": kwargs, "format_version": FOLDER_FORMAT_VERSION}

    def save_pretrained(self, save_directory: str | os.PathLike[str], **kwargs: Any) -> str | None:
        """Write the converter's folder (``model.safetensors`` + ``config.json``) and a model card ``README.md``.

        Keyword arguments are ``PyTorchModelHubMixin.save_pretrained``'s (``push_to_hub=True, repo_id=...``,
        ``model_card_kwargs``); returns the commit URL when pushing, else None.
        """
        return _folder.save_pretrained(self, save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Upload the folder ``save_pretrained`` writes to the Hub repository ``repo_id`` (one commit).

        Keyword arguments are ``PyTorchModelHubMixin.push_to_hub``'s (``private``, ``token``, ``branch``,
        ``commit_message``, ``create_pr``...). Returns the commit URL.
        """
        return _folder.push_to_hub(self, repo_id, **kwargs)

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
        return _folder.load(
            None if cls is HubMixin else cls, pretrained_model_name_or_path, port_class, map_location=map_location,
            revision=revision, cache_dir=cache_dir, force_download=force_download, local_files_only=local_files_only,
            token=token,
        )  # fmt: skip
