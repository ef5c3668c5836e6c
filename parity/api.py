"""Python API of the parity harness.

* :func:`check_case`: the port against a stored case (no jax needed);
* :func:`live`: the Flax reference and the port side by side (needs jax + flax);
* :func:`record`: write a case of your own model with the Flax reference (needs jax + flax);
* :func:`assert_parity`: one call for a test suite; raises ``AssertionError`` with the report text.

Every function returns a :class:`~tokenlearner_torch.parity.compare.Report`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from tokenlearner_torch.config_check import check_case_config
from tokenlearner_torch.errors import ConfigError

from .cases import (
    Case,
    CaseError,
    default_call_kwargs,
    input_names_for,
    load_case,
    load_json,
    port_class,
    refuse_nonempty,
    write_case,
)
from .compare import F64Result, Report, compare_all
from .modes import MODES, Mode, get_mode, precision
from .port import run_port

__all__ = ["assert_parity", "check_case", "live", "record", "resolve_config", "Report", "CaseError"]

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------------------------------
# Configs and inputs
# ------------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """ConfigDicts / FrozenDicts / tuples -> JSON-able plain values."""
    if hasattr(value, "to_dict") and callable(value.to_dict):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is not None and not isinstance(value, (str, int, float, bool)):
        name = getattr(value, "__name__", None) or getattr(value, "name", None)
        return str(name or value)
    return value


def _without_path(exc: BaseException, folder: Path) -> str:
    """An error's text without a leading ``<folder>: `` (the caller names the folder once)."""
    text = str(exc)
    return text[len(f"{folder}: "):] if text.startswith(f"{folder}: ") else text


def _is_inline(config_or_case: Any) -> bool:
    return isinstance(config_or_case, str) and config_or_case.lstrip().startswith("{")


def _named(config_or_case: Any) -> Any:
    """A path to show in a report (None for a dict or inline JSON)."""
    return config_or_case if isinstance(config_or_case, (str, os.PathLike)) and not _is_inline(config_or_case) else None


def resolve_config(config_or_case: Any) -> tuple[dict[str, Any], Path | None]:
    """``(config, case_dir)`` from a dict, a JSON file, a case folder (then ``case_dir`` is set) or the
    JSON text itself (a string starting with ``{``: what a failing property test prints to replay it).

    A config holds ``scenic_class``, ``constructor_kwargs``, and optionally ``inputs``
    (``[{"name": ..., "shape": [...]}]``, in call order), ``call_kwargs`` and ``seed``.
    """
    case_dir, where = None, "config"
    if isinstance(config_or_case, Mapping):
        config = dict(config_or_case)
    elif _is_inline(config_or_case):
        try:
            config = json.loads(config_or_case)
        except ValueError as exc:
            raise CaseError(f"inline config: not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CaseError("inline config: expected a JSON object")
    else:
        path = Path(config_or_case)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CaseError(f"{path}: not a case folder (no config.json)")
            case_dir, path = path, path / "config.json"
        elif not path.is_file():
            raise CaseError(f"{path}: no such config file or case folder")
        config, where = load_json(path), str(path)
    try:  # 'constructor_kwarg', 'hiden_size', 'use_v1l': the converter's named one-line errors, before any Flax
        check_case_config(config, where, resolve=port_class)
    except ConfigError as exc:
        raise CaseError(str(exc)) from None
    if "scenic_class" not in config:
        raise CaseError("config has no 'scenic_class' (e.g. \"TokenLearnerViT\")")
    kwargs = config.get("constructor_kwargs", {})
    if not isinstance(kwargs, Mapping) and not hasattr(kwargs, "to_dict"):
        raise CaseError("config 'constructor_kwargs' must be an object")
    config["constructor_kwargs"] = _plain(kwargs)
    return config, case_dir


def _input_specs(config: Mapping[str, Any], input_shapes: Mapping[str, Sequence[int]] | None) -> list[tuple[str, list[int]]]:
    specs = [(s["name"], list(s["shape"])) for s in config.get("inputs", []) if "shape" in s]
    if input_shapes:
        known = dict(specs)
        names = [n for n, _ in specs] or input_names_for(config["scenic_class"])
        for name, shape in input_shapes.items():
            if name not in names:
                raise CaseError(f"unknown input {name!r}; the inputs are {', '.join(names)}")
            known[name] = list(shape)
        specs = [(n, known[n]) for n in names if n in known]
        missing = [n for n in names if n not in known]
        if missing:
            raise CaseError(f"no shape for input(s) {', '.join(missing)}")
    if not specs:
        names = " ".join(f"--input-shape {n}=D0,D1,..." for n in input_names_for(config["scenic_class"]))
        raise CaseError(f"the config gives no input shapes ('inputs'); pass {names}")
    return specs


def _resolve_inputs(
    config: Mapping[str, Any],
    inputs: Any,
    input_shapes: Mapping[str, Sequence[int]] | None,
    seed: int,
) -> dict[str, np.ndarray]:
    names_default = [s["name"] for s in config.get("inputs", [])] or input_names_for(config["scenic_class"])
    if inputs is None:
        rng = np.random.default_rng(seed)
        return {n: rng.standard_normal(shape).astype(np.float32) for n, shape in _input_specs(config, input_shapes)}
    if isinstance(inputs, (str, os.PathLike)):
        path = Path(inputs)
        try:
            with np.load(path, allow_pickle=False) as data:
                inputs = {k: np.array(data[k]) for k in data.files if k != "cotangent"}
        except (OSError, ValueError) as exc:
            raise CaseError(f"{path}: cannot read inputs ({exc})") from None
    if isinstance(inputs, np.ndarray) or hasattr(inputs, "numpy"):
        inputs = [inputs]
    if isinstance(inputs, Mapping):
        missing = [n for n in names_default if n not in inputs]
        if missing and len(inputs) == len(names_default):
            return {n: _as_np(v) for n, v in zip(names_default, inputs.values())}
        if missing:
            raise CaseError(f"inputs lack {', '.join(missing)} (have {', '.join(inputs)})")
        return {n: _as_np(inputs[n]) for n in names_default}
    inputs = list(inputs)
    if len(inputs) != len(names_default):
        raise CaseError(f"expected {len(names_default)} input(s) ({', '.join(names_default)}), got {len(inputs)}")
    return {n: _as_np(v) for n, v in zip(names_default, inputs)}


def _as_np(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy()
    return np.asarray(v)


def _subject(config: Mapping[str, Any], where: Any) -> str:
    cls = str(config["scenic_class"]).rsplit(".", 1)[-1]
    return f"{where} ({cls})" if where else cls


def _check_device(device: str) -> str:
    device = str(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CaseError("--device cuda: torch sees no CUDA device")
    elif device != "cpu":
        raise CaseError(f"unknown device {device!r}; expected cpu or cuda")
    return device


# ------------------------------------------------------------------------------------------------------
# check: stored case vs port (no jax)
# ------------------------------------------------------------------------------------------------------
_DTYPE_OF_MODE = {"f64": "float64", "f32": "float32", "tf32": "float32", "bf16": "bfloat16"}


def check_case(
    path: PathLike,
    *,
    mode: str | None = None,
    device: str = "cpu",
    tol: float | None = None,
    grads: bool = True,
    weights: PathLike | None = None,
) -> Report:
    """The port against a stored case (goldens format): output, every stored intermediate, every gradient.

    Weights come through the converter: ``checkpoint/`` when the case has one, else ``params.msgpack``;
    or, with ``weights``, from a folder written by ``tokenlearner-convert`` (``model.safetensors`` and
    ``config.json``, which must describe the case's model).
    ``mode`` defaults to the mode the case was recorded in (``f32`` for the goldens); it must compute in
    the same dtype (``tf32`` may check an ``f32`` case). Never imports jax.
    """
    case = load_case(path, with_params=weights is None)
    if weights is not None:
        case = _with_converted_weights(case, weights)
    device = _check_device(device)
    mode_name = mode or case.mode
    m = get_mode(mode_name)
    if _DTYPE_OF_MODE[m.name] != _DTYPE_OF_MODE[case.mode]:
        raise CaseError(
            f"{case.path}: recorded in mode {case.mode}; mode {m.name} computes in another dtype "
            f"(use `live --mode {m.name}` or record the case in that mode)"
        )
    return _check_loaded(case, m, device, tol, grads)


def _with_converted_weights(case: Case, folder: PathLike) -> Case:
    """``case`` with the parameters of a converted folder (read back to a Flax tree, bitwise)."""
    from dataclasses import replace

    from tokenlearner_torch.errors import TokenLearnerError
    from tokenlearner_torch.weights_convert import load_pretrained, torch_to_flax

    folder = Path(folder)
    try:
        model = load_pretrained(folder)  # checks the folder, its config.json and weights
    except (OSError, ValueError, TokenLearnerError) as exc:
        raise CaseError(f"{folder}: not a converted model folder ({_without_path(exc, folder)})") from None
    converted = load_json(folder / "config.json")
    _same_model(folder, converted, f"the case {case.path}", case.config)
    return replace(case, params=torch_to_flax(model), params_source=f"{folder} (tokenlearner-convert output)")


def is_converted_folder(path: PathLike) -> bool:
    """A folder written by ``tokenlearner-convert`` (``model.safetensors`` and ``config.json``)."""
    path = Path(path)
    return path.is_dir() and (path / "model.safetensors").is_file() and (path / "config.json").is_file()


def _converted_params(folder: PathLike, against: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The Flax parameter tree of a converted folder, whose config.json must describe ``config``'s model."""
    from tokenlearner_torch.errors import TokenLearnerError
    from tokenlearner_torch.weights_convert import load_pretrained, torch_to_flax

    folder = Path(folder)
    _same_model(folder, load_json(folder / "config.json"), against, config)
    try:
        model = load_pretrained(folder)
    except (OSError, ValueError, TokenLearnerError) as exc:
        raise CaseError(f"{folder}: not a converted model folder ({_without_path(exc, folder)})") from None
    return torch_to_flax(model)


def _model_words(config: Mapping[str, Any]) -> str:
    return str(config.get("scenic_class", "?")).rsplit(".", 1)[-1]


def _flat_kwargs(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat_kwargs(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def _same_model(folder: Path, converted: Mapping[str, Any], against: str, config: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`CaseError` naming both models when ``folder``'s config.json is another model."""
    a_cls, b_cls = _model_words(converted), _model_words(config)
    a_kw = _flat_kwargs(_plain(converted.get("constructor_kwargs", {})))
    b_kw = _flat_kwargs(_plain(config.get("constructor_kwargs", {})))
    if a_cls == b_cls and a_kw == b_kw:
        return
    telling = ("tokenizer.type", "tokenizer.patches.size", "hidden_size", "num_layers", "num_heads", "num_classes")
    keys = sorted((k for k in set(a_kw) | set(b_kw) if a_kw.get(k, "unset") != b_kw.get(k, "unset")),
                  key=lambda k: (telling.index(k) if k in telling else len(telling), k))

    def words(cls: str, kw: Mapping[str, Any]) -> str:
        if a_cls != b_cls or not keys:
            return cls
        more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
        return f"{cls} with " + ", ".join(f"{k}={kw.get(k, 'unset')}" for k in keys[:4]) + more

    raise CaseError(
        f"{folder}: its config.json describes another model than {against}: {folder.name}/ holds a "
        f"{words(a_cls, a_kw)}; {against} is a {words(b_cls, b_kw)}"
    )


def _check_loaded(case: Case, m: Mode, device: str, tol: float | None, grads: bool) -> Report:
    with precision(m, use_jax=False) as settings:
        res = run_port(
            case.scenic_class,
            case.constructor_kwargs,
            case.params,
            case.inputs,
            case.cotangent if (grads and case.grads) else None,
            m,
            device,
        )
    tolerance = m.tolerance(device) if tol is None else tol
    rows = compare_all(
        actual_out=res.out,
        reference_out=case.out,
        actual_inter=res.intermediates,
        reference_inter=case.intermediates,
        inter_order=res.order,
        actual_grads=res.grads if grads and case.grads else None,
        reference_grads=case.grads if grads else None,
        tol=tolerance,
        scenic_class=case.scenic_class,
        constructor_kwargs=case.constructor_kwargs,
        grad_tol=m.grad_tolerance(device) if tol is None else tol,
    )
    ref = case.config.get("parity", {}).get("reference") or "stored case (genuine Scenic goldens format)"
    notes = [f"weights: {case.params_source} via tokenlearner_torch.weights_convert"]
    return Report(_subject(case.config, case.path), m.name, device, f"stored: {ref}", tolerance, rows, notes, settings)


# ------------------------------------------------------------------------------------------------------
# live / record: Flax reference vs port (jax)
# ------------------------------------------------------------------------------------------------------
def _require_jax() -> None:
    try:
        import flax  # noqa: F401
        import jax  # noqa: F401
    except ImportError as exc:
        raise CaseError(
            f"the Flax reference needs jax and flax ({exc}); pip install 'tokenlearner-torch[parity]'"
        ) from None


def _reference_run(
    config_or_case: Any,
    checkpoint: PathLike | None,
    inputs: Any,
    input_shapes: Mapping[str, Sequence[int]] | None,
    m: Mode,
    device: str,
    seed: int | None,
    grads: bool,
    prefer_genuine: bool,
    jit: bool,
    compare_port: bool,
    fast_compile: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    say = progress or (lambda line: None)
    if "flax" not in sys.modules:
        say("importing jax and flax")
    _require_jax()
    from tokenlearner_torch.errors import CheckpointError
    from tokenlearner_torch.weights_convert.readers import read_checkpoint

    from . import reference as R

    config, case_dir = resolve_config(config_or_case)
    seed = int(config.get("seed", 0) if seed is None else seed)
    case = load_case(case_dir) if case_dir is not None and (case_dir / "outputs.npz").is_file() else None
    if inputs is None and input_shapes is None and case is not None:
        inputs = case.inputs
    xs = _resolve_inputs(config, inputs, input_shapes, seed)
    call_kwargs = dict(config.get("call_kwargs") or default_call_kwargs(config["scenic_class"]))
    cls, kwargs = config["scenic_class"], config["constructor_kwargs"]
    notes: list[str] = []
    out_shape = None
    say(f"building the reference {_model_words(config)}: {R.reference_name(prefer_genuine)}")
    with precision(m, use_jax=True) as settings:
        module = R.reference_module(cls, kwargs, m, prefer_genuine=prefer_genuine)
        if checkpoint is not None and is_converted_folder(checkpoint):
            say(f"reading weights: {checkpoint} (tokenlearner-convert output)")
            against = (f"the case {case_dir}" if case_dir is not None else
                       f"the config {_named(config_or_case)}" if _named(config_or_case) else "the config")
            params = _converted_params(checkpoint, against, config)
            params_source = f"{checkpoint} (tokenlearner-convert output)"
        elif checkpoint is not None:
            say(f"reading weights: {checkpoint}")
            try:
                params = read_checkpoint(checkpoint)
            except CheckpointError as exc:
                raise CaseError(str(exc)) from None
            params_source = f"checkpoint {checkpoint}"
        elif case is not None:
            params, params_source = case.params, f"{case.path.name}/{case.params_source}"
        else:
            # One abstract trace gives the parameter shapes and the output's (for the cotangent below).
            out_shape, shapes = R.init_shapes(module, xs, call_kwargs)
            params = R.random_params(module, xs, call_kwargs, seed, shapes=shapes)
            params_source = f"random (seed {seed}, goldens' randomisation: no parameter zero)"
        if set(params) == {"params"}:
            params = params["params"]
        if checkpoint is not None:
            _check_params_fit(module, params, xs, call_kwargs, checkpoint, config)
        cot = None
        if case is not None and case.cotangent is not None and inputs is case.inputs:
            cot = case.cotangent
        elif grads and out_shape is not None:
            cot = R.draw_cotangent(out_shape, seed, m.array_dtype == "float64")
        say(f"compiling and running the reference (mode {m.name}, {'jit' if jit else 'eager'}, "
            f"{'forward and gradients' if grads else 'forward'})")
        try:
            out, inter, g, cot, run_notes = R.run_reference(
                module, params, xs, call_kwargs, cot, m, device=device, jit=jit, grads=grads, seed=seed,
                fast_compile=fast_compile, prefer_genuine=prefer_genuine,
            )
        except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as exc:
            raise CaseError(f"the Flax reference rejects this config/input: {type(exc).__name__}: {exc}") from None
        except Exception as exc:
            if type(exc).__module__.startswith("flax"):  # e.g. ScopeParamShapeError: weights vs config
                raise CaseError(f"the Flax reference rejects these weights/inputs: {_one_line(str(exc))}") from None
            raise
        notes += run_notes
        port = None
        if compare_port:
            say(f"running the port ({device})")
            port = run_port(cls, kwargs, params, xs, cot if grads else None, m, device)
    if m.name == "bf16" and "dtype" not in {f for f in _dtype_fields(cls)}:
        notes.append(f"{cls.rsplit('.', 1)[-1]} has no dtype option: bf16 mode computes it in float32")
    return dict(
        config=config, case_dir=case_dir, module=module, params=params, params_source=params_source, inputs=xs,
        call_kwargs=call_kwargs, out=out, inter=inter, grads=g, cotangent=cot, port=port, settings=settings,
        notes=notes, seed=seed, reference=R.reference_name(prefer_genuine),
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _check_params_fit(module: Any, params: Mapping[str, Any], xs: Mapping[str, np.ndarray],
                      call_kwargs: Mapping[str, Any], checkpoint: PathLike, config: Mapping[str, Any]) -> None:
    """Raise a one-line :class:`CaseError` naming the missing, unexpected and mis-shaped parameters when
    the checkpoint's tree does not fit the reference module built from ``config`` (Flax would only name
    the first, as a ScopeParamShapeError)."""
    from tokenlearner_torch.weights_convert.mapping import flatten_tree

    from . import reference as R

    try:
        want = R.init_shapes(module, xs, call_kwargs)[1]
    except Exception:  # noqa: BLE001 - the reference run itself reports a config/input it rejects
        return
    have = {k: tuple(np.shape(v)) for k, v in flatten_tree(dict(params)).items()}
    missing = sorted(set(want) - set(have))
    unexpected = sorted(set(have) - set(want))
    misshaped = sorted(k for k in set(want) & set(have) if want[k] != have[k])
    if not (missing or unexpected or misshaped):
        return
    parts = [f"{len(missing)} missing, {len(unexpected)} unexpected, {len(misshaped)} mis-shaped"]
    if misshaped:
        parts.append("mis-shaped: " + ", ".join(f"{k} found {list(have[k])} expected {list(want[k])}"
                                                for k in misshaped[:4]) + (" ..." if len(misshaped) > 4 else ""))
    if missing:
        parts.append("missing: " + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
    if unexpected:
        parts.append("unexpected: " + ", ".join(unexpected[:4]) + (" ..." if len(unexpected) > 4 else ""))
    raise CaseError(f"{checkpoint}: the weights do not fit the {_model_words(config)} of the config: "
                    + "; ".join(parts))


def _dtype_fields(scenic_class: str) -> list[str]:
    from .port import has_dtype_option

    return ["dtype"] if has_dtype_option(scenic_class) else []


def live(
    config_or_case: Any,
    *,
    checkpoint: PathLike | None = None,
    inputs: Any = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "f32",
    device: str = "cpu",
    seed: int | None = None,
    tol: float | None = None,
    grads: bool = True,
    prefer_genuine: bool = True,
    jit: bool = True,
    fast_compile: bool = False,
    accuracy: str = "auto",
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Run the Flax reference (genuine Scenic when importable) and the port side by side.

    ``config_or_case``: a config dict / JSON file (``scenic_class``, ``constructor_kwargs``, ``inputs``
    shapes) or a case folder (its config, weights and inputs). Weights: ``checkpoint`` if given, else the
    case's, else random ones (no parameter zero). Inputs: ``inputs`` (arrays, a name -> array dict or an
    .npz path), else the case's, else seeded ``N(0,1)`` of the config's (or ``input_shapes``) shapes.
    ``fast_compile``: compile the jitted reference with LLVM -O0 (``reference.FAST_COMPILE``): the same HLO
    and a much shorter compile on CPU, but LLVM then contracts no fused multiply-adds, so Flax's rounding
    changes where it matters (LayerNorm statistics of tiny rows whose mean dwarfs their spread), and on
    jaxlib 0.10 one random ViT's tf32 input gradient (global max pooling) even came out NaN where the default
    compile gives finite values; the property tests use it in float64 only. Off by default: the reference is
    compiled as Flax users run it.

    ``accuracy`` (the accuracy rule, see :mod:`.compare`): ``"auto"`` runs the reference once more in
    float64 on the same weights, inputs and cotangent when a tensor fails the plain rule, and passes it
    if the port is elementwise as close to that float64 result as the reference is; ``"always"`` does the
    float64 run in any case (every row then shows both distances); ``"off"``: the plain rule only. Mode
    ``f64`` is its own float64 result: the plain rule only. ``progress``: called with a line per phase.
    """
    if accuracy not in ACCURACY_CHOICES:
        raise CaseError(f"unknown accuracy {accuracy!r}; expected one of {', '.join(ACCURACY_CHOICES)}")
    say = progress or (lambda line: None)
    m = get_mode(mode)
    device = _check_device(device)
    r = _reference_run(config_or_case, checkpoint, inputs, input_shapes, m, device, seed, grads,
                       prefer_genuine, jit, compare_port=True, fast_compile=fast_compile, progress=say)
    port = r["port"]
    tolerance = m.tolerance(device) if tol is None else tol
    config = r["config"]

    def compare(exact: F64Result | None) -> list[Any]:
        return compare_all(
            actual_out=port.out,
            reference_out=r["out"],
            actual_inter=port.intermediates,
            reference_inter=r["inter"],
            inter_order=port.order,
            actual_grads=port.grads if grads else None,
            reference_grads=r["grads"] if grads else None,
            tol=tolerance,
            scenic_class=config["scenic_class"],
            constructor_kwargs=config["constructor_kwargs"],
            grad_tol=m.grad_tolerance(device) if tol is None else tol,
            exact=exact,
        )

    say(f"comparing {mode}: output, intermediates{', gradients' if grads else ''}")
    rows = compare(None)
    status = "unavailable"
    if m.array_dtype != "float64" and accuracy != "off":
        status = "not needed"
        if accuracy == "always" or any(row.verdict == "FAIL" for row in rows):
            say(f"running the reference in float64 (accuracy rule: is the port as close to float64 as the "
                f"reference?)")
            rows = compare(_f64_reference(r, device, grads, prefer_genuine, jit, fast_compile))
            status = "applied"
    notes = [f"weights: {r['params_source']}"] + r["notes"]
    where = r["case_dir"] or _named(config_or_case)
    return Report(_subject(config, where), m.name, device, f"live: {r['reference']}", tolerance, rows, notes,
                  r["settings"], accuracy=status)


ACCURACY_CHOICES = ("auto", "always", "off")


def _f64_reference(r: Mapping[str, Any], device: str, grads: bool, prefer_genuine: bool, jit: bool,
                   fast_compile: bool) -> F64Result:
    """The reference once more, in float64, on the run ``r``'s weights, inputs and cotangent."""
    from . import reference as R

    f64 = get_mode("f64")
    config = r["config"]
    with precision(f64, use_jax=True):
        module = R.reference_module(config["scenic_class"], config["constructor_kwargs"], f64,
                                    prefer_genuine=prefer_genuine)
        out, inter, g, _, _ = R.run_reference(
            module, r["params"], r["inputs"], r["call_kwargs"], r["cotangent"] if grads else None, f64,
            device=device, jit=jit, grads=grads, seed=r["seed"], fast_compile=fast_compile,
            prefer_genuine=prefer_genuine,
        )
    return F64Result(out, inter, g)


def record(
    config_or_case: Any,
    out_dir: PathLike,
    *,
    checkpoint: PathLike | None = None,
    inputs: Any = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    mode: str = "f32",
    seed: int | None = None,
    copy_checkpoint: bool = False,
    overwrite: bool = False,
    prefer_genuine: bool = True,
    fast_compile: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write a case of your model, computed by the Flax reference, in the goldens' format.

    Commit the folder and run ``tokenlearner-parity check`` on it in CI (no jax needed there). In mode
    ``f64`` the arrays are float64 and ``check`` then verifies to 1e-10. ``copy_checkpoint``: also copy
    ``checkpoint`` into the case's ``checkpoint/`` (``check`` then loads the weights from it).
    ``progress``: called with a line per phase.
    """
    import flax
    import jax

    m = get_mode(mode)
    refuse_nonempty(out_dir, overwrite)  # before the reference runs
    r = _reference_run(config_or_case, checkpoint, inputs, input_shapes, m, "cpu", seed, True,
                       prefer_genuine, True, compare_port=False, fast_compile=fast_compile, progress=progress)
    if progress:
        progress(f"writing the case {out_dir}")
    config = r["config"]
    params = r["params"]
    if m.array_dtype == "float64":
        params = _tree_astype(params, np.float64)
        xs = {k: v.astype(np.float64) for k, v in r["inputs"].items()}
    else:
        params = _tree_astype(params, np.float32)
        xs = {k: v.astype(np.float32) for k, v in r["inputs"].items()}
    kwargs = dict(config["constructor_kwargs"])
    if m.name == "bf16" and _dtype_fields(config["scenic_class"]):
        kwargs["dtype"] = "bfloat16"
    elif "dtype" in kwargs:
        kwargs["dtype"] = "float32"
    out_config = {
        "case": Path(out_dir).name,
        "scenic_class": config["scenic_class"],
        "constructor_kwargs": kwargs,
        "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in xs.items()],
        "call_kwargs": r["call_kwargs"],
        "seed": r["seed"],
        "parity": {
            "mode": m.name,
            "reference": r["reference"],
            "params_source": r["params_source"],
            "jax_settings": {k: v for k, v in r["settings"].items() if k.startswith("jax")},
            "tool": "tokenlearner-parity record",
        },
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "numpy": np.__version__},
    }
    if checkpoint is not None and copy_checkpoint:
        out_config["checkpoint"] = {"dir": "checkpoint", "source": str(checkpoint)}
    return write_case(
        out_dir,
        config=out_config,
        params=params,
        inputs=xs,
        cotangent=r["cotangent"],
        out=r["out"],
        intermediates=r["inter"],
        grads=r["grads"],
        checkpoint=checkpoint if copy_checkpoint else None,
        overwrite=overwrite,
    )


def _tree_astype(tree: Mapping[str, Any], dtype: Any) -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out[k] = _tree_astype(v, dtype)
        else:
            a = np.asarray(v)
            out[k] = a.astype(dtype) if (a.dtype.kind == "f" or a.dtype.name == "bfloat16") else a
    return out


# ------------------------------------------------------------------------------------------------------
# assert_parity
# ------------------------------------------------------------------------------------------------------
def assert_parity(
    config_or_case: Any,
    checkpoint: PathLike | None = None,
    inputs: Any = None,
    mode: str | None = None,
    device: str = "cpu",
    *,
    live_reference: bool | None = None,
    accuracy: str = "auto",
    **kwargs: Any,
) -> Report:
    """Assert that the port equals the Flax reference; return the :class:`Report`.

    A case folder with stored outputs is checked without jax (:func:`check_case`, the plain rule) unless
    ``live_reference=True`` or a ``checkpoint`` / ``inputs`` is given; anything else runs :func:`live`
    (with the accuracy rule ``accuracy``: ``"auto"``, ``"always"`` or ``"off"``, see :func:`live`).
    Raises ``AssertionError`` whose message is the report's text when any tensor differs.
    """
    stored = (
        isinstance(config_or_case, (str, os.PathLike))
        and (Path(config_or_case) / "outputs.npz").is_file()
        and checkpoint is None
        and inputs is None
    )
    if accuracy not in ACCURACY_CHOICES:
        raise CaseError(f"unknown accuracy {accuracy!r}; expected one of {', '.join(ACCURACY_CHOICES)}")
    if live_reference is None:
        live_reference = not stored
    if not live_reference:
        report = check_case(config_or_case, mode=mode, device=device, **kwargs)
    else:
        report = live(config_or_case, checkpoint=checkpoint, inputs=inputs, mode=mode or "f32", device=device,
                      accuracy=accuracy, **kwargs)
    if not report.passed:
        raise AssertionError(report.to_text())
    return report


MODE_NAMES = tuple(MODES)
