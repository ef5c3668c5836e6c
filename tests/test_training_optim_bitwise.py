"""OptaxChain's multi-tensor step against the straightforward per-parameter implementation it replaced.

The reference below is the previous ``OptaxChain`` maths written out one parameter and one op at a time
(optax's order, every scalar rounded to float32 first). The multi-tensor step must give the same bits:
parameters, optimiser state and the updates' norm, through clipped and unclipped steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenlearner_torch.training.optim import get_optax_optimizer_config, named_specs, scenic_optimizer
from tokenlearner_torch.training.schedules import compound_lr_fn

# Odd sizes and a few thousand elements, so vectorised kernels and their tails both run.
SHAPES = {"a/bias": (37,), "a/kernel": (48, 37), "attn/query/bias": (3, 7), "attn/query/kernel": (48, 3, 7),
          "norm/scale": (48,), "pos/pos_embedding": (1, 17, 48), "z/kernel": (129, 65)}  # fmt: skip
LR_CFG = {"learning_rate_schedule": "compound", "factors": "constant*linear_warmup*linear_decay",
          "base_learning_rate": 0.05, "warmup_steps": 2, "total_steps": 10, "end_learning_rate": 1e-4}
CLIP = {"clip_method": "clip_by_global_norm", "clip_value": 2.0}
CONFIGS = {
    "adamw_unmasked": {"optimizer": "adam", "optimizer_configs": {"weight_decay": 0.3}, "grad_clip_configs": CLIP},
    "adamw_masked": {"optimizer": "adam", "skip_scale_and_bias_regularization": True,
                     "optimizer_configs": {"beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6, "weight_decay": 0.1},
                     "grad_clip_configs": CLIP},
    "adamw_nesterov": {"optimizer_configs": {"optimizer": "adamw", "nesterov": True, "weight_decay": 0.05,
                                             "grad_clip": CLIP}},
    "momentum_wd_masked": {"optimizer": "momentum", "skip_scale_and_bias_regularization": True,
                           "optimizer_configs": {"momentum": 0.8, "weight_decay": 1e-2}, "grad_clip_configs": CLIP},
    "nesterov_wd": {"optimizer": "nesterov", "optimizer_configs": {"momentum": 0.9, "weight_decay": 1e-2},
                    "grad_clip_configs": CLIP},
}


def _f32(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def _global_norm(ts):
    total = None
    for t in ts:
        sq = torch.sum(t * t)
        total = sq if total is None else total + sq
    return torch.sqrt(total)


def _bias_correction(decay: float, count: int) -> torch.Tensor:
    return 1 - torch.pow(_f32(decay), torch.tensor(float(count), dtype=torch.float32))


class _PerParameterReference:
    """The former OptaxChain maths for Scenic's adamw / sgd chains: [decay (sgd)] [clip] optimizer, lr."""

    def __init__(self, opt_cfg: dict, lr_fn, params: list[torch.Tensor], names: list[str]) -> None:
        cfg = dict(opt_cfg)
        self.name = cfg["optimizer"]
        self.params, self.lr_fn = params, lr_fn
        self.wd = cfg.get("weight_decay", 1e-4 if self.name == "adamw" else 0.0)
        masked = cfg.get("skip_scale_and_bias_regularization") and self.wd
        self.mask = [p.ndim != 1 if masked else True for p in params]
        self.clip = cfg["grad_clip"]["clip_value"]
        self.b1, self.b2, self.eps = cfg.get("b1", 0.9), cfg.get("b2", 0.999), cfg.get("eps", 1e-8)
        self.momentum, self.nesterov = cfg.get("momentum"), bool(cfg.get("nesterov", False))
        self.mu = [torch.zeros_like(p) for p in params]
        self.nu = [torch.zeros_like(p) for p in params]
        self.trace = [torch.zeros_like(p) for p in params]
        self.count = 0

    def _adam(self, us):
        self.count += 1
        b1, b2, c = self.b1, self.b2, self.count
        out = []
        for i, g in enumerate(us):
            mu = _f32(1 - b1) * g + _f32(b1) * self.mu[i]
            nu = _f32(1 - b2) * (g * g) + _f32(b2) * self.nu[i]
            if self.nesterov:
                mu_hat = _f32(b1) * (mu / _bias_correction(b1, c + 1)) + _f32(1 - b1) * (g / _bias_correction(b1, c))
            else:
                mu_hat = mu / _bias_correction(b1, c)
            nu_hat = nu / _bias_correction(b2, c)
            out.append(mu_hat / (torch.sqrt(nu_hat + _f32(0.0)) + _f32(self.eps)))
            self.mu[i], self.nu[i] = mu, nu
        return out

    def _decay(self, us):
        return [u + _f32(self.wd) * p if m else u for u, p, m in zip(us, self.params, self.mask)]

    def step(self, grads: list[torch.Tensor]) -> torch.Tensor:
        lr_count = self.count if self.name == "adamw" else getattr(self, "lr_count", 0)
        us = list(grads)
        if self.name == "sgd" and self.wd:
            us = self._decay(us)
        norm = _global_norm(us)
        if not bool(norm < self.clip):
            us = [(u / norm) * _f32(self.clip) for u in us]
        if self.name == "adamw":
            us = self._decay(self._adam(us))
        elif self.momentum is not None:
            out = []
            for i, g in enumerate(us):
                t = g + _f32(self.momentum) * self.trace[i]
                self.trace[i] = t
                out.append(g + _f32(self.momentum) * t if self.nesterov else t)
            us = out
        lr = float(np.float32(self.lr_fn(lr_count)))
        us = [_f32(-lr) * u for u in us]
        self.lr_count = lr_count + 1
        for p, u in zip(self.params, us):
            p.add_(u)
        return _global_norm(us)


@pytest.mark.parametrize("group_numel", [None, 1000])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_multi_tensor_step_is_bitwise_the_per_parameter_one(name, group_numel):
    opt_cfg = get_optax_optimizer_config(CONFIGS[name])
    lr_fn = compound_lr_fn(LR_CFG)
    rng = np.random.default_rng([23, len(name)])
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
    specs = named_specs((k, p, p.ndim) for k, p in params.items())
    opt = scenic_optimizer(opt_cfg, lr_fn, specs)
    if group_numel is not None:  # several parameter groups per step (the default puts these in one)
        opt.group_numel = group_numel
        assert len(opt._groups()) >= 3
    ref_params = [torch.from_numpy(init[s.name].copy()) for s in specs]
    ref = _PerParameterReference(opt_cfg, lr_fn, ref_params, [s.name for s in specs])
    clipped = []
    for step in range(5):
        scale = 3.0 if step in (0, 3) else 0.005  # global norm far above / below the clip value
        grads = [torch.from_numpy((rng.normal(size=s.param.shape) * scale).astype(np.float32)) for s in specs]
        clipped.append(bool(_global_norm(grads) >= CLIP["clip_value"]))
        for s, g in zip(specs, grads):
            s.param.grad = g.clone()
        opt.step()
        ref_norm = ref.step(grads)
        for s, g, r in zip(specs, grads, ref_params):
            assert torch.equal(s.param.grad, g), f"{name}: step {step} modified {s.name}'s gradient"
            assert torch.equal(s.param.detach(), r), f"{name}: step {step} {s.name} differs from the per-parameter step"
        assert torch.equal(opt.last_updates_norm, ref_norm), f"{name}: step {step} updates norm differs"
        states = {"mu": ref.mu, "nu": ref.nu} if ref.name == "adamw" else {"trace": ref.trace}
        index = next(i for i, t in enumerate(opt.transforms) if type(t).__name__ in ("ScaleByAdam", "Trace"))
        for key, ref_state in states.items():
            ours = opt.optax_state(index, key)
            for s, r in zip(specs, ref_state):
                assert torch.equal(ours[s.name], r), f"{name}: step {step} state {key} of {s.name} differs"
    assert clipped == [True, False, False, True, False]
