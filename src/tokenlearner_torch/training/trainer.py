"""``ScenicTrainer``: Scenic's ``classification_trainer.train_step`` for TokenLearner, from a Scenic config.

A thin composition of standard pieces, each an attribute you can use on its own: ``model`` (the port's
``TokenLearnerViT``), ``loss_fn`` (:class:`~.losses.ScenicClassificationLoss`), ``lr_fn`` (Scenic's schedule,
``step -> float32``) and ``optimizer`` (an :class:`~.optim.OptaxChain`, a ``torch.optim.Optimizer``).
One step, in Scenic's order: forward in train mode -> loss (+ l2 term) -> gradients -> global norm ->
trainer clipping (``max_grad_norm``) -> the optax chain -> ``global_step += 1``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, ShapeError
from .config import cfg_get, load_config
from .losses import ScenicClassificationLoss
from .mixup import mixup, sample_mixup_weight
from .optim import OptaxChain, ParamSpec, clip_grads, get_optax_optimizer_config, global_norm, named_specs, scenic_optimizer
from .schedules import get_learning_rate_fn
from .surgery import init_token_learner_from_train_state

__all__ = ["ScenicTrainer", "MODEL_NAMES", "build_model"]

# Scenic's registry names (config.model_name) of the TokenLearner model classes, and their loss.
MODEL_NAMES = {
    "token_learner_classification": "softmax",  # TokenLearnerClassificationModel
    "token_learner_multilabel_classification": "sigmoid",  # TokenLearnerMultilabelClassificationModel
}


def build_model(config: Mapping[str, Any], dataset_meta_data: Mapping[str, Any]) -> torch.nn.Module:
    """The port's ``TokenLearnerViT`` as Scenic's model classes build it (``build_flax_model``)."""
    from ..models import TokenLearnerViT

    model = cfg_get(config, "model")
    try:
        return TokenLearnerViT(
            num_classes=int(dataset_meta_data["num_classes"]),
            mlp_dim=model["mlp_dim"],
            num_layers=model["num_layers"],
            num_heads=model["num_heads"],
            tokenizer=model["tokenizer"],
            hidden_size=model["hidden_size"],
            representation_size=model.get("representation_size"),
            classifier=model.get("classifier", "gap"),
            dropout_rate=model.get("dropout_rate", 0.1),
            attention_dropout_rate=model.get("attention_dropout_rate", 0.1),
            dtype=config.get("model_dtype_str", "float32"),
        )
    except KeyError as e:
        raise ConfigError(f"config.model.{e.args[0]} is required by TokenLearnerViT") from e


def _params_tree(params: Any) -> Mapping[str, Any]:
    if isinstance(params, (str, os.PathLike)):
        from ..weights_convert.readers import read_checkpoint

        return read_checkpoint(params)
    return params


def _tensor(value: Any, device: torch.device, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device)
    arr = np.asarray(value)
    if arr.dtype == object:
        raise ShapeError(f"batch['{name}'] is not a numeric array")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(device)


class ScenicTrainer:
    """Train a TokenLearner model exactly as Scenic's classification_trainer does.

    ``config``: a Scenic experiment config (dict, ConfigDict, a ``.py`` with ``get_config()`` or a ``.json``);
    ``dataset_meta_data``: ``num_classes``, ``input_shape`` (``(-1, H, W, C)`` or ``(-1, T, H, W, C)``),
    ``target_is_onehot``. The model starts from Scenic's initialisation for the config (torch RNG seeded with
    ``config.rng_seed``; ``init_head_bias`` on ``output_projection/bias``); :meth:`load_params` replaces it.
    """

    def __init__(self, config: Any, dataset_meta_data: Mapping[str, Any], *, device: str | torch.device = "cpu",
                 strict: bool = False) -> None:
        # config_check: a key no code reads warns (ConfigWarning); strict=True makes it a ConfigError.
        self.config = load_config(config, strict=strict)
        self.dataset_meta_data = dict(dataset_meta_data)
        self.device = torch.device(device)
        model_name = self.config.get("model_name")
        if model_name not in MODEL_NAMES:
            raise ConfigError(f"config.model_name {model_name!r} is not a TokenLearner classification model; "
                              f"expected one of {sorted(MODEL_NAMES)}")  # fmt: skip
        self.mixup_config = dict(self.config.get("mixup") or {})
        # Scenic's mixup weight comes from its JAX RNG; the port's from this generator (rng_seed).
        self.mixup_generator = torch.Generator().manual_seed(int(self.config.get("rng_seed", 0) or 0))
        for key in ("num_classes", "input_shape"):
            if key not in self.dataset_meta_data:
                raise ConfigError(f"dataset_meta_data['{key}'] is required")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.config.get("rng_seed", 0) or 0))
            self.model = build_model(self.config, self.dataset_meta_data).to(self.device)
            shape = (1, *[int(d) for d in self.dataset_meta_data["input_shape"][1:]])
            with torch.no_grad():  # creates the input-dependent parameters with Scenic's initialisers
                self.model.eval()(torch.zeros(shape, device=self.device))
        head_bias = self.config.get("init_head_bias")
        if head_bias is not None:  # Scenic's initialize_model: output_projection/bias = init_head_bias
            with torch.no_grad():
                self.model.output_projection.bias.fill_(float(head_bias))
        self.model.train()
        # The train-mode forward: the model itself, or its data-parallel wrapper (distributed.Context.prepare:
        # DDP averages the gradients over processes during backward, Scenic's pmean).
        self.forward_module: torch.nn.Module = self.model
        # True once the parameters are sharded over processes (FSDP2, distributed.Context.prepare): params()
        # and opt_state_tree() are then collectives every rank must call.
        self.sharded = False
        # Called with the gradients after backward, before the trainer's clipping (e.g. a custom all-reduce).
        self.grad_hook: Optional[Callable[[list[Tensor]], None]] = None
        self.loss_fn = ScenicClassificationLoss(
            MODEL_NAMES[model_name],
            num_classes=int(self.dataset_meta_data["num_classes"]),
            target_is_onehot=bool(self.dataset_meta_data.get("target_is_onehot", False)),
            label_smoothing=self.config.get("label_smoothing"),
            l2_decay_factor=self.config.get("l2_decay_factor"),
        )
        self.lr_fn = get_learning_rate_fn(self.config)
        self.optimizer_config = get_optax_optimizer_config(self.config)
        self._reset_optimizer()

    # -- parameters ------------------------------------------------------------------------------------
    def _reset_optimizer(self) -> None:
        """Scenic's ``tx.init(params)`` and ``global_step = 0``."""
        from ..weights_convert.mapping import iter_leaves, torch_to_flax
        from ..weights_convert.layouts import flatten_tree

        flat = flatten_tree(torch_to_flax(self.model))
        named = dict(self.model.named_parameters())
        self._torch_key = {}
        items = []
        for torch_key, flax_path in iter_leaves(self.model):
            self._torch_key[flax_path] = torch_key
            items.append((flax_path, named[torch_key], np.ndim(flat[flax_path])))
        self.specs: list[ParamSpec] = named_specs(items)
        self.optimizer: OptaxChain = scenic_optimizer(self.optimizer_config, self.lr_fn, self.specs)
        self.global_step = 0

    def load_params(self, params: Mapping[str, Any] | str | os.PathLike) -> None:
        """Set the parameters from a Flax ``params`` tree (or a Scenic/Flax checkpoint path, read with
        ``weights_convert.read_checkpoint``); the optimiser starts afresh (step 0), as Scenic's."""
        from ..weights_convert.mapping import flax_to_torch

        params = _params_tree(params)
        state = flax_to_torch(self.model, params)
        current = self.model.state_dict()
        state = {k: v.to(dtype=current[k].dtype) for k, v in state.items()}
        self.model.load_state_dict(state, strict=True)
        self._reset_optimizer()

    def params(self) -> dict[str, Any]:
        """A snapshot of the current parameters as a Flax ``params`` tree (nested dicts of numpy arrays)."""
        from ..weights_convert.layouts import flatten_tree, unflatten_tree
        from ..weights_convert.mapping import torch_to_flax

        # torch_to_flax may return views of the parameters' memory; a snapshot must not move with training.
        return unflatten_tree({k: np.array(v, copy=True) for k, v in flatten_tree(torch_to_flax(self.model)).items()})

    def optimizer_state(self, key: str) -> dict[str, Any]:
        """One per-parameter optax state (``'mu'``, ``'nu'``, ``'trace'``) as a Flax tree."""
        from ..weights_convert.mapping import torch_to_flax

        for i in range(len(self.optimizer.transforms)):
            found = self.optimizer.optax_state(i, key)
            if found:
                return torch_to_flax(self.model, {self._torch_key[n]: t for n, t in found.items()})
        raise KeyError(f"the optimizer has no state {key!r}")

    def init_from_train_state(self, restored_params: Mapping[str, Any] | str | os.PathLike,
                              restored_config: Any = None) -> None:  # fmt: skip
        """Scenic's fine-tuning surgery (``init_token_learner_from_train_state``) from a restored source model
        (its Flax ``params`` tree, or a checkpoint path such as ``config.init_from.checkpoint_path``).

        ``restored_config``: the source's experiment config (default ``config.init_from.model_config``).
        The result is loaded and the optimiser starts afresh at step 0 (Scenic: ``tx.init``, step 0).
        """
        if restored_config is None:
            restored_config = cfg_get(self.config, "init_from.model_config", None)
            if restored_config is None:
                raise ConfigError("init_from_train_state: pass restored_config or set config.init_from.model_config")
        new = init_token_learner_from_train_state(self.params(), _params_tree(restored_params), self.config, load_config(restored_config))
        self.load_params(new)

    # -- training --------------------------------------------------------------------------------------
    def _batch(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        for key in ("inputs", "label"):
            if key not in batch:
                raise ShapeError(f"batch['{key}'] is required (Scenic's batch: inputs, label[, batch_mask])")
        inputs = _tensor(batch["inputs"], self.device, "inputs").to(torch.float32)
        label = _tensor(batch["label"], self.device, "label")
        mask = batch.get("batch_mask")
        mask_t = None if mask is None else _tensor(mask, self.device, "batch_mask").to(torch.float32)
        if inputs.shape[0] != label.shape[0] or (mask_t is not None and mask_t.shape[0] != inputs.shape[0]):
            raise ShapeError(f"batch: inputs {tuple(inputs.shape)}, label {tuple(label.shape)} and batch_mask must share the batch size")
        return inputs, label, mask_t

    def step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One Scenic training step, its logs left on the device (no host synchronisation: the loop
        accumulates them there, as Scenic accumulates its metrics on the accelerator).

        Returns 0-d tensors ``loss``, ``grad_norm`` (before clipping), ``l2_grads`` (after clipping, Scenic's
        log), ``l2_params``, ``l2_updates``, ``learning_rate`` (float32 ``lr_fn(step)`` before the update),
        ``metrics`` (``{name: (sum, normalizer)}`` tensors) and, with mixup, ``mixup_weight`` (a float).
        """
        inputs, label, mask = self._batch(batch)
        mixup_weight = None
        if self.mixup_config.get("alpha"):  # Scenic's train_step mixes the batch first
            mixup_weight = sample_mixup_weight(float(self.mixup_config["alpha"]), self.mixup_generator)
            inputs, label = mixup(inputs, label.to(torch.float32), mixup_weight,
                                  self.mixup_config.get("image_format", "NHWC"))
        self.model.train()
        logits = self.forward_module(inputs)
        l2 = [s.param for s in self.specs if s.flax_ndim > 1] if self.loss_fn.l2_decay_factor is not None else None
        loss = self.loss_fn(logits, label, mask, l2)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            grads = [s.param.grad if s.param.grad is not None else torch.zeros_like(s.param) for s in self.specs]
            if self.grad_hook is not None:
                self.grad_hook(grads)
            max_norm = self.config.get("max_grad_norm")
            if max_norm is not None:
                clipped, norm = clip_grads(grads, float(max_norm))
                for s, g in zip(self.specs, clipped):
                    s.param.grad = g
                logged = global_norm(clipped)
            else:
                norm = logged = global_norm(grads)
                for s, g in zip(self.specs, grads):  # the hook may have replaced them (averaged copies)
                    s.param.grad = g
        lr = float(np.float32(self.lr_fn(self.global_step)))
        self.optimizer.step()
        self.global_step += 1
        with torch.no_grad():
            l2_params = global_norm([s.param for s in self.specs])
        return {
            "loss": loss.detach(),
            "learning_rate": torch.tensor(lr, dtype=torch.float32),
            "grad_norm": norm,
            "l2_grads": logged,
            "l2_params": l2_params,
            "l2_updates": self.optimizer.last_updates_norm,
            "metrics": self.loss_fn.metric_tensors(logits.detach(), label, mask),
            **({"mixup_weight": mixup_weight} if mixup_weight is not None else {}),
        }

    def train_step(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """One Scenic training step on ``batch`` (``inputs`` [B, H, W, C] or [B, T, H, W, C], ``label``,
        optional ``batch_mask`` [B]; numpy or torch).

        Returns ``loss`` (the differentiated objective), ``learning_rate`` (``lr_fn(step)`` before the update),
        ``grad_norm`` (global gradient norm before clipping), ``l2_grads`` (after clipping, Scenic's log),
        ``l2_params``, ``l2_updates`` and ``metrics`` (``{name: (sum, normalizer)}``, Scenic's train metrics),
        all as Python floats (:meth:`step` leaves them on the device).
        """
        logs = self.step(batch)
        out: dict[str, Any] = {k: float(v) for k, v in logs.items() if k not in ("metrics", "mixup_weight")}
        out["metrics"] = {k: (float(a), float(b)) for k, (a, b) in logs["metrics"].items()}
        if "mixup_weight" in logs:
            out["mixup_weight"] = logs["mixup_weight"]
        return out

    @torch.no_grad()
    def eval_step(self, batch: Mapping[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
        """Scenic's ``eval_step``: a deterministic forward (``train=False``) and the validation metrics with
        the batch's ``batch_mask``; ``{name: (sum, normalizer)}`` as 0-d tensors on the device."""
        inputs, label, mask = self._batch(batch)
        was_training = self.model.training
        self.model.eval()
        try:
            logits = self.model(inputs)
        finally:
            self.model.train(was_training)
        return self.loss_fn.metric_tensors(logits, label, mask)

    # -- checkpoints -----------------------------------------------------------------------------------
    def num_trainable_params(self) -> int:
        """Scenic's ``num_trainable_params``: the number of entries of the parameter tree."""
        return sum(s.param.numel() for s in self.specs)

    def opt_state_tree(self) -> dict[str, Any]:
        """The optimiser state as optax lays it out (``flax.serialization.to_state_dict(tx.init(params))``
        of the chain Scenic builds), numpy arrays in Flax layouts: what Scenic's TrainState checkpoints hold."""
        from .checkpoint import opt_state_to_tree

        return opt_state_to_tree(self.optimizer, self._leaf_to_flax)

    def load_opt_state_tree(self, tree: Mapping[str, Any]) -> None:
        """Set the optimiser state from optax's tree (see :meth:`opt_state_tree`); a tree of another chain or
        model raises :class:`~tokenlearner_torch.errors.CheckpointError` naming what does not fit."""
        from .checkpoint import opt_state_from_tree

        opt_state_from_tree(self.optimizer, tree, self._leaf_to_torch)

    def _leaves(self) -> dict[str, Any]:
        from ..weights_convert.mapping import leaf_table

        if getattr(self, "_leaf_by_path", None) is None:
            self._leaf_by_path = {leaf.flax_path: leaf for leaf in leaf_table(self.model)}
        return self._leaf_by_path

    def _leaf_to_flax(self, flax_path: str, t: Tensor) -> np.ndarray:
        leaf = self._leaves()[flax_path]
        return np.array(leaf.rule.to_flax(t.detach().cpu().numpy(), leaf.module), copy=True)

    def _leaf_to_torch(self, flax_path: str, arr: np.ndarray) -> Tensor:
        leaf = self._leaves()[flax_path]
        out = np.ascontiguousarray(leaf.rule.to_torch(np.asarray(arr), leaf.module))
        return torch.from_numpy(out.copy()).to(self.device)

    def rng_state(self) -> dict[str, np.ndarray]:
        """The torch random state this run draws from (dropout: the global generator(s); mixup: its own),
        as uint8 arrays, so a resumed run draws the same numbers."""
        out = {"torch_cpu": torch.get_rng_state().numpy().copy(),
               "mixup": self.mixup_generator.get_state().numpy().copy()}  # fmt: skip
        if self.device.type == "cuda":
            out["torch_cuda"] = torch.cuda.get_rng_state(self.device).numpy().copy()
        return out

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`rng_state` returned (missing entries are left as they are)."""
        if "torch_cpu" in state:
            torch.set_rng_state(torch.from_numpy(np.array(state["torch_cpu"], dtype=np.uint8)))
        if "mixup" in state:
            self.mixup_generator.set_state(torch.from_numpy(np.array(state["mixup"], dtype=np.uint8)))
        if "torch_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(torch.from_numpy(np.array(state["torch_cuda"], dtype=np.uint8)), self.device)
