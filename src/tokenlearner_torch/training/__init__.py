"""Training as Scenic trains TokenLearner: its losses, optimisers, learning-rate schedules, fine-tuning
surgery and ``classification_trainer.train_step`` (docs/training.md).

``ScenicTrainer(config, dataset_meta_data)`` composes the pieces; each is usable on its own.
``train(config=, dataset=, workdir=)`` is Scenic's ``classification_trainer.train()`` job around it, with
Scenic's ``checkpoint_<step>`` files read and written both ways (``checkpoint.py``).
"""

from .checkpoint import (
    TrainState,
    latest_checkpoint,
    list_checkpoints,
    opt_state_from_tree,
    opt_state_to_tree,
    read_train_state,
    restore_newest,
    write_checkpoint,
)
from .config import cfg_get, load_config
from .losses import (
    ScenicClassificationLoss,
    apply_label_smoothing,
    l2_regularization,
    weighted_sigmoid_cross_entropy,
    weighted_softmax_cross_entropy,
    weighted_unnormalized_sigmoid_cross_entropy,
    weighted_unnormalized_softmax_cross_entropy,
)
from .mixup import mixup, sample_mixup_weight
from .optim import OptaxChain, clip_grads, get_optax_optimizer_config, scenic_optimizer, weight_decay_mask
from .schedules import COMPOUND_FACTORS, compound_lr_fn, get_learning_rate_fn
from .surgery import (
    inflate_embedding,
    init_token_learner_from_train_state,
    interpolate_positional_embeddings,
    resize_position_embedding,
    tile_positional_embeddings,
    zoom_linear,
)
from .loop import get_num_training_steps, train
from .trainer import ScenicTrainer, build_model

__all__ = [
    "train",
    "TrainState",
    "get_num_training_steps",
    "list_checkpoints",
    "latest_checkpoint",
    "read_train_state",
    "write_checkpoint",
    "restore_newest",
    "opt_state_to_tree",
    "opt_state_from_tree",
    "ScenicTrainer",
    "build_model",
    "load_config",
    "cfg_get",
    "ScenicClassificationLoss",
    "apply_label_smoothing",
    "l2_regularization",
    "weighted_softmax_cross_entropy",
    "weighted_sigmoid_cross_entropy",
    "weighted_unnormalized_softmax_cross_entropy",
    "weighted_unnormalized_sigmoid_cross_entropy",
    "mixup",
    "sample_mixup_weight",
    "OptaxChain",
    "scenic_optimizer",
    "get_optax_optimizer_config",
    "weight_decay_mask",
    "clip_grads",
    "get_learning_rate_fn",
    "compound_lr_fn",
    "COMPOUND_FACTORS",
    "zoom_linear",
    "interpolate_positional_embeddings",
    "tile_positional_embeddings",
    "resize_position_embedding",
    "inflate_embedding",
    "init_token_learner_from_train_state",
]
