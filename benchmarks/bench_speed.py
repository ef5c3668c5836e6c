"""Speed and memory of the port against the Flax reference (Scenic's computation) under ``jax.jit``.

One command::

    python benchmarks/bench_speed.py --write    # full run (inference and training rows, compile, memory)
                                                # -> benchmarks/results/cpu.md (without --write: a temp folder)
    python benchmarks/bench_speed.py --rows train --only "B/16 TokenLearner"   # the CPU training rows
    python benchmarks/bench_speed.py --quick    # smoke test: a tiny TokenLearner ViT, one round (~1 min), temp folder
    python benchmarks/bench_speed.py --device cuda --write   # the same on the first GPU -> benchmarks/results/gpu.md

Training rows (``--rows train``): forward + backward of softmax cross-entropy against Scenic's
``jax.jit(jax.value_and_grad(loss))`` and a full AdamW step against ``optax.adamw`` in one jitted step, with
every gradient and the optimiser step checked in the run; see ``train_rows.py``. Every compiled column
(inference and training, and the CUDA-graph column on cuda) is built from its one-line recipe in
``recipes.py`` and the recipes are printed under the table.

For every workload: the port is built with ``from_scenic``; Flax parameters are initialised by the reference
module (genuine Scenic when importable, else ``parity/flax_reference.py``), every all-zero leaf (biases, the
zero-initialised ``output_projection`` kernel...) is replaced by N(0, 0.02) noise so the output check is not
trivial, and the same tree goes through ``flax_to_torch``. Outputs are checked equal (max |port - Flax|,
scaled like the goldens: / max(1, max|Flax|)). Then, interleaved round by round (so background load hits every
column alike), one call each of: port eager (``torch.inference_mode``), port ``torch.compile(fullgraph=True,
dynamic=False)`` (on CPU with ``options={"freezing": True}``), ``jax.jit(module.apply)`` under ``jax_default_matmul_precision='highest'``, and a
2048x2048x2048 float32 torch matmul (the peak matmul rate of this machine in this run). Medians are reported.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on the port (matmuls, convolutions,
attention; 2 FLOPs per multiply-add). "share of floor" = (FLOPs / peak matmul rate) / measured time.

Peak memory: each (workload, implementation) runs in a fresh subprocess that builds the model, loads weights,
makes the input, (for Flax: compiles), then resets the kernel's peak-RSS counter (``echo 5 >
/proc/self/clear_refs``), runs one forward and reads ``VmHWM``. "activation MiB" = peak RSS during the
forward - RSS just before it: what inference needs beyond weights and input (Linux only).

Third-party PyTorch TokenLearners (``tokenlearner-pytorch``, ``robotic-transformer-pytorch``) are timed on the
module workloads when importable. They compute something different from Scenic (see
/work/shared/research/ports.md, rows R3 and R4), so no equality check applies and they are marked so.

``--device cuda``: the port, its inputs and the Flax side (jax's GPU backend, params and inputs committed to
``jax.devices('gpu')[0]``) run on the GPU; every timed call is bracketed by ``torch.cuda.synchronize()``; ViT
batches 8 and 64, 20 repeats after 3 warm-up rounds; the matmul floor is 8192³. Each row runs at one of two
precision settings (``--precision``): 'highest' (torch TF32 off for cuBLAS and cuDNN,
``jax_default_matmul_precision='highest'``: full float32 on both sides) and 'tf32' (TF32 on, 'tensorfloat32'),
pinned through ``parity.modes`` (modes 'f32' and 'tf32'). Memory: the CUDA caching allocator's peak (port) and
jax's device ``memory_stats()`` (Flax) instead of RSS, in fresh subprocesses with
``XLA_PYTHON_CLIENT_PREALLOCATE=false`` (jax would otherwise take 75% of the GPU at its first use).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # parity/ (the Flax reference) lives at the repository root

import tokenlearner_torch as tl  # noqa: E402
from tokenlearner_torch.weights_convert import flax_to_torch  # noqa: E402
from parity.modes import MODES, precision as pinned_precision  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))  # the helpers next to this file, when it runs as a script
import train_rows  # noqa: E402
from recipes import recipe  # noqa: E402

MATMUL_N = 2048
# On a GPU a 2048³ matmul takes well under a millisecond, so launch overhead and clock ramp-up would set the
# "peak"; 8192³ (1.1 TFLOP) runs long enough to reach it.
MATMUL_N_CUDA = 8192
# --precision name -> parity.modes mode: 'f32' pins TF32 off in torch (cuBLAS, cuDNN) and jax 'highest';
# 'tf32' pins TF32 on and jax 'tensorfloat32'.
# 'bf16': Scenic's dtype='bfloat16' policy on both sides (the encoder blocks compute in bfloat16, parameters,
# embedding, TokenLearner and head stay float32), matmuls otherwise 'highest'; ViT workloads only.
PRECISIONS = {"highest": "f32", "tf32": "tf32", "bf16": "bf16"}
WARMUP_CUDA = 3  # first GPU calls load kernels, pick cuBLAS algorithms and grow allocator pools


# --------------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------------
def _vit_kwargs(tokenizer_type: str) -> dict:
    """Scenic's ImageNet TokenLearner config (configs/im1k_token_learner_config.py), B/16, inference."""
    return dict(
        num_classes=1000,
        mlp_dim=3072,
        num_layers=12,
        num_heads=12,
        hidden_size=768,
        representation_size=None,
        classifier="gap",
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        tokenizer=dict(
            type=tokenizer_type,
            patches=dict(size=[16, 16]),
            num_tokens=16,
            tokenlearner_loc=9,
            use_tokenfuse=False,
            use_v11=True,
        ),
    )


WORKLOADS: dict[str, dict[str, Any]] = {
    "B/16 TokenLearner (16 tok @9, V1.1)": dict(
        cls="TokenLearnerViT", kwargs=_vit_kwargs("dynamic"), inputs=lambda b: [(b, 224, 224, 3)],
        call={"train": False}, main=True,
    ),
    "B/16 ViT (patch, no TokenLearner)": dict(
        cls="TokenLearnerViT", kwargs=_vit_kwargs("patch"), inputs=lambda b: [(b, 224, 224, 3)],
        call={"train": False},
    ),
    "TokenLearnerModuleV11(8) [B,32,32,128]": dict(
        cls="TokenLearnerModuleV11", kwargs=dict(num_tokens=8), inputs=lambda b: [(b, 32, 32, 128)],
        call={"deterministic": True}, third_party="v11",
    ),
    "TokenFuser [B,8,768] + [B,196,768]": dict(
        cls="TokenFuser", kwargs=dict(), inputs=lambda b: [(b, 8, 768), (b, 196, 768)],
        call={"deterministic": True}, third_party="fuser",
    ),
    "TokenLearnerModule v1(8) [B,14,14,768]": dict(
        cls="TokenLearnerModule", kwargs=dict(num_tokens=8), inputs=lambda b: [(b, 14, 14, 768)],
        call={}, third_party="v1",
    ),
}


# --quick: the smoke test's workload, a tiny TokenLearnerViT with B/16's structure (seconds, not minutes).
QUICK_WORKLOADS: dict[str, dict[str, Any]] = {
    "tiny TokenLearner ViT (smoke test)": dict(
        cls="TokenLearnerViT",
        kwargs=dict(
            num_classes=10, mlp_dim=64, num_layers=2, num_heads=2, hidden_size=32, representation_size=None,
            classifier="gap", dropout_rate=0.0, attention_dropout_rate=0.0,
            tokenizer=dict(type="dynamic", patches=dict(size=[8, 8]), num_tokens=4, tokenlearner_loc=1,
                           use_tokenfuse=False, use_v11=True),
        ),
        inputs=lambda b: [(b, 32, 32, 3)], call={"train": False}, main=True,
    ),
}


def with_precision(spec: dict, prec: str) -> Optional[dict]:
    """The workload under ``prec``: 'bf16' sets Scenic's ``dtype='bfloat16'`` (ViTs only: None otherwise)."""
    if prec != "bf16":
        return spec
    if spec["cls"] != "TokenLearnerViT":
        return None
    return {**spec, "kwargs": {**spec["kwargs"], "dtype": "bfloat16"}}


def _inputs(spec: dict, batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randn(*shape).astype(np.float32) for shape in spec["inputs"](batch)]


# --------------------------------------------------------------------------------------------------------
# Flax side
# --------------------------------------------------------------------------------------------------------
# Params by workload config. They depend on nothing else (batch-1 input, fixed seeds), and B/16's op-by-op
# init takes 10-20 s, which every row (batch x precision) would otherwise repeat.
_PARAMS: dict[str, Any] = {}


def _flax(spec: dict, xs: list[np.ndarray]):
    """(flax module, randomised params, jitted apply) for one workload."""
    import jax
    import jax.numpy as jnp
    from parity.flax_reference import build_reference_module, genuine_scenic_available

    module = build_reference_module(spec["cls"], spec["kwargs"])
    call = dict(spec["call"])
    # The dtype policy changes the computation, not the parameters (float32 either way): one tree for both.
    kwargs = {k: v for k, v in spec["kwargs"].items() if k != "dtype"}
    key = json.dumps([spec["cls"], kwargs, call], sort_keys=True)
    if key not in _PARAMS:
        # Initialised on the CPU backend (the only one on a CPU machine): the params go to numpy right away,
        # and on a GPU run init's buffers then stay out of the device's peak-memory counter (_cuda_memory).
        with jax.default_matmul_precision("highest"), jax.default_device(jax.devices("cpu")[0]):
            small = [jnp.asarray(x[:1]) for x in xs]
            params = module.init(jax.random.PRNGKey(0), *small, **call)["params"]
        params = jax.tree_util.tree_map(np.asarray, params)
        rng = np.random.RandomState(1)
        # Zero-initialised leaves would make the output check trivial (e.g. a zero output_projection).
        _PARAMS[key] = jax.tree_util.tree_map(
            lambda a: (rng.normal(0, 0.02, a.shape).astype(a.dtype) if not np.any(a) else a), params
        )
    params = _PARAMS[key]
    jitted = jax.jit(lambda p, *x: module.apply({"params": p}, *x, **call))
    return module, params, jitted, ("genuine Scenic" if genuine_scenic_available() else "parity/flax_reference.py")


def _jax_inputs(params, xs: list[np.ndarray], cuda: bool):
    """(params, inputs) for the jitted apply. On cuda both are committed to jax's first GPU once (numpy params
    would be copied host to device on every call); on cpu they are passed as the CPU benchmark always did."""
    import jax

    if not cuda:
        return params, [jax.numpy.asarray(x) for x in xs]
    gpu = jax.devices("gpu")[0]
    return jax.device_put(params, gpu), [jax.device_put(x, gpu) for x in xs]


def _jax_call(jitted, params, xs_j, matmul_precision: str = "highest") -> Callable[[], Any]:
    import jax

    def run():
        with jax.default_matmul_precision(matmul_precision):
            return jitted(params, *xs_j).block_until_ready()

    return run


def _precision(device: str, prec: str, use_jax: bool = True):
    """Context pinning ``prec`` on both sides. cuda: parity.modes sets the torch TF32 switches and
    jax_default_matmul_precision (restored on exit). cpu: nothing to pin (no TF32 on CPU, and XLA CPU computes
    float32 dots in float32 at any setting), so the CPU run stays exactly what it was."""
    if device != "cuda":
        return contextlib.nullcontext({})
    return pinned_precision(PRECISIONS[prec], use_jax=use_jax)


# --------------------------------------------------------------------------------------------------------
# Third-party packages (not Scenic's computation)
# --------------------------------------------------------------------------------------------------------
def _stub_cfg_module() -> None:
    """robotic-transformer-pytorch imports classifier_free_guidance_pytorch (text conditioning for RT-1, which
    pulls transformers/open_clip/environs). Its TokenLearner does not use it; a stub makes the import work."""
    if "classifier_free_guidance_pytorch" in sys.modules:
        return
    try:
        import classifier_free_guidance_pytorch  # noqa: F401

        return
    except Exception:
        pass
    stub = types.ModuleType("classifier_free_guidance_pytorch")
    stub.TextConditioner = stub.AttentionTextConditioner = object
    stub.classifier_free_guidance = lambda fn: fn
    sys.modules["classifier_free_guidance_pytorch"] = stub


def third_party(kind: str, xs: list[torch.Tensor]) -> list[tuple[str, Any]]:
    """[(label, callable or error string)] for the third-party modules that have a counterpart of ``kind``."""
    out: list[tuple[str, Any]] = []
    dev = xs[0].device
    try:
        import tokenlearner_pytorch as tp
    except Exception as e:  # not installed
        tp = f"not installed ({type(e).__name__})"
    try:
        _stub_cfg_module()
        import robotic_transformer_pytorch as rt
    except Exception as e:
        rt = f"not importable ({type(e).__name__}: {e})"[:80]
    if kind == "v1":
        # tokenlearner-pytorch's TokenLearner(S) is its v1 (per-token CBAM-style spatial attention), [B,H,W,C].
        if isinstance(tp, str):
            out.append(("tokenlearner-pytorch TokenLearner", tp))
        else:
            m = tp.TokenLearner(8).eval()
            for t in m.tokenizers:  # a plain list, not a ModuleList: eval() and to() do not reach them
                t.eval().to(dev)
            out.append(("tokenlearner-pytorch TokenLearner(8)", lambda: m(xs[0])))
    elif kind == "v11":
        # robotic-transformer-pytorch's TokenLearner is its "1.1" (grouped per-token MLP), channels-first.
        if isinstance(rt, str):
            out.append(("robotic-transformer-pytorch TokenLearner", rt))
        else:
            c = xs[0].shape[-1]
            m = rt.TokenLearner(dim=c, num_output_tokens=8).eval().to(dev)
            xcf = xs[0].permute(0, 3, 1, 2).contiguous()
            out.append(("robotic-transformer-pytorch TokenLearner(dim=128, 8)", lambda: m(xcf)))
    elif kind == "fuser":
        if isinstance(tp, str):
            out.append(("tokenlearner-pytorch TokenFuser", tp))
        else:
            b, s, c = xs[0].shape
            n = xs[1].shape[1]
            h = int(round(n**0.5))
            m = tp.TokenFuser(h, h, c, s).eval().to(dev)
            orig = xs[1].reshape(b, h, h, c)
            out.append(("tokenlearner-pytorch TokenFuser(14,14,768,8)", lambda: m(xs[0], orig)))
    return out


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------
def _port(spec: dict, params: Optional[dict]) -> torch.nn.Module:
    # Built with its input shapes: every parameter exists before the first call (compile, optimisers).
    model = tl.from_scenic(spec["cls"], spec["kwargs"], input_shapes=[s[1:] for s in spec["inputs"](1)])
    if params is not None:
        model.load_state_dict(flax_to_torch(model, params), strict=True)
    return model.eval()


def count_flops(model: torch.nn.Module, xs: list[torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*xs)
    return int(counter.get_total_flops())


def _timed(fn: Callable[[], Any], sync: Optional[Callable[[], None]] = None) -> float:
    if sync is not None:
        sync()  # start from an idle GPU: work queued earlier must not land in this call's time
    t = time.perf_counter()
    fn()
    if sync is not None:
        sync()  # CUDA calls return once launched; the time is to the end of the GPU work
    return time.perf_counter() - t


def _scaled_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


def memory_child(workload: str, impl: str, batch: int, device: str = "cpu", prec: str = "highest",
                 kind: str = "infer") -> dict:
    """Runs in a fresh process: activation memory of one forward, or of one training forward + backward
    (``kind='train'``, see train_rows.py); see the module docstring."""
    spec = with_precision({**WORKLOADS, **QUICK_WORKLOADS}[workload], prec)
    if kind == "train":
        with _precision(device, prec, use_jax=impl == "flax"):
            return train_rows.train_memory_child(spec, impl, batch, device, prec, ENV)
    xs = _inputs(spec, batch)
    if device == "cuda":
        with _precision(device, prec, use_jax=impl == "flax"):
            return _cuda_memory(spec, impl, xs, prec)

    def status(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    if impl == "port":
        model = _port(spec, None)
        xt = [torch.from_numpy(x) for x in xs]
        with torch.inference_mode():
            model(*[x[:1] for x in xt])  # materialise lazy parameters on a batch-1 input
        run = lambda: model(*xt)  # noqa: E731
    else:
        import jax

        module, params, jitted, _ = _flax(spec, xs)
        xs_j = [jax.numpy.asarray(x) for x in xs]
        with jax.default_matmul_precision("highest"):
            compiled = jitted.lower(params, *xs_j).compile()
        params = jax.device_put(params)
        run = lambda: compiled(params, *xs_j).block_until_ready()  # noqa: E731
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (peak RSS) to the current RSS
    before = status("VmRSS")
    with torch.inference_mode():
        run()
    peak = status("VmHWM")
    return {"before_mib": before / 2**20, "activation_mib": (peak - before) / 2**20}


def _cuda_memory(spec: dict, impl: str, xs: list[np.ndarray], prec: str) -> dict:
    """memory_child on the GPU: allocator statistics instead of RSS (RSS does not see device memory). Measured
    like the CPU path: the first call at this batch after setup, peak during it minus what was in use before."""
    mib = 2**20
    if impl == "port":
        model = _port(spec, None)
        with torch.inference_mode():
            model(*[torch.from_numpy(x[:1]) for x in xs])  # materialise lazy parameters on a batch-1 input
        model.to("cuda")
        xt = [torch.from_numpy(x).cuda() for x in xs]
        with torch.inference_mode():
            model(*[x[:1] for x in xt])  # creates the cuBLAS/cuDNN handles and workspaces: kept, not activations
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.inference_mode():
            model(*xt)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return {"before_mib": before / mib, "activation_mib": (peak - before) / mib}
    import jax

    module, params, jitted, _ = _flax(spec, xs)
    params, xs_j = _jax_inputs(params, xs, cuda=True)
    with jax.default_matmul_precision(MODES[PRECISIONS[prec]].jax_matmul_precision):
        compiled = jitted.lower(params, *xs_j).compile()
    gpu = jax.devices("gpu")[0]
    stats = gpu.memory_stats()
    if not stats or "peak_bytes_in_use" not in stats or "bytes_in_use" not in stats:
        return {"activation_mib": None, "note": "jax memory_stats() has no peak_bytes_in_use here"}
    before, peak_before = stats["bytes_in_use"], stats["peak_bytes_in_use"]
    compiled(params, *xs_j).block_until_ready()
    peak = gpu.memory_stats()["peak_bytes_in_use"]
    if peak > peak_before:
        return {"before_mib": before / mib, "activation_mib": (peak - before) / mib}
    # jax cannot reset its peak counter: a call that stays below an earlier peak of the process (compile-time
    # autotuning buffers) only bounds its own peak from above.
    return {"before_mib": before / mib, "activation_mib": (peak_before - before) / mib, "upper_bound": True}


def measure_memory(workload: str, impl: str, batch: int, device: str = "cpu", prec: str = "highest",
                   kind: str = "infer"):
    """Activation MiB from a fresh subprocess: a float, a string "≤ N" (an upper bound) or None."""
    cuda = device == "cuda"
    if not cuda and not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, __file__, "--memory-child", workload, impl, str(batch), "--memory-kind", kind,
           "--device", device, "--precision", prec]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if cuda:
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # else jax takes 75% of the GPU at its first use
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            out = json.loads(line)
            v = out["activation_mib"]
            if v is None:
                print(f"  memory for {workload} {impl}: {out.get('note')}", file=sys.stderr)
            return f"≤ {v:.0f}" if out.get("upper_bound") else v
    print(f"  memory child failed for {workload} {impl}: {res.stderr[-500:]}", file=sys.stderr)
    return None


# bench_speed's helpers as train_rows.py uses them (it cannot import this file when it runs as a script).
ENV = types.SimpleNamespace(
    flax=lambda spec, xs: _flax(spec, xs), port=lambda spec, params: _port(spec, params), inputs=_inputs,
    jax_inputs=lambda params, xs, cuda: _jax_inputs(params, xs, cuda), timed=_timed,
    mode=lambda prec: MODES[PRECISIONS[prec]],
)


def bench_one(name: str, spec: dict, batch: int, repeats: int, compile_: bool, log,
              device: str = "cpu", prec: str = "highest", columns: tuple[str, ...] = ("compiled", "cudagraphs"),
              backend: Optional[str] = None, warmup: Optional[int] = None) -> dict:
    """One inference row. On cuda, run it inside ``_precision(device, prec)``. ``backend`` replaces inductor
    in the compiled columns (the smoke test's aot_eager); ``warmup``: rounds before timing (default 1, cuda 3)."""
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else None
    xs = _inputs(spec, batch)
    module, params, jitted, ref_name = _flax(spec, xs)
    model = _port(spec, params).to(device)
    xt = [torch.from_numpy(x).to(device) for x in xs]
    params_j, xs_j = _jax_inputs(params, xs, cuda)
    jax_run = _jax_call(jitted, params_j, xs_j, MODES[PRECISIONS[prec]].jax_matmul_precision)
    ref = np.asarray(jax_run())
    with torch.inference_mode():
        eager_out = model(*xt).cpu().numpy()
    row: dict[str, Any] = dict(workload=name, batch=batch, reference=ref_name, precision=prec)
    row["err_eager"] = _scaled_err(eager_out, ref)
    row["flops"] = count_flops(model, xt)
    fns: dict[str, Callable[[], Any]] = {}

    def eager():
        with torch.inference_mode():
            return model(*xt)

    fns["eager"] = eager
    # The compiled columns, each built by its one-line recipe (recipes.py): "compiled" everywhere, "cudagraphs"
    # (mode="reduce-overhead") on cuda. CPU inference uses inductor's freezing (parameters become constants);
    # the Dense GEMMs are oneDNN calls of tokenlearner::linear either way (tokenlearner_torch.cpu_gemm).
    # A fresh dynamo cache per row: every row recompiles anyway (new model, batch or precision), and a GPU
    # run's 8+ compiles of one forward would otherwise reach dynamo's recompile limit and run eager. Once per
    # row, not per column: a reset between columns would make the first column compile again when timed.
    torch._dynamo.reset()
    for col in columns if compile_ else ():
        rec = recipe(device, "infer", col)
        if rec is None:
            continue
        t0 = time.perf_counter()
        compiled = rec.apply(model, backend=backend)
        graphs = col == "cudagraphs"
        try:
            with torch.inference_mode():
                if graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                comp_out = compiled(*xt).cpu().numpy()
            row[f"compile_s_{col}"] = time.perf_counter() - t0
            row[f"err_{col}"] = _scaled_err(comp_out, ref)

            def comp(compiled=compiled, graphs=graphs):
                with torch.inference_mode():
                    if graphs:  # a new iteration: the previous call's outputs may be overwritten
                        torch.compiler.cudagraph_mark_step_begin()
                    return compiled(*xt)

            fns[col] = comp
        except Exception as e:  # report, do not hide
            row[f"{col}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    fns["flax"] = jax_run
    n = MATMUL_N_CUDA if cuda else MATMUL_N
    a = torch.randn(n, n, device=device)
    bm = torch.randn(n, n, device=device)
    fns["matmul"] = lambda: torch.mm(a, bm)
    tp = third_party(spec.get("third_party", ""), xt) if spec.get("third_party") else []
    for label, fn in tp:
        if callable(fn):
            def run_tp(fn=fn):
                with torch.inference_mode():
                    return fn()

            fns["tp:" + label] = run_tp
        else:
            row.setdefault("tp_missing", []).append(f"{label}: {fn}")
    for _ in range(warmup if warmup is not None else (WARMUP_CUDA if cuda else 1)):  # first calls allocate...
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn, sync))
    med = {k: statistics.median(v) for k, v in times.items()}
    row["times"] = med
    row["spread"] = {k: (min(v), max(v)) for k, v in times.items()}
    row["matmul_n"] = n
    row["peak_gflops"] = 2 * n**3 / med["matmul"] / 1e9
    log(f"  {name} b={batch} {prec}: "
        + ", ".join(f"{k} {v * 1e3:.{3 if cuda else 1}f} ms" for k, v in med.items())
        + f"; err {row['err_eager']:.2e}; {row['flops'] / 1e9:.2f} GFLOP")
    return row


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------
def _ms(t: Optional[float], digits: int = 1) -> str:
    return "—" if t is None else (f"{t * 1e3:.{digits}f}" if t < 10 else f"{t:.1f} s")


def machine_info(device: str = "cpu", precs: tuple[str, ...] = ("highest",)) -> str:
    import jax
    import flax

    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
            if line.startswith("Model name")
        )
    except Exception:
        model = platform.processor() or "unknown CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = ""
    if device == "cuda":
        gpu = (
            f"- GPU: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}, cuDNN "
            f"{torch.backends.cudnn.version()}; jax device {jax.devices('gpu')[0].device_kind}\n"
        )
        for q in precs:  # the switches actually in force for each precision's rows
            with _precision(device, q) as settings:
                gpu += f"- Precision '{q}': " + ", ".join(f"{k}={v}" for k, v in settings.items()) + "\n"
    return (
        f"- Machine: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
        f"load average at start {load:.1f}\n"
        + gpu
        + f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, jax {jax.__version__}, "
        f"flax {flax.__version__}, numpy {np.__version__}\n"
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
    )


def render(rows: list[dict], mem: dict, args, header: str) -> str:
    cuda = args.device == "cuda"
    # GPU module calls take tens of microseconds: show ms to 3 decimals there.
    _ms_ = (lambda t: _ms(t, 3)) if cuda else _ms  # noqa: E731
    pc = lambda r: f"{r['precision']} | "  # noqa: E731
    cols = ("eager", "compiled") + (("cudagraphs",) if cuda else ())
    names = {"eager": "eager", "compiled": "compiled", "cudagraphs": "CUDA graphs"}
    lines = [header, ""]
    infer = [r for r in rows if r.get("kind", "infer") == "infer"]
    train = [r for r in rows if r.get("kind") == "train"]
    if infer:
        lines.append(
            "| workload | batch | precision | " + " | ".join(f"port {names[c]} ms" for c in cols) + " | Flax jit ms | "
            + " | ".join(f"{names[c]} × Flax" for c in cols)
            + " | GFLOP | peak matmul GFLOP/s | floor ms | share of floor " + " / ".join(names[c] for c in cols)
            + " | max err " + " / ".join(names[c] for c in cols) + " |"
        )
        ncol = 3 + 2 * len(cols) + 1 + 5
        lines.append("|" + "---|" * ncol)
    for r in infer:
        t = r["times"]
        f = t.get("flax")
        floor = r["flops"] / (r["peak_gflops"] * 1e9)

        def cell(c, r=r, t=t):
            if c in t:
                return _ms_(t[c])
            return ("error: " + r[f"{c}_error"]) if f"{c}_error" in r else "—"

        ratios = " | ".join(f"{f / t[c]:.2f}x" if c in t else "—" for c in cols)
        share = " / ".join(f"{floor / t[c]:.0%}" if c in t else "—" for c in cols)
        err = " / ".join(f"{r[f'err_{c}']:.1e}" for c in cols if f"err_{c}" in r)
        lines.append(
            f"| {r['workload']} | {r['batch']} | {pc(r)}" + " | ".join(cell(c) for c in cols)
            + f" | {_ms_(f)} | {ratios} | {r['flops'] / 1e9:.2f} | {r['peak_gflops']:.0f} | {_ms_(floor)} "
            f"| {share} | {err} |"
        )
        dashes = " | ".join(["—"] * (len(cols) - 1))
        for k, v in t.items():
            if k.startswith("tp:"):
                lines.append(
                    f"| ↳ {k[3:]} (**not Scenic's computation**) | {r['batch']} | {pc(r)}{_ms_(v)} | {dashes} | — | "
                    f"{f / v:.2f}x | {dashes} | — | — | — | — | n/a |"
                )
        for msg in r.get("tp_missing", []):
            lines.append(
                f"| ↳ {msg} (not Scenic's computation) | {r['batch']} | {pc(r)}"
                + " | ".join(["—"] * (ncol - 3)) + " |"
            )
    if train:
        lines += render_train(train, cols, names, _ms_, args)
    if mem:
        if cuda:
            what = (
                "fresh process; port: `torch.cuda.max_memory_allocated()` during the call minus "
                "`memory_allocated()` just before it; Flax: the jax device's `memory_stats()`, `peak_bytes_in_use` "
                "after the call minus `bytes_in_use` before it; MiB. \"≤\": the Flax call stayed below an earlier "
                "peak of its process (jax cannot reset the counter), so only a bound"
            )
        else:
            what = "fresh process; peak RSS during the call minus RSS just before it, MiB"
        fmt = lambda x: "—" if x is None else (x if isinstance(x, str) else f"{x:.0f}")  # noqa: E731
        for kind, title in (("infer", "one inference call"),
                            ("train", "one training forward + backward, gradient buffers included on both sides")):
            items = [(k, v) for k, v in mem.items() if k[2] == kind]
            if not items:
                continue
            lines += ["", f"Peak memory of {title}; {what}:", "",
                      "| workload | batch | precision | port eager | Flax jit |", "|---|---|---|---|---|"]
            for (w, b, _, q), v in items:
                lines.append(f"| {w} | {b} | {q} | {fmt(v.get('port'))} | {fmt(v.get('flax'))} |")
    lines += ["", "Columns and their one-line recipes (benchmarks/recipes.py):", ""]
    for kind in (("infer",) if infer else ()) + (("train",) if train else ()):
        for c in cols[1:]:
            rec = recipe(args.device, kind, c)
            if rec is not None:
                what = "inference" if kind == "infer" else "training"
                lines.append(f"- {names[c]}, {what}: `{rec.line}`"
                             + (f" (run with backend={args.backend!r} instead)" if args.backend else ""))
    if train:
        for k in args.optimizers:
            label, code = train_rows.OPTIMIZERS[k]
            lines.append(f"- full step, {label}: `{code}`")
        lines.append(f"- full step, {train_rows.OPTIMIZER_NOTE}")
    lines.append("")
    if cuda:
        lines += [
            f"Repeats per cell: {args.repeats}, interleaved (one call of each column per round), median reported, "
            f"after {WARMUP_CUDA} warm-up rounds. Every timed call is bracketed by `torch.cuda.synchronize()` "
            "(the Flax call also ends in `block_until_ready()`): a time runs from launch to the end of the GPU "
            "work. Precision: 'highest' = TF32 off in torch (cuBLAS matmuls, cuDNN convolutions) and "
            "`jax_default_matmul_precision='highest'`, full float32 on both sides; 'tf32' = TF32 on and "
            "'tensorfloat32' on both sides (errors of ~1e-3 are expected there); 'bf16' = Scenic's "
            "`dtype='bfloat16'` on both sides (encoder blocks in bfloat16). Errors are max|port - Flax| / "
            "max(1, max|Flax|). Floor = GFLOP / peak matmul rate measured in the same rounds "
            f"({MATMUL_N_CUDA}³ float32 torch matmul on the GPU, in the row's precision).",
        ]
        return "\n".join(lines) + "\n"
    lines += [
        f"Repeats per cell: {args.repeats}, interleaved (one call of each column per round), median reported, "
        f"after {args.warmup} warm-up round(s). Flax runs `jax.jit(module.apply)` (training: `jax.jit(jax.value_and_grad(loss))`) under `jax_default_matmul_precision='highest'` (what the parity harness "
        "uses; on CPU XLA computes float32 dots in float32 at every precision setting, so 'highest' costs nothing "
        "there). Errors are max|port - Flax| / max(1, max|Flax|). Floor = GFLOP / peak matmul rate measured in "
        "the same rounds (2048³ float32 torch matmul).",
    ]
    return "\n".join(lines) + "\n"


def render_train(rows: list[dict], cols: tuple[str, ...], names: dict, _ms_, args) -> list[str]:
    """The training table: forward + backward and full AdamW step, one line each per row."""
    cuda = args.device == "cuda"
    lines = [
        "",
        "Training (softmax cross-entropy; Scenic: `jax.jit(jax.value_and_grad(loss))`, full step: "
        "`optax.adamw` in one jitted step; gradients of every column checked against Scenic's, scaled like the "
        "goldens, worst leaf named; full step: one step of the port's optimiser vs optax.adamw on the same "
        "gradients):",
        "",
        "| workload | batch | precision | what | " + " | ".join(f"port {names[c]} ms" for c in cols)
        + " | Scenic jit ms | " + " | ".join(f"{names[c]} × Scenic" for c in cols)
        + " | check (scaled error: gradients " + " / ".join(names[c] for c in cols) + " (tolerance); "
        "optimiser step) |",
        "|" + "---|" * (4 + 2 * len(cols) + 2),
    ]
    for r in rows:
        t = r["times"]
        errs = " / ".join(f"{r[f'grad_err_{c}']:.1e}" if f"grad_err_{c}" in r else "—" for c in cols)
        bad = [c for c in cols if r.get(f"grad_err_{c}", 0.0) > r["tolerance"]]
        if bad:
            errs += " **over: " + ", ".join(f"{c} at {r[f'grad_worst_{c}']}" for c in bad) + "**"
        what_lines = [("fwd_bwd", "fwd_bwd", "forward + backward", f"grad {errs} ({r['tolerance']:.0e})")]
        for k, err in r["adamw_err"].items():
            what_lines.append((f"step[{k}]", "step", f"full step, {train_rows.OPTIMIZERS[k][0]}",
                               f"step vs optax.adamw {err:.1e}"))
        for what, ref_key, label, check in what_lines:
            f = t.get(f"{ref_key}:flax")

            def cell(c, what=what, r=r, t=t):
                if f"{what}:{c}" in t:
                    return _ms_(t[f"{what}:{c}"])
                return ("error: " + r[f"error_{c}"]) if f"error_{c}" in r else "—"

            ratios = " | ".join(f"{f / t[f'{what}:{c}']:.2f}x" if f"{what}:{c}" in t else "—" for c in cols)
            lines.append(
                f"| {r['workload']} | {r['batch']} | {r['precision']} | {label} | "
                + " | ".join(cell(c) for c in cols) + f" | {_ms_(f)} | {ratios} | {check} |"
            )
    if not cuda:
        lines.append("")
    return lines


def _fail(msg: str) -> None:
    """One line on stderr and exit status 2 (argparse's usage-error status), not a traceback."""
    print(f"bench_speed.py: error: {msg}", file=sys.stderr)
    sys.exit(2)


def main(argv: Optional[list[str]] = None) -> None:
    """The command line; ``argv`` defaults to ``sys.argv[1:]`` (tests call it in-process)."""
    p = argparse.ArgumentParser(prog="bench_speed.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: port, Flax (jax GPU backend) and the matmul floor on the first GPU")
    p.add_argument("--rows", default="infer,train",
                   help="comma-separated, of infer (inference rows) and train (forward + backward and full AdamW "
                        "step rows, ViT workloads); default both")
    p.add_argument("--precision", default=None,
                   help="inference rows: comma-separated, of highest,tf32,bf16 (one row each); tf32 needs cuda; "
                        "bf16 = Scenic's dtype='bfloat16' (ViTs only). Default: highest,tf32,bf16 on cuda, "
                        "highest on cpu")
    p.add_argument("--train-precision", default=None,
                   help="training rows, as --precision. Default: bf16 on cuda, highest on cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny TokenLearner ViT instead of the workloads, batch 2, 1 repeat, "
                        "1 warm-up round, no memory")
    p.add_argument("--repeats", type=int, default=None, help="default 7 (cuda: 20; --quick: 1)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds (default 1; cuda: 3)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--compile-only", default=None, metavar="SUBSTRING",
                   help="torch.compile only the workloads whose name contains this (compiling B/16 is slow)")
    p.add_argument("--backend", default=None,
                   help="torch.compile backend instead of each recipe's inductor (e.g. aot_eager, for tests)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--batches", default=None,
                   help="comma-separated ViT inference batch sizes (default 1,8; cuda: 8,64)")
    p.add_argument("--train-batches", default=None, help="comma-separated training batch sizes (default 8; cuda: 64)")
    p.add_argument("--optimizer", default="optax,torch",
                   help="full-step rows: comma-separated, of optax (the project's optax-order AdamW, "
                        "tokenlearner_torch.training) and torch (torch.optim.AdamW fused); default both")
    p.add_argument("--only", default=None, help="substring of the workload names to run")
    p.add_argument("--write", action="store_true",
                   help="update the committed table, benchmarks/results/cpu.md (cuda: gpu.md); without it the "
                        "table goes to a new temporary folder, whose path is printed")
    p.add_argument("--out", default=None, help="write the table to this file instead (not with --write)")
    p.add_argument("--memory-child", nargs=3, metavar=("WORKLOAD", "IMPL", "BATCH"), help=argparse.SUPPRESS)
    p.add_argument("--memory-kind", default="infer", choices=("infer", "train"), help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if args.memory_child:
        w, impl, b = args.memory_child
        print(json.dumps(memory_child(w, impl, int(b), args.device, args.precision or "highest", args.memory_kind)))
        return
    cuda = args.device == "cuda"
    kinds = tuple(args.rows.split(","))
    if not kinds or any(k not in ("infer", "train") for k in kinds):
        _fail(f"--rows takes a comma-separated list of infer, train; got {args.rows!r}")
    args.precs = tuple((args.precision or ("highest,tf32,bf16" if cuda else "highest")).split(","))
    args.train_precs = tuple((args.train_precision or ("bf16" if cuda else "highest")).split(","))
    for opt, precs in (("--precision", args.precs), ("--train-precision", args.train_precs)):
        if any(q not in PRECISIONS for q in precs):
            _fail(f"{opt} takes a comma-separated list of {', '.join(PRECISIONS)}, got {','.join(precs)!r}")
        if not cuda and "tf32" in precs:
            _fail(f"{opt} tf32 needs --device cuda (CPUs have no TF32; XLA CPU computes float32 dots in float32)")
    args.optimizers = tuple(args.optimizer.split(","))
    if not args.optimizers or any(k not in train_rows.OPTIMIZERS for k in args.optimizers):
        _fail(f"--optimizer takes a comma-separated list of {', '.join(train_rows.OPTIMIZERS)}, got {args.optimizer!r}")
    for opt, value in (("--batches", args.batches), ("--train-batches", args.train_batches)):
        if value is not None and not all(b.strip().isdigit() and int(b) > 0 for b in value.split(",")):
            _fail(f"{opt} takes comma-separated positive integers, got {value!r}")
    if cuda:
        if not torch.cuda.is_available():
            _fail(f"--device cuda: torch {torch.__version__} sees no CUDA device (torch.cuda.is_available() is False)")
        # Before jax creates its GPU client: by default it would reserve 75% of the GPU memory and starve torch.
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        import jax

        try:
            jax.devices("gpu")
        except RuntimeError as e:
            _fail(f"--device cuda: jax {jax.__version__} has no GPU backend ({str(e).splitlines()[0]})")
    if args.repeats is None:
        args.repeats = 1 if args.quick else (20 if cuda else 7)
    if args.warmup is None:
        args.warmup = 1 if args.quick or not cuda else WARMUP_CUDA
    if args.quick:
        args.no_memory = True
    workloads = QUICK_WORKLOADS if args.quick else WORKLOADS
    selected = {n: s for n, s in workloads.items() if not (args.only and args.only not in n)}
    if not selected:
        _fail(f"--only {args.only!r} matches no workload; the workloads are: {'; '.join(workloads)}")
    if args.write and args.out is not None:
        _fail("--write updates the committed table; --out writes elsewhere: give one of them")
    if args.write:
        args.out = str(ROOT / "benchmarks" / "results" / ("gpu.md" if cuda else "cpu.md"))
    elif args.out is None:
        # A smoke or trial run never touches the committed tables: only an explicit --write does.
        args.out = str(Path(tempfile.mkdtemp(prefix="tokenlearner-bench-")) / ("gpu.md" if cuda else "cpu.md"))
    torch.manual_seed(0)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    header = machine_info(args.device, tuple(dict.fromkeys(args.precs + args.train_precs)))
    log(header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = "# GPU benchmark (latest run)" if cuda else "# CPU benchmark (latest run)"
    # The options shape a run (rows, batches, precisions, compile subset): record them, less --out / --write.
    kept = [a for i, a in enumerate(argv)
            if not (a.startswith("--out") or a == "--write" or (i and argv[i - 1] == "--out"))]
    command = shlex.join(["python", "benchmarks/bench_speed.py"] + kept)

    def write(text: str, partial: bool = False) -> None:
        note = "_Partial: written after each row; the run was still going or was cut off._\n\n" if partial else ""
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")  # renamed into place: never a half-written table
        try:
            tmp.write_text(f"{title}\n\n{note}Command: `{command}`\n\n" + text)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)

    def batches_of(value: Optional[str], default: list[int]) -> list[int]:
        return [int(b) for b in value.split(",")] if value else default

    vit_batches = batches_of(args.batches, [2] if args.quick else ([8, 64] if cuda else [1, 8]))
    train_batches = batches_of(args.train_batches, [2] if args.quick else ([64] if cuda else [8]))
    rows = []

    def after_row() -> None:
        gc.collect()
        if cuda:  # GPU runs are time-limited: one cut off keeps its rows (a CPU run leaves cpu.md alone)
            write(render(rows, {}, args, header), partial=True)

    for name, base in selected.items():
        vit = base["cls"] == "TokenLearnerViT"
        compile_ = not args.no_compile and (args.compile_only is None or args.compile_only in name)
        if "infer" in kinds:
            for b in vit_batches if vit else [8]:
                for prec in args.precs:
                    spec = with_precision(base, prec)
                    if spec is None:  # bf16 is Scenic's ViT dtype policy; the modules alone have no dtype
                        continue
                    with _precision(args.device, prec):
                        rows.append(bench_one(name, spec, b, args.repeats, compile_, log, args.device, prec,
                                              backend=args.backend, warmup=args.warmup))
                    after_row()
        if "train" in kinds and vit:
            for b in train_batches:
                for prec in args.train_precs:
                    with _precision(args.device, prec):
                        torch._dynamo.reset()
                        rows.append(train_rows.bench_train(
                            name, with_precision(base, prec), b, args.repeats,
                            ("compiled", "cudagraphs") if compile_ else (), log, ENV, args.device, prec,
                            warmup=args.warmup, backend=args.backend, optimizers=args.optimizers,
                        ))
                    after_row()
    mem: dict = {}
    if not args.no_memory:
        jobs = []
        for name, spec in selected.items():
            if "infer" in kinds and with_precision(spec, args.precs[0]) is not None:
                jobs += [(name, impl, 8, args.precs[0], "infer") for impl in ("port", "flax")]
            if "train" in kinds and spec["cls"] == "TokenLearnerViT":
                jobs += [(name, impl, train_batches[0], args.train_precs[0], "train") for impl in ("port", "flax")]
        # One child at a time on CPU (RSS peaks and timings of a shared CPU). On cuda each child reads its own
        # process's allocator counters, so children may overlap; it saves minutes of imports and compiles.
        with concurrent.futures.ThreadPoolExecutor(4 if cuda else 1) as pool:
            results = pool.map(lambda job: measure_memory(job[0], job[1], job[2], args.device, job[3], job[4]), jobs)
            for (name, impl, b, prec, kind), value in zip(jobs, results):
                mem.setdefault((name, b, kind, prec), {})[impl] = value
                if impl == "flax":
                    log(f"  memory {kind} {name} b={b} {prec}: {mem[(name, b, kind, prec)]}")
    text = render(rows, mem, args, header)
    print(text)
    write(text)
    log(f"written {out}")
    if not args.write:
        log(f"(not the committed table: --write updates benchmarks/results/{'gpu.md' if cuda else 'cpu.md'})")


if __name__ == "__main__":
    main()
