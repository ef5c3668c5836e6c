"""``tokenlearner-parity train``: K training steps of the port against Scenic's training semantics.

Two sources for the Scenic side:

* a **training case folder** (tests/fixtures/train_goldens format: genuine Scenic's own records): the port
  runs from the case's parameters and batches and is compared with the stored per-step loss / learning rate /
  pre-clip gradient norm and the final parameters (no JAX needed);
* a **Scenic experiment config** (``.py`` with ``get_config()`` or ``.json``): the Flax side is this
  project's Flax reference (``flax_reference.TokenLearnerViT``), optax, and a JAX re-implementation of
  ``classification_trainer.train_step`` (loss, trainer clipping, the optax chain Scenic builds); both sides
  start from the same parameters and see the same seeded batches.

The report lists per step both sides' loss, learning rate and gradient norm, and the final per-parameter
error, naming the first parameter that diverges (the earliest step, then the largest error). Parameters
whose gradient is structurally ~0 (attention ``key/bias``, ...) move by rounding noise under Adam: as in
the goldens, they get the loose tolerance 1e-2 and are listed as noise-sensitive.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

PARAM_TOL, NOISE_TOL, LOSS_RTOL, LR_TOL, GRAD_RTOL = 1e-4, 1e-2, 1e-5, 1e-6, 1e-5
# Parameters whose gradient is structurally zero (the output does not depend on them; the gradient is rounding
# noise): a shift of every attention key, of V1.1's per-token logits, of the TokenFuser mixing is cancelled.
STRUCTURALLY_ZERO_GRAD = re.compile(
    r"(MultiHeadDotProductAttention_\d+/key/bias|TokenLearnerModuleV11_\d+/token_masking/Dense_1/bias|TokenFuser_\d+/Dense_0/bias)$")


def _scaled(a: np.ndarray, ref: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - ref).max() / max(1.0, float(np.abs(ref).max()))) if ref.size else 0.0


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a - b)


@dataclass
class TrainReport:
    """Per-step records of both sides and the final per-parameter errors."""

    subject: str
    reference: str
    steps: list[dict[str, float]] = field(default_factory=list)
    param_errors: dict[str, float] = field(default_factory=dict)
    noise_sensitive: list[str] = field(default_factory=list)
    first_divergence: Optional[dict[str, Any]] = None
    tol: float = PARAM_TOL

    def _param_tol(self, path: str) -> float:
        return NOISE_TOL if path in self.noise_sensitive else self.tol

    @property
    def step_failures(self) -> list[str]:
        out = []
        # Learning rates relative to the run's largest (a cosine's end loses relative precision in float32).
        lr_scale = max([abs(s["ref_learning_rate"]) for s in self.steps] + [1e-12])
        for s in self.steps:
            if _rel(s["loss"], s["ref_loss"]) > LOSS_RTOL:
                out.append(f"step {s['step']}: loss {s['loss']:.8g} vs {s['ref_loss']:.8g}")
            if abs(s["learning_rate"] - s["ref_learning_rate"]) > LR_TOL * lr_scale:
                out.append(f"step {s['step']}: learning rate {s['learning_rate']:.8g} vs {s['ref_learning_rate']:.8g}")
            if _rel(s["grad_norm"], s["ref_grad_norm"]) > GRAD_RTOL:
                out.append(f"step {s['step']}: grad norm {s['grad_norm']:.8g} vs {s['ref_grad_norm']:.8g}")
        return out

    @property
    def param_failures(self) -> list[str]:
        return [p for p, e in self.param_errors.items() if e > self._param_tol(p)]

    @property
    def passed(self) -> bool:
        return not self.step_failures and not self.param_failures

    def summary(self) -> str:
        others = {p: e for p, e in self.param_errors.items() if p not in self.noise_sensitive}
        worst = max(others, key=others.get) if others else None
        verdict = "PASS" if self.passed else "FAIL"
        parts = [f"{verdict}: {len(self.steps)} steps vs {self.reference}",
                 f"max loss rel err {max((_rel(s['loss'], s['ref_loss']) for s in self.steps), default=0):.2g}",
                 f"max grad-norm rel err {max((_rel(s['grad_norm'], s['ref_grad_norm']) for s in self.steps), default=0):.2g}"]
        if worst is not None:
            parts.append(f"final params max err {others[worst]:.2g} ({worst})")
        if self.first_divergence:
            d = self.first_divergence
            parts.append(f"first divergence: step {d['step']} {d['param']} ({d['error']:.2g})")
        return "; ".join(parts)

    def to_text(self, verbose: bool = False) -> str:
        lines = [f"train parity: {self.subject}", f"reference: {self.reference}",
                 f"{'step':>4} {'loss':>14} {'ref loss':>14} {'lr':>12} {'ref lr':>12} {'grad norm':>12} {'ref':>12}"]
        for s in self.steps:
            lines.append(f"{s['step']:>4} {s['loss']:>14.8g} {s['ref_loss']:>14.8g} {s['learning_rate']:>12.6g} "
                         f"{s['ref_learning_rate']:>12.6g} {s['grad_norm']:>12.7g} {s['ref_grad_norm']:>12.7g}")
        ranked = sorted(self.param_errors.items(), key=lambda kv: -kv[1])
        lines.append(f"final parameters ({len(ranked)}): scaled error max|a-b|/max(1,max|ref|), tol {self.tol:g} "
                     f"(noise-sensitive {NOISE_TOL:g})")
        for path, err in ranked if verbose else ranked[:8]:
            tag = " [noise-sensitive]" if path in self.noise_sensitive else ""
            mark = "FAIL" if err > self._param_tol(path) else "ok"
            lines.append(f"  {mark:4} {err:.3g}  {path}{tag}")
        for f in self.step_failures:
            lines.append(f"  FAIL {f}")
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"subject": self.subject, "reference": self.reference, "passed": self.passed, "steps": self.steps,
                "param_errors": self.param_errors, "noise_sensitive": self.noise_sensitive,
                "first_divergence": self.first_divergence, "step_failures": self.step_failures,
                "param_failures": self.param_failures}  # fmt: skip


def _flat(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    from tokenlearner_torch.weights_convert.layouts import flatten_tree

    return {k: np.asarray(v) for k, v in flatten_tree(tree).items()}


def _divergence(port: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], noise: Sequence[str], tol: float):
    errs = {p: _scaled(port[p], ref[p]) for p in ref}
    bad = {p: e for p, e in errs.items() if e > (NOISE_TOL if p in noise else tol)}
    return errs, (max(bad, key=bad.get) if bad else None)


def is_training_case(path: Path) -> bool:
    return (path / "steps.json").is_file() and (path / "batches.npz").is_file() and (path / "config.json").is_file()


def check_training_case(case_dir: Path, steps: Optional[int] = None, tol: Optional[float] = None,
                        device: str = "cpu", strict: bool = False) -> TrainReport:  # fmt: skip
    """The port against a stored genuine-Scenic training case (no JAX). ``strict``: a config key no code
    reads is a ConfigError, not a ConfigWarning (:mod:`tokenlearner_torch.config_check`)."""
    from tokenlearner_torch.training import ScenicTrainer
    from tokenlearner_torch.weights_convert.readers import read_checkpoint

    meta = json.loads((case_dir / "config.json").read_text())
    records = json.loads((case_dir / "steps.json").read_text())["steps"]
    k = len(records) if steps is None else steps
    if not 1 <= k <= len(records):
        raise ValueError(f"--steps {k}: the case holds {len(records)} steps")
    trainer = ScenicTrainer(meta["config"], meta["dataset_meta_data"], device=device, strict=strict)
    if meta.get("surgery"):
        trainer.load_params(read_checkpoint(case_dir / "params_target_init.msgpack"))
        trainer.init_from_train_state(read_checkpoint(case_dir / "params_restored.msgpack"), meta["surgery"]["source_config"])
    else:
        trainer.load_params(read_checkpoint(case_dir / "params_init.msgpack"))
    noise = sorted(meta.get("rounding_sensitivity", {}).get("noise_sensitive_params (err > 1e-5)", {}))
    report = TrainReport(str(case_dir), "genuine Scenic (stored training case)", noise_sensitive=noise, tol=tol or PARAM_TOL)
    batches = np.load(case_dir / "batches.npz")
    for i in range(k):
        batch = {"inputs": batches[f"inputs_{i}"], "label": batches[f"label_{i}"]}
        if f"batch_mask_{i}" in batches.files:
            batch["batch_mask"] = batches[f"batch_mask_{i}"]
        logs = trainer.train_step(batch)
        rec = records[i]
        report.steps.append({"step": i, "loss": logs["loss"], "ref_loss": rec["loss"], "learning_rate": logs["learning_rate"],
                             "ref_learning_rate": rec["learning_rate"], "grad_norm": logs["grad_norm"],
                             "ref_grad_norm": rec["grad_norm_pre_clip"]})  # fmt: skip
    if k == len(records):  # the stored parameters are those after all K steps
        ref = _flat(read_checkpoint(case_dir / "params_final.msgpack"))
        report.param_errors, worst = _divergence(_flat(trainer.params()), ref, noise, report.tol)
        if worst:
            report.first_divergence = {"step": k - 1, "param": worst, "error": report.param_errors[worst]}
    return report


# ------------------------------------------------------------------------------------------------------------
# The Flax side for a config: the project's Flax reference + optax + Scenic's train_step semantics in JAX.

def optax_chain(optimizer_config: Mapping[str, Any], lr_fn, params: Mapping[str, Any], schedule=None):
    """Scenic's ``get_optimizer`` as optax calls (the order of scenic/train_lib/optimizers.py).

    ``schedule``: optax's ``count -> learning rate``; default ``lr_fn`` evaluated eagerly on a concrete count
    (not traceable: a jitted step passes a traceable one, e.g. a table lookup)."""
    import jax
    import optax

    cfg = dict(optimizer_config)
    name = cfg.pop("optimizer")
    mask = None
    if cfg.pop("skip_scale_and_bias_regularization", None) and cfg.get("weight_decay", 0):
        mask = jax.tree_util.tree_map(lambda x: x.ndim != 1, params)
    ops = []
    if name == "sgd" and "weight_decay" in cfg:
        wd = cfg.pop("weight_decay")
        if wd:
            ops.append(optax.add_decayed_weights(wd, mask))
    if mask is not None and name == "adamw":
        cfg["mask"] = mask
    clip = cfg.pop("grad_clip", None)
    if clip and clip.get("clip_method") == "clip_by_global_norm" and clip.get("clip_value") is not None:
        ops.append(optax.clip_by_global_norm(clip["clip_value"]))
    freeze = cfg.pop("freeze_params_reg_exp", None)
    if schedule is None:
        schedule = lambda count: np.float32(lr_fn(int(count)))  # noqa: E731 - evaluated eagerly (count is concrete)
    opt = getattr(optax, name)(learning_rate=schedule, **cfg)
    if freeze:
        from tokenlearner_torch.weights_convert.layouts import flatten_tree, unflatten_tree

        frozen = unflatten_tree({p: bool(re.search(freeze, p)) for p in flatten_tree(params)})
        ops += [optax.masked(opt, jax.tree_util.tree_map(lambda f: not f, frozen)), optax.masked(optax.set_to_zero(), frozen)]
    else:
        ops.append(opt)
    return optax.chain(*ops)


def scenic_optax_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Scenic's ``get_optax_optimizer_config`` on the raw experiment config, written for the reference side from
    scenic/train_lib/optimizers.py (not the port's translation): a new-style ``optimizer_configs.optimizer``
    is returned as is (Scenic quirk: top-level ``grad_clip_configs`` is then not copied in); otherwise
    'adam' + weight_decay -> adamw, 'momentum' -> sgd (momentum 0.9 unless given), 'nesterov' -> sgd with
    nesterov, beta1/beta2/epsilon -> b1/b2/eps, and skip_scale_and_bias_regularization / grad_clip_configs
    copied in."""
    opt = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in dict(config.get("optimizer_configs") or {}).items()}
    if "optimizer" in opt:
        return opt
    name = config.get("optimizer")
    if name is not None:
        opt["optimizer"] = name
        if name == "adam" and "weight_decay" in opt:
            opt["optimizer"] = "adamw"
        if name == "momentum":
            opt["optimizer"] = "sgd"
            opt.setdefault("momentum", 0.9)
        if name == "nesterov":
            opt["optimizer"], opt["nesterov"] = "sgd", True
    if "skip_scale_and_bias_regularization" in config:
        opt["skip_scale_and_bias_regularization"] = config["skip_scale_and_bias_regularization"]
    for old, new in (("beta1", "b1"), ("beta2", "b2"), ("epsilon", "eps")):
        if old in opt:
            opt[new] = opt.pop(old)
    if "grad_clip_configs" in config:
        opt["grad_clip"] = dict(config["grad_clip_configs"])
    return opt


def reference_lr_fn(lr_configs: Mapping[str, Any]):
    """Scenic's learning-rate schedule for the reference side, built from the raw ``lr_configs`` with optax's
    own schedules (``linear_schedule``, ``cosine_decay_schedule``) where Scenic's factor has one, jnp where
    not (rsqrt), never the port's ``schedules.py``. Returns ``step -> float32``, or None for a factor not
    covered here (the caller then says the reference rate is the port's)."""
    import jax.numpy as jnp
    import optax

    c = dict(lr_configs)
    base = c.get("base_learning_rate")
    if "learning_rate_schedule" not in c:
        return lambda step: np.float32(base)
    if c["learning_rate_schedule"] != "compound":
        return None
    factors = [f.strip() for f in c["factors"].split("*")]
    if not set(factors) <= {"constant", "linear_warmup", "linear_decay", "rsqrt_decay", "cosine_decay"}:
        return None
    if "cosine_decay" in factors and (c.get("t_mul", 1.0) != 1.0 or c.get("m_mul", 1.0) != 1.0):
        return None

    def lr(step: int):
        ratio = jnp.float32(1.0)
        for name in factors:
            if name == "constant":
                ratio = ratio * base
            elif name == "linear_warmup":  # min(1, alpha + s (1 - alpha) / warmup)
                warm = c["warmup_steps"]
                ratio = ratio * (optax.linear_schedule(c.get("warmup_alpha", 0.0), 1.0, warm)(step) if warm else 1.0)
            elif name == "rsqrt_decay":
                warm, timescale = c.get("warmup_steps", 0.0), c.get("timescale", 10_000)
                ratio = ratio * jnp.where(warm < step, jnp.sqrt(timescale) / jnp.sqrt(step + timescale - warm), 1.0)
            elif name == "cosine_decay":  # restarts every cycle (t_mul = 1); the cycle shortened by the warmup
                warm, cycle = c.get("warmup_steps", 0.0), c["steps_per_cycle"]
                cycle = cycle - int(warm / (c.get("total_steps", cycle) / cycle))
                if cycle > 0:
                    s = max(0.0, step - warm - c.get("start_decay_step", 0.0))
                    ratio = ratio * optax.cosine_decay_schedule(1.0, cycle, c.get("alpha", 0.0))(s % cycle)
            else:  # linear_decay of the product so far, down to end_learning_rate
                warm, end = c.get("warmup_steps", 0.0), c.get("end_learning_rate", 0.0)
                frac = optax.linear_schedule(1.0, 0.0, c["total_steps"] - warm)(max(0.0, step - warm))
                ratio = (ratio - end) * frac + end
        return np.float32(ratio)

    return lr


def _jax_loss(kind: str, logits, targets, weights, label_smoothing, l2_decay_factor, params):
    import jax
    import jax.numpy as jnp

    if label_smoothing is not None:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]
    if kind == "softmax":
        per = -(targets * jax.nn.log_softmax(logits))
    else:
        per = -(targets * jax.nn.log_sigmoid(logits) + (1.0 - targets) * jax.nn.log_sigmoid(-logits))
    norm = targets.shape[0]
    if weights is not None:
        per = per * weights[:, None]
        norm = weights.sum()
    loss = jnp.sum(per) / (norm + 1e-8)
    if l2_decay_factor is not None:
        l2 = sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(params) if x.ndim > 1)
        loss = loss + 0.5 * l2_decay_factor * l2
    return loss


def live_train(config: Any, dataset_meta_data: Mapping[str, Any], steps: int, *, batch_size: int = 4, seed: int = 0,
               tol: Optional[float] = None, device: str = "cpu", strict: bool = False) -> TrainReport:  # fmt: skip
    """K steps of the port and of the Flax reference + optax from the same parameters and batches.
    ``strict``: a config key no code reads is a ConfigError, not a ConfigWarning."""
    import jax
    import jax.numpy as jnp
    import optax

    from tokenlearner_torch.training import ScenicTrainer, cfg_get, load_config
    from tokenlearner_torch.training.trainer import MODEL_NAMES

    from .flax_reference import TokenLearnerViT as FlaxViT

    cfg = load_config(config, strict=strict)
    model_cfg = cfg_get(cfg, "model")
    if model_cfg.get("dropout_rate", 0.1) or model_cfg.get("attention_dropout_rate", 0.1):
        raise ValueError("train parity needs config.model.dropout_rate = attention_dropout_rate = 0 "
                         "(Scenic's dropout RNG cannot be reproduced)")  # fmt: skip
    if cfg.get("model_dtype_str", "float32") != "float32":
        raise ValueError("train parity runs float32 models (config.model_dtype_str)")
    trainer = ScenicTrainer(cfg, dataset_meta_data, device=device, strict=strict)
    kind = MODEL_NAMES[cfg["model_name"]]
    flax_model = FlaxViT(num_classes=int(dataset_meta_data["num_classes"]), mlp_dim=model_cfg["mlp_dim"],
                         num_layers=model_cfg["num_layers"], num_heads=model_cfg["num_heads"],
                         tokenizer=model_cfg["tokenizer"], hidden_size=model_cfg["hidden_size"],
                         representation_size=model_cfg.get("representation_size"), dropout_rate=0.0,
                         attention_dropout_rate=0.0, classifier=model_cfg.get("classifier", "gap"))  # fmt: skip
    params = jax.tree_util.tree_map(jnp.asarray, trainer.params())
    # The reference side reads the raw config itself: Scenic's translation and schedule, not the port's.
    ref_lr = reference_lr_fn(cfg_get(cfg, "lr_configs"))
    ref_lr_source = "optax schedules from the raw lr_configs"
    if ref_lr is None:
        ref_lr, ref_lr_source = trainer.lr_fn, "the port's lr_fn (a factor with no reference schedule here)"
    tx = optax_chain(scenic_optax_config(cfg), ref_lr, params)
    opt_state = tx.init(params)
    onehot = bool(dataset_meta_data.get("target_is_onehot", False))
    n_cls = int(dataset_meta_data["num_classes"])
    ls, l2f, max_norm = cfg.get("label_smoothing"), cfg.get("l2_decay_factor"), cfg.get("max_grad_norm")

    @jax.jit
    def grads_of(p, inputs, targets, weights):
        def loss_fn(p):
            logits = flax_model.apply({"params": p}, inputs, train=True)
            return _jax_loss(kind, logits, targets, weights, ls, l2f, p)

        return jax.value_and_grad(loss_fn)(p)

    rng = np.random.default_rng([seed, 1])
    grad_ratio: dict[str, float] = {}
    step_errors: list[dict[str, float]] = []
    shape = [int(d) for d in dataset_meta_data["input_shape"][1:]]
    report = TrainReport(f"{config if isinstance(config, (str, Path)) else cfg.get('experiment_name', 'config')}",
                         f"the project's Flax reference + optax + Scenic's train_step semantics (JAX); lr: {ref_lr_source}",
                         tol=tol or PARAM_TOL)  # fmt: skip
    for i in range(steps):
        labels = rng.integers(0, n_cls, size=batch_size)
        batch = {"inputs": rng.normal(size=(batch_size, *shape)).astype(np.float32),
                 "label": np.eye(n_cls, dtype=np.float32)[labels] if onehot else labels.astype(np.int32)}
        logs = trainer.train_step(batch)
        targets = batch["label"] if onehot else np.eye(n_cls, dtype=np.float32)[labels]
        loss, grads = grads_of(params, jnp.asarray(batch["inputs"]), jnp.asarray(targets), None)
        gnorm = jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree_util.tree_leaves(grads)))
        flat_g = _flat(jax.device_get(grads))  # a param whose gradient stays ~0 moves by rounding noise under Adam
        top = max(float(np.abs(g).max()) for g in flat_g.values()) or 1.0
        for p, g in flat_g.items():
            grad_ratio[p] = max(grad_ratio.get(p, 0.0), float(np.abs(g).max()) / top)
        if max_norm is not None:
            grads = jax.tree_util.tree_map(lambda g: jnp.where(gnorm < max_norm, g, g * (max_norm / gnorm)), grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        report.steps.append({"step": i, "loss": logs["loss"], "ref_loss": float(loss), "learning_rate": logs["learning_rate"],
                             "ref_learning_rate": float(ref_lr(i)), "grad_norm": logs["grad_norm"],
                             "ref_grad_norm": float(gnorm)})  # fmt: skip
        port, ref = _flat(trainer.params()), _flat(jax.device_get(params))
        step_errors.append({p: _scaled(port[p], ref[p]) for p in ref})
    report.noise_sensitive = sorted(p for p, r in grad_ratio.items() if r < 1e-5 or STRUCTURALLY_ZERO_GRAD.search(p))
    for i, errs in enumerate(step_errors):
        bad = {p: e for p, e in errs.items() if e > report._param_tol(p)}
        if bad:
            worst = max(bad, key=bad.get)
            report.first_divergence = {"step": i, "param": worst, "error": bad[worst]}
            break
    report.param_errors = step_errors[-1] if step_errors else {}
    return report


# ------------------------------------------------------------------------------------------------------------
# Command line: `tokenlearner-parity train CONFIG|CASE_DIR --steps K` (registered by parity/cli.py).

def add_train_parser(sub: Any, common: Any) -> None:
    tp = sub.add_parser("train", help="K training steps of the port vs Scenic's training semantics",
                        description="A training case folder (genuine Scenic's records) or a Scenic experiment "
                        "config (the Flax reference + optax + Scenic's train_step in JAX): per-step loss, learning "
                        "rate, gradient norm, and the final per-parameter error.")  # fmt: skip
    tp.add_argument("target", metavar="CONFIG|CASE_DIR", help="a training case folder, or a Scenic config .py[:ARG] / .json")
    tp.add_argument("--steps", type=int, default=None, help="steps to run (default: all of a case's, 3 for a config)")
    tp.add_argument("--num-classes", type=int, default=None, help="config only: dataset_meta_data num_classes")
    tp.add_argument("--input-shape", default=None, metavar="H,W,C", help="config only: one example's shape")
    tp.add_argument("--onehot", action="store_true", help="config only: one-hot targets (target_is_onehot)")
    tp.add_argument("--batch-size", type=int, default=4, help="config only: batch size (default 4)")
    tp.add_argument("--seed", type=int, default=0, help="config only: seed of the batches (default 0)")
    tp.add_argument("--strict", action="store_true", help="a config key that no code reads (a likely typo: "
                    "lr_configs.learning_rate_schedul) is an error (exit 2), not a warning")
    common(tp)


def cmd_train(args: Any) -> int:
    from tokenlearner_torch.cli_common import EXIT_FAIL, EXIT_OK, UsageError, print_reports, write_reports_json

    strict = bool(getattr(args, "strict", False))
    target = Path(args.target)
    if getattr(args, "plot", None):
        raise UsageError("--plot draws per-module forward errors; it is not available for train")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    if target.is_dir():
        if not is_training_case(target):
            raise UsageError(f"{target}: not a training case folder (config.json, steps.json, batches.npz)")
        report = check_training_case(target, steps=args.steps, tol=args.tol, device=args.device, strict=strict)
    else:
        if args.num_classes is None or args.input_shape is None:
            raise UsageError("a config needs --num-classes and --input-shape (the dataset_meta_data)")
        try:
            shape = [int(d) for d in args.input_shape.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--input-shape {args.input_shape!r}: expected H,W,C (or T,H,W,C)") from None
        try:
            import jax  # noqa: F401
            import optax  # noqa: F401
        except ImportError:
            raise UsageError("a config needs jax, flax and optax: pip install 'tokenlearner-torch[parity]' optax") from None
        meta = {"num_classes": args.num_classes, "input_shape": [-1, *shape], "target_is_onehot": args.onehot}
        report = live_train(args.target, meta, args.steps or 3, batch_size=args.batch_size, seed=args.seed,
                            tol=args.tol, device=args.device, strict=strict)  # fmt: skip
    print_reports([report], args)
    write_reports_json([report], [], args)
    return EXIT_OK if report.passed else EXIT_FAIL
