"""Dropout placement (train mode) against the Flax reference with the SAME masks.

Both sides' dropout layers are replaced by one deterministic mask function of the tensor's shape (every
7th element, in C order, dropped; the others scaled by 1 / (1 - rate)), injected by monkeypatching the
port's ``layers.Dropout.forward`` and Flax's ``nn.Dropout.__call__``. With identical masks at identical
sites the train-mode outputs agree to float32 noise; a site moved (the mask applied to another tensor, of
another shape or value) or removed changes the output by orders of magnitude more. Sites covered: after
the position embedding, after attention, both of every MlpBlock (encoder blocks, TokenLearner V1.1's and
TokenFuser's token masking), after the TokenFuser. Attention-weight dropout runs inside
``F.scaled_dot_product_attention`` / Flax's attention and is not covered here (its rate is 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch import layers
from tokenlearner_torch.weights_convert import torch_to_flax

jax = pytest.importorskip("jax")
nn = pytest.importorskip("flax.linen")
fr = pytest.importorskip("tokenlearner_torch.parity.flax_reference")

RATE = 0.25


def _keep(shape: tuple[int, ...]) -> np.ndarray:
    """The deterministic mask: element i (C order) dropped iff i % 7 == 3; float32 keep mask."""
    n = int(np.prod(shape))
    return (np.arange(n) % 7 != 3).astype(np.float32).reshape(shape)


def _port_forward(self, x):
    if not self.training or self.p == 0.0:
        return x
    return x * torch.from_numpy(_keep(tuple(x.shape))).to(x.dtype) / (1.0 - self.p)


def _flax_call(self, inputs, deterministic=None, rng=None):
    deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
        return inputs
    return inputs * _keep(tuple(inputs.shape)) / (1.0 - self.rate)


@pytest.mark.parametrize("use_tokenfuse", [False, True], ids=["learner", "fuser"])
def test_dropout_sites_match_flax_with_the_same_masks(monkeypatch, use_tokenfuse):
    kwargs = dict(num_classes=5, mlp_dim=32, num_layers=2, num_heads=2, hidden_size=16, representation_size=None,
                  classifier="gap", dropout_rate=RATE, attention_dropout_rate=0.0,
                  tokenizer={"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 4, "tokenlearner_loc": 1,
                             "use_tokenfuse": use_tokenfuse})  # fmt: skip
    torch.manual_seed(0)
    model = tl.from_scenic("TokenLearnerViT", kwargs, input_shapes=[(16, 16, 3)])
    with torch.no_grad():  # nonzero everywhere (Scenic zero-inits the head and the fuser's projections)
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype(np.float32)
    params = torch_to_flax(model)
    flax_model = fr.build_flax_module("TokenLearnerViT", kwargs)

    monkeypatch.setattr(layers.Dropout, "forward", _port_forward)
    monkeypatch.setattr(nn.Dropout, "__call__", _flax_call)
    with torch.no_grad():
        port_train = model.train()(torch.from_numpy(x)).numpy()
        port_eval = model.eval()(torch.from_numpy(x)).numpy()
    ref_train, _ = fr.apply_reference(flax_model, params, [x], {"train": True}, capture_intermediates=False, jit=False)
    ref_eval, _ = fr.apply_reference(flax_model, params, [x], {"train": False}, capture_intermediates=False, jit=False)
    scale = max(1.0, np.abs(ref_train).max())
    # the premise: the masks change the output far beyond float32 noise, so a moved or missing site shows
    assert np.abs(ref_train - ref_eval).max() > 1e-2 * scale
    assert np.abs(port_eval - ref_eval).max() <= 1e-5 * max(1.0, np.abs(ref_eval).max())
    assert np.abs(port_train - ref_train).max() <= 1e-5 * scale
