"""The optimiser chain against optax itself on random parameters and gradients, for every way Scenic builds it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tokenlearner_torch.errors import ConfigError
from tokenlearner_torch.training.optim import (
    ParamSpec,
    clip_grads,
    get_optax_optimizer_config,
    named_specs,
    scenic_optimizer,
    weight_decay_mask,
)
from tokenlearner_torch.training.schedules import compound_lr_fn

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = jax.numpy

# A Flax-shaped tree: rank-1 biases/scales, rank-2 attention biases, kernels.
SHAPES = {
    "a/bias": (5,),
    "a/kernel": (4, 5),
    "attn/query/bias": (2, 3),
    "attn/query/kernel": (4, 2, 3),
    "norm/scale": (4,),
    "pos/pos_embedding": (1, 6, 4),
}
LR_CFG = {"learning_rate_schedule": "compound", "factors": "constant*linear_warmup*linear_decay",
          "base_learning_rate": 0.05, "warmup_steps": 2, "total_steps": 10, "end_learning_rate": 1e-4}


def _optax_schedule():
    """LR_CFG as optax's own schedules, from the raw config values (not the port's compound_lr_fn).

    Scenic's compound ``constant*linear_warmup*linear_decay``: base * min(1, s / warmup) for s < warmup; from
    warmup on, (base - end) * max(1 - (s - warmup) / (total - warmup), 0) + end. As optax: a linear ramp 0 ->
    base over the warmup steps, joined at step 2 to a linear ramp base -> end over total - warmup steps.
    """
    base, warmup, total, end = 0.05, 2, 10, 1e-4
    return optax.join_schedules([optax.linear_schedule(0.0, base, warmup),
                                 optax.linear_schedule(base, end, total - warmup)], [warmup])


def _rank_not_1(params: dict) -> dict:
    return {k: v.ndim != 1 for k, v in params.items()}


# Each CONFIGS entry as the optax chain Scenic's get_optimizer builds from it, written by hand from the raw
# Scenic config and scenic/train_lib/optimizers.py (get_optax_optimizer_config's renames: 'adam' with a
# weight_decay -> adamw; 'momentum' -> sgd with momentum 0.9 unless given; 'nesterov' -> sgd(nesterov=True);
# beta1/beta2/epsilon -> b1/b2/eps; skip_scale_and_bias_regularization -> the decay masked to ndim != 1;
# for sgd the decay is add_decayed_weights before the optimizer; grad_clip first; a frozen regex masks the
# optimizer to the other params and zeroes the frozen ones). The port's translation is never called here.
HAND_CHAINS = {
    "adam": lambda s, p: optax.adam(s, b1=0.8, b2=0.99, eps=1e-6),
    "adam_nesterov": lambda s, p: optax.adam(s, nesterov=True),
    "adamw_unmasked": lambda s, p: optax.adamw(s, b1=0.9, b2=0.999, weight_decay=0.3),
    "adamw_masked": lambda s, p: optax.adamw(s, weight_decay=0.1, mask=_rank_not_1(p)),
    "adamw_default_decay": lambda s, p: optax.adamw(s),  # optax's default weight_decay=1e-4
    "sgd": lambda s, p: optax.sgd(s),
    "momentum_default": lambda s, p: optax.sgd(s, momentum=0.9),
    "momentum_wd": lambda s, p: optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(s, momentum=0.8)),
    "momentum_wd_masked": lambda s, p: optax.chain(optax.add_decayed_weights(1e-2, _rank_not_1(p)),
                                                   optax.sgd(s, momentum=0.9)),
    "nesterov": lambda s, p: optax.sgd(s, momentum=0.9, nesterov=True),
    "nesterov_no_momentum": lambda s, p: optax.sgd(s, nesterov=True),
    # Scenic quirk: a new-style config returns before grad_clip_configs is copied in: no clipping.
    "new_style_grad_clip": lambda s, p: optax.adamw(s, weight_decay=0.05),
    "new_style_grad_clip_inside": lambda s, p: optax.chain(optax.clip_by_global_norm(0.5),
                                                           optax.adamw(s, weight_decay=0.05)),
    "old_style_grad_clip": lambda s, p: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(s)),
    "freeze": lambda s, p: optax.chain(optax.masked(optax.sgd(s, momentum=0.9), {k: "attn" not in k for k in p}),
                                       optax.masked(optax.set_to_zero(), {k: "attn" in k for k in p})),
}


def test_lr_schedule_matches_optax_schedule():
    """The port's compound schedule against optax's linear schedules built from the same raw values."""
    lr_fn, ref = compound_lr_fn(LR_CFG), _optax_schedule()
    for step in range(14):
        assert abs(float(lr_fn(step)) - float(ref(step))) <= 1e-6 * 0.05, step
    assert float(lr_fn(0)) == 0.0 and abs(float(lr_fn(1)) - 0.025) < 1e-9  # warmup: base * 1 / 2 by hand


CONFIGS = {
    "adam": {"optimizer": "adam", "optimizer_configs": {"beta1": 0.8, "beta2": 0.99, "epsilon": 1e-6}},
    "adam_nesterov": {"optimizer": "adam", "optimizer_configs": {"nesterov": True}},
    "adamw_unmasked": {"optimizer": "adam", "optimizer_configs": {"beta1": 0.9, "beta2": 0.999, "weight_decay": 0.3}},
    "adamw_masked": {"optimizer": "adam", "skip_scale_and_bias_regularization": True,
                     "optimizer_configs": {"weight_decay": 0.1}},
    "adamw_default_decay": {"optimizer": "adamw", "optimizer_configs": {}},
    "sgd": {"optimizer": "sgd", "optimizer_configs": {}},
    "momentum_default": {"optimizer": "momentum", "optimizer_configs": {}},
    "momentum_wd": {"optimizer": "momentum", "optimizer_configs": {"momentum": 0.8, "weight_decay": 1e-2}},
    "momentum_wd_masked": {"optimizer": "momentum", "skip_scale_and_bias_regularization": True,
                           "optimizer_configs": {"weight_decay": 1e-2}},
    "nesterov": {"optimizer": "nesterov", "optimizer_configs": {"momentum": 0.9}},
    "nesterov_no_momentum": {"optimizer": "nesterov", "optimizer_configs": {}},
    "new_style_grad_clip": {"optimizer_configs": {"optimizer": "adamw", "weight_decay": 0.05},
                            "grad_clip_configs": {"clip_method": "clip_by_global_norm", "clip_value": 0.5}},
    "new_style_grad_clip_inside": {"optimizer_configs": {"optimizer": "adamw", "weight_decay": 0.05, "grad_clip": {
        "clip_method": "clip_by_global_norm", "clip_value": 0.5}}},
    "old_style_grad_clip": {"optimizer": "adam", "optimizer_configs": {},
                            "grad_clip_configs": {"clip_method": "clip_by_global_norm", "clip_value": 0.5}},
    "freeze": {"optimizer_configs": {"optimizer": "sgd", "momentum": 0.9, "freeze_params_reg_exp": "attn"}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_chain_matches_optax(name):
    config = CONFIGS[name]
    opt_cfg = get_optax_optimizer_config(config)
    lr_fn = compound_lr_fn(LR_CFG)
    rng = np.random.default_rng([7, len(name)])
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in params.items()}
    specs = named_specs((k, p, p.ndim) for k, p in torch_params.items())
    opt = scenic_optimizer(opt_cfg, lr_fn, specs)
    tx = HAND_CHAINS[name](_optax_schedule(), params)
    jparams = {k: jnp.asarray(v) for k, v in params.items()}
    state = tx.init(jparams)
    for step in range(6):
        grads = {k: (rng.normal(size=s) * (3.0 if step == 1 else 0.3)).astype(np.float32) for k, s in SHAPES.items()}
        for k, p in torch_params.items():
            p.grad = torch.from_numpy(grads[k].copy())
        opt.step()
        updates, state = tx.update({k: jnp.asarray(v) for k, v in grads.items()}, state, jparams)
        jparams = optax.apply_updates(jparams, updates)
        for k in SHAPES:
            ref = np.asarray(jparams[k])
            err = np.abs(torch_params[k].detach().numpy() - ref).max() / max(1.0, np.abs(ref).max())
            assert err < 1e-6, f"{name}: step {step} {k} differs from optax by {err:.3g}"


def test_translation_quirks():
    assert get_optax_optimizer_config({"optimizer": "adam", "optimizer_configs": {"beta1": 0.9, "weight_decay": 0.3}}) == {
        "optimizer": "adamw", "b1": 0.9, "weight_decay": 0.3}
    assert get_optax_optimizer_config({"optimizer": "momentum", "optimizer_configs": {}}) == {"optimizer": "sgd", "momentum": 0.9}
    # Scenic quirk: 'nesterov' without a momentum is plain SGD (optax.sgd(momentum=None, nesterov=True)).
    assert get_optax_optimizer_config({"optimizer": "nesterov", "optimizer_configs": {}}) == {"optimizer": "sgd", "nesterov": True}
    with pytest.raises(ConfigError, match="both config.optimizer"):
        get_optax_optimizer_config({"optimizer": "adam", "optimizer_configs": {"optimizer": "sgd"}})


def test_decay_mask_uses_flax_rank():
    specs = named_specs((k, torch.zeros(s), len(s)) for k, s in SHAPES.items())
    mask = dict(zip([s.name for s in specs], weight_decay_mask(specs)))
    # Flax's [heads, head_dim] attention biases have rank 2: Scenic's `ndim != 1` mask decays them.
    assert mask == {"a/bias": False, "a/kernel": True, "attn/query/bias": True, "attn/query/kernel": True,
                    "norm/scale": False, "pos/pos_embedding": True}


def test_unknown_optimizer_and_argument_are_errors():
    specs = [ParamSpec("w", torch.nn.Parameter(torch.zeros(2)), 1)]
    with pytest.raises(ConfigError, match="not supported"):
        scenic_optimizer({"optimizer": "lion"}, lambda s: 0.1, specs)
    with pytest.raises(ConfigError, match="has no argument"):
        scenic_optimizer({"optimizer": "adam", "beta_1": 0.9}, lambda s: 0.1, specs)


def test_trainer_clip_matches_jax_example_libraries():
    from jax.example_libraries.optimizers import clip_grads as jax_clip

    rng = np.random.default_rng(3)
    grads = [rng.normal(size=s).astype(np.float32) for s in SHAPES.values()]
    for max_norm in (0.5, 1e3):
        ours, norm = clip_grads([torch.from_numpy(g) for g in grads], max_norm)
        ref = jax_clip([jnp.asarray(g) for g in grads], max_norm)
        assert abs(float(norm) - float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads)))) < 1e-5
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_state_dict_round_trip_continues_identically():
    cfg = get_optax_optimizer_config(CONFIGS["adamw_masked"])
    rng = np.random.default_rng(11)
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(4)]

    def make():
        params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
        return params, scenic_optimizer(cfg, compound_lr_fn(LR_CFG), named_specs((k, p, p.ndim) for k, p in params.items()))

    def step(params, opt, g):
        for k, p in params.items():
            p.grad = torch.from_numpy(g[k].copy())
        opt.step()

    a_params, a = make()
    for g in grads:
        step(a_params, a, g)
    b_params, b = make()
    for g in grads[:2]:
        step(b_params, b, g)
    saved = b.state_dict()
    c_params, c = make()
    with torch.no_grad():
        for k in c_params:
            c_params[k].copy_(b_params[k])
    c.load_state_dict(saved)
    for g in grads[2:]:
        step(c_params, c, g)
    for k in SHAPES:
        assert torch.equal(a_params[k], c_params[k]), k
