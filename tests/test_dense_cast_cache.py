"""Dense under Scenic's bf16 policy keeps its parameter casts between no-grad calls, and only while they hold.

The cache is a speed measure (an eager bf16 inference call otherwise re-casts every weight); these tests pin
that it never changes a number: cached outputs are bitwise those of casting anew, and every way a parameter
changes (optimiser step, load_state_dict, .to(), direct in-place edits) is seen at the next call.
"""

from __future__ import annotations

import copy

import torch

import tokenlearner_torch as tl
from tokenlearner_torch import cpu_gemm, layers
from tokenlearner_torch.layers import Dense


def _dense() -> Dense:
    torch.manual_seed(0)
    d = Dense(24, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        d.bias.normal_()
    return d


def _fresh(d: Dense, x: torch.Tensor) -> torch.Tensor:
    """The uncached computation: cast the current parameters now."""
    return torch.nn.functional.linear(x.to(torch.bfloat16), d.weight.detach().to(torch.bfloat16),
                                      d.bias.detach().to(torch.bfloat16))


def test_cached_casts_are_bitwise_and_follow_every_change():
    d = _dense()
    x = torch.randn(3, 16)
    with torch.inference_mode():
        first = d(x)
    cached = d.__dict__["_cast_cache"]
    assert all(t.grad_fn is None and not t.requires_grad and not t.is_inference() for t in cached[1:])
    assert torch.equal(first, _fresh(d, x))
    with torch.no_grad():
        assert torch.equal(d(x), first)  # cached under plain no_grad too (not an inference tensor)

    opt = torch.optim.SGD(d.parameters(), lr=0.5)  # an optimiser step: in-place, bumps the version
    d(x).float().sum().backward()
    opt.step()
    with torch.inference_mode():
        after_step = d(x)
    assert not torch.equal(after_step, first) and torch.equal(after_step, _fresh(d, x))

    state = {k: torch.randn_like(v) for k, v in d.state_dict().items()}
    d.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(d(x), _fresh(d, x))
        d.bias.add_(1.0)  # a direct in-place edit
        assert torch.equal(d(x), _fresh(d, x))
    d.to(torch.float64).to(torch.float32)  # new storage: the cache is dropped
    assert "_cast_cache" not in d.__dict__
    with torch.no_grad():
        assert torch.equal(d(x), _fresh(d, x))
    twin = copy.deepcopy(d)
    with torch.no_grad():
        twin.weight.mul_(2.0)
        assert torch.equal(twin(x), _fresh(twin, x)) and torch.equal(d(x), _fresh(d, x))


def test_autograd_casts_every_call():
    """With autograd on, the cast stays in the graph: gradients reach the float32 parameters."""
    d = _dense()
    x = torch.randn(3, 16, requires_grad=True)
    d(x).float().sum().backward()
    assert "_cast_cache" not in d.__dict__
    assert d.weight.grad is not None and d.weight.grad.dtype == torch.float32 and x.grad is not None
    frozen = _dense().requires_grad_(False)  # frozen weights, input gradients (saliency): still no cache
    frozen(x).float().sum().backward()
    assert "_cast_cache" not in frozen.__dict__


def test_bf16_model_inference_unchanged_by_the_cache(monkeypatch):
    """A whole bf16 TokenLearner ViT: a second inference call (cached casts) equals the first bitwise."""
    # The float32 layers (embedding, TokenLearner, head) take oneDNN's GEMM in inference only; keep one kernel
    # on both sides so that the comparison isolates the cast cache.
    monkeypatch.setattr(cpu_gemm, "_ONEDNN_LINEAR", None)
    kwargs = dict(
        num_classes=10, mlp_dim=64, num_layers=2, num_heads=2, hidden_size=32, representation_size=None,
        classifier="gap", dropout_rate=0.0, attention_dropout_rate=0.0, dtype="bfloat16",
        tokenizer=dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1,
                       use_tokenfuse=False, use_v11=True),
    )
    torch.manual_seed(0)
    model = tl.from_scenic("TokenLearnerViT", kwargs, input_shapes=[(32, 32, 3)])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 32, 32, 3)
    with torch.enable_grad():
        reference = model(x).detach()  # autograd on: casts anew, no cache
    with torch.inference_mode():
        first, second = model(x), model(x)
    assert torch.equal(first, reference) and torch.equal(second, reference)
