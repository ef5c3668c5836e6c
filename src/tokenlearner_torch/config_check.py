"""One checker for every config the project reads: a misspelled key is never silently ignored.

Three kinds of config, three rules:

* **Model constructor kwargs and the tokenizer** (``from_scenic``, the classes themselves, ``--set``,
  ``--config``, case ``config.json`` files, ``tokenlearner-parity live``, the converter): an unknown key is a
  :class:`~tokenlearner_torch.errors.ConfigError` naming it and the closest known one::

      unknown tokenizer field 'use_v1l'; did you mean 'use_v11'?

  The constructor fields come from the classes' signatures (:func:`constructor_fields`); the tokenizer's
  from :data:`TOKENIZER_FIELDS` (what models.py reads, as Scenic's model.py).
* **Case files** (``config.json`` of a parity case, golden or recorded, and the converter's golden-style
  ``--config``): a top-level key close to one the code reads (``constructor_kwarg``) is an error naming both;
  other top-level keys are notes (the goldens carry many), see :data:`CASE_KEYS`.
* **Experiment configs** (Scenic's training ``config``): Scenic configs carry many keys a given trainer
  ignores, so the rule is a warning. A key under a section the port implements (:data:`EXPERIMENT_KEYS`:
  ``lr_configs``, ``optimizer_configs``, ``model``, ``init_from``, ``mixup``, ...) that no code reads, and a
  top-level key that is a near miss of one the code reads (``label_smothing``), give a
  :class:`ConfigWarning` naming the key and its closest known name; ``strict=True`` (``--strict``) raises a
  ConfigError listing them all instead. Unknown top-level keys that are no near miss (Scenic's generic
  ``log_large_summary_steps``, a project's own) pass. The tokenizer under ``model`` keeps its error rule.

:data:`EXPERIMENT_KEYS` is THE registry of the experiment keys the port reads: code that reads a new key
registers it there (tests/test_config_check.py scans training/*.py for keys read and fails on any not
registered).

Why the port's classes come in as arguments: this module is on the package's ground floor. ``models.py``
checks its tokenizer with it and ``scenic.py`` its constructor kwargs, so it imports no model and not the class
registry (tests/test_house.py: no import circle, function-level imports included). What needs a class takes it
from its caller, which sits above the models anyway: :func:`check_constructor_kwargs` the class,
:func:`check_case_config` a ``resolve`` function (Scenic name -> port class), :func:`check_experiment_config`
the ``model`` section's fields (``TokenLearnerViT``'s: ``training.config.vit_model_fields()``).
"""

from __future__ import annotations

import difflib
import inspect
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional

from .errors import ConfigError

__all__ = [
    "ConfigWarning",
    "TOKENIZER_FIELDS",
    "CASE_KEYS",
    "EXPERIMENT_KEYS",
    "closest",
    "constructor_fields",
    "check_tokenizer",
    "check_constructor_kwargs",
    "check_case_config",
    "experiment_sections",
    "check_experiment_config",
    "is_registered",
]


class ConfigWarning(UserWarning):
    """A key of an experiment config that no code reads (a likely typo); ``strict=True`` makes it an error."""


# ---------------------------------------------------------------------------------------------------------
# The fields. A nested dict is a section with its own fields; None is a value (not checked inside).

# Scenic's tokenizer ConfigDict as TokenLearnerViT / TokenLearnerViTRepresentation read it (Scenic's model.py:
# type, patches.size, num_tokens, tokenlearner_loc, use_tokenfuse, use_v11; ViViT's temporal_encode:
# temporal_encoding_config.method / kernel_init_method / n_sampled_frames).
TOKENIZER_FIELDS: dict[str, Any] = {
    "type": None,
    "patches": {"size": None},
    "num_tokens": None,
    "tokenlearner_loc": None,
    "use_tokenfuse": None,
    "use_v11": None,
    "temporal_encoding_config": {"method": None, "kernel_init_method": None, "n_sampled_frames": None},
}

# Top level of a case config.json (tests/fixtures/goldens/README.md) and of a converted folder's config.json.
# "read": keys some code reads (a near miss of one is an error); "notes": what recorders write for people.
CASE_KEYS: dict[str, frozenset[str]] = {
    "read": frozenset({
        "scenic_class", "constructor_kwargs", "inputs", "call_kwargs", "seed", "parity", "case", "checkpoint",
        "format_version", "input_order", "intermediates", "output", "cotangent",
    }),
    "notes": frozenset({
        "param_shapes", "param_randomization", "execution", "versions", "scenic_source_sha256", "scenic_commit",
        "notes", "scenic_zero_initialized_params", "scenic_partially_zero_initialized_params",
        "intermediates_native_dtype_if_not_float32 (stored as float32)",
    }),
}  # fmt: skip

# The experiment-config registry: section ("" = top level; dotted for nested sections) -> keys the port's
# code reads. Sections not listed (dataset_configs, init_from.model_config) are not checked inside.
# The `model` section also takes TokenLearnerViT's constructor fields (derived from its signature, see
# experiment_sections); `model.tokenizer` is checked against TOKENIZER_FIELDS, as an error.
EXPERIMENT_KEYS: dict[str, frozenset[str]] = {
    "": frozenset({
        # the model and its loss (trainer.py, losses.py)
        "model_name", "model", "model_dtype_str", "data_dtype_str", "label_smoothing", "l2_decay_factor",
        "init_head_bias", "rng_seed", "shuffle_seed", "class_balancing",
        # optimisation (optim.py, schedules.py, trainer.py)
        "optimizer", "optimizer_configs", "skip_scale_and_bias_regularization", "grad_clip_configs",
        "explicit_weight_decay", "max_grad_norm", "lr_configs", "mixup", "init_from",
        # the training job (the loop, data, checkpoints, logs)
        "batch_size", "eval_batch_size", "num_training_steps", "num_training_epochs", "log_eval_steps",
        "log_summary_steps", "checkpoint_steps", "checkpoint", "max_checkpoint_keep", "steps_per_eval",
        "dataset_name", "dataset_configs", "trainer_name", "experiment_name", "write_summary", "xprof",
        "debug_train", "debug_eval", "report_progress_step", "fsdp", "count_flops",
    }),
    "lr_configs": frozenset({
        "learning_rate_schedule", "base_learning_rate", "factors", "warmup_steps", "warmup_alpha", "timescale",
        "staircase", "steps_per_decay", "decay_factor", "decay_rate", "decay_steps", "decay_events",
        "decay_factors", "end_factor", "power", "steps_per_cycle", "total_steps", "start_decay_step", "t_mul",
        "m_mul", "alpha", "end_learning_rate", "cooldown_steps",
    }),
    "optimizer_configs": frozenset({
        "optimizer", "beta1", "beta2", "epsilon", "b1", "b2", "eps", "eps_root", "mu_dtype", "weight_decay",
        "momentum", "nesterov", "accumulator_dtype", "skip_scale_and_bias_regularization", "grad_clip",
        "freeze_params_reg_exp",
    }),
    "optimizer_configs.grad_clip": frozenset({"clip_method", "clip_value"}),
    "grad_clip_configs": frozenset({"clip_method", "clip_value"}),
    "mixup": frozenset({"alpha", "image_format"}),
    "init_from": frozenset({
        "checkpoint_path", "model_config", "restore_positional_embedding", "restore_input_embedding",
        "positional_embed_size_change",
    }),
    # Besides TokenLearnerViT's fields: Scenic's im1k config sets stochastic_depth, which Scenic's
    # TokenLearnerViT does not take either; a restored ViViT-style config (surgery.py) carries patches and
    # temporal_encoding_config at model level.
    "model": frozenset({"stochastic_depth", "patches", "temporal_encoding_config"}),
    "model.patches": frozenset({"size"}),
    "model.temporal_encoding_config": frozenset({"method", "kernel_init_method", "n_sampled_frames"}),
    # Listed for the registry scan, not warned on (see UNCHECKED_SECTIONS): the keys of the port's own data
    # sources (data.py: digits, image_folder) and the video frames surgery.py reads.
    "dataset_configs": frozenset({
        "image_size", "train_dir", "valid_dir", "crop_padding", "onehot_labels", "num_workers", "num_frames",
    }),
}  # fmt: skip

# Sections whose inside is not checked: Scenic's datasets define their own dataset_configs keys (the port's
# are listed above for the scan); init_from.model_config is a whole (restored) experiment config.
UNCHECKED_SECTIONS = frozenset({"dataset_configs", "init_from.model_config"})

# Scenic's generic top-level keys (frequent in scenic/projects/*/configs) the port does not read: accepted
# silently, and never offered as a "did you mean".
SCENIC_TOP_LEVEL = frozenset({
    "log_large_summary_steps", "weights", "multicrop_clips_per_device", "skip_wrong_shape",
    "write_xm_measurements", "load_prefix", "frozen_params", "num_eval_examples", "eval_only",
})  # fmt: skip



# ---------------------------------------------------------------------------------------------------------
# Helpers


def closest(key: str, known: Iterable[str], cutoff: float = 0.6) -> Optional[str]:
    """The known name most similar to ``key`` (difflib ratio >= ``cutoff``), or None."""
    found = difflib.get_close_matches(key, sorted(known), n=1, cutoff=cutoff)
    return found[0] if found else None


def _unknown(what: str, key: str, known: Iterable[str]) -> str:
    """``unknown <what> 'key'; did you mean 'k'?`` (or the list of known names when none is close)."""
    known = sorted(known)
    near = closest(key, known)
    if near is not None:
        return f"unknown {what} {key!r}; did you mean {near!r}?"
    return f"unknown {what} {key!r}; expected one of {', '.join(known)}"


def _keys(value: Any) -> Optional[list[str]]:
    """The keys of a dict or an ml_collections ConfigDict (None for anything else: a value, not a section)."""
    if isinstance(value, Mapping):
        return [str(k) for k in value]
    if hasattr(value, "to_dict") and callable(getattr(value, "keys", None)):
        return [str(k) for k in value.keys()]
    return None


def _child(value: Any, key: str) -> Any:
    return value[key] if isinstance(value, Mapping) else getattr(value, key)


# ---------------------------------------------------------------------------------------------------------
# Model constructor kwargs and the tokenizer: errors


def check_tokenizer(tokenizer: Any, where: str = "tokenizer") -> None:
    """Raise ConfigError for a key of ``tokenizer`` (dict or ConfigDict, nested sections included) that the
    model does not read. Missing keys and values are the model's to check."""
    problems: list[str] = []

    def walk(node: Any, spec: Mapping[str, Any], path: str) -> None:
        keys = _keys(node)
        if keys is None:
            return
        for key in keys:
            if key not in spec:
                problems.append(_unknown(f"{path} field", key, spec))
            elif isinstance(spec[key], Mapping):
                walk(_child(node, key), spec[key], f"{path}.{key}")

    walk(tokenizer, TOKENIZER_FIELDS, where)
    if problems:
        raise ConfigError("; ".join(problems))


def constructor_fields(cls: type) -> dict[str, inspect.Parameter]:
    """Scenic's constructor fields of the port class ``cls``, from its signature: the positional-or-keyword
    parameters (keyword-only ones are the port's extras, e.g. ``input_shape``)."""
    if not isinstance(cls, type):  # a Scenic name: the caller resolves it (this module knows no class)
        raise TypeError(f"constructor_fields takes a class, got {type(cls).__name__} {cls!r}")
    # Defined here, not in conventions.py (which re-exports it as scenic_fields): conventions' HubMixin builds
    # modules through this checker, so this file must not import it (tests/test_house.py: no import circle).
    sig = inspect.signature(cls.__init__)
    return {
        n: p
        for n, p in sig.parameters.items()
        if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.POSITIONAL_ONLY)
    }


def check_constructor_kwargs(cls: type, kwargs: Any) -> None:
    """Raise ConfigError for a key of ``kwargs`` that the constructor of the port class ``cls`` does not take
    (naming the closest field), then for an unknown field of its ``tokenizer``."""
    keys = _keys(kwargs)
    if keys is None:
        raise ConfigError(f"constructor_kwargs must be a dict, got {type(kwargs).__name__}")
    fields = constructor_fields(cls)
    unknown = [k for k in keys if k not in fields]
    if unknown:
        raise ConfigError(f"{cls.__name__}: " + "; ".join(_unknown("constructor argument", k, fields) for k in unknown))
    if "tokenizer" in keys:
        check_tokenizer(_child(kwargs, "tokenizer"))


# ---------------------------------------------------------------------------------------------------------
# Case files: a near miss of a key the code reads is an error


def check_case_config(
    config: Mapping[str, Any], where: str = "config", resolve: Optional[Callable[[str], Optional[type]]] = None
) -> None:
    """Raise ConfigError (``<where>: unknown field 'constructor_kwarg'; did you mean 'constructor_kwargs'?``)
    for a top-level key of a case / golden-style config that is a near miss of a key the code reads, and for
    unknown constructor arguments or tokenizer fields of the class ``scenic_class`` names.

    ``resolve``: Scenic class name (short or dotted) -> the port's class, or None for a name the port does not
    have (then nothing is checked inside ``constructor_kwargs``: ``from_scenic`` names the unknown class).
    Callers pass one (the class registry sits above this module); without it only the top level is checked.
    """
    read, notes = CASE_KEYS["read"], CASE_KEYS["notes"]
    for key in config:
        if key in read or key in notes:
            continue
        near = closest(str(key), read, cutoff=0.75)
        if near is not None:
            raise ConfigError(f"{where}: unknown field {key!r}; did you mean {near!r}?")
    scenic_class = config.get("scenic_class")
    kwargs = config.get("constructor_kwargs", {})
    if resolve is not None and isinstance(scenic_class, str) and _keys(kwargs) is not None:
        cls = resolve(scenic_class)
        if cls is not None:
            try:
                check_constructor_kwargs(cls, kwargs)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# Experiment configs: warnings (strict: an error)


def experiment_sections(model_fields: Optional[Iterable[str]]) -> dict[str, frozenset[str]]:
    """:data:`EXPERIMENT_KEYS` with the ``model`` section completed by ``model_fields``: the model's
    constructor fields, TokenLearnerViT's for the port's trainer and converter (all of them: the trainer takes
    num_classes from dataset_meta_data and the dtype from model_dtype_str, but the converter reads
    ``model.num_classes`` / ``model.dtype`` of an experiment config). ``model_fields=None``: the caller does
    not say which model, so the ``model`` section is left out (not checked inside; its subsections and the
    tokenizer still are)."""
    if model_fields is None:
        return {s: keys for s, keys in EXPERIMENT_KEYS.items() if s != "model"}
    return {**EXPERIMENT_KEYS, "model": EXPERIMENT_KEYS["model"] | frozenset(model_fields)}


def is_registered(dotted: str, model_fields: Iterable[str]) -> bool:
    """Whether ``'a.b.c'`` is a key the registry knows (inside an unchecked section: always), the ``model``
    section taking ``model_fields`` (as :func:`experiment_sections`)."""
    sections = experiment_sections(model_fields)
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        section = ".".join(parts[:i])
        if section in UNCHECKED_SECTIONS:
            return True
        if section == "model.tokenizer":
            spec: Any = TOKENIZER_FIELDS
            for sub in parts[i:]:
                if not isinstance(spec, Mapping) or sub not in spec:
                    return False
                spec = spec[sub]
            return True
        if section not in sections or part not in sections[section]:
            return False
    return True


def _experiment_problems(config: Mapping[str, Any], model_fields: Optional[Iterable[str]]) -> list[str]:
    sections = experiment_sections(model_fields)
    top = sections[""]
    problems = []
    for key in config:
        if key in top or key in SCENIC_TOP_LEVEL:
            continue
        near = closest(str(key), top, cutoff=0.8)  # only near misses: Scenic configs carry many other keys
        if near is not None:
            problems.append(f"config key {key!r} is read by no code; did you mean {near!r}?")
    for section in sorted(s for s in sections if s and s not in UNCHECKED_SECTIONS):
        node: Any = config
        for part in section.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        keys = _keys(node)
        if keys is None:
            continue
        known = sections[section]
        for key in keys:
            if key in known:
                continue
            near = closest(key, known)
            hint = f"; did you mean '{section}.{near}'?" if near else f" (known: {', '.join(sorted(known))})"
            problems.append(f"config key '{section}.{key}' is read by no code{hint}")
    return problems


def check_experiment_config(
    config: Any, *, strict: bool = False, model_fields: Optional[Iterable[str]] = None
) -> list[str]:
    """Check a Scenic experiment config (dict or ConfigDict) against :data:`EXPERIMENT_KEYS`.

    ``model_fields``: the constructor fields the ``model`` section may hold besides ``EXPERIMENT_KEYS["model"]``
    (the port's callers pass TokenLearnerViT's: ``training.config.vit_model_fields()``); None leaves the
    ``model`` section's own keys unchecked (see :func:`experiment_sections`).

    Returns the problems found (one line each). Each is a :class:`ConfigWarning`; with ``strict=True`` a
    :class:`ConfigError` listing them all is raised instead. An unknown ``model.tokenizer`` field is a
    ConfigError in any case (the rule of the model's own fields).
    """
    plain = config.to_dict() if hasattr(config, "to_dict") and callable(config.to_dict) else config  # ConfigDict
    if not isinstance(plain, Mapping):
        raise ConfigError(f"a config must be a dict or a ConfigDict, got {type(config).__name__}")
    model = plain.get("model")
    if isinstance(model, Mapping) and model.get("tokenizer") is not None:
        check_tokenizer(model["tokenizer"], "model.tokenizer")
    problems = _experiment_problems(plain, model_fields)
    if problems and strict:
        raise ConfigError(f"strict config check: {len(problems)} key(s) no code reads: " + "; ".join(problems))
    for line in problems:
        warnings.warn(line, ConfigWarning, stacklevel=3)
    return problems
