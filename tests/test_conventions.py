"""timm / Hugging Face conventions on the ViT models: num_features, forward_features / forward_head,
reset_classifier, no_weight_decay (Scenic's mask), set_grad_checkpointing (bitwise gradients)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.weights_convert import flax_to_torch
from tokenlearner_torch.weights_convert.mapping import flatten_tree, leaf_table

from goldens import Golden

DROPOUT_VIT = dict(
    num_classes=10, mlp_dim=64, num_layers=3, num_heads=2, hidden_size=32, representation_size=16,
    classifier="gap", dropout_rate=0.1, attention_dropout_rate=0.1,
    tokenizer=dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1,
                   use_tokenfuse=True, use_v11=True),
)  # fmt: skip


def _golden_vit():
    g = Golden("vit_image_cls")
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"], input_shapes=[(32, 32, 3)])
    model.load_state_dict(flax_to_torch(model, g.params))
    return g, model, torch.from_numpy(g.inputs[0])


def test_features_and_head_compose_to_forward():
    g, model, x = _golden_vit()
    kwargs = g.config["constructor_kwargs"]
    assert model.num_features == kwargs["hidden_size"]
    assert model.head_hidden_size == kwargs["representation_size"]
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model.forward_head(feats), model(x), rtol=0, atol=0)
        pre = model.forward_head(feats, pre_logits=True)
    # forward_features is Scenic's encoder output; pre_logits is its Dense `pre_logits` followed by the tanh
    ref = g.outputs["inter/Transformer/encoder_norm"]
    assert feats.shape == (2, kwargs["tokenizer"]["num_tokens"], kwargs["hidden_size"]) == ref.shape
    np.testing.assert_allclose(feats.numpy(), ref, atol=1e-4)
    assert pre.shape == (2, kwargs["representation_size"])
    np.testing.assert_allclose(pre.numpy(), np.tanh(g.outputs["inter/pre_logits"]), atol=1e-4)


def test_reset_classifier_is_scenics_zero_head():
    _, model, x = _golden_vit()
    model.reset_classifier(7)
    assert model.num_classes == 7
    w, b = model.output_projection.weight, model.output_projection.bias
    assert w.shape == (7, model.head_hidden_size) and not w.any() and not b.any()
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x), pre_logits=True))
    assert "output_projection.weight" not in model.state_dict()


def test_no_weight_decay_is_scenics_mask():
    """Scenic's skip_scale_and_bias_regularization leaves Flax rank-1 leaves undecayed: read from the Flax tree."""
    g, model, _ = _golden_vit()
    flax = flatten_tree(g.params)
    expected = {leaf.torch_key for leaf in leaf_table(model) if np.ndim(flax[leaf.flax_path]) == 1}
    assert model.no_weight_decay() == expected
    names = model.no_weight_decay()
    assert "Transformer.encoder_norm.weight" in names and "Transformer.encoderblock_0.MlpBlock_0.Dense_0.bias" in names
    # Scenic quirk: query/key/value biases are [heads, head_dim] in Flax, so they are decayed
    assert "Transformer.encoderblock_0.MultiHeadDotProductAttention_0.query.bias" not in names
    assert "Transformer.encoderblock_0.MultiHeadDotProductAttention_0.out.bias" in names
    assert "Transformer.posembed_input.pos_embedding" not in names


def _grads(model, x, seed):
    torch.manual_seed(seed)  # the same dropout draws with and without checkpointing
    model.zero_grad()
    model(x).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("cls", ["TokenLearnerViT", "TokenLearnerViTRepresentation"])
def test_grad_checkpointing_gives_bitwise_equal_gradients(cls):
    kwargs = dict(DROPOUT_VIT)
    if cls != "TokenLearnerViT":
        for k in ("num_classes", "representation_size", "classifier"):
            kwargs.pop(k)
        kwargs["target_channel_dim"] = 32
    torch.manual_seed(0)
    model = tl.from_scenic(cls, kwargs, input_shapes=[(32, 32, 3)]).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 32, 32, 3)
    plain = _grads(model, x, 1)
    model.set_grad_checkpointing()
    assert model.Transformer.grad_checkpointing
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.manual_seed(1)
        model(x).square().sum()
    checkpointed = _grads(model, x, 1)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=0, atol=0, msg=name)
    model.set_grad_checkpointing(False)
    n_saved_ckpt = len(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        model(x).square().sum()
    assert n_saved_ckpt < len(saved)  # the blocks' activations are not kept
