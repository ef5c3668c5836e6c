"""The port against every genuine-Scenic golden: output, every stored intermediate, every gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.weights_convert import flax_to_torch, torch_to_flax
from tokenlearner_torch.weights_convert.mapping import flatten_tree

from goldens import CASES, Golden, is_structurally_zero, scaled_error

TOL = 1e-4  # float32: max |port - Scenic| / max(1, max |Scenic|)


def run_golden(g: Golden):
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"])
    model.load_state_dict(flax_to_torch(model, g.params), strict=True)
    xs = [torch.tensor(a, requires_grad=True) for a in g.inputs]
    out, inter = tl.capture_intermediates(model, *xs)
    (out.float() * torch.from_numpy(g.cotangent)).sum().backward()
    grads = flatten_tree(torch_to_flax(model, {k: p.grad for k, p in model.named_parameters()}))
    grads = {f"params/{k}": v for k, v in grads.items()}
    grads.update({f"input/{n}": x.grad.numpy() for n, x in zip(g.input_names, xs)})
    return model, out, inter, grads


@pytest.fixture(scope="module", params=CASES)
def result(request):
    g = Golden(request.param)
    return g, run_golden(g)


def test_output(result):
    g, (_, out, _, _) = result
    ref = g.outputs["out"]
    assert list(out.shape) == g.config["output"]["shape"]
    assert out.dtype == torch.float32
    assert scaled_error(out.detach().numpy(), ref) < TOL


def test_every_intermediate(result):
    g, (_, _, inter, _) = result
    stored = {k[len("inter/"):]: v for k, v in g.outputs.items() if k.startswith("inter/")}
    assert stored, "the golden stores intermediates"
    assert set(stored) <= set(inter), sorted(set(stored) - set(inter))
    for key, ref in stored.items():
        # torch keeps attention heads flat ([B, N, H*D] for Flax [B, N, H, D]): same C-order data.
        actual = inter[key].detach().float().numpy().reshape(ref.shape)
        assert scaled_error(actual, ref) < TOL, key


def test_every_gradient(result):
    g, (_, _, _, grads) = result
    assert set(grads) == set(g.grads)
    scale = max(1.0, max(float(np.abs(v).max()) for v in g.grads.values()))
    for key, ref in g.grads.items():
        if is_structurally_zero(key, g):
            # Both sides are rounding noise around an exact zero: compare on the case's gradient scale.
            assert np.abs(grads[key] - ref).max() < TOL * scale, key
        else:
            assert scaled_error(grads[key], ref) < TOL, key


def test_parameter_tree_is_scenics(result):
    g, (model, _, _, _) = result
    flat = flatten_tree(torch_to_flax(model))
    shapes = {f"params/{k}": list(v.shape) for k, v in flat.items()}
    assert shapes == g.config["param_shapes"]


@pytest.mark.parametrize("name", [c for c in CASES if (Golden(c).dir / "checkpoint").is_dir()])
def test_checkpoint_loads_like_params(name):
    """The Scenic training checkpoint (the vit_* cases have one) holds exactly the golden's parameters."""
    g = Golden(name)
    ckpt = g.dir / "checkpoint"
    from tokenlearner_torch.weights_convert.readers import read_checkpoint

    params = read_checkpoint(ckpt)
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"])
    model.load_state_dict(flax_to_torch(model, params), strict=True)
    with torch.no_grad():
        out = model(*[torch.from_numpy(a) for a in g.inputs])
    assert scaled_error(out.numpy(), g.outputs["out"]) < TOL
