"""Scenic's optimisers (``scenic/train_lib/optimizers.py``) as a ``torch.optim.Optimizer`` in optax's order.

Scenic turns ``config.optimizer`` + ``config.optimizer_configs`` into an optax chain
(:func:`get_optax_optimizer_config`, then :func:`scenic_optimizer`). :class:`OptaxChain` runs such a chain
on PyTorch parameters: each step takes ``p.grad``, passes it through the transforms in order and adds the
result to ``p`` (optax's ``apply_updates``). Where a stock torch optimiser differs from optax:

* ``torch.optim.Adam(W)``: epsilon is added to ``sqrt(nu) / sqrt(bias_correction2)``; optax adds it to
  ``sqrt(nu / bias_correction2)``. ``AdamW`` decays with ``p *= 1 - lr*wd`` before the Adam step; optax adds
  ``wd*p`` to the Adam direction and then scales the sum by ``-lr`` (the same in exact arithmetic, different
  rounding, and optax's decay can be masked per parameter).
* ``torch.optim.SGD(momentum, nesterov)``: ``buf = m*buf + g`` is the same as optax's trace, but torch's first
  step copies ``g`` into the buffer, and weight decay is added before the momentum, as optax's
  ``add_decayed_weights`` placed before ``sgd`` in Scenic's chain (coupled, scaled by lr and momentum).
* Scenic's learning rate is a function of optax's own step count, read before the increment.

Masks and norms use the Flax view of the parameters (``flax_ndim``): Scenic's ``skip_scale_and_bias_regularization``
mask is ``ndim != 1`` on Flax shapes, so attention query/key/value biases (Flax ``[heads, head_dim]``) are decayed.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = [
    "ParamSpec",
    "Transform",
    "ScaleByAdam",
    "Trace",
    "AddDecayedWeights",
    "ClipByGlobalNorm",
    "ScaleByLearningRate",
    "SetToZero",
    "Masked",
    "OptaxChain",
    "get_optax_optimizer_config",
    "scenic_optimizer",
    "weight_decay_mask",
    "global_norm",
    "clip_grads",
    "named_specs",
]


@dataclass(frozen=True)
class ParamSpec:
    """A parameter with its Flax path (``'Transformer/encoder_norm/scale'``) and its Flax rank."""

    name: str
    param: Tensor
    flax_ndim: int


def _f32(x: float, like: Tensor) -> Tensor:
    """A Python number rounded to the tensor's dtype, as JAX does with weakly typed scalars."""
    return torch.tensor(x, dtype=like.dtype, device=like.device)


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """sqrt(sum of squares), leaf by leaf in order (Scenic's l2_norm / optax.tree.norm)."""
    total = None
    for t in tensors:
        sq = torch.sum(t * t)
        total = sq if total is None else total + sq
    if total is None:
        return torch.zeros(())
    return torch.sqrt(total)


def clip_grads(grads: Sequence[Tensor], max_norm: float) -> tuple[list[Tensor], Tensor]:
    """Scenic's trainer clipping (``jax.example_libraries.optimizers.clip_grads``): ``g * (max/norm)`` if
    ``norm >= max``. Returns the clipped gradients and the norm before clipping.

    No host synchronisation (the training loop keeps the device busy): the scale is chosen on the device,
    and ``g * 1`` is ``g`` bit for bit, so the unclipped case equals clip_grads' ``return grads``."""
    norm = global_norm(grads)
    scale = torch.where(norm < max_norm, torch.ones_like(norm), _f32(max_norm, norm) / norm)
    return [g * scale for g in grads], norm


class Transform:
    """One optax GradientTransformation on lists of tensors; state lives in per-parameter dicts.

    The maths runs as multi-tensor (``torch._foreach_*``) ops over the list, one elementwise op at a time in
    optax's order, so every intermediate is rounded to float32 exactly where optax rounds it (no fused
    multiply-adds: ``addcmul``/``lerp``/``add(alpha=)`` would round differently). ``owned`` says the incoming
    updates are scratch tensors of this step that may be overwritten in place (never ``p.grad`` or state).
    """

    def init(self, specs: Sequence[ParamSpec], states: Sequence[dict]) -> None:  # pragma: no cover - trivial
        pass

    def update(self, updates: list[Tensor], specs: Sequence[ParamSpec], states: Sequence[dict]) -> list[Tensor]:
        return self._update(list(updates), specs, states, owned=False)[0]

    def _update(self, updates: list[Tensor], specs: Sequence[ParamSpec], states: Sequence[dict],
                owned: bool) -> tuple[list[Tensor], bool]:  # fmt: skip
        """The new updates and whether they are this step's own scratch tensors."""
        raise NotImplementedError


class _Counted(Transform):
    """A transform with optax's int32 ``count`` (kept per parameter, so that ``state_dict`` holds it)."""

    key = "count"

    def init(self, specs, states):
        for s in states:
            s[self.key] = torch.zeros((), dtype=torch.int32)

    def _count(self, states) -> int:
        return int(states[0][self.key]) if states else 0

    def _advance(self, states) -> None:
        for s in states:  # a tensor per parameter: no shared storage in state_dict
            s[self.key] = s[self.key] + 1


class ScaleByAdam(_Counted):
    """optax.scale_by_adam: ``m/(1-b1^t) / (sqrt(v/(1-b2^t) + eps_root) + eps)``."""

    def __init__(self, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
                 nesterov: bool = False) -> None:  # fmt: skip
        self.b1, self.b2, self.eps, self.eps_root, self.nesterov = b1, b2, eps, eps_root, nesterov

    def init(self, specs, states):
        super().init(specs, states)
        for spec, s in zip(specs, states):
            s["mu"] = torch.zeros_like(spec.param, memory_format=torch.preserve_format)
            s["nu"] = torch.zeros_like(spec.param, memory_format=torch.preserve_format)

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def _bias_correction(decay: float, count: int) -> float:
        # optax: 1 - decay**count evaluated in float32 (pow of two float32 values); the float32 result is
        # exact as a Python float, so dividing by it below divides by the same float32 number.
        pw = torch.pow(torch.tensor(decay, dtype=torch.float32), torch.tensor(float(count), dtype=torch.float32))
        return float(1 - pw)

    def _update(self, updates, specs, states, owned):
        if not updates:
            return updates, owned
        count = self._count(states) + 1
        g = updates
        mu, nu = [s["mu"] for s in states], [s["nu"] for s in states]
        # optax's update_moment: (1-b1)*g + b1*mu, each product rounded, then the sum (add commutes).
        tmp = torch._foreach_mul(g, 1 - self.b1)
        torch._foreach_mul_(mu, self.b1)
        torch._foreach_add_(mu, tmp)
        # update_moment_per_elem_norm: (1-b2)*(g*g) + b2*nu.
        sq = torch._foreach_mul(g, g)
        torch._foreach_mul_(sq, 1 - self.b2)
        torch._foreach_mul_(nu, self.b2)
        torch._foreach_add_(nu, sq)
        if self.nesterov:
            # b1*(mu/(1-b1^(t+1))) + (1-b1)*(g/(1-b1^t))
            out = torch._foreach_div(mu, self._bias_correction(self.b1, count + 1))
            torch._foreach_mul_(out, self.b1)
            tmp = torch._foreach_div(g, self._bias_correction(self.b1, count))
            torch._foreach_mul_(tmp, 1 - self.b1)
            torch._foreach_add_(out, tmp)
        else:
            out = torch._foreach_div(mu, self._bias_correction(self.b1, count))
        del tmp, sq
        # mu_hat / (sqrt(nu/(1-b2^t) + eps_root) + eps)
        nu_hat = torch._foreach_div(nu, self._bias_correction(self.b2, count))
        if self.eps_root != 0.0:  # x + 0.0 == x for the non-negative nu_hat
            torch._foreach_add_(nu_hat, self.eps_root)
        torch._foreach_sqrt_(nu_hat)
        torch._foreach_add_(nu_hat, self.eps)
        torch._foreach_div_(out, nu_hat)
        self._advance(states)
        return out, True


class Trace(Transform):
    """optax.trace (sgd momentum): ``t = g + decay*t``; the update is ``t`` (or ``g + decay*t`` for nesterov)."""

    def __init__(self, decay: float, nesterov: bool = False) -> None:
        self.decay, self.nesterov = decay, nesterov

    def init(self, specs, states):
        for spec, s in zip(specs, states):
            s["trace"] = torch.zeros_like(spec.param, memory_format=torch.preserve_format)

    def _update(self, updates, specs, states, owned):
        if not updates:
            return updates, owned
        t = [s["trace"] for s in states]
        torch._foreach_mul_(t, self.decay)
        torch._foreach_add_(t, updates)
        if not self.nesterov:
            # The update is the trace itself: not scratch (a later in-place op would corrupt the state).
            return t, False
        out = torch._foreach_mul(t, self.decay)
        torch._foreach_add_(out, updates)
        return out, True


class AddDecayedWeights(Transform):
    """optax.add_decayed_weights: ``u + wd * p`` (Scenic places it before sgd, or inside adamw)."""

    def __init__(self, weight_decay: float) -> None:
        self.weight_decay = weight_decay

    def _update(self, updates, specs, states, owned):
        if self.weight_decay == 0.0 or not updates:
            return updates, owned
        decayed = torch._foreach_mul([s.param for s in specs], self.weight_decay)
        if owned:
            torch._foreach_add_(updates, decayed)
            return updates, True
        torch._foreach_add_(decayed, updates)  # float addition commutes: the same bits as u + wd*p
        return decayed, True


class ClipByGlobalNorm(Transform):
    """optax.clip_by_global_norm (Scenic's ``grad_clip_configs``): ``(u / norm) * max`` unless ``norm < max``."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        # Set by OptaxChain.step while it runs the chain a group of parameters at a time.
        self._global: Optional[Tensor] = None

    def _update(self, updates, specs, states, owned):
        norm = self._global if self._global is not None else global_norm(updates)
        if bool(norm < self.max_norm):
            return updates, owned
        out = torch._foreach_div(updates, norm) if not owned else updates
        if owned:
            torch._foreach_div_(out, norm)
        torch._foreach_mul_(out, self.max_norm)
        return out, True


class ScaleByLearningRate(_Counted):
    """optax.scale_by_learning_rate(schedule): ``-lr_fn(count) * u``, then ``count += 1``."""

    def __init__(self, lr_fn: Callable[[int], Any]) -> None:
        self.lr_fn = lr_fn
        self._last: tuple[int, float] = (-1, 0.0)

    def _update(self, updates, specs, states, owned):
        count = self._count(states)
        if self._last[0] != count:  # one schedule call per step, not one per parameter group
            self._last = (count, float(np.float32(self.lr_fn(count))))
        lr = self._last[1]
        if updates:
            if owned:
                torch._foreach_mul_(updates, -lr)
            else:
                updates = torch._foreach_mul(updates, -lr)
        self._advance(states)
        return updates, True


class SetToZero(Transform):
    """optax.set_to_zero."""

    def _update(self, updates, specs, states, owned):
        return [torch.zeros_like(u) for u in updates], True


class Masked(Transform):
    """optax.masked: the inner transforms see only the parameters whose mask is True; others pass unchanged."""

    def __init__(self, inner: Sequence[Transform], mask: Sequence[bool], prefix: str) -> None:
        self.inner, self.mask, self.prefix = list(inner), list(mask), prefix
        self._by_name: dict[str, bool] = {}

    def _flags(self, specs) -> list[bool]:
        # By name, so that the chain can run on any group of the parameters given to init.
        return [self._by_name[s.name] for s in specs]

    def _select(self, items, flags):
        return [x for x, m in zip(items, flags) if m]

    def _sub_states(self, states, i, flags):
        key = f"{self.prefix}{i}"
        return [s.setdefault(key, {}) for s in self._select(states, flags)]

    def init(self, specs, states):
        if len(self.mask) != len(specs):
            raise ConfigError(f"optax.masked: the mask has {len(self.mask)} entries for {len(specs)} parameters")
        self._by_name = {s.name: bool(m) for s, m in zip(specs, self.mask)}
        for i, t in enumerate(self.inner):
            t.init(self._select(specs, self.mask), self._sub_states(states, i, self.mask))

    def _update(self, updates, specs, states, owned):
        flags = self._flags(specs)
        sel, sel_owned, sel_specs = self._select(updates, flags), owned, self._select(specs, flags)
        for i, t in enumerate(self.inner):
            sel, sel_owned = t._update(sel, sel_specs, self._sub_states(states, i, flags), sel_owned)
        it = iter(sel)
        # Scratch only if both the passed-through and the transformed parts are.
        return [next(it) if m else u for u, m in zip(updates, flags)], owned and sel_owned


class OptaxChain(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that applies an optax chain of :class:`Transform` s, in order.

    ``specs``: the parameters with their Flax paths and ranks, in the order of Scenic's parameter tree
    (sorted Flax paths: the order of global norms). ``step()`` reads ``p.grad`` (missing ones count as 0)
    and sets ``p <- p + update``. ``last_updates_norm`` holds the global norm of the last updates
    (Scenic's ``l2_updates``). The transforms' state is per parameter in ``self.state[p]`` under
    ``'<index>/<name>'``, so ``state_dict()`` saves it. Each transform runs as multi-tensor ops over all
    its parameters (see :class:`Transform`); the state tensors are updated in place, as torch's optimisers do.
    """

    def __init__(self, specs: Sequence[ParamSpec], transforms: Sequence[Transform]) -> None:
        self.specs = list(specs)
        self.transforms = list(transforms)
        super().__init__([s.param for s in self.specs], {})
        self.last_updates_norm: Optional[Tensor] = None
        for i, t in enumerate(self.transforms):
            t.init(self.specs, self._sub_states(i))

    @property
    def _states(self) -> list[dict]:
        # Looked up each time: load_state_dict replaces self.state.
        return [self.state[s.param] for s in self.specs]

    def _sub_states(self, i: int) -> list[dict]:
        return [st.setdefault(str(i), {}) for st in self._states]

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        specs = self.specs
        updates = [s.param.grad if s.param.grad is not None else torch.zeros_like(s.param) for s in specs]
        sub_states = [self._sub_states(i) for i in range(len(self.transforms))]
        # Everything up to the last global-norm clip runs over all parameters (the clip needs the norm of
        # all its inputs); from the clip on, every op is elementwise, so the rest of the chain runs a
        # group of parameters at a time while their tensors are still in cache. Same ops, same order.
        clips = [i for i, t in enumerate(self.transforms) if isinstance(t, ClipByGlobalNorm)]
        split = clips[-1] if clips else 0
        owned = False
        for i in range(split):
            updates, owned = self.transforms[i]._update(updates, specs, sub_states[i], owned)
        clip = self.transforms[split] if clips else None
        if clip is not None:
            clip._global = global_norm(updates)
        total = None
        try:
            for lo, hi in self._groups():
                group, group_owned = updates[lo:hi], owned
                for i in range(split, len(self.transforms)):
                    group, group_owned = self.transforms[i]._update(group, specs[lo:hi], sub_states[i][lo:hi], group_owned)
                params = [s.param for s in specs[lo:hi]]
                if all(u.dtype == p.dtype for u, p in zip(group, params)):
                    torch._foreach_add_(params, group)
                else:
                    for p, u in zip(params, group):
                        p.add_(u.to(p.dtype))
                for u in group:  # global_norm's order: per-tensor sums of squares added left to right
                    sq = torch.sum(u * u)
                    total = sq if total is None else total + sq
        finally:
            if clip is not None:
                clip._global = None
        self.last_updates_norm = torch.zeros(()) if total is None else torch.sqrt(total)
        return loss

    #: Parameters are stepped in groups of about this many elements (large tensors alone).
    group_numel = 1 << 18

    def _groups(self) -> list[tuple[int, int]]:
        out, lo, n = [], 0, 0
        for i, s in enumerate(self.specs):
            n += s.param.numel()
            if n >= self.group_numel:
                out.append((lo, i + 1))
                lo, n = i + 1, 0
        if lo < len(self.specs):
            out.append((lo, len(self.specs)))
        return out

    def optax_state(self, index: int, key: str) -> dict[str, Tensor]:
        """The per-parameter state ``key`` of transform ``index`` (e.g. ``(0, 'mu')``), keyed by Flax path."""
        return {s.name: st[str(index)][key] for s, st in zip(self.specs, self._states) if key in st[str(index)]}


# ----------------------------------------------------------------------------------------------------------
# Scenic's translation of its config into an optax chain.

_OPTAX_KWARGS = {
    "adam": {"b1", "b2", "eps", "eps_root", "mu_dtype", "nesterov"},
    "adamw": {"b1", "b2", "eps", "eps_root", "mu_dtype", "weight_decay", "mask", "nesterov"},
    "sgd": {"momentum", "nesterov", "accumulator_dtype"},
}


def get_optax_optimizer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Scenic's ``get_optax_optimizer_config``: the old ``config.optimizer`` names to optax's.

    ``'adam'`` + ``weight_decay`` -> ``'adamw'``; ``'momentum'`` -> ``'sgd'`` with momentum 0.9 unless given
    (flax.optim's default); ``'nesterov'`` -> ``'sgd'`` + ``nesterov=True`` (no default momentum: Scenic quirk,
    plain SGD); beta1/beta2/epsilon -> b1/b2/eps; ``skip_scale_and_bias_regularization`` and
    ``grad_clip_configs`` are carried over.
    """
    opt_cfg = dict(config.get("optimizer_configs") or {})
    if "optimizer" in opt_cfg:
        if "optimizer" in config:
            raise ConfigError("both config.optimizer and config.optimizer_configs.optimizer are defined; define it once")
        return opt_cfg
    if "optimizer" in config:
        name = config["optimizer"]
        opt_cfg["optimizer"] = name
        if name == "adam" and "weight_decay" in opt_cfg:
            opt_cfg["optimizer"] = "adamw"
        if name == "momentum":
            opt_cfg["optimizer"] = "sgd"
            opt_cfg.setdefault("momentum", 0.9)
        if name == "nesterov":
            opt_cfg["optimizer"] = "sgd"
            opt_cfg["nesterov"] = True
    if "skip_scale_and_bias_regularization" in config:
        opt_cfg["skip_scale_and_bias_regularization"] = config["skip_scale_and_bias_regularization"]
    for old, new in (("beta1", "b1"), ("beta2", "b2"), ("epsilon", "eps")):
        if old in opt_cfg:
            opt_cfg[new] = opt_cfg.pop(old)
    if "grad_clip_configs" in config:
        opt_cfg["grad_clip"] = config["grad_clip_configs"]
    return opt_cfg


def weight_decay_mask(specs: Sequence[ParamSpec]) -> list[bool]:
    """Scenic's ``skip_scale_and_bias_regularization`` mask: decay where the Flax rank is not 1."""
    return [s.flax_ndim != 1 for s in specs]


def _optimizer_transforms(name: str, kwargs: dict[str, Any], lr_fn, mask: Optional[list[bool]]) -> list[Transform]:
    allowed = _OPTAX_KWARGS.get(name)
    if allowed is None:
        raise ConfigError(f"optimizer {name!r} is not supported by the port; supported: adam, adamw, sgd "
                          "(Scenic's 'momentum' and 'nesterov' become sgd)")  # fmt: skip
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ConfigError(f"optax.{name} has no argument(s) {unknown} (from config.optimizer_configs); expected {sorted(allowed)}")
    for dtype_key in ("mu_dtype", "accumulator_dtype"):
        if kwargs.get(dtype_key) not in (None, "float32"):
            raise ConfigError(f"optimizer_configs.{dtype_key}={kwargs[dtype_key]!r} is not supported (float32 only)")
    lr = ScaleByLearningRate(lr_fn)
    if name in ("adam", "adamw"):
        adam = ScaleByAdam(kwargs.get("b1", 0.9), kwargs.get("b2", 0.999), kwargs.get("eps", 1e-8),
                           kwargs.get("eps_root", 0.0), bool(kwargs.get("nesterov", False)))  # fmt: skip
        if name == "adam":
            return [adam, lr]
        # optax.adamw's default weight_decay is 1e-4 (used when config.optimizer is 'adamw' without one).
        decay: Transform = AddDecayedWeights(kwargs.get("weight_decay", 1e-4))
        if mask is not None:
            decay = Masked([decay], mask, prefix="masked")
        return [adam, decay, lr]
    momentum = kwargs.get("momentum")
    first: Transform = Trace(momentum, bool(kwargs.get("nesterov", False))) if momentum is not None else _Identity()
    return [first, lr]


class _Identity(Transform):
    def _update(self, updates, specs, states, owned):
        return updates, owned


def scenic_optimizer(optimizer_config: Mapping[str, Any], lr_fn: Callable[[int], Any],
                     specs: Sequence[ParamSpec]) -> OptaxChain:  # fmt: skip
    """Scenic's ``get_optimizer(optimizer_config, lr_fn, params)`` as an :class:`OptaxChain`.

    ``optimizer_config`` is the result of :func:`get_optax_optimizer_config`. The chain is built as Scenic
    builds it: [add_decayed_weights (sgd + weight_decay)] [clip (grad_clip)] optimizer [set_to_zero on
    frozen params], with the optimizer masked to the unfrozen params when ``freeze_params_reg_exp`` is set.
    """
    cfg = dict(optimizer_config)
    if "optimizer" not in cfg:
        raise ConfigError("config.optimizer (or optimizer_configs.optimizer) is required")
    name = cfg.pop("optimizer")
    mask = None
    skip = cfg.pop("skip_scale_and_bias_regularization", None)
    if skip and cfg.get("weight_decay", 0):
        mask = weight_decay_mask(specs)
    ops: list[Transform] = []
    if name == "sgd" and "weight_decay" in cfg:
        wd = cfg.pop("weight_decay")
        if wd:
            ops.append(AddDecayedWeights(wd) if mask is None else Masked([AddDecayedWeights(wd)], mask, prefix="masked"))
    grad_clip = cfg.pop("grad_clip", None)
    if grad_clip is not None:
        method, value = grad_clip.get("clip_method"), grad_clip.get("clip_value")
        if method is not None and value is not None:
            if method != "clip_by_global_norm":
                raise ConfigError(f"grad_clip_configs.clip_method {method!r} is not supported; the port has clip_by_global_norm")
            ops.append(ClipByGlobalNorm(value))
    freeze_re = cfg.pop("freeze_params_reg_exp", None)
    unfreeze = None
    if freeze_re is not None:
        pattern = re.compile(freeze_re)
        frozen = [bool(pattern.search(s.name)) for s in specs]
        if all(frozen):
            raise ConfigError("freeze_params_reg_exp matched all parameters in the model; nothing would train")
        unfreeze = [not f for f in frozen]
    opt = _optimizer_transforms(name, cfg, lr_fn, mask if name == "adamw" else None)
    if unfreeze is None:
        ops.extend(opt)
    else:
        ops.append(Masked(opt, unfreeze, prefix="opt"))
        ops.append(Masked([SetToZero()], [not u for u in unfreeze], prefix="zero"))
    return OptaxChain(specs, ops)


def named_specs(items: Iterable[tuple[str, Tensor, int]]) -> list[ParamSpec]:
    """ParamSpecs sorted as JAX orders a Flax tree (by path components)."""
    specs = [ParamSpec(n, p, d) for n, p, d in items]
    return sorted(specs, key=lambda s: tuple(s.name.split("/")))
