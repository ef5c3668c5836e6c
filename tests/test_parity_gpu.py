"""GPU parity: live on CUDA in f32 / tf32 / bf16 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

CONFIG = {
    "scenic_class": "TokenLearnerViT",
    "constructor_kwargs": {
        "num_classes": 5, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "hidden_size": 32,
        "representation_size": None, "classifier": "gap",
        "tokenizer": {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 4, "tokenlearner_loc": 1,
                      "use_tokenfuse": True, "use_v11": True},
        "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
    },
    "inputs": [{"name": "x", "shape": [2, 16, 16, 3]}],
}


@pytest.mark.parametrize("mode", ["f32", "tf32", "bf16"])
def test_live_on_cuda(mode):
    pytest.importorskip("jax")
    from tokenlearner_torch.parity import api

    report = api.live(CONFIG, mode=mode, device="cuda")
    assert report.passed, report.to_text()
    assert report.device == "cuda"


def test_check_golden_on_cuda():
    from pathlib import Path

    from tokenlearner_torch.parity import api

    golden = Path(__file__).parent / "fixtures" / "goldens" / "vit_image_cls"
    report = api.check_case(golden, device="cuda")
    assert report.passed, report.to_text()
    report = api.check_case(golden, device="cuda", mode="tf32")
    assert report.passed, report.to_text()
