"""ScenicTrainer on Scenic's ImageNet TokenLearner experiment config, read from its .py as written
(tests/fixtures/scenic_configs), with a synthetic ImageNet-shaped dataset: 224x224x3 images, 1000 classes,
one-hot targets. Only the model width and depth are shrunk so that a few steps run in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tokenlearner_torch.training import ScenicTrainer, load_config
from tokenlearner_torch.training.optim import AddDecayedWeights, ScaleByAdam, ScaleByLearningRate

pytest.importorskip("ml_collections")

CONFIG = Path(__file__).parent / "fixtures" / "scenic_configs" / "im1k_token_learner_config.py"
IMAGENET_META = {"num_classes": 1000, "input_shape": (-1, 224, 224, 3), "input_dtype": "float32",
                 "target_is_onehot": True, "num_train_examples": 1281167}  # fmt: skip


def test_the_config_as_scenic_reads_it():
    config = load_config(f"{CONFIG}:runlocal")
    assert config["batch_size"] == 8 and load_config(CONFIG)["batch_size"] == 4096
    assert config["lr_configs"]["total_steps"] == 90 * (1281167 // 8)
    assert config["model"]["hidden_size"] == 768 and config["model"]["tokenizer"]["tokenlearner_loc"] == 9


def test_trainer_runs_the_im1k_config():
    config = load_config(f"{CONFIG}:runlocal")
    # Shrunk: width and depth only (B/16 would take minutes on a CPU); everything else as written.
    config["model"].update(hidden_size=32, mlp_dim=64, num_heads=2, num_layers=3)
    config["model"]["tokenizer"]["tokenlearner_loc"] = 1
    trainer = ScenicTrainer(config, IMAGENET_META)
    # 'adam' + weight_decay -> adamw, and without skip_scale_and_bias_regularization: no mask (Scenic quirk).
    kinds = [type(t) for t in trainer.optimizer.transforms]
    assert kinds == [ScaleByAdam, AddDecayedWeights, ScaleByLearningRate]
    rng = np.random.default_rng([42, 1])
    before = trainer.params()
    lrs, losses = [], []
    for step in range(3):
        labels = np.eye(1000, dtype=np.float32)[rng.integers(0, 1000, size=config["batch_size"])]
        batch = {"inputs": rng.normal(size=(config["batch_size"], 224, 224, 3)).astype(np.float32), "label": labels}
        logs = trainer.train_step(batch)
        lrs.append(logs["learning_rate"])
        losses.append(logs["loss"])
        assert logs["l2_grads"] <= 1.0 + 1e-6 < logs["grad_norm"]  # max_grad_norm = 1.0 clips
        if step == 0:  # warmup: lr 0 at step 0, so the parameters are unchanged (Scenic quirk)
            after0 = trainer.params()
            assert np.array_equal(after0["embedding"]["kernel"], before["embedding"]["kernel"])
    assert lrs == [0.0, pytest.approx(5e-3 / 10_000, rel=1e-6), pytest.approx(2 * 5e-3 / 10_000, rel=1e-6)]
    # init_head_bias=-10 makes the initial sigmoid loss small: ~ 10 (the true class) + 999 * softplus(-10).
    assert losses[0] == pytest.approx(10 + 999 * np.log1p(np.exp(-10.0)), rel=1e-3)
    after = trainer.params()
    assert not np.array_equal(after["embedding"]["bias"], before["embedding"]["bias"])
