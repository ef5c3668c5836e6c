"""Speed and memory of the port against the Flax reference (Scenic's computation) under ``jax.jit``.

One command::

    python benchmarks/bench_speed.py            # full run (batch 1 and 8, compile, memory): ~15-30 min on 2 cores
    python benchmarks/bench_speed.py --quick    # batch 1 ViTs, fewer repeats: a few minutes

For every workload: the port is built with ``from_scenic``; Flax parameters are initialised by the reference
module (genuine Scenic when importable, else ``parity/flax_reference.py``), every all-zero leaf (biases, the
zero-initialised ``output_projection`` kernel...) is replaced by N(0, 0.02) noise so the output check is not
trivial, and the same tree goes through ``flax_to_torch``. Outputs are checked equal (max |port - Flax|,
scaled like the goldens: / max(1, max|Flax|)). Then, interleaved round by round (so background load hits every
column alike), one call each of: port eager (``torch.inference_mode``), port ``torch.compile(fullgraph=True,
dynamic=False)``, ``jax.jit(module.apply)`` under ``jax_default_matmul_precision='highest'``, and a
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
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
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

MATMUL_N = 2048


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


def _inputs(spec: dict, batch: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.RandomState(seed)
    return [rng.randn(*shape).astype(np.float32) for shape in spec["inputs"](batch)]


# --------------------------------------------------------------------------------------------------------
# Flax side
# --------------------------------------------------------------------------------------------------------
def _flax(spec: dict, xs: list[np.ndarray]):
    """(flax module, randomised params, jitted apply) for one workload."""
    import jax
    import jax.numpy as jnp
    from parity.flax_reference import build_reference_module, genuine_scenic_available

    module = build_reference_module(spec["cls"], spec["kwargs"])
    call = dict(spec["call"])
    with jax.default_matmul_precision("highest"):
        small = [jnp.asarray(x[:1]) for x in xs]
        params = module.init(jax.random.PRNGKey(0), *small, **call)["params"]
    params = jax.tree_util.tree_map(np.asarray, params)
    rng = np.random.RandomState(1)
    # Zero-initialised leaves would make the output check trivial (e.g. a zero output_projection).
    params = jax.tree_util.tree_map(
        lambda a: (rng.normal(0, 0.02, a.shape).astype(a.dtype) if not np.any(a) else a), params
    )
    jitted = jax.jit(lambda p, *x: module.apply({"params": p}, *x, **call))
    return module, params, jitted, ("genuine Scenic" if genuine_scenic_available() else "parity/flax_reference.py")


def _jax_call(jitted, params, xs_j) -> Callable[[], Any]:
    import jax

    def run():
        with jax.default_matmul_precision("highest"):
            return jitted(params, *xs_j).block_until_ready()

    return run


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
            for t in m.tokenizers:  # a plain list, not a ModuleList: eval() does not reach them
                t.eval()
            out.append(("tokenlearner-pytorch TokenLearner(8)", lambda: m(xs[0])))
    elif kind == "v11":
        # robotic-transformer-pytorch's TokenLearner is its "1.1" (grouped per-token MLP), channels-first.
        if isinstance(rt, str):
            out.append(("robotic-transformer-pytorch TokenLearner", rt))
        else:
            c = xs[0].shape[-1]
            m = rt.TokenLearner(dim=c, num_output_tokens=8).eval()
            xcf = xs[0].permute(0, 3, 1, 2).contiguous()
            out.append(("robotic-transformer-pytorch TokenLearner(dim=128, 8)", lambda: m(xcf)))
    elif kind == "fuser":
        if isinstance(tp, str):
            out.append(("tokenlearner-pytorch TokenFuser", tp))
        else:
            b, s, c = xs[0].shape
            n = xs[1].shape[1]
            h = int(round(n**0.5))
            m = tp.TokenFuser(h, h, c, s).eval()
            orig = xs[1].reshape(b, h, h, c)
            out.append(("tokenlearner-pytorch TokenFuser(14,14,768,8)", lambda: m(xs[0], orig)))
    return out


# --------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------
def _port(spec: dict, params: Optional[dict]) -> torch.nn.Module:
    model = tl.from_scenic(spec["cls"], spec["kwargs"])
    if params is not None:
        model.load_state_dict(flax_to_torch(model, params), strict=True)
    return model.eval()


def count_flops(model: torch.nn.Module, xs: list[torch.Tensor]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(*xs)
    return int(counter.get_total_flops())


def _timed(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _scaled_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


def memory_child(workload: str, impl: str, batch: int) -> dict:
    """Runs in a fresh process: activation memory of one forward (see the module docstring)."""
    spec = WORKLOADS[workload]
    xs = _inputs(spec, batch)

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


def measure_memory(workload: str, impl: str, batch: int) -> Optional[float]:
    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, __file__, "--memory-child", workload, impl, str(batch)]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in res.stdout.splitlines()[::-1]:
        if line.startswith("{"):
            return json.loads(line)["activation_mib"]
    print(f"  memory child failed for {workload} {impl}: {res.stderr[-500:]}", file=sys.stderr)
    return None


def bench_one(name: str, spec: dict, batch: int, repeats: int, compile_: bool, log) -> dict:
    import jax

    xs = _inputs(spec, batch)
    module, params, jitted, ref_name = _flax(spec, xs)
    model = _port(spec, params)
    xt = [torch.from_numpy(x) for x in xs]
    xs_j = [jax.numpy.asarray(x) for x in xs]
    jax_run = _jax_call(jitted, params, xs_j)
    ref = np.asarray(jax_run())
    with torch.inference_mode():
        eager_out = model(*xt).numpy()
    row: dict[str, Any] = dict(workload=name, batch=batch, reference=ref_name)
    row["err_eager"] = _scaled_err(eager_out, ref)
    row["flops"] = count_flops(model, xt)
    fns: dict[str, Callable[[], Any]] = {}

    def eager():
        with torch.inference_mode():
            return model(*xt)

    fns["eager"] = eager
    if compile_:
        t0 = time.perf_counter()
        compiled = torch.compile(model, fullgraph=True, dynamic=False)
        try:
            with torch.inference_mode():
                comp_out = compiled(*xt).numpy()
            row["compile_s"] = time.perf_counter() - t0
            row["err_compiled"] = _scaled_err(comp_out, ref)

            def comp():
                with torch.inference_mode():
                    return compiled(*xt)

            fns["compiled"] = comp
        except Exception as e:  # report, do not hide
            row["compiled_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    fns["flax"] = jax_run
    a = torch.randn(MATMUL_N, MATMUL_N)
    bm = torch.randn(MATMUL_N, MATMUL_N)
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
    for fn in fns.values():  # warm-up (first calls allocate, jit caches...)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    row["times"] = med
    row["spread"] = {k: (min(v), max(v)) for k, v in times.items()}
    row["peak_gflops"] = 2 * MATMUL_N**3 / med["matmul"] / 1e9
    log(f"  {name} b={batch}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items())
        + f"; err {row['err_eager']:.2e}; {row['flops'] / 1e9:.2f} GFLOP")
    return row


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------
def _ms(t: Optional[float]) -> str:
    return "—" if t is None else (f"{t * 1e3:.1f}" if t < 10 else f"{t:.1f} s")


def machine_info() -> str:
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
    return (
        f"- Machine: {model}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
        f"load average at start {load:.1f}\n"
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, jax {jax.__version__}, "
        f"flax {flax.__version__}, numpy {np.__version__}\n"
        f"- Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"
    )


def render(rows: list[dict], mem: dict, args, header: str) -> str:
    lines = [header, ""]
    lines.append(
        "| workload | batch | port eager ms | port compiled ms | Flax jit ms | eager × Flax | compiled × Flax "
        "| GFLOP | peak matmul GFLOP/s | floor ms | share of floor eager / compiled | max err eager / compiled |"
    )
    lines.append("|" + "---|" * 12)
    for r in rows:
        t = r["times"]
        e, c, f = t.get("eager"), t.get("compiled"), t.get("flax")
        floor = r["flops"] / (r["peak_gflops"] * 1e9)
        share = f"{floor / e:.0%}" + (f" / {floor / c:.0%}" if c else " / —")
        comp = _ms(c) if c else ("error: " + r["compiled_error"] if "compiled_error" in r else "—")
        err = f"{r['err_eager']:.1e}" + (f" / {r['err_compiled']:.1e}" if "err_compiled" in r else "")
        lines.append(
            f"| {r['workload']} | {r['batch']} | {_ms(e)} | {comp} | {_ms(f)} | {f / e:.2f}x | "
            + (f"{f / c:.2f}x" if c else "—")
            + f" | {r['flops'] / 1e9:.2f} | {r['peak_gflops']:.0f} | {_ms(floor)} | {share} | {err} |"
        )
        for k, v in t.items():
            if k.startswith("tp:"):
                lines.append(
                    f"| ↳ {k[3:]} (**not Scenic's computation**) | {r['batch']} | {_ms(v)} | — | — | "
                    f"{f / v:.2f}x | — | — | — | — | — | n/a |"
                )
        for msg in r.get("tp_missing", []):
            lines.append(f"| ↳ {msg} (not Scenic's computation) | {r['batch']} | — | — | — | — | — | — | — | — | — | — |")
    if mem:
        lines += ["", "Peak activation memory of one inference call (fresh process; peak RSS during the call minus "
                  "RSS just before it, MiB):", "", "| workload | batch | port eager | Flax jit |", "|---|---|---|---|"]
        for (w, b), v in mem.items():
            fmt = lambda x: "—" if x is None else f"{x:.0f}"  # noqa: E731
            lines.append(f"| {w} | {b} | {fmt(v.get('port'))} | {fmt(v.get('flax'))} |")
    lines += [
        "",
        f"Repeats per cell: {args.repeats}, interleaved (one call of each column per round), median reported. "
        "Flax runs `jax.jit(module.apply)` under `jax_default_matmul_precision='highest'` (what the parity harness "
        "uses; on CPU XLA computes float32 dots in float32 at every precision setting, so 'highest' costs nothing "
        "there). Errors are max|port - Flax| / max(1, max|Flax|). Floor = GFLOP / peak matmul rate measured in "
        "the same rounds (2048³ float32 torch matmul).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="batch 1 for the ViTs, 3 repeats, no batch-1 memory")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--batches", default=None, help="comma-separated ViT batch sizes (default 1,8; --quick: 1)")
    p.add_argument("--only", default=None, help="substring of the workload names to run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu.md"))
    p.add_argument("--memory-child", nargs=3, metavar=("WORKLOAD", "IMPL", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        w, impl, b = args.memory_child
        print(json.dumps(memory_child(w, impl, int(b))))
        return
    if args.repeats is None:
        args.repeats = 3 if args.quick else 7
    torch.manual_seed(0)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    header = machine_info()
    log(header)
    rows = []
    for name, spec in WORKLOADS.items():
        if args.only and args.only not in name:
            continue
        vit = spec["cls"] == "TokenLearnerViT"
        vit_batches = [int(b) for b in args.batches.split(",")] if args.batches else ([1] if args.quick else [1, 8])
        batches = vit_batches if vit else [8]
        for b in batches:
            rows.append(bench_one(name, spec, b, args.repeats, not args.no_compile, log))
            gc.collect()
    mem: dict = {}
    if not args.no_memory:
        for name, spec in WORKLOADS.items():
            if args.only and args.only not in name:
                continue
            mem[(name, 8)] = {impl: measure_memory(name, impl, 8) for impl in ("port", "flax")}
            log(f"  memory {name} b=8: {mem[(name, 8)]}")
    text = render(rows, mem, args, header)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# CPU benchmark (latest run)\n\nCommand: `python benchmarks/bench_speed.py"
                   + (" --quick" if args.quick else "") + "`\n\n" + text)
    log(f"written {out}")


if __name__ == "__main__":
    main()
