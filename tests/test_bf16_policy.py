"""The bf16 policy (``dtype=bfloat16``) inspected module by module with forward hooks.

Expected policy, from Scenic's code (scenic/projects/token_learner/model.py and scenic/projects/baselines/
vit.py): TokenLearnerViT hands ``dtype`` only to EncoderMod / EncoderModFuser, which hand it only to
``vit.Encoder1DBlock``; Encoder1DBlock passes it to its two ``nn.LayerNorm(dtype=...)``, its
``MultiHeadDotProductAttention(dtype=...)`` and its ``MlpBlock(dtype=...)``. Nothing else gets a dtype: the
patch embedding, AddPositionEmbs, TokenLearnerModuleV11 / TokenFuser, ``encoder_norm``, ``pre_logits`` and
``output_projection`` compute in float32, and the block's residual additions (bf16 branch + float32 input)
promote back to float32, so every block returns float32 and so does the model. Parameters stay float32.
"""

from __future__ import annotations

import pytest
import torch

import tokenlearner_torch as tl

BF16_INSIDE_BLOCK = ("LayerNorm_0", "LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0")


@pytest.mark.parametrize("use_tokenfuse", [False, True], ids=["learner", "fuser"])
def test_bf16_policy_per_module(use_tokenfuse):
    kwargs = dict(num_classes=5, mlp_dim=32, num_layers=2, num_heads=2, hidden_size=16, representation_size=8,
                  classifier="gap", dropout_rate=0.0, attention_dropout_rate=0.0, dtype="bfloat16",
                  tokenizer={"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 4, "tokenlearner_loc": 1,
                             "use_tokenfuse": use_tokenfuse})  # fmt: skip
    torch.manual_seed(0)
    model = tl.from_scenic("TokenLearnerViT", kwargs, input_shapes=[(16, 16, 3)])
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    seen: dict[str, torch.dtype] = {}
    def record(name):
        def hook(module, args, out):  # returns None: the output is left unchanged
            seen.setdefault(name, out.dtype)

        return hook

    hooks = [m.register_forward_hook(record(name)) for name, m in model.named_modules() if name]
    with torch.no_grad():
        out = model(torch.randn(2, 16, 16, 3))
    for h in hooks:
        h.remove()
    assert out.dtype == torch.float32
    blocks = [n for n in seen if n.rsplit(".", 1)[-1].startswith("encoderblock_")]
    assert len(blocks) == 2
    for name, dtype in seen.items():
        parts = name.split(".")
        inside = next((i for i, p in enumerate(parts) if p.startswith("encoderblock_")), None)
        if inside is not None and inside + 1 < len(parts) and parts[inside + 1] in BF16_INSIDE_BLOCK:
            if parts[-1] in ("Dropout_0", "Dropout_1", "StochasticDepth_0", "StochasticDepth_1"):
                continue
            assert dtype == torch.bfloat16, f"{name} computes in {dtype}, Scenic: bfloat16"
        elif inside is not None and inside + 1 < len(parts):
            continue  # the block's dropout / stochastic depth: identity here, dtype of their input
        else:
            assert dtype == torch.float32, f"{name} computes in {dtype}, Scenic: float32"
    expected_f32 = {"embedding", "Transformer.posembed_input", "Transformer.encoder_norm", "pre_logits",
                    "output_projection", "Transformer.encoderblock_0", "Transformer.encoderblock_1"}
    assert expected_f32 <= set(seen), sorted(seen)
    learners = [n for n in seen if "TokenLearnerModule" in n.rsplit(".", 1)[-1] or "TokenFuser" in n.rsplit(".", 1)[-1]]
    assert learners and all(seen[n] == torch.float32 for n in learners)
