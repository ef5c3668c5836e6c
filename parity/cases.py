"""Case folders in the format of the goldens (tests/fixtures/goldens/README.md). No jax needed.

A case folder holds ``config.json``, ``params.msgpack`` (``{'params': tree}``), ``inputs.npz`` (the inputs
by name plus ``cotangent``), ``outputs.npz`` (``out`` and ``inter/<module path>``), ``grads.npz``
(``params/<path>`` and ``input/<name>``) and, optionally, ``checkpoint/`` (a Scenic training checkpoint
holding the same parameters; when present, :func:`load_params` reads the weights from it).

Cases written by ``tokenlearner-parity record`` carry a ``parity`` entry in ``config.json``
(mode, reference, device); the goldens do not (they are float32, mode ``f32``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tokenlearner_torch.config_check import check_case_config
from tokenlearner_torch.errors import ConfigError, TokenLearnerError

__all__ = [
    "CaseError",
    "Case",
    "load_case",
    "load_params",
    "write_case",
    "default_call_kwargs",
    "input_names_for",
    "find_cases",
]

REQUIRED_FILES = ("config.json", "inputs.npz", "outputs.npz")


class CaseError(TokenLearnerError):
    """A case folder or a config is missing, unreadable or inconsistent (a usage/input error, exit 2)."""


# Scenic's call keywords (deterministic mode) per class, and its positional input names.
_TRAIN = {"TokenLearnerViT", "TokenLearnerViTRepresentation", "EncoderMod", "EncoderModFuser"}
_DETERMINISTIC = {"TokenLearnerModuleV11", "TokenFuser", "MlpBlock", "Encoder1DBlock"}


def short_class(scenic_class: str) -> str:
    return scenic_class.rsplit(".", 1)[-1]


def default_call_kwargs(scenic_class: str) -> dict[str, Any]:
    """The keywords that put a Scenic module in deterministic (eval) mode."""
    name = short_class(scenic_class)
    if name in _TRAIN:
        return {"train": False}
    if name in _DETERMINISTIC:
        return {"deterministic": True}
    return {}


def input_names_for(scenic_class: str) -> list[str]:
    """Scenic's positional input names of a class (``x`` for the ViTs, ``inputs, original`` for TokenFuser)."""
    name = short_class(scenic_class)
    if name in ("TokenLearnerViT", "TokenLearnerViTRepresentation"):
        return ["x"]
    if name == "TokenFuser":
        return ["inputs", "original"]
    return ["inputs"]


@dataclass
class Case:
    """A loaded case. ``params`` is the bare Flax tree (no ``'params'`` wrapper)."""

    path: Path
    config: dict[str, Any]
    params: dict[str, Any]
    inputs: dict[str, np.ndarray]
    cotangent: np.ndarray | None
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray] = field(default_factory=dict)
    params_source: str = "params.msgpack"

    @property
    def name(self) -> str:
        return self.config.get("case") or self.path.name

    @property
    def scenic_class(self) -> str:
        return self.config["scenic_class"]

    @property
    def constructor_kwargs(self) -> dict[str, Any]:
        return dict(self.config.get("constructor_kwargs", {}))

    @property
    def out(self) -> np.ndarray:
        return self.outputs["out"]

    @property
    def intermediates(self) -> dict[str, np.ndarray]:
        return {k[len("inter/") :]: v for k, v in self.outputs.items() if k.startswith("inter/")}

    @property
    def mode(self) -> str:
        """The precision mode the reference was recorded in (goldens: ``f32``, or ``bf16`` for a
        bfloat16 model)."""
        recorded = self.config.get("parity", {}).get("mode")
        if recorded:
            return recorded
        dtype = str(self.config.get("constructor_kwargs", {}).get("dtype", "float32"))
        return "bf16" if dtype.endswith("bfloat16") else "f32"


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError) as exc:
        raise CaseError(f"{path}: cannot read npz file ({exc})") from None


def load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CaseError(f"{path}: cannot read JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CaseError(f"{path}: expected a JSON object")
    return data


def load_params(case_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], str]:
    """The case's parameter tree and where it came from: ``checkpoint/`` when present (through the
    converter's reader, as a user's checkpoint would be), else ``params.msgpack``."""
    from tokenlearner_torch.errors import CheckpointError
    from tokenlearner_torch.weights_convert.readers import read_checkpoint

    case_dir = Path(case_dir)
    ckpt = case_dir / "checkpoint"
    source = ckpt if ckpt.exists() else case_dir / "params.msgpack"
    if not source.exists():
        raise CaseError(f"{case_dir}: neither checkpoint/ nor params.msgpack exists")
    try:
        params = read_checkpoint(source)
    except CheckpointError as exc:
        raise CaseError(str(exc)) from None
    if set(params) == {"params"} and isinstance(params["params"], Mapping):
        params = dict(params["params"])
    return params, source.name + ("/" if source.is_dir() else "")


def port_class(scenic_class: str) -> type | None:
    """The port's class for a Scenic class name (short or dotted), or None when the port has none: the
    resolver :func:`~tokenlearner_torch.config_check.check_case_config` takes (the checker sits below the class
    registry). The registry is imported at call time: it imports torch and the models."""
    from tokenlearner_torch.scenic import _resolve

    try:
        return _resolve(scenic_class)
    except ConfigError:
        return None


def load_case(path: str | os.PathLike[str], *, with_params: bool = True) -> Case:
    """Read a case folder; raise :class:`CaseError` (one line) when it is not a valid case."""
    path = Path(path)
    if not path.is_dir():
        raise CaseError(f"{path}: not a case folder (no such directory)")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise CaseError(f"{path}: not a case folder (missing {', '.join(missing)})")
    config = load_json(path / "config.json")
    try:  # a misspelled key ('constructor_kwarg', 'hiden_size', 'use_v1l') is a named error, not a default
        check_case_config(config, str(path / "config.json"), resolve=port_class)
    except ConfigError as exc:
        raise CaseError(str(exc)) from None
    if "scenic_class" not in config:
        raise CaseError(f"{path / 'config.json'}: no 'scenic_class'")
    specs = config.get("inputs")
    if not isinstance(specs, list) or not specs:
        raise CaseError(f"{path / 'config.json'}: no 'inputs' list")
    raw_inputs = _load_npz(path / "inputs.npz")
    names = [s["name"] for s in specs]
    absent = [n for n in names if n not in raw_inputs]
    if absent:
        raise CaseError(f"{path / 'inputs.npz'}: missing input(s) {', '.join(absent)}")
    inputs = {n: raw_inputs[n] for n in names}
    outputs = _load_npz(path / "outputs.npz")
    if "out" not in outputs:
        raise CaseError(f"{path / 'outputs.npz'}: no 'out' array")
    grads = _load_npz(path / "grads.npz") if (path / "grads.npz").is_file() else {}
    if grads and "cotangent" not in raw_inputs:
        raise CaseError(f"{path / 'inputs.npz'}: grads.npz present but no 'cotangent'")
    params, source = load_params(path) if with_params else ({}, "")
    return Case(path, config, params, inputs, raw_inputs.get("cotangent"), outputs, grads, source)


def find_cases(root: str | os.PathLike[str]) -> list[Path]:
    """Case folders under ``root`` (``root`` itself if it is one), sorted; ``index.json`` order is not
    needed."""
    root = Path(root)
    if (root / "config.json").is_file():
        return [root]
    if not root.is_dir():
        return []
    return sorted(p.parent for p in root.glob("*/config.json"))


def refuse_nonempty(path: str | os.PathLike[str], overwrite: bool) -> None:
    """Raise :class:`CaseError` when ``path`` is a non-empty folder and ``overwrite`` is False."""
    path = Path(path)
    if not overwrite and path.is_dir() and any(path.iterdir()):
        raise CaseError(f"{path}: exists and is not empty (pass overwrite=True to overwrite it)")


def write_case(
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    params: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    cotangent: np.ndarray,
    out: np.ndarray,
    intermediates: Mapping[str, np.ndarray],
    grads: Mapping[str, np.ndarray],
    checkpoint: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a case folder in the goldens' format. ``params`` is the bare tree; it is written as
    ``{'params': tree}`` (like ``flax.serialization.to_bytes``). ``checkpoint``: copied to
    ``checkpoint/`` (a file keeps its name, a directory its content)."""
    from tokenlearner_torch.weights_convert.readers import write_flax_msgpack

    path = Path(path)
    refuse_nonempty(path, overwrite)
    path.mkdir(parents=True, exist_ok=True)
    config = dict(config)
    config["intermediates"] = list(intermediates)
    config["output"] = {"shape": list(np.shape(out)), "dtype": str(np.asarray(out).dtype)}
    config["cotangent"] = {
        "shape": list(np.shape(cotangent)),
        "dtype": str(np.asarray(cotangent).dtype),
        "loss": "sum(out.astype(f32) * cotangent)",
    }
    config["input_order"] = list(inputs)
    (path / "config.json").write_text(json.dumps(config, indent=2, default=_json_default) + "\n")
    if (path / "params.msgpack").exists():
        (path / "params.msgpack").unlink()
    write_flax_msgpack(path / "params.msgpack", _plain_tree(params), wrap="variables")
    np.savez(path / "inputs.npz", **{k: np.asarray(v) for k, v in inputs.items()}, cotangent=np.asarray(cotangent))
    np.savez(
        path / "outputs.npz", out=np.asarray(out), **{f"inter/{k}": np.asarray(v) for k, v in intermediates.items()}
    )
    np.savez(path / "grads.npz", **{k: np.asarray(v) for k, v in grads.items()})
    if checkpoint is not None:
        src = Path(checkpoint)
        dst = path / "checkpoint"
        if dst.exists():
            shutil.rmtree(dst)
        if src.is_dir():
            shutil.copytree(src, dst)
        else:
            dst.mkdir()
            shutil.copy2(src, dst / src.name)
    return path


def _plain_tree(tree: Mapping[str, Any]) -> dict[str, Any]:
    return {
        str(k): _plain_tree(v) if isinstance(v, Mapping) else np.ascontiguousarray(np.asarray(v))
        for k, v in tree.items()
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return str(value)
