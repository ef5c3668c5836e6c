"""benchmarks/bench_speed.py end to end on a tiny model: every row kind runs, and its built-in checks hold.

The benchmark checks the port against the Flax reference itself (outputs, every gradient, the optimiser
step); this test runs it with ``--quick`` (a tiny TokenLearner ViT, batch 2, one round) and reads those
checks back from the table, so a broken training row, recipe or check fails here and not on the lead's
quiet machine. ``--backend aot_eager`` keeps inductor's C++ build out of the test (seconds, not minutes);
the recipes' inductor options are checked separately. The benchmark subprocesses compile the Flax side with
XLA's fast-compile options (_fast_xla_flags: the same computation, less optimised machine code); the argument
errors are checked in-process through ``main(argv)``, and once as a command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks" / "bench_speed.py"


def _fast_xla_flags() -> str:
    """The parity harness's fast-compile options (``reference.fast_compile_options``: LLVM -O0 and, on jaxlib
    0.10, the elemental emitters) as XLA_FLAGS for the benchmark runs these tests start. The HLO (what jax
    computes) is the same; the code XLA makes from it runs slower and may differ in the last bits (a contracted
    multiply-add; the checks read here hold at 1e-6 and looser), and it compiles in a quarter of the CPU time:
    XLA compiling Scenic's steps and the op-by-op init was 25 of a --quick run's 44 s."""
    from tokenlearner_torch.parity.reference import fast_compile_options

    return " ".join(f"--{k}={str(v).lower()}" for k, v in fast_compile_options().items())


def _env() -> dict:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {_fast_xla_flags()}".strip()
    return env


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, env=_env(),
                          cwd=ROOT, timeout=timeout)


@pytest.mark.slow
def test_quick_run_all_rows():
    """Also: a run without --write (nor --out) leaves the committed table alone and says where its table went
    (`bash run.sh bench --quick` overwrote benchmarks/results/cpu.md)."""
    import shutil
    import tempfile

    committed = ROOT / "benchmarks" / "results" / "cpu.md"
    before = committed.read_bytes()
    # Inference in bf16 only (the float32 inference path is the same code, and the goldens cover it), training
    # at both precisions with both optimisers.
    res = _run("--quick", "--backend", "aot_eager", "--precision", "bf16", "--train-precision", "highest,bf16",
               "--optimizer", "optax,torch")
    assert res.returncode == 0, res.stderr[-3000:]
    assert committed.read_bytes() == before
    written = re.findall(r"^written (.+)$", res.stderr, re.M)
    assert len(written) == 1 and "not the committed table: --write updates benchmarks/results/cpu.md" in res.stderr
    out = Path(written[0])
    assert out.parent.parent == Path(tempfile.gettempdir()) and out.parent.name.startswith("tokenlearner-bench-")
    try:
        text = out.read_text()
        assert sorted(p.name for p in out.parent.iterdir()) == ["cpu.md"]  # no temporary file left beside it
    finally:
        shutil.rmtree(out.parent)
    assert "Command: `python benchmarks/bench_speed.py --quick" in text
    # inference rows: both precisions, eager and compiled, errors within the modes' tolerances
    infer = re.findall(r"^\| tiny TokenLearner ViT \(smoke test\) \| 2 \| (highest|bf16) \|(.*)$", text, re.M)
    infer = [(p, cells) for p, cells in infer if "forward" not in cells and "full step" not in cells]
    assert [p for p, _ in infer] == ["bf16"]
    for prec, cells in infer:
        errs = [float(e) for e in cells.rstrip(" |").split("|")[-1].split("/")]
        assert len(errs) == 2 and 0 < max(errs) < 3e-2, (prec, cells)  # bf16: close to Scenic, not float32
    # training rows: forward + backward and a full step per optimiser, at both precisions
    grads = re.findall(r"\| (highest|bf16) \| forward \+ backward \|.*\| grad ([0-9.e+-]+) / ([0-9.e+-]+) "
                       r"\(([0-9.e+-]+)\) \|$", text, re.M)
    assert [g[0] for g in grads] == ["highest", "bf16"], text
    for prec, eager, compiled, tol in grads:
        assert float(eager) < float(tol) and float(compiled) < float(tol), (prec, eager, compiled, tol)
        assert float(eager) > 0 or prec == "highest"  # bf16 must differ a little from float32; not a copy
    steps = re.findall(r"\| (highest|bf16) \| full step, (.*?) \|.*step vs optax\.adamw ([0-9.e+-]+) \|$",
                       text, re.M)
    assert sorted((p, o) for p, o, _ in steps) == [
        ("bf16", "optax-order AdamW"), ("bf16", "torch AdamW fused"),
        ("highest", "optax-order AdamW"), ("highest", "torch AdamW fused"),
    ]
    for prec, opt, err in steps:
        assert float(err) < 1e-6, (prec, opt, err)  # same gradients: only the optimisers' rounding differs
    # every timed cell is a number, and the recipes are printed under the table
    assert "| error: " not in text
    assert 'torch.compile(model, fullgraph=True, dynamic=False, options={"freezing": True})' in text
    assert "optax.adamw(1e-3" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rows", "inference"], "--rows takes a comma-separated list of infer, train"),
        (["--precision", "tf32"], "--precision tf32 needs --device cuda"),
        (["--train-precision", "fp8"], "--train-precision takes a comma-separated list of"),
        (["--train-batches", "0"], "--train-batches takes comma-separated positive integers"),
        (["--optimizer", "sgd"], "--optimizer takes a comma-separated list of optax, torch"),
        (["--quick", "--only", "nothing-like-this"], "--only 'nothing-like-this' matches no workload"),
        (["--quick", "--write"], "--write updates the committed table; --out writes elsewhere: give one of them"),
    ],
)
def test_bad_options_one_line(args, message, tmp_path, capsys):
    """In-process (``main(argv)``): the command line's own path, exit status 2 and one line on stderr, is
    checked once in a subprocess by test_bad_option_command_line_one_line."""
    out = tmp_path / "never.md"
    err = _main_fails(_bench_modules()[0].main, *args, "--out", str(out), capsys=capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_speed.py: error: ") and message in lines[0], err
    assert not out.exists()


def test_bad_option_command_line_one_line(tmp_path):
    """As a command: one line on stderr, nothing on stdout, exit status 2, no table."""
    out = tmp_path / "never.md"
    res = _run("--rows", "inference", "--out", str(out), timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == ("bench_speed.py: error: --rows takes a comma-separated list of infer, "
                                            "train; got 'inference'"), res.stderr
    assert res.stdout == "" and not out.exists()


def test_cuda_without_gpu_one_line(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: this test is about the message on a CPU-only machine")
    bench_speed, _ = _bench_modules()
    err = _main_fails(bench_speed.main, "--device", "cuda", "--rows", "train", "--out", str(tmp_path / "gpu.md"),
                      capsys=capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bench_speed.py: error: --device cuda: torch"), err
    assert not (tmp_path / "gpu.md").exists()


def _bench_modules():
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_speed
    import recipes

    return bench_speed, recipes


def _main_fails(main, *argv: str, capsys) -> str:
    """A benchmark's ``main(argv)`` in this process must exit with status 2 before any work: its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    captured = capsys.readouterr()
    assert info.value.code == 2, captured.err
    assert captured.out == "", captured.out
    return captured.err


def test_recipes_table():
    """Every cell's recipe is the documented one-liner, and what it runs is that line's torch.compile call."""
    _, recipes = _bench_modules()
    cpu_infer = recipes.recipe("cpu", "infer", "compiled")
    assert cpu_infer.line == 'torch.compile(model, fullgraph=True, dynamic=False, options={"freezing": True})'
    assert cpu_infer.kwargs == {"fullgraph": True, "dynamic": False, "options": {"freezing": True}}
    assert recipes.recipe("cpu", "train", "compiled").kwargs == {"fullgraph": True, "dynamic": False}
    assert recipes.recipe("cpu", "infer", "cudagraphs") is None  # no CUDA graphs on a CPU
    for kind in ("infer", "train"):
        graphs = recipes.recipe("cuda", kind, "cudagraphs")
        assert graphs.kwargs["mode"] == "reduce-overhead" and 'mode="reduce-overhead"' in graphs.line
        assert recipes.recipe("cuda:0", kind, "compiled").kwargs == {"fullgraph": True, "dynamic": False}
    with pytest.raises(ValueError, match="workload must be 'infer' or 'train'"):
        recipes.recipe("cpu", "serve", "compiled")


def test_cudagraph_recipe_runs_where_there_is_no_gpu():
    """The CUDA-graph recipe's code path (mark_step_begin, mode='reduce-overhead') runs eagerly-equal on CPU,
    where inductor skips the graphs: the GPU run cannot fail on a typo there."""
    import torch

    bench_speed, recipes = _bench_modules()
    spec = bench_speed.QUICK_WORKLOADS["tiny TokenLearner ViT (smoke test)"]
    model = bench_speed._port(spec, None).train()
    x = torch.randn(2, 32, 32, 3)
    y = torch.tensor([1, 2])
    import train_rows

    eager = train_rows.port_fwd_bwd(model, model, x, y)
    loss_e = eager()
    grads_e = train_rows.port_grads(model)
    torch._dynamo.reset()
    graphs = recipes.recipe("cuda", "train", "cudagraphs").apply(model, backend="aot_eager")
    loss_g = train_rows.port_fwd_bwd(model, graphs, x, y, cudagraphs=True)()
    torch.testing.assert_close(loss_g, loss_e)
    for k, g in train_rows.port_grads(model).items():
        torch.testing.assert_close(g, grads_e[k], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak-RSS reset is Linux-only")
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["port", "flax"])
def test_train_memory_child(impl):
    """The training-memory measurement of one side reports the RSS it read (a tiny model's step may fit in pages
    already held: >= 0) and the gradient buffers' size, the model's parameter bytes. The port's runs in this
    process; Flax's in the child process measure_memory starts (``--memory-child ... --memory-kind train``, its
    JSON line read back), with the fast XLA compile of _env: its op-by-op init and jitted gradient are most of
    its cost."""
    import json

    bench_speed, _ = _bench_modules()
    name = "tiny TokenLearner ViT (smoke test)"
    if impl == "port":
        out = bench_speed.memory_child(name, impl, 2, "cpu", "highest", "train")
    else:
        res = _run("--memory-child", name, impl, "2", "--memory-kind", "train", "--precision", "highest",
                   timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
    n_params = sum(p.numel() for p in bench_speed._port(bench_speed.QUICK_WORKLOADS[name], None).parameters())
    assert out["activation_mib"] >= 0 and out["before_mib"] > 10, out  # the process holds torch (and jax)
    assert out["grad_mib"] == pytest.approx(n_params * 4 / 2**20), out


def test_render_cuda_tables():
    """The GPU table layout (CUDA-graph column, training lines, memory bounds) from rows shaped like a GPU
    run's, so a GPU session does not find a formatting error after its measurements."""
    import types

    bench_speed, _ = _bench_modules()
    args = types.SimpleNamespace(device="cuda", repeats=20, warmup=3, backend=None, optimizers=("optax", "torch"),
                                 precs=("bf16",), train_precs=("bf16",))
    infer = dict(workload="B/16 TokenLearner", batch=8, precision="bf16", flops=2.0e11, peak_gflops=4.0e5,
                 err_eager=1e-2, err_compiled=1e-2, err_cudagraphs=1e-2,
                 times=dict(eager=0.008, compiled=0.004, cudagraphs=0.002, flax=0.0028, matmul=0.001))
    train = dict(workload="B/16 TokenLearner", batch=64, precision="bf16", kind="train", tolerance=0.17,
                 grad_err_eager=0.01, grad_err_compiled=0.01, grad_err_cudagraphs=0.2,
                 grad_worst_cudagraphs="Transformer/encoder_norm/scale", adamw_err={"optax": 3e-8, "torch": 1e-7},
                 times={"fwd_bwd:eager": 0.03, "fwd_bwd:compiled": 0.02, "fwd_bwd:cudagraphs": 0.019,
                        "fwd_bwd:flax": 0.0228, "step[optax]:eager": 0.05, "step[optax]:compiled": 0.04,
                        "step[optax]:cudagraphs": 0.039, "step[torch]:eager": 0.033, "step[torch]:compiled": 0.022,
                        "step[torch]:cudagraphs": 0.021, "step:flax": 0.025})
    mem = {("B/16 TokenLearner", 64, "train", "bf16"): {"port": 3000.0, "flax": "≤ 9000"}}
    text = bench_speed.render([infer, train], mem, args, "header")
    assert "| port eager ms | port compiled ms | port CUDA graphs ms | Flax jit ms |" in text
    assert "| B/16 TokenLearner | 8 | bf16 | 8.000 | 4.000 | 2.000 | 2.800 | 0.35x | 0.70x | 1.40x |" in text
    assert "| forward + backward | 30.000 | 20.000 | 19.000 | 22.800 | 0.76x | 1.14x | 1.20x |" in text
    assert "**over: cudagraphs at Transformer/encoder_norm/scale**" in text
    assert "| full step, torch AdamW fused | 33.000 | 22.000 | 21.000 | 25.000 |" in text
    assert "| B/16 TokenLearner | 64 | bf16 | 3000 | ≤ 9000 |" in text
    assert 'mode="reduce-overhead")`' in text


def test_profile_step_quick(capsys):
    """benchmarks/profile_step.py on the tiny ViT: shares per kind that add up to the whole step."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import profile_step

    assert profile_step.main(["--quick", "--top", "5"]) == 0
    out = capsys.readouterr().out
    kinds = re.findall(r"^\| ([A-Za-z /()]+) \| ([0-9.]+)% \|$", out, re.M)
    assert ("matmul / linear" in dict(kinds)) and abs(sum(float(v) for _, v in kinds) - 100) < 0.5, out
    assert profile_step.kind_of("aten::addmm") == "matmul / linear"
    assert profile_step.kind_of("aten::_to_copy") == "casts and copies"
    assert profile_step.main(["--quick", "--layers", "1"]) == 2


def test_bench_gemm_prints_every_shape():
    """benchmarks/bench_gemm.py (the measurement behind cpu_gemm): one table row per shape, rates positive."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gemm.py"), "--rows", "8",
                          "--repeats", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| 8 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["768 -> 768", "768 -> 3072", "3072 -> 768"]
    assert all(float(c) > 0 for r in rows for c in r.strip("| ").split("|")[2:])


def test_bench_overhead_prints_both_precisions(capsys):
    """benchmarks/bench_overhead.py: the host-side cost of an eager forward, float32 and the bf16 policy."""
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_overhead.py"), "--repeats", "2"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in res.stdout.splitlines()
            if line.startswith("| float32") or line.startswith("| bfloat16")}
    assert set(rows) == {"float32", "bfloat16"} and all(v > 0 for v in rows.values())
    import torch

    if not torch.cuda.is_available():  # without CUDA, --device cuda is a one-line usage error (main(argv) here)
        _bench_modules()
        import bench_overhead

        err = _main_fails(bench_overhead.main, "--device", "cuda", capsys=capsys)
        assert len(err.strip().splitlines()) == 1 and "CUDA" in err, err


@pytest.mark.slow
def test_bench_train_loop_quick(tmp_path):
    """benchmarks/bench_train_loop.py --quick (issue 17.6): the loop-overhead rounds, the host-read check (the
    benchmark exits 1 if train() reads the host on a step without a summary more than the bare step does), both
    data sources and Scenic's jitted step, whose first step must be the port's (same loss and l2_grads). Writes
    only to --out; the committed results stay as they are."""
    committed = ROOT / "benchmarks" / "results" / "train_loop.md"
    before = committed.read_bytes() if committed.exists() else None
    out = tmp_path / "train_loop.md"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_loop.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert (committed.read_bytes() if committed.exists() else None) == before
    text = out.read_text()
    ratio = float(re.search(r"\*\*\(b\) / \(a\) per step: ([0-9.]+)\*\*", text).group(1))
    assert 0.2 < ratio < 5, ratio  # a timing on a shared machine: only its sanity; the read check is exact
    bare, loop = re.search(r"bare step ([0-9.]+), `train\(\)` ([0-9.]+) \(\*\*asserted", text).groups()
    assert float(loop) == float(bare), text
    rows = dict(re.findall(r"^\| (digits|image_folder) \| \d+ \| 1 \| [0-9.]+ \| [0-9.]+ \| ([0-9.]+)%", text, re.M))
    assert set(rows) == {"digits", "image_folder"} and all(0 <= float(v) <= 100 for v in rows.values()), text
    loss_err, grad_err = re.search(r"its first step's loss and l2_grads differ from the port's by ([0-9.e+-]+) and "
                                   r"([0-9.e+-]+)", text).groups()
    assert float(loss_err) < 1e-5 and float(grad_err) < 1e-5, (loss_err, grad_err)
    assert re.search(r"\| Scenic's `train_step`, `jax.jit`.*\| [0-9.]+ \|", text)
