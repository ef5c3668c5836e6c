"""Data parallelism with Scenic's pmap semantics (training/distributed.py) on 2 gloo processes (CPU).

Each job runs tests/dist_worker.py's main() in one process per rank, with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT on 127.0.0.1 with a free port), and reads what the ranks wrote. The rank
processes are forked by a server process that imported torch and the package once (tests/forkserver.py; a
fresh interpreter per rank would spend ~3 s of CPU on those imports); torchrun itself launches the README's
command in test_torchrun_cli_two_processes (and scripts/train_distributed.py in tests/test_distributed.py).
Compared against:

* shared/loop_goldens/public_pmap2 (copied to tests/fixtures/loop_goldens): a genuine 2-device Scenic run
  (``jax.pmap``, global batch 8 = 2 x 4, a different batch_mask per device, a fully masked eval shard):
  per-step scalars 1e-4 relative, final parameters 1e-4 scaled (noise-sensitive ones 1e-2);
* the mean of the per-process gradients, gathered (DDP's average must equal it bitwise for 2 processes:
  halving is exact, so ``g0/2 + g1/2 == (g0 + g1)/2``);
* one process on the whole global batch (no masking): 1e-6.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from forkserver import ForkedProcess, ForkServer

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "fixtures" / "loop_goldens" / "public_pmap2"
SCALAR_TOL, PARAM_TOL, NOISE_PARAM_TOL = 1e-4, 1e-4, 1e-2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What the ranks import, once, in the fork server they are forked from (tests/forkserver.py; importing runs no
# torch computation): each rank is still a separate process (own memory, own sockets; a rank that exits or
# sleeps is really dead or silent), without ~3 s of CPU of imports (torch._dynamo: torch.optim's first optimizer).
PRELOAD = ["torch._dynamo", "torch.distributed.fsdp", "torch.distributed.tensor.experimental",
           "torch.nn.attention.flex_attention", "torch.nn.parallel", "torch.utils.flop_counter",
           "torch.utils.module_tracker", "safetensors.torch", "loop_goldens", "dist_worker",
           "tokenlearner_torch.models", "tokenlearner_torch.scenic", "tokenlearner_torch.weights_convert.mapping",
           "tokenlearner_torch.training.loop", "tokenlearner_torch.training.checkpoint"]
_RANK = "import sys, dist_worker; sys.exit(dist_worker.main())"


def launch(mode: str, out: Path, nproc: int = 2, *, timeout: float = 240, collective_timeout_s: float = 60,
           wait_for: int | None = None, args: tuple[str, ...] = ()) -> tuple[list[dict | None], list[ForkedProcess]]:  # fmt: skip
    """Run ``nproc`` ranks of tests/dist_worker.py (separate processes; rank r's output in OUTDIR/log<r>.txt);
    wait for all (or for rank ``wait_for`` only: the others are then killed). Returns what each rank wrote
    and each one's process (``.returncode`` as subprocess.Popen's)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "OMP_NUM_THREADS": "1", "WORKER_TIMEOUT_S": str(collective_timeout_s), "PYTHONPATH": str(ROOT / "src")}  # fmt: skip
    procs = [ForkServer.spawn(_RANK, [mode, str(out), *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              cwd=ROOT, stdout=out / f"log{r}.txt", preload=PRELOAD)
             for r in range(nproc)]
    awaited = procs if wait_for is None else [procs[wait_for]]
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in awaited):
        if time.monotonic() > deadline:
            for p in procs:
                p.kill()
                p.wait()
            raise subprocess.TimeoutExpired(f"{mode} ranks", timeout)
        time.sleep(0.02)
    for p in procs:  # wait_for's peers
        p.kill()
        p.wait()
    results = []
    for rank in range(nproc):
        f = out / f"rank{rank}.json"
        results.append(json.loads(f.read_text()) if f.exists() else None)
    if wait_for is None:
        for rank, p in enumerate(procs):
            assert p.returncode == 0, (out / f"log{rank}.txt").read_text()[-4000:]
    return results, procs


def _flax_flat(path: Path) -> dict[str, np.ndarray]:
    from tokenlearner_torch.weights_convert import read_checkpoint
    from tokenlearner_torch.weights_convert.layouts import flatten_tree

    return {k: np.asarray(v) for k, v in flatten_tree(read_checkpoint(str(path))).items()}


def _scaled(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


def _rel(a: float, ref: float) -> float:
    return abs(a - ref) / max(abs(ref), 1e-12)


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


@pytest.fixture(scope="module")
def semantics(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("semantics")
    results, _ = launch("semantics", out)
    return results, out


def _summaries(per_step: list[dict], golden: dict) -> dict[int, dict[str, float]]:
    """Scenic's train summaries from the per-step records: a summary at step s normalises the metrics
    (sum, count) summed over the steps since the previous summary, and averages the training logs
    (l2_grads, l2_params, l2_updates, learning_rate) over the same steps. The summary steps are those the
    golden's run wrote."""
    steps = [r["step"] for r in golden["scalars"] if "train_loss" in r]
    out, prev = {}, 0
    for s in steps:
        window = [r for r in per_step if prev < r["step"] <= s]
        row = {}
        for name in window[0]["metrics"]:
            total = sum(r["metrics"][name][0] for r in window)
            count = sum(r["metrics"][name][1] for r in window)
            row[f"train_{name}"] = total / count
        for key in ("l2_grads", "l2_params", "l2_updates", "learning_rate"):
            row[key] = float(np.mean([r[key] for r in window]))
        out[s], prev = row, s
    return out


def test_public_pmap2_scalars_two_processes(semantics, golden):
    """The genuine 2-device Scenic run's train and eval scalars, step by step, from 2 gloo processes."""
    results, _ = semantics
    lead = results[0]
    summaries = _summaries(lead["per_step"], golden)
    checked = 0
    for record in golden["scalars"]:
        step = record["step"]
        for key, want in record.items():
            if key in ("step", "num_trainable_params", "gflops"):
                continue
            if key.startswith("valid_"):
                got = lead["evals"][str(step)][key.removeprefix("valid_")]
            else:
                got = summaries[step][key]
            err = abs(got - want) if want == 0 else _rel(got, want)
            assert err <= SCALAR_TOL, f"step {step} {key}: port {got!r}, Scenic {want!r}"
            checked += 1
    assert checked >= 20


def test_public_pmap2_params_two_processes(semantics, golden):
    """After 5 steps, the parameters equal genuine Scenic's (and are bitwise equal on both ranks)."""
    results, out = semantics
    assert results[0]["params_digest"] == results[1]["params_digest"]
    got = dict(np.load(out / "golden_params.npz"))
    ref = _flax_flat(GOLDEN / "params_final.msgpack")
    assert set(got) == set(ref)
    noise = set(golden["noise_sensitive_params"])
    for k in ref:
        tol = NOISE_PARAM_TOL if k in noise else PARAM_TOL
        assert _scaled(got[k], ref[k]) <= tol, f"{k}: {_scaled(got[k], ref[k]):.3g}"


def test_ddp_gradient_is_the_mean_of_per_process_gradients(semantics):
    """Scenic's pmean: each process differentiates the mean loss over ITS OWN unmasked rows (step 1 of the
    golden: rank 0 has 3 of 4 rows, rank 1 all 4), and DDP's gradient is exactly the mean of the two."""
    results, _ = semantics
    for r in results:
        assert r["ddp_vs_mean_max_abs"] == 0.0
        # The per-process gradients really differ (else the check above could not fail).
        assert r["ddp_vs_own_max_abs"] > 1e-3


def test_fully_masked_eval_shard(semantics, golden):
    """Eval batch 1 masks all of rank 1's rows: its (sum, count) is (0, 0) and the global metric is Scenic's
    (no NaN), at every evaluation."""
    results, _ = semantics
    for step, evals in results[0]["evals"].items():
        want = next(r for r in golden["scalars"] if r["step"] == int(step) and "valid_loss" in r)
        assert _rel(evals["loss"], want["valid_loss"]) <= SCALAR_TOL
        assert _rel(evals["prec@1"], want["valid_prec@1"]) <= SCALAR_TOL
    assert results[0]["evals"] == results[1]["evals"]


def test_two_processes_equal_one_process(semantics, golden):
    """The same unmasked global batches on 2 processes x 4 rows and on 1 process x 8 rows: 1e-6.

    The golden's noise-sensitive parameters (a structurally zero gradient made of rounding noise, which
    differs with the summation order and which Adam normalises into lr-sized steps) get 1e-2."""
    results, out = semantics
    assert results[0]["unmasked_digest"] == results[1]["unmasked_digest"]
    two = dict(np.load(out / "unmasked_2proc.npz"))
    one = dict(np.load(out / "unmasked_1proc.npz"))
    noise = set(golden["noise_sensitive_params"])
    worst = max((float(np.abs(two[k] - one[k]).max()), k) for k in one if k not in noise)
    assert worst[0] <= 1e-6, worst
    assert max(float(np.abs(two[k] - one[k]).max()) for k in noise) <= NOISE_PARAM_TOL
    for a, b in zip(results[0]["unmasked_logs"], results[0]["unmasked_logs_1proc"]):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (key, a[key], b[key])


@pytest.mark.slow
def test_fsdp2_equals_ddp(semantics, golden, tmp_path):
    """config.fsdp = True (FSDP2's fully_shard) on 2 processes: each holds half of the parameters and of the
    Adam moments, and after 3 steps the parameters equal DDP's (1e-6; noise-sensitive ones 1e-2), bitwise
    equal on both ranks once gathered."""
    ddp_results, ddp_out = semantics
    results, _ = launch("fsdp", tmp_path)
    assert results[0]["params_digest"] == results[1]["params_digest"]
    for r in results:
        held = r["held"]
        assert held["local_param_numel"] < 0.6 * held["total_param_numel"], held
        assert held["local_mu_numel"] == held["local_param_numel"], held
    fsdp = dict(np.load(tmp_path / "unmasked_fsdp.npz"))
    ddp = dict(np.load(ddp_out / "unmasked_2proc.npz"))
    noise = set(golden["noise_sensitive_params"])
    worst = max((float(np.abs(fsdp[k] - ddp[k]).max()), k) for k in ddp if k not in noise)
    assert worst[0] <= 1e-6, worst
    assert max(float(np.abs(fsdp[k] - ddp[k]).max()) for k in noise) <= NOISE_PARAM_TOL
    for a, b in zip(results[0]["logs"], ddp_results[0]["unmasked_logs"]):
        for key in a:
            assert abs(a[key] - b[key]) <= 1e-6 * max(1.0, abs(b[key])), (key, a[key], b[key])


def test_ranks_that_disagree_fail_fast(semantics):
    """check_agree: every rank raises the same one-line ConfigError naming what differs."""
    results, _ = semantics
    messages = [r["disagree"] for r in results]
    assert messages[0] is not None and messages[0] == messages[1]
    assert "checkpoint step" in messages[0] and "rank 1" in messages[0] and "\n" not in messages[0]


def _prepare_workdirs(out: Path, starts: dict[str, str]) -> None:
    """Rank 0's workdirs hold the golden's start checkpoints; rank 1's are empty (it must restore rank 0's)."""
    import shutil

    for tag, start in starts.items():
        shutil.copytree(GOLDEN / start, out / "rank0" / tag)
        for p in (out / "rank0" / tag).iterdir():
            p.chmod(0o644)
        (out / "rank1" / tag).mkdir(parents=True)


@pytest.fixture(scope="module")
def train_runs(tmp_path_factory) -> tuple[list[dict], Path]:
    """training.train() on 2 processes from workdir_step0 ("full") and from Scenic's ckpt_mid ("mid")."""
    out = tmp_path_factory.mktemp("train")
    _prepare_workdirs(out, {"full": "workdir_step0", "mid": "ckpt_mid"})
    results, _ = launch("train", out)
    return results, out


@pytest.mark.parametrize("tag, scalars", [("full", "scalars"), ("mid", "scalars_resumed_from_mid")])
def test_train_reproduces_public_pmap2(train_runs, golden, tag, scalars):
    """Scenic's 2-device train(), reproduced by train() on 2 gloo processes: every write_scalars call
    (1e-4 relative; gflops is the port's FLOP count, not XLA's, and left out), the eval summary, the final
    parameters (1e-4 scaled, noise-sensitive 1e-2), bitwise equal on both ranks; only rank 0 wrote."""
    from loop_goldens import compare_scalars

    results, out = train_runs
    lead, other = results[0][tag], results[1][tag]
    assert compare_scalars(lead["scalars"], golden[scalars], rtol=SCALAR_TOL, skip=("gflops",)) == []
    summary = golden["eval_summary" if tag == "full" else "eval_summary_resumed"]
    for k, v in summary.items():
        assert _rel(lead["eval_summary"][k], v) <= SCALAR_TOL
    assert lead["digest"] == other["digest"]
    got = dict(np.load(out / f"{tag}_params.npz"))
    ref = _flax_flat(GOLDEN / "params_final.msgpack")
    noise = set(golden["noise_sensitive_params"])
    for k in ref:
        assert _scaled(got[k], ref[k]) <= (NOISE_PARAM_TOL if k in noise else PARAM_TOL), k
    if tag == "full":
        assert lead["files"] == golden["checkpoints_written_by_scenic"]
    assert other["files"] == []  # rank 1 restored rank 0's checkpoint and wrote nothing


@pytest.mark.slow
def test_killed_rank_then_rerun_resumes_bitwise(train_runs, tmp_path):
    """Rank 1 dies after step 4 of the 5-step run: rank 0 stops with a one-line PeerError (no hang); the same command
    again resumes both ranks from checkpoint_3, the last complete one, and ends bitwise where the
    uninterrupted run ended."""
    _prepare_workdirs(tmp_path, {"killed": "workdir_step0"})
    start = time.monotonic()
    results, procs = launch("train_kill", tmp_path, wait_for=0, timeout=180, collective_timeout_s=30)
    assert procs[1].returncode == 3
    # One line (not torch's multi-line report of DDP's backward), naming the step, the dead rank, the timeout.
    err = results[0]["error"]
    assert err is not None and "\n" not in err, err
    assert err.startswith("PeerError: rank 0/2: training step 5 failed: rank 1 died or did not answer"), err
    assert "collective timeout 30 s" in err, err
    assert time.monotonic() - start < 180
    assert sorted(p.name for p in (tmp_path / "rank0" / "killed").iterdir()) == ["checkpoint_0", "checkpoint_3"]
    (tmp_path / "rank0.json").unlink()
    resumed, _ = launch("train_resume", tmp_path)
    full = train_runs[0][0]["full"]
    assert resumed[0]["digest"] == resumed[1]["digest"] == full["digest"]
    assert resumed[0]["files"] == ["checkpoint_0", "checkpoint_3", "checkpoint_5"]


def _checkpoint_leaves(path: Path) -> dict[str, np.ndarray]:
    from loop_goldens import flat

    from tokenlearner_torch.training.checkpoint import read_train_state

    return {k: np.asarray(v) for k, v in flat(read_train_state(path)).items()}


@pytest.mark.slow
def test_fsdp2_train_checkpoints_equal_ddp_and_resume(train_runs, golden, tmp_path):
    """train() with config.fsdp = True on 2 processes from workdir_step0: checkpoint_3 and checkpoint_5 (built
    by gathering the shards of the parameters AND of Adam's moments on every rank, written by rank 0 alone)
    hold the same tree as the 2-process DDP run's files, every parameter and moment within 1e-6 (the golden's
    noise-sensitive parameters, and their moments, 1e-2 scaled), the same steps and counts. Resumed from its
    own checkpoint_3, the FSDP2 run ends bitwise where it ended uninterrupted.

    Ctrl-C under FSDP2: KeyboardInterrupt on both ranks after step 4 of a run resumed from checkpoint_3: both
    leave train() with it at once (no checkpoint of step 4: gathering the shards is a collective that a rank
    interrupted elsewhere could not join; nothing waits for the collective timeout)."""
    _prepare_workdirs(tmp_path, {"fsdp_full": "workdir_step0"})
    results, _ = launch("train_fsdp", tmp_path)
    lead, other = results[0], results[1]
    assert lead["fsdp_full"]["files"] == golden["checkpoints_written_by_scenic"]
    assert other["fsdp_full"]["files"] == other["fsdp_mid"]["files"] == []  # rank 1 wrote nothing
    ddp_dir, fsdp_dir = train_runs[1] / "rank0" / "full", tmp_path / "rank0" / "fsdp_full"
    noise = set(golden["noise_sensitive_params"])
    for name in ("checkpoint_3", "checkpoint_5"):
        ddp, fsdp = _checkpoint_leaves(ddp_dir / name), _checkpoint_leaves(fsdp_dir / name)
        assert set(fsdp) == set(ddp), sorted(set(fsdp) ^ set(ddp))
        compared = 0
        for key, ref in ddp.items():
            if key.startswith("metadata/"):  # wall-clock times (chrono) and torch's random state
                continue
            got = fsdp[key]
            assert got.shape == ref.shape and got.dtype == ref.dtype, key
            if ref.dtype == object:  # an empty node ({}: model_state, optax's stateless transforms)
                assert got.item() == ref.item() == {}, key
                continue
            if ref.dtype.kind in "iu":
                assert np.array_equal(got, ref), key
                continue
            is_noise = any(key.endswith("/" + n) or key == "params/" + n for n in noise)
            assert _scaled(got, ref) <= (NOISE_PARAM_TOL if is_noise else 1e-6), (name, key, _scaled(got, ref))
            compared += 1
        assert compared >= 3 * sum(1 for k in ddp if k.startswith("params/")), compared  # params, mu, nu
    # The resumed run (from its own checkpoint_3) ends bitwise equal to the uninterrupted one, on both ranks.
    assert lead["fsdp_mid"]["digest"] == lead["fsdp_full"]["digest"] == other["fsdp_mid"]["digest"]
    assert lead["fsdp_mid"]["files"] == ["checkpoint_3", "checkpoint_5"]
    mid5, full5 = _checkpoint_leaves(tmp_path / "rank0" / "fsdp_mid" / "checkpoint_5"), _checkpoint_leaves(fsdp_dir / "checkpoint_5")
    for key in full5:
        if not key.startswith("metadata/"):
            assert np.array_equal(mid5[key], full5[key]), key
    for r in results:
        assert r["fsdp_int"]["error"] == "KeyboardInterrupt", r["fsdp_int"]
        assert r["fsdp_int"]["after_s"] < 20, r["fsdp_int"]  # one step; the collective timeout is 60 s
    assert sorted(p.name for p in (tmp_path / "rank0" / "fsdp_int").iterdir()) == ["checkpoint_3"]


DIGITS = ROOT / "configs" / "digits_tokenlearner.py"
# The demo config made tiny: 3 steps of the global batch 64 (32 per process), 2 blocks, one evaluation.
TINY = ("num_training_epochs=null", "num_training_steps=3", "log_eval_steps=3", "checkpoint_steps=2",
        "model.num_layers=2", "model.tokenizer.tokenlearner_loc=1")  # fmt: skip


@pytest.mark.slow
def test_torchrun_cli_two_processes(tmp_path):
    """`torchrun --standalone --nproc_per_node 2 -m tokenlearner_torch.training.cli ...` (the README's
    command) on gloo: exit 0; rank 0 alone prints (rank 1's stdout and stderr are empty) and writes (one
    TensorBoard file, each summary once in metrics.jsonl, checkpoint_3 of global step 3)."""
    import collections

    from tokenlearner_torch.training.checkpoint import read_train_state

    workdir, logs = tmp_path / "wd", tmp_path / "logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--redirects", "3", "--log-dir", str(logs), "-m", "tokenlearner_torch.training.cli",
           "--config", f"{DIGITS}:runlocal", "--workdir", str(workdir), "--device", "cpu"]  # fmt: skip
    for item in TINY:
        cmd += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENLEARNER_DIST_TIMEOUT": "60", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    by_rank = {int(f.parent.name): f for f in logs.rglob("stderr.log")}
    assert sorted(by_rank) == [0, 1], sorted(logs.rglob("*"))
    for rank in (0, 1):
        out = (by_rank[rank].parent / "stdout.log").read_text()
        assert out == "", (rank, out)
    err0, err1 = by_rank[0].read_text(), by_rank[1].read_text()
    assert err1 == "", err1
    lines = err0.splitlines()
    assert "Traceback" not in err0 and sum("tokenlearner-train: done: 3 steps;" in ln for ln in lines) == 1, err0
    assert any(ln.startswith("tokenlearner-train: step 3/3: valid_accuracy=") for ln in lines), err0
    names = sorted(p.name for p in workdir.iterdir())
    events = [n for n in names if n.startswith("events.out.tfevents.")]  # one per writing process (pid in name)
    assert len(events) <= 1 and sorted(set(names) - set(events)) == ["checkpoint_3", "metrics.jsonl"], names
    records = [json.loads(ln) for ln in (workdir / "metrics.jsonl").read_text().splitlines()]
    seen = collections.Counter((r["step"], k) for r in records for k in r if k != "step")
    assert seen and max(seen.values()) == 1, seen.most_common(3)
    assert int(np.asarray(read_train_state(workdir / "checkpoint_3")["global_step"])) == 3


def test_cli_prints_a_peer_error_as_one_line(tmp_path, monkeypatch, capsys):
    """tokenlearner-train when train() raises the PeerError of a dead rank: exit 1 (the run failed, not an
    input error), one line on stderr naming it, no traceback."""
    from tokenlearner_torch.training import cli, loop
    from tokenlearner_torch.training.distributed import PeerError

    message = "rank 0/2: training step 5 failed: rank 1 died or did not answer (collective timeout 30 s; x)"

    def dead_peer(**kwargs):
        raise PeerError(message)

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(loop, "train", dead_peer)
    argv = ["--config", f"{DIGITS}:runlocal", "--workdir", str(tmp_path / "wd"), "-q"]
    for item in TINY:
        argv += ["--set", item]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"tokenlearner-train: error: PeerError: {message}\n", err


def test_train_ranks_with_different_configs_fail_fast(tmp_path):
    """train() on ranks whose configs differ (max_grad_norm): the same one-line ConfigError on both, before
    any step, naming the key where they differ."""
    results, _ = launch("train_disagree", tmp_path)
    errors = [r["error"] for r in results]
    assert errors[0] is not None and errors[0] == errors[1], errors
    assert errors[0].startswith("the processes disagree on config") and "max_grad_norm" in errors[0], errors[0]
    assert "\n" not in errors[0]
    assert not list((tmp_path / "rank0").glob("checkpoint_*"))


def test_dead_rank_is_an_error_not_a_hang(tmp_path):
    """Rank 1 exits after the first all-reduce: rank 0's next collective fails at once."""
    start = time.monotonic()
    results, procs = launch("kill", tmp_path, wait_for=0, timeout=120, collective_timeout_s=30)
    assert procs[1].returncode == 3
    err = results[0]["error"]
    assert err is not None and err.startswith("PeerError: rank 0/2: all_reduce failed"), err
    assert results[0]["after_s"] < 30
    assert time.monotonic() - start < 120


def test_silent_rank_times_out(tmp_path):
    """Rank 1 stops answering (alive, asleep): rank 0 gets a PeerError after the collective timeout."""
    results, _ = launch("stall", tmp_path, wait_for=0, timeout=120, collective_timeout_s=4)
    err = results[0]["error"]
    assert err is not None and err.startswith("PeerError: rank 0/2: all_reduce failed") and "4 s" in err, err
    assert 3.5 <= results[0]["after_s"] < 30


def test_single_process_context_and_errors(monkeypatch):
    """Without a process group or torchrun's environment: rank 0 of 1, collectives are no-ops; a global
    batch the processes do not divide is a ConfigError."""
    import torch

    from tokenlearner_torch.errors import ConfigError
    from tokenlearner_torch.training.distributed import get_context, shard_rows

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = get_context()
    assert (ctx.rank, ctx.world_size, ctx.is_lead) == (0, 1, True)
    t = torch.tensor([1.0, 2.0])
    ctx.all_reduce_sum_([t])
    assert t.tolist() == [1.0, 2.0]
    assert ctx.all_reduce_metrics({"loss": (3.0, 2.0)}) == {"loss": (3.0, 2.0)}
    assert shard_rows(8, 1, 2) == slice(4, 8)
    with pytest.raises(ConfigError, match="global batch size 6 is not divisible by the 4 processes"):
        shard_rows(6, 0, 4)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="MASTER_ADDR is not set"):
        get_context()
    monkeypatch.setenv("TOKENLEARNER_DIST_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="TOKENLEARNER_DIST_TIMEOUT"):
        get_context()
