"""Every factor of Scenic's compound learning-rate schedule against float64 formulas, and Scenic's quirks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tokenlearner_torch.errors import ConfigError
from tokenlearner_torch.training.schedules import COMPOUND_FACTORS, compound_lr_fn, get_learning_rate_fn

BASE = 0.01


def _cosine(step, cycle, t_mul=1.0, m_mul=1.0, alpha=0.0):
    p = step / cycle
    if t_mul == 1.0:
        i = math.floor(p)
        p -= i
    else:
        i = math.floor(math.log(1 - p * (1 - t_mul)) / math.log(t_mul))
        p = (p - (1 - t_mul**i) / (1 - t_mul)) / t_mul**i
    return (1 - alpha) * max(0.0, 0.5 * m_mul**i * (1 + math.cos(math.pi * (p % 1.0)))) + alpha


def _piecewise_linear(step, events, factors):
    xs, ys = [0] + events, [1.0] + factors
    return float(np.interp(step, xs, ys))


# name -> (lr_configs without factors/base, float64 reference of the factor)
CASES = {
    "constant": ({}, lambda s: 1.0),
    "polynomial": ({"decay_steps": 30, "end_factor": 0.1, "power": 2},
                   lambda s: (1 - 0.1) * (max(0.0, 1 - s / 30) if s <= 30 else 0.0) ** 2 + 0.1),
    "piecewise_constant": ({"decay_events": [10, 25], "decay_factors": [0.5, 0.1]},
                           lambda s: 1.0 if s <= 10 else (0.5 if s <= 25 else 0.1)),
    "piecewise_linear": ({"decay_events": [10, 25], "decay_factors": [0.5, 0.1]},
                         lambda s: _piecewise_linear(s, [10, 25], [0.5, 0.1])),
    "linear_warmup": ({"warmup_steps": 8}, lambda s: min(1.0, s / 8)),
    "linear_warmup_alpha": ({"warmup_steps": 8, "warmup_alpha": 0.2}, lambda s: min(1.0, 0.2 + s * 0.8 / 8)),
    "rsqrt_decay": ({"warmup_steps": 5, "timescale": 20}, lambda s: math.sqrt(20) / math.sqrt(s + 15) if s > 5 else 1.0),
    "decay_every": ({"steps_per_decay": 7, "decay_factor": 0.5}, lambda s: 0.5 ** (s // 7)),
    "exponential_decay": ({"decay_steps": 10, "decay_rate": 0.5}, lambda s: 0.5 ** (s / 10)),
    "exponential_decay_staircase": ({"decay_steps": 10, "decay_rate": 0.5, "staircase": True},
                                    lambda s: 0.5 ** math.floor(s / 10)),
    "cosine_decay": ({"steps_per_cycle": 12}, lambda s: _cosine(s, 12)),
    "cosine_decay_restarts": ({"steps_per_cycle": 10, "t_mul": 2.0, "m_mul": 0.5, "alpha": 0.1},
                              lambda s: _cosine(s, 10, 2.0, 0.5, 0.1)),
    # Scenic quirk: with warmup the cycle is shortened to steps_per_cycle - int(warmup / (total / steps_per_cycle)).
    "cosine_decay_warmup": ({"steps_per_cycle": 20, "warmup_steps": 4, "total_steps": 40},
                            lambda s: _cosine(max(0.0, s - 4), 20 - int(4 / (40 / 20)))),
    "linear_decay": ({"warmup_steps": 4, "total_steps": 30, "end_learning_rate": 1e-4}, None),
    "linear_cooldown": ({"warmup_steps": 4, "total_steps": 30, "cooldown_steps": 10},
                        lambda s: min(1.0, (30 - max(s, 4)) / 10)),
}


def _factor(case: str) -> str:
    return next(f for f in sorted(COMPOUND_FACTORS, key=len, reverse=True) if case.startswith(f))


def test_every_scenic_factor_is_covered():
    assert {_factor(case) for case in CASES} == set(COMPOUND_FACTORS)


@pytest.mark.parametrize("case", sorted(CASES))
def test_factor_matches_formula(case):
    cfg, ref = CASES[case]
    factor = _factor(case)
    lr_fn = compound_lr_fn({"factors": f"constant*{factor}" if factor != "constant" else "constant",
                            "base_learning_rate": BASE, **cfg})  # fmt: skip
    for step in range(0, 45):
        got = lr_fn(step)
        assert isinstance(got, np.float32)
        if factor == "linear_decay":  # it acts on the product so far: (lr - end) * (1 - progress) + end
            progress = max(0.0, (step - 4) / 26)
            want = (BASE - 1e-4) * max(1 - progress, 0.0) + 1e-4
        else:
            want = BASE * ref(step)
        assert abs(float(got) - want) <= 1e-6 * BASE, (case, step, float(got), want)


def test_warmup_starts_at_zero_and_factor_order():
    lr = compound_lr_fn({"factors": "constant*linear_warmup*linear_decay", "base_learning_rate": 5e-3,
                         "warmup_steps": 3, "total_steps": 12, "end_learning_rate": 1e-5})  # fmt: skip
    assert lr(0) == 0.0  # Scenic quirk: the first update of a warmup has lr 0
    # The im1k_like golden's logged rates. Scenic's lr_fn runs jitted, where XLA contracts multiply-adds into
    # FMAs: 1 ulp from the plain float32 evaluation (eager JAX gives the port's value bitwise).
    assert abs(lr(1) - 0.0016666665906086564) <= 1 * np.spacing(np.float32(0.0016666666))
    assert lr(4) == np.float32(0.004445555619895458)


def test_constant_without_schedule_and_errors():
    assert get_learning_rate_fn({"lr_configs": {"base_learning_rate": 0.02}})(123) == np.float32(0.02)
    with pytest.raises(ConfigError, match="base_learning_rate"):
        get_learning_rate_fn({"lr_configs": {}})
    with pytest.raises(ConfigError, match="unknown lr_configs.factors"):
        compound_lr_fn({"factors": "constant*rsqrt_normalized", "base_learning_rate": 1.0})
    with pytest.raises(ConfigError, match="warmup_steps"):
        compound_lr_fn({"factors": "linear_warmup", "base_learning_rate": 1.0})(3)
    with pytest.raises(ConfigError, match="learning_rate_schedule"):
        get_learning_rate_fn({"lr_configs": {"base_learning_rate": 1.0, "learning_rate_schedule": "cosine"}})
