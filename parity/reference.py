"""The Flax side of the harness (needs jax + flax): build the reference module (genuine Scenic when
``scenic.projects.token_learner.model`` is importable, else the project's Flax implementation in
:mod:`.flax_reference`), give it parameters, run it under the mode's precision and capture the output,
every submodule output and every gradient, keyed like the goldens."""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterator, Mapping

import numpy as np

from tokenlearner_torch.weights_convert.mapping import flatten_tree

from .modes import Mode

__all__ = ["reference_module", "init_shapes", "random_params", "draw_cotangent", "run_reference", "reference_name"]


def reference_name(prefer_genuine: bool = True) -> str:
    """The Flax reference :func:`reference_module` builds, as reports name it: genuine Scenic with the file
    it was imported from, or the project's reference (with the import error when a ``scenic`` package is
    installed but Scenic's TokenLearner did not import, so a silent fallback cannot pass for Scenic)."""
    from . import flax_reference as fr

    if prefer_genuine and fr.genuine_scenic_available():
        return f"genuine Scenic (scenic.projects.token_learner.model from {fr.genuine_scenic_origin()})"
    name = "project Flax reference (tokenlearner_torch.parity.flax_reference)"
    why = fr.genuine_scenic_unavailable_reason() if prefer_genuine else ""
    return f"{name}; genuine Scenic not importable: {why}" if why else name


def _has_dtype_field(module_cls: type) -> bool:
    try:
        return "dtype" in {f.name for f in dataclasses.fields(module_cls)}
    except TypeError:
        return False


def reference_module(scenic_class: str, constructor_kwargs: Mapping[str, Any], mode: Mode, *,
                     prefer_genuine: bool = True) -> Any:
    """The Flax module for ``scenic_class`` with Scenic's ``dtype`` set by the mode (where it exists)."""
    from . import flax_reference as fr

    kwargs = dict(constructor_kwargs)
    module = fr.build_reference_module(scenic_class, kwargs, prefer_genuine=prefer_genuine)
    if _has_dtype_field(type(module)):
        kwargs["dtype"] = mode.flax_dtype
        module = fr.build_reference_module(scenic_class, kwargs, prefer_genuine=prefer_genuine)
    return module


def _device(device: str) -> tuple[Any, str | None]:
    import jax

    if str(device).startswith("cuda"):
        try:
            return jax.devices("gpu")[0], None
        except RuntimeError:
            return jax.devices("cpu")[0], "JAX has no GPU backend here: the Flax reference ran on CPU"
    return jax.devices("cpu")[0], None


def _randomize(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """The goldens' randomisation: no parameter stays zero (Scenic zero-initialises several)."""
    name = path.rsplit("/", 1)[-1]
    z = rng.standard_normal(shape)
    if name == "kernel":
        parent = path.rsplit("/", 2)[-2] if path.count("/") else ""
        fan_in = shape[0] if parent in ("query", "key", "value") else int(np.prod(shape[:-1]))
        return z / np.sqrt(max(fan_in, 1))
    if name == "scale":
        return 1.0 + 0.1 * z
    if name == "bias":
        return 0.05 * z
    if name == "pos_embedding":
        return 0.2 * z
    return 0.1 * z


def init_shapes(module: Any, inputs: Mapping[str, np.ndarray],
                call_kwargs: Mapping[str, Any]) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
    """``(output shape, {flat parameter path: shape})`` of ``module`` on ``inputs``, from one abstract trace
    of its init (no arithmetic): what :func:`random_params` fills and the cotangent's shape."""
    import jax
    import jax.numpy as jnp

    xs = [jax.ShapeDtypeStruct(np.shape(v), jnp.float32) for v in inputs.values()]
    out, variables = jax.eval_shape(
        lambda *a: module.init_with_output(jax.random.PRNGKey(0), *a, **call_kwargs), *xs)
    return tuple(out.shape), {k: tuple(v.shape) for k, v in flatten_tree(dict(variables["params"])).items()}


def random_params(module: Any, inputs: Mapping[str, np.ndarray], call_kwargs: Mapping[str, Any],
                  seed: int = 0, *, shapes: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, Any]:
    """A parameter tree for ``module`` with the goldens' random values (float32, numpy). ``shapes``: the
    parameter shapes :func:`init_shapes` gave, when the caller has them (else they are traced here)."""
    from tokenlearner_torch.weights_convert.mapping import unflatten_tree

    if shapes is None:
        shapes = init_shapes(module, inputs, call_kwargs)[1]
    rng = np.random.default_rng(seed)
    return unflatten_tree({k: _randomize(k, shapes[k], rng).astype(np.float32) for k in sorted(shapes)})


def draw_cotangent(shape: tuple[int, ...], seed: int, f64: bool) -> np.ndarray:
    """The seeded ``N(0, 1)`` cotangent of a live run whose case has none (float64 in mode f64)."""
    rng = np.random.default_rng(seed + 1)
    return rng.standard_normal(shape).astype(np.float64 if f64 else np.float32)


def _capture_filter(module: Any, method_name: str) -> bool:
    import flax.linen as nn

    return (
        method_name == "__call__"
        and not isinstance(module, nn.Dropout)
        and module.scope is not None
        and len(module.scope.path) > 0
    )


def _host(a: Any) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.name in ("bfloat16", "float16"):
        a = a.astype(np.float32)
    return a


@contextlib.contextmanager
def float64_mlp_blocks(prefer_genuine: bool = True) -> Iterator[None]:
    """f64 mode: Scenic's ``MlpBlock`` defaults to ``dtype=jnp.float32`` and TokenLearnerModuleV11 /
    TokenFuser build their ``token_masking`` MlpBlock without passing a dtype, so under x64 that block
    would still compute in float32 (1e-7 noise, hiding what f64 mode is for). Inside this context the
    default is float64 (the class keeps its name, so the parameter tree is unchanged)."""
    import importlib

    import jax.numpy as jnp

    from . import flax_reference as fr

    targets: list[tuple[Any, str]] = [(fr, "MlpBlock")]
    if prefer_genuine and fr.genuine_scenic_available():
        targets.append((importlib.import_module("scenic.model_lib.layers.attention_layers"), "MlpBlock"))
    saved = []
    for mod, name in targets:
        base = getattr(mod, name)
        sub = type(name, (base,), {"__annotations__": {"dtype": Any}, "dtype": jnp.float64,
                                   "__module__": base.__module__, "__qualname__": base.__qualname__})
        saved.append((mod, name, base))
        setattr(mod, name, sub)
    try:
        yield
    finally:
        for mod, name, base in saved:
            setattr(mod, name, base)


#: XLA:CPU options that shorten compilation (LLVM -O0; on jaxlib 0.10, XLA:CPU's elemental emitters instead of
#: its MLIR fusion emitters, which halves the compile again); the HLO, hence the arithmetic, is unchanged.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def fast_compile_options() -> dict[str, Any]:
    """:data:`FAST_COMPILE` for this jaxlib (the one place that decides the fast-compile options)."""
    from importlib.metadata import version

    # Only on the jaxlib line where the option was seen to exist: XLA rejects an option it does not know.
    if tuple(int(v) for v in re.findall(r"\d+", version("jaxlib"))[:2]) == (0, 10):
        return {**FAST_COMPILE, "xla_cpu_use_fusion_emitters": False}
    return dict(FAST_COMPILE)


def run_reference(
    module: Any,
    params: Mapping[str, Any],
    inputs: Mapping[str, np.ndarray],
    call_kwargs: Mapping[str, Any],
    cotangent: np.ndarray | None,
    mode: Mode,
    *,
    device: str = "cpu",
    jit: bool = True,
    fast_compile: bool = False,
    grads: bool = True,
    seed: int = 0,
    prefer_genuine: bool = True,
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None, list[str]]:
    """Run the reference under the precision already pinned by :func:`.modes.precision`: output, every
    submodule output and the gradients of ``sum(out * cotangent)``, in one (jitted) computation.

    Returns ``(out, intermediates, grads, cotangent, notes)``. ``cotangent=None`` with ``grads``: a seeded
    ``N(0,1)`` one of the output's shape is drawn (and returned).
    """
    import jax
    import jax.numpy as jnp

    notes: list[str] = []
    dev, note = _device(device)
    if note:
        notes.append(note)
    f64 = mode.array_dtype == "float64"
    dtype = jnp.float64 if f64 else jnp.float32

    def cast(a: Any) -> Any:
        a = np.asarray(a)
        if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
            return jax.device_put(jnp.asarray(a.astype(np.float64 if f64 else np.float32)), dev)
        return jax.device_put(jnp.asarray(a), dev)

    variables = {"params": jax.tree_util.tree_map(cast, dict(params))}
    xs = [cast(v) for v in inputs.values()]
    kwargs = dict(call_kwargs)

    def fwd(v: Any, a: list[Any]) -> Any:
        return module.apply(v, *a, capture_intermediates=_capture_filter, mutable=["intermediates"], **kwargs)

    def loss(v: Any, a: list[Any], cot: Any) -> Any:
        out, state = fwd(v, a)
        return jnp.sum(out.astype(dtype) * cot.astype(dtype)), (out, state)

    def wrap(f: Any) -> Any:
        if not jit:
            return f
        return jax.jit(f, compiler_options=fast_compile_options() if (fast_compile and dev.platform == "cpu") else None)

    patch = float64_mlp_blocks(prefer_genuine) if f64 else contextlib.nullcontext()
    grad_out: dict[str, np.ndarray] = {}
    with jax.default_device(dev), patch:
        if grads:
            if cotangent is None:
                cotangent = draw_cotangent(jax.eval_shape(fwd, variables, xs)[0].shape, seed, f64)
            (g_vars, g_inputs), (out, state) = wrap(jax.grad(loss, argnums=(0, 1), has_aux=True))(
                variables, xs, cast(cotangent)
            )
            grad_out = {k: _host(v) for k, v in flatten_tree(dict(g_vars)).items()}
            grad_out.update({f"input/{n}": _host(g) for n, g in zip(inputs, g_inputs)})
        else:
            out, state = wrap(fwd)(variables, xs)
    inter: dict[str, np.ndarray] = {}
    for path, values in flatten_tree(dict(state.get("intermediates", {}))).items():
        if not path.endswith("/__call__"):
            continue
        key = path[: -len("/__call__")]
        values = list(values)
        for i, value in enumerate(values):
            if hasattr(value, "shape"):
                inter[key if len(values) == 1 else f"{key}[{i}]"] = _host(value)
    if f64:
        notes.append("f64: Scenic's MlpBlock dtype default (float32) raised to float64 on the Flax side")
    return _host(out), inter, grad_out, cotangent, notes
