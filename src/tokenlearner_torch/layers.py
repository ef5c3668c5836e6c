"""Flax-numerics building blocks: Dense, Conv, LayerNorm, MlpBlock, attention, Encoder1DBlock.

Every module here mirrors one Flax/Scenic module, and its attribute names are the Flax names, so a
``state_dict`` key is a Flax parameter path with ``.`` for ``/`` (the converter in
``tokenlearner_torch.weights_convert`` relies on it).

Flax infers parameter shapes from the first input; so can these leaves. A dimension left as ``None`` makes
the parameter lazy (an ``nn.UninitializedParameter``): it is created, with Scenic's initialiser, on the first
forward call (outside ``torch.inference_mode`` even when called inside it), or takes its shape from
``load_state_dict``. Models built with their input shapes (``input_shape=...``, ``from_scenic(...,
input_shapes=...)``) have every parameter on return (:mod:`tokenlearner_torch.shapes`). Asking a lazy
parameter for its shape, rank or ``state_dict`` raises a :class:`ShapeError` that says how to give the shapes.

Shape checks and rank-dependent layouts live in small module-level helpers registered with ``torch.fx.wrap``:
``torch.fx.symbolic_trace`` records each as one call (checked when the traced graph runs) instead of failing
on Python control flow over a traced shape.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, Optional, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from .errors import ShapeError
from .conventions import HubMixin
from . import cpu_gemm, flax_numerics
from . import initializers as init
from .numerics_mode import get_layer_norm_numerics

__all__ = [
    "Dense",
    "Conv",
    "LayerNorm",
    "Identity",
    "Dropout",
    "StochasticDepth",
    "MlpBlock",
    "MultiHeadDotProductAttention",
    "Encoder1DBlock",
    "AddPositionEmbs",
    "gelu",
    "resolve_dtype",
]


def gelu(x: Tensor) -> Tensor:
    """Flax's ``nn.gelu``: the tanh approximation (``jax.nn.gelu(approximate=True)``), not the exact erf."""
    return F.gelu(x, approximate="tanh")


def resolve_dtype(dtype: object) -> Optional[torch.dtype]:
    """Scenic's ``dtype`` option (a string, a torch dtype or None) as the compute dtype of a block.

    Returns None for float32 (the parameters' own dtype: no casts at all).
    """
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        name = getattr(dtype, "__name__", None) or getattr(dtype, "name", None) or str(dtype)
        name = name.rsplit(".", 1)[-1]
        table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if name not in table:
            from .errors import ConfigError

            raise ConfigError(f"dtype must be one of {sorted(table)} (as a string or torch dtype), got {dtype!r}")
        resolved = table[name]
    return None if resolved == torch.float32 else resolved


_LAZY_HINT = (
    "build the model with its input shapes (input_shape=... in the constructor, or from_scenic(..., "
    "input_shapes=[...])), load weights into it, or run one forward call first"
)


class LazyParameter(nn.UninitializedParameter):
    """A parameter whose shape comes from the first input (Flax-style); becomes an ``nn.Parameter`` then.

    Its ``shape``, ``ndim``, ``dim()``, ``size()`` and ``numel()`` raise :class:`ShapeError` instead of
    answering (torch's UninitializedParameter reports ``ndim == 1``, which silently puts every still-lazy
    weight matrix in the no-weight-decay group of a "skip 1-D parameters" optimiser recipe).
    """

    cls_to_become = nn.Parameter

    def _lazy_error(self) -> ShapeError:
        return ShapeError(f"a parameter has no shape yet (its shape comes from the model's input): {_LAZY_HINT}")

    @property
    def shape(self):  # type: ignore[override]
        raise self._lazy_error()

    @property
    def ndim(self):  # type: ignore[override]
        raise self._lazy_error()

    def dim(self):  # type: ignore[override]
        raise self._lazy_error()

    def size(self, *args):  # type: ignore[override]
        raise self._lazy_error()

    def numel(self):  # type: ignore[override]
        raise self._lazy_error()


class _LazyShapes(nn.Module):
    """Parameters whose shapes may depend on the first input, as in Flax.

    Subclasses register parameters with :meth:`_param` (``None`` shape = lazy) and implement
    :meth:`_reset` (the Scenic initialiser). A lazy parameter takes its shape from ``load_state_dict``
    or from :meth:`_materialize` at the first forward call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._register_load_state_dict_pre_hook(self._materialize_from_state_dict)
        self.register_state_dict_pre_hook(_refuse_lazy_state_dict)

    def _param(self, name: str, shape: Optional[Sequence[int]]) -> None:
        if shape is None:
            self.register_parameter(name, LazyParameter(dtype=torch.float32))
        else:
            self.register_parameter(name, nn.Parameter(torch.empty(*shape, dtype=torch.float32)))

    def is_lazy(self) -> bool:
        # Once every parameter exists none becomes lazy again (only __init__ makes lazy ones): remembered, as
        # this runs in every forward and eager small-batch calls are Python-bound.
        if self.__dict__.get("_materialized", False):
            return False
        lazy = any(isinstance(p, nn.UninitializedParameter) for p in self._parameters.values() if p is not None)
        if not lazy:
            self.__dict__["_materialized"] = True
        return lazy

    def lazy_parameter_names(self) -> list[str]:
        return [n for n, p in self._parameters.items() if isinstance(p, nn.UninitializedParameter)]

    def _materialize_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        for name, param in self._parameters.items():
            key = prefix + name
            if isinstance(param, nn.UninitializedParameter) and key in state_dict:
                param.materialize(tuple(state_dict[key].shape))
        self._sync_dims()

    def _materialize(self, shapes: dict[str, Sequence[int]]) -> None:
        # Outside inference mode even when the first call runs inside it: parameters created as inference
        # tensors could never be trained.
        with torch.inference_mode(False), torch.no_grad():
            for name, shape in shapes.items():
                param = self._parameters[name]
                if isinstance(param, nn.UninitializedParameter):
                    param.materialize(tuple(shape))
            self._sync_dims()
            self._reset()

    def _sync_dims(self) -> None:
        """Refresh the size attributes from parameters that got their shape from a state dict."""

    def _reset(self) -> None:
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """Re-draw the parameters from Scenic's initialisers."""
        with torch.no_grad():
            self._reset()


def _refuse_lazy_state_dict(module: _LazyShapes, prefix: str, keep_vars: bool) -> None:
    lazy = module.lazy_parameter_names()
    if lazy:
        names = ", ".join(prefix + n for n in lazy)
        verb = "have" if len(lazy) > 1 else "has"
        raise ShapeError(f"state_dict: {names} {verb} no shape yet (it comes from the model's input): {_LAZY_HINT}")


_F = TypeVar("_F", bound=Callable)


def shape_check(fn: _F) -> _F:
    """Decorates a function that validates (and lays out) shapes so that ``torch.jit.trace`` does not warn.

    Under ``torch.jit.trace`` a tensor's sizes are traced 0-d tensors, and the truth value of a comparison of
    them (``if x.shape[-1] != n: raise``) raises a TracerWarning ("might cause the trace to be incorrect"),
    although a check that passes records nothing in the graph and the trace is exact. The check still runs
    while tracing (a wrong example input still gets the port's ShapeError); only that warning is silenced, and
    only there. Eager mode pays one ``torch.jit.is_tracing()`` call.
    """

    @functools.wraps(fn)
    def checked(*args, **kwargs):
        if torch.jit.is_tracing():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return checked  # type: ignore[return-value]


@shape_check
def _check_features(x: Tensor, n: int, who: str) -> Tensor:
    if x.shape[-1] != n:
        raise ShapeError(f"{who}: expected input with {n} features, got shape {tuple(x.shape)}")
    return x


torch.fx.wrap("_check_features")


# Dense's float32 CPU GEMM (oneDNN where it applies): one named place, tokenlearner_torch.cpu_gemm.
linear = cpu_gemm.linear


def _hooked(module: nn.Module) -> bool:
    """Whether anything watches ``module``'s forward (then it must run as itself: hooks see its output)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
    )


class Dense(_LazyShapes):
    """Flax ``nn.Dense``: ``y = x @ kernel + bias``; torch ``weight`` is the kernel transposed, [out, in].

    Args:
        features: output size (None: decided by the owner before the first call, via ``out_features``).
        in_features: input size (None: taken from the first input).
        use_bias: as Flax.
        kernel_init, bias_init: Scenic initialisers from :mod:`tokenlearner_torch.initializers`.
        dtype: compute dtype (Flax ``dtype``): inputs and parameters are cast to it. None = float32.
    """

    def __init__(
        self,
        features: Optional[int],
        in_features: Optional[int] = None,
        *,
        use_bias: bool = True,
        kernel_init: Callable[[Tensor, int, int], None] = init.lecun_normal_,
        bias_init: Callable[[Tensor], None] = init.zeros_,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """See the class docstring; a size left None is taken from the first input (or a state dict)."""
        super().__init__()
        self.out_features = features
        self.in_features = in_features
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self.dtype = dtype
        known = features is not None and in_features is not None
        self._param("weight", (features, in_features) if known else None)
        if use_bias:
            self._param("bias", (features,) if features is not None else None)
        else:
            self.register_parameter("bias", None)
        if not self.is_lazy():
            self.reset_parameters()

    def _sync_dims(self) -> None:
        if not isinstance(self.weight, nn.UninitializedParameter):
            self.out_features, self.in_features = self.weight.shape

    def _reset(self) -> None:
        self.kernel_init(self.weight, self.in_features, self.out_features)
        if self.bias is not None:
            self.bias_init(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[..., in_features] -> [..., out_features] (in ``dtype`` when set)."""
        if self.is_lazy():
            self._materialize_from(x)
        else:
            x = _check_features(x, self.in_features, "Dense")
        if self.dtype is not None:
            weight, bias = self._params_in_dtype()
            return F.linear(x.to(self.dtype), weight, bias)
        return linear(x, self.weight, self.bias)

    def _materialize_from(self, x: Tensor) -> None:
        """Creates the lazy parameters for input ``x`` [..., in] (Scenic's initialisers)."""
        out = self.out_features
        if out is None:
            raise ShapeError("Dense: the output size was never set (an owner module must set out_features)")
        self._materialize({"weight": (out, x.shape[-1]), "bias": (out,)})

    def _params_in_dtype(self) -> tuple[Tensor, Optional[Tensor]]:
        """weight and bias cast to ``dtype`` (Scenic's bf16 policy casts the float32 parameters at every call).

        Where autograd is off (inference), the casts are kept until a parameter changes (an in-place update
        bumps its version counter; ``.to()`` or ``load_state_dict`` with new storage changes its data
        pointer): an eager bf16 call otherwise spends about a fifth of its time re-casting every weight
        (benchmarks/README.md, profile). Same values as casting anew; costs one ``dtype`` copy of the
        weights while the module lives. With autograd on, under torch.compile / torch.fx / torch.jit tracing
        (the graph does the cast), or for tensor subclasses (DTensor, proxies), it casts each call.
        """
        w, b = self.weight, self.bias
        if torch.is_grad_enabled() or not cpu_gemm.plain_eager(w, b) or w.device.type == "meta":
            return w.to(self.dtype), (None if b is None else b.to(self.dtype))
        key = (self.dtype, w.device, w.data_ptr(), w._version) + (() if b is None else (b.data_ptr(), b._version))
        cache = self.__dict__.get("_cast_cache")
        if cache is None or cache[0] != key:
            # Outside inference mode (an inference tensor could not be used later under plain no_grad); and
            # inference_mode(False) turns autograd back on, so no_grad again: the copies must be plain leaves.
            with torch.inference_mode(False), torch.no_grad():
                cache = (key, w.to(self.dtype), None if b is None else b.to(self.dtype))
            self.__dict__["_cast_cache"] = cache
        return cache[1], cache[2]

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() give the parameters new storage; a later one could reuse an old address.
        self.__dict__.pop("_cast_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv(_LazyShapes):
    """Flax ``nn.Conv`` on channels-first tensors: torch weight [out, in, *kernel] (Flax [*kernel, in, out]).

    Only the paddings Scenic uses: ``'SAME'`` with stride 1 and odd kernels (symmetric), and ``'VALID'``.
    Inputs and outputs are [B, C, *spatial] (torch layout); the owner moves channel-last data in and out.
    """

    # The hooks that record intermediates compare this module's output in Flax's channel-last layout.
    channels_first_output = True

    def __init__(
        self,
        features: int,
        kernel_size: Sequence[int],
        in_channels: Optional[int] = None,
        *,
        strides: Optional[Sequence[int]] = None,
        padding: str = "SAME",
        use_bias: bool = True,
        kernel_init: Callable[[Tensor, int, int], None] = init.lecun_normal_,
        bias_init: Callable[[Tensor], None] = init.zeros_,
    ) -> None:
        """``features`` output channels; ``kernel_size`` 2 or 3 entries (torch order: [T,] H, W);
        ``in_channels`` None = from the first input; ``strides`` default 1; ``padding`` 'SAME' or 'VALID'."""
        super().__init__()
        self.out_channels = features
        self.in_channels = in_channels
        self.kernel_size = tuple(int(k) for k in kernel_size)
        self.strides = tuple(int(s) for s in (strides or (1,) * len(self.kernel_size)))
        if len(self.kernel_size) not in (2, 3):
            raise ValueError(f"Conv supports 2-D and 3-D kernels, got kernel_size={self.kernel_size}")
        if padding == "SAME":
            if any(s != 1 for s in self.strides) or any(k % 2 == 0 for k in self.kernel_size):
                raise ValueError("Conv: 'SAME' padding is implemented for stride 1 and odd kernels only")
            self._padding = tuple(k // 2 for k in self.kernel_size)
        elif padding == "VALID":
            self._padding = (0,) * len(self.kernel_size)
        else:
            raise ValueError(f"Conv: padding must be 'SAME' or 'VALID', got {padding!r}")
        self.padding = padding
        self.kernel_init = kernel_init
        self.bias_init = bias_init
        self._param("weight", (features, in_channels, *self.kernel_size) if in_channels is not None else None)
        if use_bias:
            self._param("bias", (features,))
        else:
            self.register_parameter("bias", None)
        if not self.is_lazy():
            self.reset_parameters()

    def _sync_dims(self) -> None:
        if not isinstance(self.weight, nn.UninitializedParameter):
            self.in_channels = self.weight.shape[1]

    def _reset(self) -> None:
        fan_in = self.in_channels * math.prod(self.kernel_size)
        fan_out = self.out_channels * math.prod(self.kernel_size)
        self.kernel_init(self.weight, fan_in, fan_out)
        if self.bias is not None:
            self.bias_init(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_channels, *spatial] -> [B, out_channels, *spatial'] (2-D or 3-D, as the kernel)."""
        if self.is_lazy():
            self._materialize({"weight": (self.out_channels, x.shape[1], *self.kernel_size)})
        conv = F.conv2d if len(self.kernel_size) == 2 else F.conv3d
        return conv(x, self.weight, self.bias, stride=self.strides, padding=self._padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"strides={self.strides}, padding={self.padding!r}, bias={self.bias is not None}"
        )


class LayerNorm(_LazyShapes):
    """Flax ``nn.LayerNorm`` over the last axis: epsilon 1e-6, learned ``scale`` (torch ``weight``) and bias.

    Numerics: statistics in float32 (at least), output in ``dtype`` (Flax ``dtype``, the Encoder1DBlock's
    compute dtype) or, when None, in Flax's promotion of the input and parameter dtypes (the input's dtype
    for a model converted with ``.to(dtype)``). How the statistics are summed is chosen in one place,
    :func:`tokenlearner_torch.numerics` (see :func:`flax_layer_norm`).
    """

    def __init__(self, dim: Optional[int] = None, *, epsilon: float = 1e-6, dtype: Optional[torch.dtype] = None):
        """``dim``: the normalised (last) axis size, None = from the first input; ``epsilon``: Flax's 1e-6."""
        super().__init__()
        self.dim = dim
        self.epsilon = epsilon
        self.dtype = dtype
        self._param("weight", (dim,) if dim is not None else None)
        self._param("bias", (dim,) if dim is not None else None)
        if not self.is_lazy():
            self.reset_parameters()

    def _sync_dims(self) -> None:
        if not isinstance(self.weight, nn.UninitializedParameter):
            self.dim = self.weight.shape[0]

    def _reset(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        """[..., dim] -> [..., dim], normalised over the last axis."""
        if self.is_lazy():
            self._materialize({"weight": (x.shape[-1],), "bias": (x.shape[-1],)})
        y = flax_layer_norm(x, self.weight, self.bias, self.epsilon)
        return y if self.dtype is None else y.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, epsilon={self.epsilon}"


def flax_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm over the last axis as Flax computes it: statistics in float32 (at least); the result in the
    promoted dtype of ``x`` and the parameters (Flax's ``dtype=None``).

    Default numerics (``"fused"``): torch's fused kernel, one graph with no data-dependent branch. Under
    ``tokenlearner_torch.numerics("xla_cpu")``: Flax's ``E[x²] - E[x]²`` summed in XLA:CPU's order
    (:mod:`tokenlearner_torch.flax_numerics`), which reproduces Flax's rounding noise on inputs whose mean
    is large against their spread (docs/numerics.md, "Numerics", for the measured errors of both).
    """
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if get_layer_norm_numerics() == "xla_cpu":
        if x.dtype == torch.float64:  # f64 parity mode: no float32 rounding to reproduce
            return _flax_formula(x, weight.to(x.dtype), bias.to(x.dtype), eps)
        return flax_numerics.layer_norm(x, weight, bias, eps).to(out_dtype)
    stats_dtype = torch.promote_types(out_dtype, torch.float32)
    y = F.layer_norm(x.to(stats_dtype), (x.shape[-1],), weight.to(stats_dtype), bias.to(stats_dtype), eps)
    return y.to(out_dtype)


# One call in a torch.fx graph: its dtype logic is Python over tensor attributes that FX cannot branch on.
torch.fx.wrap("flax_layer_norm")


def _flax_formula(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x * x).mean(-1, keepdim=True) - mean * mean).clamp_min(0.0)
    return (x - mean) * (torch.rsqrt(var + eps) * weight) + bias


class Identity(nn.Module):
    """Scenic's ``IdentityLayer``: names an array (``mlp1``, ``mlp2``, ``pre_logits``) for intermediates."""

    def __init__(self) -> None:
        """No parameters."""
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> the same tensor."""
        return x


class Dropout(nn.Dropout):
    """Flax ``nn.Dropout``: active in ``train()`` mode only (Scenic's ``deterministic=False``)."""

    def __init__(self, rate: float = 0.5) -> None:
        """``rate``: the probability of dropping an element (Flax's ``rate``)."""
        super().__init__(rate)

    def forward(self, x: Tensor) -> Tensor:
        """Any shape -> the same shape; in training, elements zeroed with probability ``rate``, others scaled."""
        if not self.training or self.p == 0.0:
            return x  # F.dropout would return x too, after a Python call per layer (eager overhead)
        return super().forward(x)


class StochasticDepth(nn.Module):
    """Scenic's StochasticDepth: drops the whole example's branch with probability ``rate`` in training."""

    def __init__(self, rate: float = 0.0) -> None:
        """``rate``: the probability of dropping an example's whole branch in training."""
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        """[B, ...] -> [B, ...]: each example's tensor kept (scaled by 1/(1-rate)) or zeroed."""
        if not self.training or self.rate == 0.0:
            return x
        return _drop_path(x, self.rate)


def _drop_path(x: Tensor, rate: float) -> Tensor:
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device).bernoulli_(keep)
    return x * (mask / keep).to(x.dtype)


torch.fx.wrap("_drop_path")


class MlpBlock(HubMixin, nn.Module):
    """Scenic ``attention_layers.MlpBlock``: Dense_0 -> gelu -> Dropout -> Dense_1 -> Dropout.

    Shapes: [..., in] -> [..., out_dim or in]. Kernels xavier-uniform, biases N(0, 1e-6) (Scenic's defaults).
    """

    def __init__(
        self,
        mlp_dim: int,
        out_dim: Optional[int] = None,
        dropout_rate: float = 0.1,
        use_bias: bool = True,
        *,
        in_dim: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """Scenic's fields (``mlp_dim`` hidden width; ``out_dim`` None = the input width), then the port's:
        ``in_dim`` the input width (None: from the first input), ``dtype`` the compute dtype."""
        super().__init__()
        self.out_dim = out_dim
        self.Dense_0 = Dense(
            mlp_dim, in_dim, use_bias=use_bias, kernel_init=init.xavier_uniform_, bias_init=init.normal_1e6_, dtype=dtype
        )
        self.mlp1 = Identity()
        self.Dropout_0 = Dropout(dropout_rate)
        self.Dense_1 = Dense(
            out_dim if out_dim is not None else in_dim,
            mlp_dim,
            use_bias=use_bias,
            kernel_init=init.xavier_uniform_,
            bias_init=init.normal_1e6_,
            dtype=dtype,
        )
        self.mlp2 = Identity()
        self.Dropout_1 = Dropout(dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        """[..., in] -> [..., out_dim] (out_dim None: [..., in])."""
        if self.Dense_1.out_features is None:
            # Scenic: out_dim=None means "as wide as the input", known only now.
            self.Dense_1.out_features = x.shape[-1]
        x = self.Dropout_0(self.mlp1(self._dense_gelu(x)))
        return self.Dropout_1(self.mlp2(self.Dense_1(x)))

    def _dense_gelu(self, x: Tensor) -> Tensor:
        """gelu(Dense_0(x)); oneDNN applies the GELU in the GEMM's epilogue where it can (cpu_gemm), one pass
        over [..., mlp_dim] fewer. Not when a hook watches Dense_0: it must see Dense_0's own output."""
        dense = self.Dense_0
        if dense.dtype is None and not _hooked(dense):
            if dense.is_lazy():  # created here, so that the first call takes the same kernel as the next ones
                dense._materialize_from(x)
            if cpu_gemm.fuses_gelu(x, dense.weight, dense.bias):
                return cpu_gemm.linear_gelu(_check_features(x, dense.in_features, "Dense"), dense.weight, dense.bias)
        return gelu(dense(x))


class _HeadsDense(Dense):
    """A Flax ``DenseGeneral`` of the attention, stored flat as a torch Linear.

    ``query``/``key``/``value``: Flax kernel [in, heads, head_dim], bias [heads, head_dim];
    ``out``: Flax kernel [heads, head_dim, out], bias [out]. torch keeps [heads*head_dim, in] and
    [out, heads*head_dim] so that one matmul computes all heads. ``num_heads`` tells the converter how to
    split the flat dimension.
    """

    def __init__(self, features: Optional[int], in_features: Optional[int], num_heads: int, dtype=None):
        """``features``/``in_features`` as :class:`Dense` (flat over heads); ``num_heads`` for the converter."""
        super().__init__(features, in_features, kernel_init=init.xavier_uniform_, bias_init=init.zeros_, dtype=dtype)
        self.num_heads = num_heads


class HeadsProjection(_HeadsDense):
    """Attention ``query``/``key``/``value``: [..., in] -> [..., heads*head_dim]."""


class HeadsOutput(_HeadsDense):
    """Attention ``out``: [..., heads*head_dim] -> [..., out]."""


class MultiHeadDotProductAttention(nn.Module):
    """Flax ``nn.MultiHeadDotProductAttention`` as Scenic's ViT uses it (self-attention, no mask).

    Shapes: [B, N, C] -> [B, N, C]; qkv_features = out_features = C, head_dim = C / num_heads.
    Numerics: query scaled by 1/sqrt(head_dim), softmax in the compute dtype, as Flax. Attention dropout is
    element-wise on the weights (``broadcast_dropout=False``).
    """

    def __init__(
        self,
        num_heads: int,
        *,
        dim: Optional[int] = None,
        dropout_rate: float = 0.0,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        """``num_heads`` (must divide C); ``dim`` C (None: from the first input); ``dropout_rate`` on the
        attention weights in training; ``dtype`` the compute dtype."""
        super().__init__()
        self.num_heads = num_heads
        self.dropout_rate = dropout_rate
        self.dtype = dtype
        for name in ("query", "key", "value"):
            setattr(self, name, HeadsProjection(dim, dim, num_heads, dtype=dtype))
        self.out = HeadsOutput(dim, dim, num_heads, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, C] -> [B, N, C] (self-attention over the N tokens)."""
        h = self.num_heads
        x = _check_heads(x, h)
        for proj in (self.query, self.key, self.value, self.out):
            if proj.out_features is None:  # lazy: as wide as the input
                proj.out_features = x.shape[-1]
        q = self.query(x).unflatten(-1, (h, -1)).transpose(1, 2)  # [B, H, N, D]
        k = self.key(x).unflatten(-1, (h, -1)).transpose(1, 2)
        v = self.value(x).unflatten(-1, (h, -1)).transpose(1, 2)
        p = self.dropout_rate if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return self.out(y.transpose(1, 2).flatten(2))


@shape_check
def _check_heads(x: Tensor, h: int) -> Tensor:
    if x.ndim != 3:
        raise ShapeError(f"MultiHeadDotProductAttention expects [batch, tokens, channels], got {tuple(x.shape)}")
    if x.shape[-1] % h:
        raise ShapeError(f"MultiHeadDotProductAttention: channels ({x.shape[-1]}) must be divisible by num_heads ({h})")
    return x


torch.fx.wrap("_check_heads")


class Encoder1DBlock(HubMixin, nn.Module):
    """Scenic ``vit.Encoder1DBlock``: pre-LN self-attention and MLP, each with a residual. [B, N, C] -> same.

    ``dtype`` (Scenic ``dtype``): the LayerNorms, attention and MLP compute in it; the residual stream stays
    float32 because adding a bf16 branch to a float32 input promotes, exactly as in JAX.
    """

    def __init__(
        self,
        mlp_dim: int,
        num_heads: int,
        dtype: object = None,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.1,
        stochastic_depth: float = 0.0,
        *,
        dim: Optional[int] = None,
    ) -> None:
        """Scenic's fields, then the port's ``dim``: the channels C (None: from the first input)."""
        super().__init__()
        dt = resolve_dtype(dtype)
        self.LayerNorm_0 = LayerNorm(dim, dtype=dt)
        self.MultiHeadDotProductAttention_0 = MultiHeadDotProductAttention(
            num_heads, dim=dim, dropout_rate=attention_dropout_rate, dtype=dt
        )
        self.Dropout_0 = Dropout(dropout_rate)
        self.StochasticDepth_0 = StochasticDepth(stochastic_depth)
        self.LayerNorm_1 = LayerNorm(dim, dtype=dt)
        self.MlpBlock_0 = MlpBlock(mlp_dim, dropout_rate=dropout_rate, in_dim=dim, dtype=dt)
        self.StochasticDepth_1 = StochasticDepth(stochastic_depth)

    def forward(self, inputs: Tensor) -> Tensor:
        """[B, N, C] -> [B, N, C]."""
        x = self.MultiHeadDotProductAttention_0(self.LayerNorm_0(inputs))
        x = self.StochasticDepth_0(self.Dropout_0(x)) + inputs
        y = self.MlpBlock_0(self.LayerNorm_1(x))
        return self.StochasticDepth_1(y) + x


class AddPositionEmbs(HubMixin, _LazyShapes):
    """Scenic ``vit.AddPositionEmbs``: adds a learned ``pos_embedding`` [1, N, C], init N(0, 0.02)."""

    def __init__(self, num_positions: Optional[int] = None, dim: Optional[int] = None) -> None:
        """``num_positions`` N and ``dim`` C of the embedding (None: from the first input)."""
        super().__init__()
        known = num_positions is not None and dim is not None
        self._param("pos_embedding", (1, num_positions, dim) if known else None)
        if known:
            self.reset_parameters()

    def _reset(self) -> None:
        init.normal_(self.pos_embedding, 0.02)

    def forward(self, x: Tensor) -> Tensor:
        """[B, N, C] -> [B, N, C]: ``x + pos_embedding``."""
        if self.is_lazy():
            x = _check_rank(x, 3, "AddPositionEmbs expects [batch, tokens, channels]")
            self._materialize({"pos_embedding": (1, x.shape[1], x.shape[2])})
        return _check_positions(x, self.pos_embedding) + self.pos_embedding


def _check_rank(x: Tensor, rank: int, expected: str) -> Tensor:
    """``x`` if it has ``rank`` dimensions, else ShapeError(``expected``, got ...)."""
    if x.ndim != rank:
        raise ShapeError(f"{expected}, got shape {tuple(x.shape)}")
    return x


@shape_check
def _check_positions(x: Tensor, pos_embedding: Tensor) -> Tensor:
    if x.ndim != 3:
        raise ShapeError(f"AddPositionEmbs expects [batch, tokens, channels], got shape {tuple(x.shape)}")
    if tuple(pos_embedding.shape[1:]) != tuple(x.shape[1:]):
        raise ShapeError(
            f"AddPositionEmbs: the position embedding covers {tuple(map(int, pos_embedding.shape[1:]))} "
            f"(tokens, channels) but the input has {tuple(map(int, x.shape[1:]))}; the input size must match the "
            "one the model was built or trained with"
        )
    return x


torch.fx.wrap("_check_rank")
torch.fx.wrap("_check_positions")
