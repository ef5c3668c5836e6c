"""Where the architecture comes from: a config file, ``--set key=value`` and the parameter tree.

Config files:

* a golden-style JSON file: ``{"scenic_class": ..., "constructor_kwargs": {...}}`` (what the converter
  itself writes as ``config.json``);
* a Scenic experiment config: a ``.py`` file with ``get_config()`` returning an ml_collections ConfigDict
  (executed with a minimal stand-in ``ml_collections`` when the real package is not installed), or the same
  config as JSON (``{"model": {...}, "model_dtype_str": ...}``). Its ``model`` section gives the kwargs of
  ``TokenLearnerViT``; ``num_classes`` comes from ``--num-classes`` or the tree.

:func:`resolve_architecture` merges the tree's inference, the config and the ``--set`` values (later wins),
and raises :class:`ConfigError` naming exactly the fields still missing and how to pass them.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from tokenlearner_torch.config_check import check_case_config, check_experiment_config
from tokenlearner_torch.errors import ConfigError

from .infer import PREFIX, Architecture, field_hint, infer_architecture

__all__ = ["load_config_file", "parse_set", "apply_sets", "resolve_architecture", "ResolvedArchitecture"]


@dataclass
class ResolvedArchitecture:
    """The architecture to build and where each top-level field came from."""

    scenic_class: str
    kwargs: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)  # dotted field -> checkpoint|config|--set|--num-classes
    ignored: list[str] = field(default_factory=list)  # config fields the class does not take


# --------------------------------------------------------------------------------------------
# Reading config files
# --------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """ConfigDict / FieldReference / tuples -> plain JSON-like python values."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if hasattr(value, "get") and type(value).__name__ == "FieldReference":
        value = value.get()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        return value.item()
    return value


def load_config_file(path: str | Path, num_classes: int | None = None) -> tuple[str | None, dict[str, Any], list[str]]:
    """Read a config file; return ``(scenic_class or None, kwargs, ignored field names)``.

    A golden-style JSON gives its class; a Scenic experiment config gives ``None`` (the class then comes from
    the tree, TokenLearnerViT if the tree does not say) and the ``model`` section as kwargs.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    if p.suffix == ".py":
        data = _plain(_run_get_config(p))
    else:
        try:
            data = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: not valid JSON ({str(exc)[:80]}); expected a golden-style config.json or a Scenic config") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{p}: expected a JSON object, got {type(data).__name__}")
    if "scenic_class" in data or "model" not in data:
        check_case_config(data, str(p), resolve=_port_class)  # 'constructor_kwarg', 'hiden_size', 'use_v1l': named errors
    else:  # a key no code reads: a ConfigWarning (one line on the CLI)
        check_experiment_config(data, model_fields=_vit_model_fields())
    if "scenic_class" in data:
        kwargs = data.get("constructor_kwargs", {})
        if not isinstance(kwargs, Mapping):
            raise ConfigError(f"{p}: constructor_kwargs must be an object")
        kwargs = copy.deepcopy(dict(kwargs))
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return str(data["scenic_class"]), kwargs, []
    if "model" in data and isinstance(data["model"], Mapping):
        kwargs = copy.deepcopy(dict(data["model"]))
        dtype = data.get("model_dtype_str")
        if dtype is not None and "dtype" not in kwargs:
            kwargs["dtype"] = dtype
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return None, kwargs, []
    raise ConfigError(
        f"{p}: neither a golden-style config (no 'scenic_class') nor a Scenic experiment config (no 'model' section)"
    )


def _stand_in_ml_collections() -> types.ModuleType:
    """A minimal ``ml_collections`` (ConfigDict, FrozenConfigDict, FieldReference, config_dict.placeholder)."""

    class FieldReference:
        def __init__(self, default: Any = None, field_type: Any = None, required: bool = False) -> None:
            self._value = default

        def get(self) -> Any:
            return self._value

        def set(self, value: Any) -> None:
            self._value = value

    class ConfigDict(dict):
        def __init__(self, initial: Any = None, type_safe: bool = True, **kw: Any) -> None:
            super().__init__()
            for k, v in dict(initial or {}, **kw).items():
                self[k] = ConfigDict(v) if isinstance(v, Mapping) and not isinstance(v, ConfigDict) else v

        def __getattr__(self, name: str) -> Any:
            if name.startswith("__"):
                raise AttributeError(name)
            try:
                value = self[name]
            except KeyError:
                raise AttributeError(f"ConfigDict has no field '{name}'") from None
            return value.get() if isinstance(value, FieldReference) else value

        def __setattr__(self, name: str, value: Any) -> None:
            current = self.get(name)
            if isinstance(current, FieldReference) and not isinstance(value, FieldReference):
                current.set(value)
            else:
                self[name] = value

        def __delattr__(self, name: str) -> None:
            del self[name]

        def get_ref(self, name: str) -> FieldReference:
            value = self[name]
            if not isinstance(value, FieldReference):
                value = FieldReference(value)
                self[name] = value
            return value

        def lock(self) -> "ConfigDict":
            return self

        def unlock(self) -> "ConfigDict":
            return self

        def unlocked(self):  # context manager in ml_collections
            import contextlib

            return contextlib.nullcontext(self)

        def copy_and_resolve_references(self) -> "ConfigDict":
            return ConfigDict(self.to_dict())

        def to_dict(self) -> dict:
            return {k: _plain(v) for k, v in self.items()}

    def placeholder(field_type: Any = None, required: bool = False) -> FieldReference:
        return FieldReference(None, field_type)

    mod = types.ModuleType("ml_collections")
    sub = types.ModuleType("ml_collections.config_dict")
    for m in (mod, sub):
        m.ConfigDict = ConfigDict
        m.FrozenConfigDict = ConfigDict
        m.FieldReference = FieldReference
        m.placeholder = placeholder
    mod.config_dict = sub
    return mod


def _run_get_config(path: Path, arg: str | None = None) -> Any:
    """Execute a Scenic config module and return ``get_config()``, or ``get_config(arg)`` for ``file.py:ARG``
    (as ml_collections' config_flags do: Scenic's ``:runlocal``)."""
    injected: dict[str, types.ModuleType] = {}
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        stand_in = _stand_in_ml_collections()
        injected = {"ml_collections": stand_in, "ml_collections.config_dict": stand_in.config_dict}
        sys.modules.update(injected)
    try:
        spec = importlib.util.spec_from_file_location(f"_tokenlearner_scenic_config_{abs(hash(str(path)))}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{path}: cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except ImportError as exc:
            raise ConfigError(f"{path}: the config imports something unavailable ({exc}); pass the config as JSON instead") from None
        except Exception as exc:  # the config's own code failed
            raise ConfigError(f"{path}: executing the config failed ({type(exc).__name__}: {str(exc)[:100]})") from None
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            raise ConfigError(f"{path}: defines no get_config() (expected a Scenic experiment config)")
        if arg is not None and not inspect.signature(get_config).parameters:
            raise ConfigError(f"{path}: get_config() takes no argument, but ':{arg}' was given")
        try:
            return get_config() if arg is None else get_config(arg)
        except Exception as exc:
            raise ConfigError(f"{path}: get_config() failed ({type(exc).__name__}: {str(exc)[:100]})") from None
    finally:
        for name in injected:
            sys.modules.pop(name, None)


# --------------------------------------------------------------------------------------------
# --set key=value
# --------------------------------------------------------------------------------------------


def parse_set(item: str) -> tuple[str, Any]:
    """``'tokenizer.tokenlearner_loc=9'`` -> ``('tokenizer.tokenlearner_loc', 9)``; values are JSON when they parse."""
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set: bad key {key!r} in {item!r}")
    raw = raw.strip()
    aliases = {"True": True, "False": False, "None": None}
    if raw in aliases:
        return key, aliases[raw]
    try:
        return key, json.loads(raw)
    except ValueError:
        return key, raw


def apply_sets(kwargs: dict[str, Any], sets: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Write dotted keys into nested dicts (in place) and return ``kwargs``."""
    for key, value in sets:
        node = kwargs
        *parents, last = key.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {key}: '{part}' is a value, not a section")
                node[part] = child
            node = child
        node[last] = value
    return kwargs


def _has(kwargs: Mapping[str, Any], dotted: str) -> bool:
    node: Any = kwargs
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _get(kwargs: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = kwargs
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _flat_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out += _flat_keys(v, path)
        else:
            out.append(path)
    return out


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


# The class registry and the models are imported at call time: this module is on the converter's start-up
# path, which reads the checkpoint while torch loads in a thread (and config_check, below the registry, takes
# these from here).


def _port_class(scenic_class: str) -> type | None:
    """The port's class for a Scenic class name (short or dotted), or None when the port has none."""
    from tokenlearner_torch.scenic import _resolve

    try:
        return _resolve(scenic_class)
    except ConfigError:
        return None


def _vit_model_fields() -> frozenset[str]:
    """TokenLearnerViT's constructor fields: what an experiment config's ``model`` section gives."""
    from tokenlearner_torch.conventions import scenic_fields
    from tokenlearner_torch.models import TokenLearnerViT

    return frozenset(scenic_fields(TokenLearnerViT))


def _constructor_fields(scenic_class: str) -> set[str] | None:
    from tokenlearner_torch.conventions import scenic_fields

    cls = _port_class(scenic_class)
    return None if cls is None else set(scenic_fields(cls))


def _full_name(scenic_class: str) -> str:
    return scenic_class if "." in scenic_class else PREFIX + scenic_class


# --------------------------------------------------------------------------------------------
# Resolution
# --------------------------------------------------------------------------------------------


def resolve_architecture(
    params: Mapping[str, Any] | None,
    *,
    config: str | Path | None = None,
    sets: Sequence[str | tuple[str, Any]] = (),
    num_classes: int | None = None,
    scenic_class: str | None = None,
) -> ResolvedArchitecture:
    """Merge tree inference, a config file and ``--set`` values into the architecture to build.

    A golden-style config is authoritative (inference is not consulted); the model built from it is then
    checked against the tree by the parameter mapping. Otherwise the tree's inference is the base, a Scenic
    experiment config and the ``--set`` values override it, and any field the tree leaves open that nothing
    provides raises :class:`ConfigError` listing exactly those fields and how to pass them.
    """
    set_items = [parse_set(s) if isinstance(s, str) else s for s in sets]
    sources: dict[str, str] = {}
    ignored: list[str] = []
    cfg_class, cfg_kwargs = None, None
    if config is not None:
        cfg_class, cfg_kwargs, _ = load_config_file(config, num_classes)
    if cfg_class is not None:  # golden-style: authoritative
        cls = _full_name(scenic_class or cfg_class)
        kwargs = apply_sets(cfg_kwargs, set_items)
        sources.update({k: "config" for k in kwargs})
        sources.update({k: "--set" for k, _ in set_items})
        return ResolvedArchitecture(cls, kwargs, sources, ignored)

    inferred: Architecture | None = None
    infer_error: ConfigError | None = None
    if params is not None:
        try:
            inferred = infer_architecture(params)
        except ConfigError as exc:
            infer_error = exc
    if inferred is None and cfg_kwargs is None and scenic_class is None:
        raise infer_error or ConfigError("no architecture: pass --config FILE")
    cls = _full_name(scenic_class or (inferred.scenic_class if inferred else "TokenLearnerViT"))
    kwargs: dict[str, Any] = copy.deepcopy(inferred.kwargs) if inferred and _full_name(inferred.scenic_class) == cls else {}
    undetermined = list(inferred.undetermined) if inferred and kwargs else []
    for k in _flat_keys(kwargs):
        sources[k] = "checkpoint"
    if cfg_kwargs is not None:
        accepted = _constructor_fields(cls)
        cfg_kwargs = dict(cfg_kwargs)
        if accepted is not None:
            ignored = sorted(k for k in cfg_kwargs if k not in accepted)
            for k in ignored:
                cfg_kwargs.pop(k)
        _deep_merge(kwargs, cfg_kwargs)
        for k in _flat_keys(cfg_kwargs):
            sources[k] = "config"
    if num_classes is not None and cfg_kwargs is None:
        kwargs["num_classes"] = num_classes
        sources["num_classes"] = "--num-classes"
    apply_sets(kwargs, set_items)
    for k, _ in set_items:
        sources[k] = "--set"

    # Conditional requirements that follow from what was given.
    if _get(kwargs, "tokenizer.type") == "video" and not _has(kwargs, "tokenizer.temporal_encoding_config.method"):
        apply_sets(kwargs, [("tokenizer.temporal_encoding_config.method", "temporal_sampling")])
    if _get(kwargs, "tokenizer.temporal_encoding_config.method") == "temporal_sampling":
        undetermined.append("tokenizer.temporal_encoding_config.n_sampled_frames")
    if _get(kwargs, "tokenizer_type") == "video":
        undetermined.append("temporal_dimensions")

    missing = [f for f in dict.fromkeys(undetermined) if not _has(kwargs, f)]
    if missing:
        short = cls.rsplit(".", 1)[-1]
        details = "; ".join(f"{f} ({field_hint(f)})" if field_hint(f) else f for f in missing)
        example = " ".join(f"--set {f}=..." for f in missing)
        raise ConfigError(
            f"the checkpoint does not determine {len(missing)} field(s) of {short}: {details}. "
            f"Pass them with {example} or --config FILE"
        )
    return ResolvedArchitecture(cls, kwargs, sources, ignored)


def constructor_signature_defaults(scenic_class: str) -> dict[str, Any]:
    """Scenic's defaults of a class's constructor fields (for reports)."""
    from tokenlearner_torch.scenic import _resolve, _scenic_parameters

    return {
        n: p.default
        for n, p in _scenic_parameters(_resolve(scenic_class)).items()
        if p.default is not inspect.Parameter.empty
    }
