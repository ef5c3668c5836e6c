"""Scenic's classification losses and train metrics (``model_lib/base_models/model_utils.py``,
``classification_model.py``, ``multilabel_classification_model.py``), in PyTorch.

Scenic's formulas, kept exactly:

* integer labels are one-hot-ed when ``dataset_meta_data['target_is_onehot']`` is False;
* label smoothing ``t * (1 - ls) + ls / C``, for the softmax **and** the sigmoid loss;
* the loss is summed over examples (and over classes for the sigmoid loss) and divided by
  ``(batch size or sum(batch_mask)) + 1e-8``; masked examples weigh 0;
* ``l2_decay_factor``: ``+ 0.5 * l2_decay_factor * sum(p**2)`` over the parameters whose *Flax* rank is > 1
  (kernels, position embeddings, and the ``[heads, head_dim]`` attention biases).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError

__all__ = [
    "onehot_targets",
    "apply_label_smoothing",
    "weighted_unnormalized_softmax_cross_entropy",
    "weighted_unnormalized_sigmoid_cross_entropy",
    "weighted_softmax_cross_entropy",
    "weighted_sigmoid_cross_entropy",
    "l2_regularization",
    "ScenicClassificationLoss",
    "LOSS_KINDS",
]

LOSS_KINDS = ("softmax", "sigmoid")


def onehot_targets(label: Tensor, num_classes: int, target_is_onehot: bool) -> Tensor:
    """``label`` as float targets ``[B, C]``: as given if ``target_is_onehot``, else one-hot of int labels ``[B]``."""
    if target_is_onehot:
        if label.ndim < 2 or label.shape[-1] != num_classes:
            raise ShapeError(f"label: expected one-hot/multi-hot [B, {num_classes}] (target_is_onehot=True), got {tuple(label.shape)}")
        return label.to(torch.float32)
    if label.is_floating_point() or label.ndim != 1:
        raise ShapeError(f"label: expected integer class ids [B] (target_is_onehot=False), got {label.dtype} {tuple(label.shape)}")
    return F.one_hot(label.long(), num_classes).to(torch.float32)


def apply_label_smoothing(targets: Tensor, label_smoothing: float) -> Tensor:
    """Scenic's smoothing: on-values ``1 - ls + ls/C``, off-values ``ls/C``."""
    return targets * (1.0 - label_smoothing) + label_smoothing / targets.shape[-1]


def _weights(loss: Tensor, weights: Optional[Tensor]) -> Tensor:
    if weights is None:
        return loss
    if weights.ndim > loss.ndim:
        raise ShapeError("batch_mask rank must not exceed the loss rank")
    return loss * weights.reshape(weights.shape + (1,) * (loss.ndim - weights.ndim)).to(loss.dtype)


def weighted_unnormalized_softmax_cross_entropy(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None,
                                                label_smoothing: Optional[float] = None) -> Tensor:  # fmt: skip
    """Per-example softmax cross-entropy ``[B]`` (``logits``, ``targets``: ``[B, C]``; ``weights``: ``[B]``)."""
    if logits.ndim != targets.ndim:
        raise ShapeError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same rank")
    if label_smoothing is not None:
        targets = apply_label_smoothing(targets, label_smoothing)
    loss = -targets * F.log_softmax(logits, dim=-1)
    return _weights(loss, weights).sum(dim=-1)


def weighted_unnormalized_sigmoid_cross_entropy(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None,
                                                label_smoothing: Optional[float] = None) -> Tensor:  # fmt: skip
    """Per-example, per-class sigmoid cross-entropy ``[B, C]``."""
    if logits.ndim != targets.ndim:
        raise ShapeError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} must have the same rank")
    if label_smoothing is not None:
        targets = apply_label_smoothing(targets, label_smoothing)
    loss = -(targets * F.logsigmoid(logits) + (1.0 - targets) * F.logsigmoid(-logits))
    return _weights(loss, weights)


def _normalizer(targets: Tensor, weights: Optional[Tensor]):
    if weights is not None:
        return weights.to(torch.float32).sum() + 1e-8
    n = 1
    for d in targets.shape[:-1]:
        n *= int(d)
    return n + 1e-8  # a Python float, rounded to float32 by the division, as in JAX


def weighted_softmax_cross_entropy(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None,
                                   label_smoothing: Optional[float] = None) -> Tensor:  # fmt: skip
    """Scalar: the summed softmax CE divided by ``(B or sum(weights)) + 1e-8``."""
    ce = weighted_unnormalized_softmax_cross_entropy(logits, targets, weights, label_smoothing)
    return ce.sum() / _normalizer(targets, weights)


def weighted_sigmoid_cross_entropy(logits: Tensor, targets: Tensor, weights: Optional[Tensor] = None,
                                   label_smoothing: Optional[float] = None) -> Tensor:  # fmt: skip
    """Scalar: the sigmoid CE summed over examples and classes divided by ``(B or sum(weights)) + 1e-8``."""
    ce = weighted_unnormalized_sigmoid_cross_entropy(logits, targets, weights, label_smoothing)
    return ce.sum() / _normalizer(targets, weights)


def l2_regularization(tensors: Sequence[Tensor]) -> Tensor:
    """``sum(p**2)`` over ``tensors`` in order (pass those of Flax rank > 1, in Flax tree order)."""
    total: Optional[Tensor] = None
    for t in tensors:
        sq = torch.sum(t * t)
        total = sq if total is None else total + sq
    return total if total is not None else torch.zeros(())


class ScenicClassificationLoss(nn.Module):
    """The ``loss_function`` of Scenic's classification model classes.

    ``kind='softmax'``: ``ClassificationModel`` (TokenLearnerClassificationModel); ``kind='sigmoid'``:
    ``MultiLabelClassificationModel`` (TokenLearnerMultilabelClassificationModel).
    """

    def __init__(self, kind: str, num_classes: int, target_is_onehot: bool = False,
                 label_smoothing: Optional[float] = None, l2_decay_factor: Optional[float] = None) -> None:  # fmt: skip
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ConfigError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")
        self.kind, self.num_classes, self.target_is_onehot = kind, int(num_classes), bool(target_is_onehot)
        self.label_smoothing, self.l2_decay_factor = label_smoothing, l2_decay_factor

    def targets(self, label: Tensor) -> Tensor:
        return onehot_targets(label, self.num_classes, self.target_is_onehot)

    def forward(self, logits: Tensor, label: Tensor, batch_mask: Optional[Tensor] = None,
                l2_params: Optional[Sequence[Tensor]] = None) -> Tensor:  # fmt: skip
        """``logits [B, C]``, ``label`` (``[B]`` ints or ``[B, C]``), ``batch_mask [B]`` -> scalar loss.

        ``l2_params``: the parameters of Flax rank > 1 in Flax tree order, needed when ``l2_decay_factor`` is set.
        """
        targets = self.targets(label)
        fn = weighted_softmax_cross_entropy if self.kind == "softmax" else weighted_sigmoid_cross_entropy
        loss = fn(logits, targets, batch_mask, self.label_smoothing)
        if self.l2_decay_factor is not None:
            if l2_params is None:
                raise ConfigError("l2_decay_factor is set: pass l2_params (the parameters of Flax rank > 1)")
            loss = loss + 0.5 * self.l2_decay_factor * l2_regularization(l2_params)
        return loss

    @torch.no_grad()
    def metrics(self, logits: Tensor, label: Tensor, batch_mask: Optional[Tensor] = None) -> dict[str, tuple[float, float]]:
        """Scenic's train metrics ``{name: (sum, normalizer)}`` as Python floats (see :meth:`metric_tensors`)."""
        return {k: (float(v[0]), float(v[1])) for k, v in self.metric_tensors(logits, label, batch_mask).items()}

    @torch.no_grad()
    def metric_tensors(self, logits: Tensor, label: Tensor, batch_mask: Optional[Tensor] = None) -> dict[str, tuple[Tensor, Tensor]]:
        """Scenic's metrics ``{name: (sum, normalizer)}`` as 0-d float32 tensors on the logits' device (no host
        sync: the training loop accumulates them on the device, as Scenic does): ``loss`` (unnormalised CE, no
        smoothing, no l2) and ``accuracy`` + ``accuracy_top_5`` (softmax, 5 classes or more) or ``prec@1``
        (sigmoid: the top-1 class is among the targets)."""
        targets = self.targets(label)
        if batch_mask is not None:
            n = batch_mask.to(torch.float32).sum()
        else:
            n = torch.tensor(float(targets.shape[0]), dtype=torch.float32, device=logits.device)
        if self.kind == "softmax":
            ce = weighted_unnormalized_softmax_cross_entropy(logits, targets, batch_mask)
            correct = (logits.argmax(-1) == targets.argmax(-1)).to(torch.float32)
            name = "accuracy"
        else:
            ce = weighted_unnormalized_sigmoid_cross_entropy(logits, targets, batch_mask)
            top = logits.argmax(-1, keepdim=True)
            correct = torch.gather(targets, -1, top).squeeze(-1)
            name = "prec@1"
        w = batch_mask.to(torch.float32) if batch_mask is not None else torch.ones_like(correct)
        out = {"loss": (ce.sum(), n), name: ((correct * w).sum(), n)}
        if self.kind == "softmax" and self.num_classes >= 5:
            # TokenLearnerClassificationModel uses ViViT's metrics (top-5 too); with fewer than 5 classes
            # Scenic's metric raises ValueError: the port leaves it out.
            top5 = (logits.topk(5, dim=-1).indices == targets.argmax(-1, keepdim=True)).any(-1).to(torch.float32)
            out["accuracy_top_5"] = ((top5 * w).sum(), n)
        return out
