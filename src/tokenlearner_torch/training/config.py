"""Reading a Scenic experiment config: a dict, an ml_collections ConfigDict, a ``.py`` with ``get_config()``,
or a ``.json`` file, always into plain nested dicts (the one form the training code reads)."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Mapping

from ..errors import ConfigError

__all__ = ["load_config", "cfg_get", "to_plain", "vit_model_fields"]

_MISSING = object()


def to_plain(value: Any) -> Any:
    """A ConfigDict / FrozenConfigDict / mapping / tuple tree as plain dicts and lists (deep copy)."""
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    return copy.deepcopy(value)


def cfg_get(cfg: Mapping[str, Any], dotted: str, default: Any = _MISSING) -> Any:
    """``cfg['a']['b']`` for ``'a.b'``; ``default`` when a key is absent (a missing required key raises)."""
    node: Any = cfg
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            if default is _MISSING:
                raise ConfigError(f"config.{dotted} is required")
            return default
        node = node[key]
    return node


def vit_model_fields() -> frozenset[str]:
    """TokenLearnerViT's constructor fields (Scenic's, from its signature): the keys an experiment config's
    ``model`` section may give besides ``config_check.EXPERIMENT_KEYS["model"]``. The checker takes them from
    here (``check_experiment_config(..., model_fields=vit_model_fields())``): it sits below the models."""
    from ..conventions import scenic_fields
    from ..models import TokenLearnerViT  # at call time: reading a config needs no torch until it is checked

    return frozenset(scenic_fields(TokenLearnerViT))


def _from_py(path: Path, arg: str | None) -> Any:
    from ..weights_convert.config import _run_get_config  # the converter's reader: one way to run a config file

    return _run_get_config(path, arg)


def load_config(config: Any, *, strict: bool = False, check: bool = True) -> dict[str, Any]:
    """A Scenic experiment config as plain nested dicts, checked against the keys the port reads.

    ``config``: a dict or ``ml_collections.ConfigDict``; or a path to a Scenic config ``.py`` (its
    ``get_config()`` is called; ``path.py:ARG`` calls ``get_config(ARG)``, e.g. ``...config.py:runlocal``)
    or to a ``.json`` file (a config dict, or a training case's ``config.json`` holding one under ``config``).

    ``check``: :func:`tokenlearner_torch.config_check.check_experiment_config`: a key no code reads (a
    misspelled ``lr_configs.learning_rate_schedul``) is a :class:`~tokenlearner_torch.config_check.
    ConfigWarning`, or with ``strict=True`` a :class:`ConfigError`; an unknown tokenizer field is a
    ConfigError in any case.
    """
    if isinstance(config, (str, os.PathLike)):
        text = os.fspath(config)
        arg = None
        if ".py:" in text:
            text, arg = text.rsplit(":", 1)
        path = Path(text)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.suffix == ".py":
            config = _from_py(path, arg)
        elif path.suffix == ".json":
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from e
            if isinstance(config, dict) and "config" in config and "dataset_meta_data" in config:
                config = config["config"]
        else:
            raise ConfigError(f"{path}: expected a Scenic config .py (with get_config()) or a .json file")
    plain = to_plain(config)
    if not isinstance(plain, dict):
        raise ConfigError(f"a config must be a dict, a ConfigDict or a path, got {type(config).__name__}")
    if check:
        from ..config_check import check_experiment_config

        check_experiment_config(plain, strict=strict, model_fields=vit_model_fields())
    return plain
