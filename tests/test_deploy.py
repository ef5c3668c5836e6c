"""Export and deployment, each checked against eager mode on inputs that include large-mean ones (x + 50).

torch.export with a dynamic batch (1..256), ONNX through the dynamo exporter run by onnxruntime, jit.trace,
torch.fx.symbolic_trace, float16 / bfloat16 models, and a folder converted with ``--dtype bfloat16``. Models:
TokenLearnerModuleV11, TokenLearnerModule (v1), TokenFuser, TokenLearnerViT (dynamic tokenizer with and
without TokenFuser) and the video 3d_conv ViT, in the golden cases' tiny configurations, built from their
input shapes (no warm-up forward) and with every parameter perturbed (no zero-initialised head left).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

import tokenlearner_torch as tl

from goldens import Golden, scaled_error


@dataclass(frozen=True)
class Case:
    name: str
    golden: str  # the golden case whose config and input shapes it takes
    fuser: bool | None = None  # TokenLearnerViT: override tokenizer.use_tokenfuse

    def build(self, seed: int = 0) -> torch.nn.Module:
        g = Golden(self.golden)
        kwargs = dict(g.config["constructor_kwargs"])
        if self.fuser is not None:
            kwargs["tokenizer"] = {**kwargs["tokenizer"], "use_tokenfuse": self.fuser}
        torch.manual_seed(seed)
        model = tl.from_scenic(g.config["scenic_class"], kwargs, input_shapes=self.shapes)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return model.eval()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [tuple(x.shape[1:]) for x in Golden(self.golden).inputs]

    def inputs(self, batch: int, seed: int = 0, shift: float = 0.0) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(seed)
        return tuple(torch.randn(batch, *s, generator=gen) + shift for s in self.shapes)


CASES = [
    Case("v11", "v11_tokens4d"),
    Case("v1", "v1_sum4d"),
    Case("fuser", "fuser_norm"),
    Case("vit_dynamic", "vit_image_cls", fuser=False),
    Case("vit_dynamic_fuser", "vit_image_cls", fuser=True),
    Case("vit_video_3d_conv", "vit_video_3dconv"),
]
IDS = [c.name for c in CASES]
# Inputs each check runs: N(0, 1) and the ill-conditioned N(50, 1), at the example batch and others.
SHIFTS = (0.0, 50.0)


def _eager(model: torch.nn.Module, xs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*xs)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    err = scaled_error(actual.detach().float().numpy(), expected.detach().float().numpy())
    assert err <= tol, f"{what}: scaled error {err:.3g} > {tol}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_torch_export_dynamic_batch(case):
    """One exported program serves every batch from 1 to 256 (no guard on the batch size)."""
    model = case.build()
    batch = torch.export.Dim("batch", min=1, max=256)
    dynamic = tuple({0: batch} for _ in case.shapes)
    program = torch.export.export(model, case.inputs(2), dynamic_shapes=dynamic)
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not [op for op in ops if "nextafter" in op or "item" in op]  # no XLA-order LayerNorm, no host sync
    exported = program.module()
    for b in (1, 16, 256):
        for shift in SHIFTS if b < 256 else (50.0,):
            xs = case.inputs(b, seed=b, shift=shift)
            with torch.no_grad():
                _assert_close(exported(*xs), _eager(model, xs), 1e-5, f"export batch {b} shift {shift}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_onnx_dynamo_export_runs_in_onnxruntime(case, tmp_path):
    pytest.importorskip("onnxscript", reason="the test extra: onnx, onnxscript, onnxruntime")
    ort = pytest.importorskip("onnxruntime", reason="the test extra: onnx, onnxscript, onnxruntime")
    model = case.build()
    batch = torch.export.Dim("batch", min=1, max=256)
    dynamic = tuple({0: batch} for _ in case.shapes)
    path = tmp_path / f"{case.name}.onnx"
    program = torch.onnx.export(model, case.inputs(2), dynamo=True, dynamic_shapes=dynamic, verbose=False)
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(case.shapes)
    for b in (1, 5):
        for shift in SHIFTS:
            xs = case.inputs(b, seed=10 + b, shift=shift)
            (out,) = session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
            _assert_close(torch.from_numpy(out), _eager(model, xs), 1e-4, f"onnxruntime batch {b} shift {shift}")


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the shape checks, constant for a fixed shape
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_jit_trace_equals_eager_across_inputs(case):
    """Traced once on N(0, 1), the graph computes eager mode's output on other values, x + 50 included
    (nothing data-dependent was baked in)."""
    model = case.build()
    with torch.no_grad():
        traced = torch.jit.trace(model, case.inputs(2), check_trace=False)
        for seed in (1, 2):
            for shift in SHIFTS:
                xs = case.inputs(2, seed=seed, shift=shift)
                _assert_close(traced(*xs), model(*xs), 1e-6, f"jit.trace seed {seed} shift {shift}")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_fx_symbolic_trace(case):
    """torch.fx.symbolic_trace (what timm's feature extraction uses) captures the whole model."""
    model = case.build()
    graph_module = torch.fx.symbolic_trace(model)
    assert isinstance(graph_module, torch.fx.GraphModule)
    calls = [n for n in graph_module.graph.nodes if n.op in ("call_module", "call_function", "call_method")]
    assert calls, "empty graph"
    with torch.no_grad():
        for b in (1, 4):
            for shift in SHIFTS:
                xs = case.inputs(b, seed=20 + b, shift=shift)
                _assert_close(graph_module(*xs), model(*xs), 1e-6, f"fx batch {b} shift {shift}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_model_in_half_precision(case, dtype):
    """``model.to(dtype)`` runs on inputs of that dtype, returns that dtype, and stays near float32."""
    model = case.build()
    half = case.build().to(dtype)
    assert {p.dtype for p in half.parameters()} == {dtype}
    for shift in SHIFTS:
        # float32 runs on the same rounded inputs: bf16 cannot hold 50 + N(0, 1) closer than 0.125, which
        # is information lost before the model starts
        xs = tuple(x.to(dtype) for x in case.inputs(2, seed=3, shift=shift))
        out = _eager(half, xs)
        assert out.dtype == dtype and torch.isfinite(out).all()
        # 8 (bf16) / 11 (fp16) mantissa bits through every layer
        _assert_close(out, _eager(model, tuple(x.float() for x in xs)), 5e-2 if dtype == torch.bfloat16 else 1e-2, f"{dtype} shift {shift}")


def test_bfloat16_converted_folder_runs(tmp_path, capsys):
    """``tokenlearner-convert --dtype bfloat16`` then ``load_pretrained``: a bf16 model that runs and matches
    the genuine-Scenic output to bf16 precision."""
    from tokenlearner_torch.weights_convert.cli import main

    g = Golden("vit_video_3dconv")
    out = tmp_path / "bf16"
    assert main([str(g.dir / "checkpoint"), "-o", str(out), "--config", str(g.dir / "config.json"), "--dtype", "bfloat16", "-q"]) == 0
    model = tl.load_pretrained(out)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = torch.from_numpy(g.inputs[0]).to(torch.bfloat16)
    with torch.no_grad():
        y = model(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    err = scaled_error(y.float().numpy(), g.outputs["out"])
    assert err < 5e-2, err
    assert np.abs(g.outputs["out"]).max() > 0.1  # the comparison is not against a near-zero output
