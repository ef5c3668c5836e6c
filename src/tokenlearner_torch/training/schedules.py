"""Scenic's learning-rate schedules (``scenic/train_lib/lr_schedules.py``), float32 as JAX computes them.

``get_learning_rate_fn(config)`` returns ``lr_fn(step) -> numpy.float32``. Scenic evaluates its
``'compound'`` factors in JAX with weak typing: Python numbers stay float64 until they meet an array
(the step), then everything is float32. numpy >= 2 follows the same rule (NEP 50) for Python scalars, so
each factor below is written with ``np.float32`` exactly where JAX has a float32 array and Python numbers
elsewhere; the factors are multiplied in the order of the ``factors`` string.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from ..errors import ConfigError
from .config import cfg_get

__all__ = ["get_learning_rate_fn", "compound_lr_fn", "COMPOUND_FACTORS", "LrFn"]

LrFn = Callable[[int], np.float32]
_F32 = np.float32


def _need(cfg: Mapping[str, Any], key: str, factor: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"lr_configs.{key} is required by the '{factor}' factor of lr_configs.factors")
    return cfg[key]


def _constant(ratio, step, cfg):
    return ratio * _need(cfg, "base_learning_rate", "constant")


def _polynomial(ratio, step, cfg):
    decay_steps = _need(cfg, "decay_steps", "polynomial")
    end_factor = _need(cfg, "end_factor", "polynomial")
    power = _need(cfg, "power", "polynomial")
    decay = np.bool_(step <= decay_steps)
    base = decay * (1 - _F32(step) / decay_steps)
    return ratio * ((1 - end_factor) * base**power + end_factor)


def _piecewise_constant(ratio, step, cfg):
    events = np.asarray(_need(cfg, "decay_events", "piecewise_constant"), np.int32)
    factors = np.asarray([1.0] + list(_need(cfg, "decay_factors", "piecewise_constant")), _F32)
    return ratio * factors[int(np.sum(events < step))]


def _piecewise_linear(ratio, step, cfg):
    events = list(_need(cfg, "decay_events", "piecewise_linear"))
    dfac = list(_need(cfg, "decay_factors", "piecewise_linear"))
    bounds = np.asarray([0] + events + [step], np.int32)
    factors = np.asarray([1.0] + dfac + [dfac[-1]], _F32)
    i = int(np.sum(bounds[1:] < step))
    slope = (factors[i + 1] - factors[i]) / _F32(max(int(bounds[i + 1] - bounds[i]), 1))
    return ratio * (slope * _F32(step - int(bounds[i])) + factors[i])


def _linear_warmup(ratio, step, cfg):
    warmup = _need(cfg, "warmup_steps", "linear_warmup")
    alpha = cfg.get("warmup_alpha", 0)
    if warmup > 0:
        # Scenic quirk kept: step 0 of a warmup has lr 0 (alpha 0), so the first update changes nothing.
        return ratio * np.minimum(1.0, alpha + _F32(step) * (1.0 - alpha) / warmup)
    return ratio * 1.0


def _rsqrt_decay(ratio, step, cfg):
    warmup = cfg.get("warmup_steps", 0.0)
    timescale = cfg.get("timescale", 10_000)
    shift = timescale - warmup
    shifted = _F32(step + shift) if float(shift).is_integer() else _F32(step) + shift
    value = np.sqrt(_F32(timescale)) / np.sqrt(shifted) if warmup < step else _F32(1.0)
    return ratio * value


def _decay_every(ratio, step, cfg):
    every = _need(cfg, "steps_per_decay", "decay_every")
    factor = _need(cfg, "decay_factor", "decay_every")
    return ratio * np.power(_F32(factor), _F32(step // every))


def _exponential_decay(ratio, step, cfg):
    decay_steps = _need(cfg, "decay_steps", "exponential_decay")
    rate = _need(cfg, "decay_rate", "exponential_decay")
    progress = _F32(step) / float(decay_steps)
    if cfg.get("staircase", False):
        progress = np.floor(progress)
    return ratio * np.power(_F32(rate), progress)


def _cosine_cycle(step32, steps_per_cycle, t_mul, m_mul, alpha):
    if steps_per_cycle <= 0:
        raise ConfigError(f"lr_configs.steps_per_cycle must be > 0, got {steps_per_cycle}")
    progress = step32 / float(steps_per_cycle)
    if t_mul == 1.0:
        restart = np.floor(progress)
        progress = progress - restart
    else:
        restart = np.floor(np.log(1.0 - progress * (1.0 - t_mul)) / np.log(_F32(t_mul)))
        done = (1.0 - np.power(_F32(t_mul), restart)) / (1.0 - t_mul)
        progress = (progress - done) / np.power(_F32(t_mul), restart)
    m_fac = np.power(_F32(m_mul), restart)
    cosine = np.maximum(0.0, 0.5 * m_fac * (1.0 + np.cos(np.pi * (progress % 1.0))))
    return (1 - alpha) * cosine + alpha


def _cosine_decay(ratio, step, cfg):
    steps_per_cycle = _need(cfg, "steps_per_cycle", "cosine_decay")
    warmup = cfg.get("warmup_steps", 0.0)
    adjusted = np.maximum(0.0, _F32(step) - (warmup + cfg.get("start_decay_step", 0.0)))
    total = cfg.get("total_steps", steps_per_cycle)
    # Scenic quirk kept: with warmup the cycle is shortened by int(warmup / (total / steps_per_cycle)).
    steps_per_cycle = steps_per_cycle - int(warmup / (total / steps_per_cycle))
    if steps_per_cycle > 0:
        ratio = ratio * _cosine_cycle(adjusted, steps_per_cycle, cfg.get("t_mul", 1.0), cfg.get("m_mul", 1.0),
                                      cfg.get("alpha", 0.0))  # fmt: skip
    return ratio


def _linear_decay(ratio, step, cfg):
    warmup = cfg.get("warmup_steps", 0.0)
    total = _need(cfg, "total_steps", "linear_decay")
    if not total > warmup:
        raise ConfigError(f"lr_configs.total_steps ({total}) must be > warmup_steps ({warmup}) with linear_decay")
    progress = np.maximum(0.0, (_F32(step) - warmup) / float(total - warmup))
    end = cfg.get("end_learning_rate", 0.0)
    return (ratio - end) * np.maximum(1.0 - progress, 0.0) + end


def _linear_cooldown(ratio, step, cfg):
    warmup = cfg.get("warmup_steps", 0.0)
    total = _need(cfg, "total_steps", "linear_cooldown")
    cooldown = _need(cfg, "cooldown_steps", "linear_cooldown")
    return ratio * np.minimum(1.0, (total - _F32(max(step, warmup))) / cooldown)


# Every factor of Scenic's compound schedule (lr_schedules.compound_lr_scheduler at commit 4a38d475).
COMPOUND_FACTORS: dict[str, Callable[[Any, int, Mapping[str, Any]], Any]] = {
    "constant": _constant,
    "polynomial": _polynomial,
    "piecewise_constant": _piecewise_constant,
    "piecewise_linear": _piecewise_linear,
    "linear_warmup": _linear_warmup,
    "rsqrt_decay": _rsqrt_decay,
    "decay_every": _decay_every,
    "exponential_decay": _exponential_decay,
    "cosine_decay": _cosine_decay,
    "linear_decay": _linear_decay,
    "linear_cooldown": _linear_cooldown,
}


def compound_lr_fn(lr_configs: Mapping[str, Any]) -> LrFn:
    """Scenic's ``'compound'`` schedule: the product of ``lr_configs.factors`` (e.g. ``'constant*linear_warmup'``)."""
    factors_str = _need(lr_configs, "factors", "compound")
    names = [n.strip() for n in str(factors_str).split("*")]
    unknown = [n for n in names if n not in COMPOUND_FACTORS]
    if unknown:
        raise ConfigError(f"unknown lr_configs.factors {unknown}; expected factors among {', '.join(COMPOUND_FACTORS)}")
    cfg = dict(lr_configs)

    def lr_fn(step: int) -> np.float32:
        step = int(step)
        ratio: Any = 1.0
        for name in names:
            ratio = COMPOUND_FACTORS[name](ratio, step, cfg)
        return _F32(ratio)

    return lr_fn


_SCHEDULES = {"compound": compound_lr_fn}


def get_learning_rate_fn(config: Mapping[str, Any]) -> LrFn:
    """``lr_fn(step)`` from a Scenic experiment config (its ``lr_configs``), as Scenic's get_learning_rate_fn.

    Without ``lr_configs.learning_rate_schedule`` the rate is the constant ``base_learning_rate`` (float32).
    """
    lr_configs = cfg_get(config, "lr_configs", None)
    if not isinstance(lr_configs, Mapping) or "base_learning_rate" not in lr_configs:
        raise ConfigError("config.lr_configs.base_learning_rate is required (Scenic's get_learning_rate_fn)")
    name = lr_configs.get("learning_rate_schedule")
    if "learning_rate_schedule" in lr_configs:
        if name not in _SCHEDULES:
            raise ConfigError(f"unknown lr_configs.learning_rate_schedule {name!r}; expected one of {list(_SCHEDULES)}")
        return _SCHEDULES[name](lr_configs)
    lr = _F32(lr_configs["base_learning_rate"])
    return lambda step: lr

