"""Benchmark of tokenlearner-convert on generated ViT-B/16 and L/16 Scenic TrainState checkpoints.

    python benchmarks/bench_convert.py [--models B16 L16] [--repeat 2] [--cache /tmp/tokenlearner_bench] [--memory-only]

Each checkpoint is a legacy Flax msgpack file holding ``params`` plus optax Adam ``mu``/``nu`` (3x the
parameters), as Scenic writes it; it is generated once with numpy and the project's writer and cached outside
the repository. Everything is measured in fresh subprocesses (wall time, and peak RSS from ``wait4``):

* ``import torch`` alone (the interpreter baseline for memory);
* flax's ``restore_checkpoint`` (time of the call alone, and peak RSS);
* reading the file once (raw bytes) and writing the parameters' bytes once (with fsync): the I/O floor;
* the command line end to end (``tokenlearner-convert SRC -o OUT``), and the conversion's own work (the
  read/resolve/convert/write seconds of its ``--report``).

Targets (from the converter issue): CLI wall <= flax restore; own work <= 2 x (read once + write once);
peak RSS - baseline <= 1.5 x parameter bytes. ``--memory-only`` measures just the last (the baseline and the
command), which other processes on the machine do not disturb the way they disturb times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {  # hidden, layers, heads, mlp, tokenlearner_loc
    "B16": (768, 12, 12, 3072, 6),
    "L16": (1024, 24, 16, 4096, 12),
}
NUM_CLASSES = 1000
GRID = 14 * 14  # 224x224 at patch 16


def _arr(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.random(shape, dtype=np.float32) - 0.5


def param_tree(name: str, rng: np.random.Generator) -> dict:
    c, layers, heads, mlp, loc = SIZES[name]
    d = c // heads
    ln = lambda: {"scale": _arr(rng, c) + 1, "bias": _arr(rng, c)}  # noqa: E731
    tr: dict = {"posembed_input": {"pos_embedding": _arr(rng, 1, GRID, c)}, "encoder_norm": ln()}
    for i in range(layers):
        attn = {k: {"kernel": _arr(rng, c, heads, d), "bias": _arr(rng, heads, d)} for k in ("query", "key", "value")}
        attn["out"] = {"kernel": _arr(rng, heads, d, c), "bias": _arr(rng, c)}
        tr[f"encoderblock_{i}"] = {
            "LayerNorm_0": ln(),
            "LayerNorm_1": ln(),
            "MultiHeadDotProductAttention_0": attn,
            "MlpBlock_0": {"Dense_0": {"kernel": _arr(rng, c, mlp), "bias": _arr(rng, mlp)},
                           "Dense_1": {"kernel": _arr(rng, mlp, c), "bias": _arr(rng, c)}},
        }  # fmt: skip
    tr["TokenLearnerModuleV11_0"] = {
        "LayerNorm_0": ln(),
        "token_masking": {"Dense_0": {"kernel": _arr(rng, c, 64), "bias": _arr(rng, 64)},
                          "Dense_1": {"kernel": _arr(rng, 64, 8), "bias": _arr(rng, 8)}},
    }  # fmt: skip
    return {
        "embedding": {"kernel": _arr(rng, 16, 16, 3, c), "bias": _arr(rng, c)},
        "Transformer": tr,
        "output_projection": {"kernel": _arr(rng, c, NUM_CLASSES), "bias": _arr(rng, NUM_CLASSES)},
    }


def _like(tree: dict, rng: np.random.Generator) -> dict:
    return {k: _like(v, rng) if isinstance(v, dict) else _arr(rng, *v.shape) for k, v in tree.items()}


def _nbytes(tree: dict) -> int:
    return sum(_nbytes(v) if isinstance(v, dict) else v.nbytes for v in tree.values())


def make_checkpoint(name: str, cache: Path) -> tuple[Path, int]:
    """Generate (once) a Scenic optax TrainState checkpoint; return its path and the parameters' bytes."""
    from tokenlearner_torch.weights_convert.readers import write_flax_msgpack

    folder = cache / name
    path = folder / "checkpoint_1000"
    meta = folder / "params_bytes.txt"
    if path.is_file() and meta.is_file():
        return path, int(meta.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    params = param_tree(name, rng)
    state = {
        "opt_state": {"0": {"count": np.int32(1000), "mu": _like(params, rng), "nu": _like(params, rng)}, "1": {}},
        "params": params,
        "global_step": 1000,
        "model_state": {},
        "rng": np.array([0, 42], dtype=np.uint32),
        "metadata": {"chrono": {"accum_train_time": 12.5}},
    }
    write_flax_msgpack(path, state, wrap="bare")
    meta.write_text(str(_nbytes(params)))
    return path, _nbytes(params)


def _unused_run(cmd: list[str]) -> tuple[float, int, str]:
    """Run a subprocess; return (wall seconds, peak RSS bytes, stdout)."""
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()  # reads the pipes; wait4 below collects the rusage
    _, status, usage = os.wait4(proc.pid, 0) if proc.returncode is None else (0, 0, None)
    wall = time.perf_counter() - t
    if usage is None:  # communicate() already reaped it: fall back to RUSAGE_CHILDREN max
        import resource

        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode not in (0, None):
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.strip()[-500:]}")
    return wall, usage.ru_maxrss * 1024, out


def run_isolated(cmd: list[str]) -> tuple[float, int, str]:
    """Like run(), but measures the child's own peak RSS through a tiny wrapper (RUSAGE_CHILDREN is cumulative-max)."""
    wrapper = (
        "import os,sys,time,json,subprocess,resource\n"
        "t=time.perf_counter(); p=subprocess.run(sys.argv[1:],capture_output=True,text=True)\n"
        "w=time.perf_counter()-t; r=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024\n"
        "print(json.dumps({'wall':w,'rss':r,'rc':p.returncode,'out':p.stdout,'err':p.stderr[-800:]}))\n"
    )
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True)
    data = json.loads(res.stdout)
    if data["rc"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {data['err']}")
    return data["wall"], data["rss"], data["out"]


PY = sys.executable
FLAX_RESTORE = (
    "import time,sys\nfrom flax.training import checkpoints\n"
    "t=time.perf_counter(); s=checkpoints.restore_checkpoint(sys.argv[1], target=None); print(time.perf_counter()-t)"
)
READ_ONCE = "import time,sys\nt=time.perf_counter(); b=open(sys.argv[1],'rb').read(); print(time.perf_counter()-t)"
WRITE_ONCE = (
    "import time,sys,os\nb=os.urandom(1<<20)*(int(sys.argv[2])>>20)\nt=time.perf_counter()\n"
    "f=open(sys.argv[1],'wb'); f.write(b); f.flush(); os.fsync(f.fileno()); f.close(); print(time.perf_counter()-t)"
)


def bench(name: str, cache: Path, out_root: Path) -> dict:
    path, pbytes = make_checkpoint(name, cache)
    run_isolated([PY, "-c", READ_ONCE, str(path)])  # warm the page cache for everyone alike
    base_wall, base_rss, _ = run_isolated([PY, "-c", "import torch"])
    _, flax_rss, out = run_isolated([PY, "-c", FLAX_RESTORE, str(path)])
    flax_s = float(out.strip().splitlines()[-1])
    _, _, out = run_isolated([PY, "-c", READ_ONCE, str(path)])
    read_s = float(out.strip().splitlines()[-1])
    scratch = out_root / f"{name}.bin"
    _, _, out = run_isolated([PY, "-c", WRITE_ONCE, str(scratch), str(pbytes)])
    write_s = float(out.strip().splitlines()[-1])
    scratch.unlink()
    target = out_root / f"{name}_torch"
    shutil.rmtree(target, ignore_errors=True)
    report = out_root / f"{name}_report.json"
    cli_wall, cli_rss, _ = run_isolated(_cli(name, path, target, report))
    seconds = json.loads(report.read_text())["seconds"]
    own = sum(v for k, v in seconds.items() if k != "torch_import_wait")  # start-up, not the conversion
    shutil.rmtree(target, ignore_errors=True)
    return {
        "model": name,
        "file_bytes": path.stat().st_size,
        "param_bytes": pbytes,
        "import_torch_s": base_wall,
        "baseline_rss": base_rss,
        "flax_restore_s": flax_s,
        "flax_rss": flax_rss,
        "read_once_s": read_s,
        "write_once_s": write_s,
        "cli_wall_s": cli_wall,
        "cli_rss": cli_rss,
        "own_work_s": own,
    }


def _cli(name: str, path: Path, target: Path, report: Path | None = None) -> list[str]:
    """The command line converting ``path`` into ``target``."""
    loc = SIZES[name][4]
    # The console script of this interpreter's environment (a pyenv/conda shim in front of it would add its
    # own start-up to the measurement); `python -m` if the package is not installed as a distribution.
    script = Path(sys.executable).parent / "tokenlearner-convert"
    exe = [str(script)] if script.exists() else [sys.executable, "-m", "tokenlearner_torch.weights_convert.cli"]
    extra = ["--report", str(report)] if report else []
    return [*exe, str(path), "-o", str(target), "-q", *extra,
            "--set", "tokenizer.type=dynamic", "--set", f"tokenizer.tokenlearner_loc={loc}", "--set", "classifier=gap"]  # fmt: skip


def memory_only(name: str, cache: Path, out_root: Path, repeat: int) -> str:
    """Peak RSS of the command above the `import torch` baseline, per run, as a multiple of the parameters."""
    path, pbytes = make_checkpoint(name, cache)
    base = min(run_isolated([PY, "-c", "import torch"])[1] for _ in range(repeat))
    target = out_root / f"{name}_torch"
    ratios = []
    for _ in range(repeat):
        shutil.rmtree(target, ignore_errors=True)
        ratios.append((run_isolated(_cli(name, path, target))[1] - base) / pbytes)
    shutil.rmtree(target, ignore_errors=True)
    med = statistics.median(ratios)
    runs = ", ".join(f"{r:.2f}" for r in ratios)
    return f"| {name} | {pbytes / (1 << 20):.0f} MiB | {base / (1 << 20):.0f} MiB | {med:.2f} ({med * pbytes / (1 << 20):.0f} MiB; runs {runs}) |"


def table(rows: list[dict]) -> str:
    mb = 1 << 20
    head = (
        "| model | file | params | flax restore | CLI wall (target <= restore) | own work | read+write once | "
        "own / (read+write) (target <= 2) | CLI peak RSS - baseline | / params (target <= 1.5) | flax peak RSS |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        io = r["read_once_s"] + r["write_once_s"]
        above = r["cli_rss"] - r["baseline_rss"]
        lines.append(
            f"| {r['model']} | {r['file_bytes'] / mb:.0f} MiB | {r['param_bytes'] / mb:.0f} MiB | {r['flax_restore_s']:.2f} s | "
            f"{r['cli_wall_s']:.2f} s ({r['cli_wall_s'] / r['flax_restore_s']:.2f}x) | {r['own_work_s']:.2f} s | {io:.2f} s | "
            f"{r['own_work_s'] / io:.2f} | {above / mb:.0f} MiB | {above / r['param_bytes']:.2f} | {r['flax_rss'] / mb:.0f} MiB |"
        )
    return "\n".join(lines)


def medians(rows: list[dict]) -> str:
    """One line per model: the median of each figure over the runs, and the targets judged on them."""
    mb = 1 << 20
    lines = [
        "Medians over the runs (a shared machine: single runs of either side vary by 2x):",
        "",
        "| model | runs | flax restore | CLI wall | CLI / restore, per run (target <= 1) | own / (read+write) (target <= 2) | RSS above baseline / params (target <= 1.5) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        med = lambda f: statistics.median(f(r) for r in mine)  # noqa: E731
        restore, wall = med(lambda r: r["flax_restore_s"]), med(lambda r: r["cli_wall_s"])
        ratio = med(lambda r: r["cli_wall_s"] / r["flax_restore_s"])  # each run's own ratio: back-to-back
        own = med(lambda r: r["own_work_s"] / (r["read_once_s"] + r["write_once_s"]))
        rss = med(lambda r: (r["cli_rss"] - r["baseline_rss"]) / r["param_bytes"])
        lines.append(f"| {name} | {len(mine)} | {restore:.2f} s | {wall:.2f} s | {ratio:.2f} | {own:.2f} | {rss:.2f} ({rss * mine[0]['param_bytes'] / mb:.0f} MiB) |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["B16", "L16"], choices=sorted(SIZES))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/tokenlearner_bench"))
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--memory-only", action="store_true", help="only the peak RSS of the command above `import torch`")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    out_root = args.cache / "out"
    out_root.mkdir(exist_ok=True)
    if args.memory_only:
        print("| model | params | `import torch` peak RSS | CLI peak RSS above it / params (target <= 1.5), median |")
        print("|---|---|---|---|")
        for name in args.models:
            print(memory_only(name, args.cache, out_root, args.repeat), flush=True)
        return
    rows = []
    for rep in range(args.repeat):
        for name in args.models:
            row = bench(name, args.cache, out_root)
            row["run"] = rep + 1
            rows.append(row)
            print(f"run {rep + 1} {name}: done", file=sys.stderr, flush=True)
    load = os.getloadavg()
    imports = ", ".join(f"{r['import_torch_s']:.2f} s" for r in rows)
    print(f"machine: {os.cpu_count()} CPUs, load average {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f}; import torch alone: {imports}")
    print(table(rows))
    print()
    print(medians(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
