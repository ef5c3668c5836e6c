"""Mutation check: deliberate small bugs that the test suite must catch.

Each mutant is one small, realistic bug in the port (a dropped mask, a swapped initialiser, a learning rate
read one step late, ...), applied by monkeypatching the installed package inside a pytest subprocess, and
the test node ids that must fail on it. The script first runs all those tests unmutated (they must pass),
then, per mutant, only its own tests (``-x``: the first failure kills it), and reports each mutant as
``killed`` (pytest exit 1), ``SURVIVED`` (exit 0: the tests miss the bug) or ``ERROR`` (anything else: a
test id that does not exist, a mutant that no longer applies). Exit status 0 when every mutant is killed
and the baseline passes, else 1; 2 on a usage error.

    python scripts/mutants.py                 # every mutant, 2 at a time
    python scripts/mutants.py --list          # names, bugs and killing tests
    python scripts/mutants.py --only lr_one_step_late --jobs 1 --json out.json

The same file is the pytest plugin that applies a mutant: ``python -m pytest -p mutants`` with ``scripts/``
on ``PYTHONPATH`` and ``TOKENLEARNER_MUTANT=<name>`` in the environment (without the variable the plugin
does nothing). A mutant only changes this process's view of ``tokenlearner_torch``; no file is touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

ENV = "TOKENLEARNER_MUTANT"
ROOT = Path(__file__).resolve().parent.parent
GOLDEN_TRAIN = "tests/test_training_goldens.py"


@dataclass(frozen=True)
class Mutant:
    """``name``: its id; ``bug``: one line saying what is broken; ``apply``: makes the bug (monkeypatch);
    ``killers``: pytest node ids (relative to the repository root) of which at least one must fail."""

    name: str
    bug: str
    apply: Callable[[], None]
    killers: tuple[str, ...]


MUTANTS: dict[str, Mutant] = {}


def mutant(name: str, bug: str, killers: list[str]) -> Callable[[Callable[[], None]], Callable[[], None]]:
    def register(apply: Callable[[], None]) -> Callable[[], None]:
        if name in MUTANTS:
            raise ValueError(f"mutant {name!r} is defined twice")
        MUTANTS[name] = Mutant(name, bug, apply, tuple(killers))
        return apply

    return register


def _patch(owner: Any, attr: str, value: Any) -> None:
    """``owner.attr = value``, refusing a name that does not exist: a refactor that renames the target makes
    the mutant fail loudly (ERROR) instead of silently patching nothing (a false SURVIVED or killed)."""
    if not hasattr(owner, attr):
        raise AttributeError(f"mutant target {getattr(owner, '__name__', owner)}.{attr} does not exist")
    setattr(owner, attr, value)


def _after_init(cls: type, edit: Callable[[Any], None]) -> None:
    """Run ``edit(self)`` after every ``cls(...)`` construction (for instance-level mutations)."""
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        edit(self)

    _patch(cls, "__init__", __init__)


def _identity(x):
    return x


# ------------------------------------------------------------------------------------------------------
# The mutants (issue 20: "What done means: mutants die").


@mutant("layer_norm_xla_cpu_runs_fused", "numerics('xla_cpu') silently runs torch's fused LayerNorm",
        ["tests/test_layer_norm.py::test_xla_cpu_numerics_are_bitwise_jitted_flax[4x197-48]",
         "tests/test_layer_norm.py::test_xla_cpu_mode_computes_flax_formula[64]"])  # fmt: skip
def _():
    import torch.nn.functional as F

    from tokenlearner_torch import flax_numerics

    def fused(x, weight, bias, eps):
        return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)

    _patch(flax_numerics, "layer_norm", fused)


@mutant("decay_mask_ignored", "skip_scale_and_bias_regularization ignored: weight decay on biases and scales too",
        [f"{GOLDEN_TRAIN}::test_final_params_match_scenic[adamw_masked_gap]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import optim

    _patch(optim, "weight_decay_mask", lambda specs: [True] * len(specs))


@mutant("surgery_inflations_swapped", "fine-tuning surgery: average_frame and central_frame inflation swapped",
        [f"{GOLDEN_TRAIN}::test_surgery_matches_scenic[inflate_average_resize_tile]",
         f"{GOLDEN_TRAIN}::test_surgery_matches_scenic[inflate_central_tile_gradclip]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import surgery

    original = surgery.inflate_embedding
    swap = {"average_frame_initializer": "central_frame_initializer",
            "central_frame_initializer": "average_frame_initializer"}  # fmt: skip
    _patch(surgery, "inflate_embedding", lambda target, restored, method: original(target, restored, swap.get(method, method)))


@mutant("init_frame_initializers_swapped", "3-D patch embedding init: central_frame_ and average_frame_ swapped",
        ["tests/test_initializers.py::test_video_embedding_initialisers[central_frame_initializer]"])  # fmt: skip
def _():
    from tokenlearner_torch import initializers

    central, average = initializers.central_frame_, initializers.average_frame_
    _patch(initializers, "central_frame_", average)
    _patch(initializers, "average_frame_", central)


@mutant("encoder_dropout_removed", "Encoder1DBlock: the dropout after attention (Dropout_0) removed",
        ["tests/test_dropout_sites.py::test_dropout_sites_match_flax_with_the_same_masks[learner]"])  # fmt: skip
def _():
    from tokenlearner_torch.layers import Encoder1DBlock

    _after_init(Encoder1DBlock, lambda block: setattr(block.Dropout_0, "forward", _identity))


@mutant("encoder_dropout_moved", "Encoder1DBlock: the dropout after attention applied to its input instead",
        ["tests/test_dropout_sites.py::test_dropout_sites_match_flax_with_the_same_masks[learner]"])  # fmt: skip
def _():
    from tokenlearner_torch.layers import Encoder1DBlock

    def forward(self, inputs):
        x = self.MultiHeadDotProductAttention_0(self.Dropout_0(self.LayerNorm_0(inputs)))
        x = self.StochasticDepth_0(x) + inputs
        y = self.MlpBlock_0(self.LayerNorm_1(x))
        return self.StochasticDepth_1(y) + x

    _patch(Encoder1DBlock, "forward", forward)


@mutant("mlp_dropout_removed", "MlpBlock: the dropout after Dense_1 (Dropout_1) removed",
        ["tests/test_dropout_sites.py::test_dropout_sites_match_flax_with_the_same_masks[learner]"])  # fmt: skip
def _():
    from tokenlearner_torch.layers import MlpBlock

    _after_init(MlpBlock, lambda block: setattr(block.Dropout_1, "forward", _identity))


@mutant("bf16_tokenlearner_in_bf16", "bf16 policy: TokenLearner (meant to stay float32) computes in bfloat16",
        ["tests/test_bf16_policy.py::test_bf16_policy_per_module[learner]"])  # fmt: skip
def _():
    import torch

    from tokenlearner_torch import models, token_learner
    from tokenlearner_torch.layers import resolve_dtype

    # The bug a port makes by handing the encoder's dtype to the TokenLearner as well: its LayerNorm,
    # MLP and pooling in bfloat16, so the residual stream leaves it in bfloat16.
    new_token_learner = models._Encoder._new_token_learner

    def marked(encoder):
        module = new_token_learner(encoder)
        module.__dict__["_mutant_bf16"] = resolve_dtype(encoder.dtype) == torch.bfloat16
        return module

    _patch(models._Encoder, "_new_token_learner", marked)
    for cls in (token_learner.TokenLearnerModuleV11, token_learner.TokenLearnerModule):
        original = cls.forward

        def forward(self, inputs, _original=original):
            if not self.__dict__.get("_mutant_bf16"):
                return _original(self, inputs)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return _original(self, inputs.to(torch.bfloat16)).to(torch.bfloat16)

        _patch(cls, "forward", forward)


@mutant("lr_one_step_late", "optax's learning rate read one step late (lr_fn(count - 1))",
        [f"{GOLDEN_TRAIN}::test_final_params_match_scenic[im1k_like_multilabel]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import optim

    def late(chain_lr):
        chain_lr.lr_fn = (lambda f: lambda count: f(max(count - 1, 0)))(chain_lr.lr_fn)

    _after_init(optim.ScaleByLearningRate, late)


@mutant("reset_parameters_skips_pos_embedding",
        "reset_parameters after to_empty leaves AddPositionEmbs.pos_embedding uninitialised",
        ["tests/test_materialize.py::test_meta_build_to_empty_and_reinitialise"])  # fmt: skip
def _():
    from tokenlearner_torch.layers import AddPositionEmbs

    # Only an explicit call after construction is broken (construction itself still draws the values):
    # exactly the meta -> to_empty -> reset_parameters path.
    original_init, original_reset = AddPositionEmbs.__init__, AddPositionEmbs.reset_parameters

    def __init__(self, *args, **kwargs):
        self.__dict__["_mutant_building"] = True
        try:
            original_init(self, *args, **kwargs)
        finally:
            self.__dict__["_mutant_building"] = False

    def reset_parameters(self):
        if self.__dict__.get("_mutant_building"):
            original_reset(self)

    _patch(AddPositionEmbs, "__init__", __init__)
    _patch(AddPositionEmbs, "reset_parameters", reset_parameters)


# ------------------------------------------------------------------------------------------------------
# More bugs that matter for Scenic parity.


@mutant("adam_bias_correction_off_by_one", "Adam's bias corrections use 1 - b**(t+1) instead of 1 - b**t",
        [f"{GOLDEN_TRAIN}::test_final_params_match_scenic[video_fuser_rsqrt]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import optim

    _patch(optim.ScaleByAdam, "_count", lambda self, states: optim._Counted._count(self, states) + 1)


@mutant("optimizer_count_not_advanced", "the learning-rate schedule's optax count never advances",
        [f"{GOLDEN_TRAIN}::test_final_optimizer_counts_match_scenic[softmax_label_smoothing]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import optim

    _patch(optim.ScaleByLearningRate, "_advance", lambda self, states: None)


@mutant("label_smoothing_ignored", "label smoothing ignored in the loss",
        [f"{GOLDEN_TRAIN}::test_steps_match_scenic[softmax_label_smoothing]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import losses

    _patch(losses, "apply_label_smoothing", lambda targets, label_smoothing: targets)


@mutant("batch_mask_ignored_in_loss", "batch_mask ignored by the differentiated loss (metrics still masked)",
        [f"{GOLDEN_TRAIN}::test_steps_match_scenic[video_fuser_rsqrt]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import losses

    original = losses.ScenicClassificationLoss.forward
    _patch(losses.ScenicClassificationLoss, "forward",
           lambda self, logits, label, batch_mask=None, l2_params=None: original(self, logits, label, None, l2_params))


@mutant("l2_decay_term_dropped", "l2_decay_factor's 0.5 * l2 * sum(p**2) term left out of the loss",
        [f"{GOLDEN_TRAIN}::test_steps_match_scenic[softmax_label_smoothing]"])  # fmt: skip
def _():
    import torch

    from tokenlearner_torch.training import losses

    _patch(losses, "l2_regularization", lambda tensors: torch.zeros(()))


@mutant("trainer_clip_ignored", "config.max_grad_norm (the trainer's clipping) ignored",
        [f"{GOLDEN_TRAIN}::test_steps_match_scenic[im1k_like_multilabel]"])  # fmt: skip
def _():
    from tokenlearner_torch.training.trainer import ScenicTrainer

    _after_init(ScenicTrainer, lambda trainer: trainer.config.__setitem__("max_grad_norm", None))


@mutant("optax_grad_clip_ignored", "optimizer_configs.grad_clip (optax clip_by_global_norm) ignored",
        [f"{GOLDEN_TRAIN}::test_final_params_match_scenic[inflate_central_tile_gradclip]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import optim

    _patch(optim.ClipByGlobalNorm, "_update", lambda self, updates, specs, states, owned: (updates, owned))


@mutant("nesterov_ignored", "'nesterov' runs as plain momentum",
        [f"{GOLDEN_TRAIN}::test_final_params_match_scenic[softmax_label_smoothing]"])  # fmt: skip
def _():
    from tokenlearner_torch.training import optim

    _after_init(optim.Trace, lambda trace: setattr(trace, "nesterov", False))


@mutant("resize_half_pixel", "position-embedding resize with half-pixel instead of aligned corners",
        [f"{GOLDEN_TRAIN}::test_surgery_matches_scenic[finetune_surgery]"])  # fmt: skip
def _():
    import numpy as np

    from tokenlearner_torch.training import surgery

    def zoom_axis(a, axis, n_out):
        n_in = a.shape[axis]
        if n_out == n_in:
            return a
        coords = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(coords).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (coords - lo).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
        return np.take(a, lo, axis=axis) * (1.0 - frac) + np.take(a, hi, axis=axis) * frac

    _patch(surgery, "_zoom_axis", zoom_axis)


@mutant("tokenfuser_norm_dropped", "TokenFuser: fuser_mix_norm2 (use_normalization) not applied",
        ["tests/test_goldens.py::test_output[fuser_norm]"])  # fmt: skip
def _():
    from tokenlearner_torch.token_learner import TokenFuser

    def drop(fuser):
        if fuser.use_normalization:
            fuser.fuser_mix_norm2.forward = _identity

    _after_init(TokenFuser, drop)


@mutant("v1_mean_pooling_ignored", "TokenLearner v1: use_sum_pooling=False still sums",
        ["tests/test_goldens.py::test_output[v1_mean3d]"])  # fmt: skip
def _():
    from tokenlearner_torch.token_learner import TokenLearnerModule

    _after_init(TokenLearnerModule, lambda module: setattr(module, "use_sum_pooling", True))


@mutant("checkpoint_count_not_restored", "restoring a checkpoint leaves optax's step counts at 0",
        ["tests/test_training_loop.py::test_resume_from_scenic_mid_checkpoint"])  # fmt: skip
def _():
    from tokenlearner_torch.training import checkpoint

    _patch(checkpoint, "_import_count", lambda node, states, where, problems: None)


# ------------------------------------------------------------------------------------------------------
# The pytest plugin.


def pytest_configure(config) -> None:
    name = os.environ.get(ENV)
    if not name:
        return
    if name not in MUTANTS:
        import pytest

        raise pytest.UsageError(f"{ENV}={name!r} is not a mutant; expected one of {sorted(MUTANTS)}")
    MUTANTS[name].apply()


def pytest_report_header(config) -> Optional[str]:
    name = os.environ.get(ENV)
    return f"mutant: {name} ({MUTANTS[name].bug})" if name in MUTANTS else None


# ------------------------------------------------------------------------------------------------------
# The runner.
#
# Each pytest run is a child process. Where the OS can fork, the children are forked from this process
# after it has imported torch, torch._dynamo, jax, flax, pytest, its plugins and the package once (about 3 s
# of CPU saved per run; nothing of torch or jax has run yet, so no thread pool or backend is copied);
# elsewhere they are fresh interpreters started with ``python -m pytest -p mutants``. Either way a mutant
# lives only in its child. All runs share one JAX persistent compilation cache (``_jax_cache``).


@dataclass
class Outcome:
    name: str
    status: str  # "killed", "SURVIVED", "ERROR" (baseline: "passed", "FAILED")
    seconds: float
    detail: str  # the first failing test (killed), or why (ERROR)


_PYTEST_ARGS = ["-q", "-p", "no:cacheprovider", "-o", "addopts="]
_JAX_CACHE = "JAX_COMPILATION_CACHE_DIR"
_JAX_CACHE_LIMITS = ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES")


def _preload() -> None:
    """Import what the runs import, once, in the parent (fork mode only): torch, pytest and the package,
    plus the third-party modules the killing tests and torch's optimisers import on first use (torch._dynamo,
    jax, flax) and pytest's installed plugins. Importing starts no thread and no jax backend (a
    backend initialises at the first computation, in the child). Nothing of the package beyond what it
    imports itself is loaded here, so a mutant still patches the modules the tests see. Then ``gc.freeze()``:
    the children's collections (pytest runs several at exit) skip the preloaded heap instead of walking it."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import importlib
    from importlib.metadata import entry_points

    import numpy  # noqa: F401
    import pytest  # noqa: F401
    import torch  # noqa: F401

    import tokenlearner_torch  # noqa: F401
    import tokenlearner_torch.training  # noqa: F401
    import tokenlearner_torch.weights_convert  # noqa: F401

    # Optional (a module that is not installed is skipped): torch.optim's first optimiser imports
    # torch._dynamo; the Flax references import jax and flax; hypothesis's pytest plugin imports it.
    for name in ("torch._dynamo", "jax", "jax.numpy", "flax.linen", "hypothesis"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for plugin in entry_points(group="pytest11"):  # every run loads them; the package's own stays lazy
        if not plugin.value.startswith("tokenlearner_torch"):
            try:
                plugin.load()
            except Exception:  # noqa: BLE001 - the child's pytest reports a broken plugin itself
                pass
    import gc

    gc.collect()
    gc.freeze()


class _Run:
    """One pytest run of ``node_ids`` (under ``mutant_name``, or unmutated when None) in a child process."""

    def __init__(self, node_ids: list[str], mutant_name: Optional[str], fork: bool) -> None:
        self.start = time.perf_counter()
        args = [*_PYTEST_ARGS, *(["-x"] if mutant_name else []), *node_ids]
        env = dict(os.environ)
        env.pop(ENV, None)
        if mutant_name is not None:
            env[ENV] = mutant_name
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc: Optional[subprocess.Popen] = None
        if not fork:
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "scripts"), *filter(None, [env.get("PYTHONPATH")])])
            env.setdefault("OMP_NUM_THREADS", "1")
            self.proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "mutants", *args], cwd=ROOT, env=env,
                                         stdout=self.log, stderr=subprocess.STDOUT)  # fmt: skip
            return
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            rc = 3
            try:
                os.dup2(self.log.fileno(), 1)
                os.dup2(self.log.fileno(), 2)
                os.environ.clear()
                os.environ.update(env)
                import pytest

                rc = int(pytest.main(args, plugins=[sys.modules[__name__]]))
            except BaseException:  # noqa: BLE001 - report anything, then leave without running the parent's code
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(rc)

    def poll(self) -> Optional[int]:
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return None
        return os.waitstatus_to_exitcode(status)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        else:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)

    def output(self) -> str:
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return text


def _run_all(jobs: list[tuple[str, list[str], Optional[str]]], workers: int, timeout: float,
             fork: bool) -> dict[str, tuple[int, str, float]]:  # fmt: skip
    """Run ``(key, node_ids, mutant_name)`` jobs, ``workers`` at a time: ``{key: (exit code, output, seconds)}``
    (exit code -1: killed after ``timeout`` seconds)."""
    pending, running, results = list(jobs), {}, {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                key, node_ids, name = pending.pop(0)
                running[key] = _Run(node_ids, name, fork)
            time.sleep(0.05)
            for key, run in list(running.items()):
                rc = run.poll()
                seconds = time.perf_counter() - run.start
                if rc is None and seconds > timeout:
                    run.kill()
                    rc = -1
                if rc is not None:
                    text = run.output() + (f"\ntimed out after {timeout:.0f} s" if rc == -1 else "")
                    results[key] = (rc, text, seconds)
                    del running[key]
    finally:  # Ctrl-C or an error here: no child outlives the check
        for run in running.values():
            run.kill()
    return results


def _first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    return match.group(1) if match else ""


def _last_lines(output: str, n: int = 3) -> str:
    return " | ".join([line for line in output.strip().splitlines() if line.strip()][-n:])


def _outcome(m: Mutant, rc: int, output: str, seconds: float) -> Outcome:
    if rc == 1:
        return Outcome(m.name, "killed", seconds, _first_failure(output) or "a test failed")
    if rc == 0:
        return Outcome(m.name, "SURVIVED", seconds, f"all of its {len(m.killers)} test id(s) passed")
    if rc == -2:  # not run
        return Outcome(m.name, "ERROR", seconds, output)
    return Outcome(m.name, "ERROR", seconds, f"pytest exit {rc}: {_last_lines(output)}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Run the mutation check: every mutant must be killed by its tests.")
    parser.add_argument("--list", action="store_true", help="list the mutants and their killing tests, run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants")
    parser.add_argument("--jobs", type=int, default=2, help="pytest processes at a time (default 2)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the killing tests")
    parser.add_argument("--no-fork", action="store_true", help="start every run as a fresh interpreter")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per pytest run (default 300)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args(argv)

    selected = list(MUTANTS.values())
    if args.only:
        unknown = sorted(set(args.only) - set(MUTANTS))
        if unknown:
            print(f"mutants.py: unknown mutant(s) {unknown}; expected names from --list", file=sys.stderr)
            return 2
        selected = [MUTANTS[n] for n in args.only]
    if args.jobs < 1:
        print("mutants.py: --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.list:
        for m in selected:
            print(f"{m.name}: {m.bug}\n" + "".join(f"    {k}\n" for k in m.killers), end="")
        return 0

    start = time.perf_counter()
    fork = hasattr(os, "fork") and not args.no_fork
    os.chdir(ROOT)
    with _jax_cache():
        if fork:
            _preload()
        return _check(args, selected, fork, start)


@contextlib.contextmanager
def _jax_cache() -> Iterator[None]:
    """One JAX persistent compilation cache for every run (a temporary folder, removed at the end; a cache
    already set in the environment, such as the test session's, is used as it is): the killing tests of
    several mutants compile the same Flax reference, which a mutant of the port does not change, and a cache
    hit loads the executable XLA compiled the first time, so no number can change. Set before jax is
    imported here or in a child (jax reads these variables at import)."""
    if os.environ.get(_JAX_CACHE):
        yield
        return
    saved = {k: os.environ.get(k) for k in (_JAX_CACHE, *_JAX_CACHE_LIMITS)}
    folder = tempfile.mkdtemp(prefix="tokenlearner-mutants-jax-cache-")
    os.environ[_JAX_CACHE] = folder
    for key in _JAX_CACHE_LIMITS:  # every compile is worth keeping: the references compile in well under 1 s
        os.environ.setdefault(key, "0")
    try:
        yield
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check(args: argparse.Namespace, selected: list[Mutant], fork: bool, start: float) -> int:
    # A killing test whose file is missing makes its mutant an ERROR without a run (and keeps it out of the
    # baseline, which checks the others).
    missing = {m.name: [k for k in m.killers if not (ROOT / k.split("::")[0]).is_file()] for m in selected}
    runnable = [m for m in selected if not missing[m.name]]
    jobs: list[tuple[str, list[str], Optional[str]]] = []
    if not args.no_baseline and runnable:
        jobs.append(("", sorted({k for m in runnable for k in m.killers}), None))
    # The order (not the outcome) matters for the JAX cache: a Flax reference compiled by two runs at the same
    # time is compiled twice. The mutants run in the reverse of the baseline's order (sorted test ids), so they
    # reach the tests the baseline runs first (and compiles for) last; and a mutant whose tests another
    # mutant already has waits until every first one has started (the first of each set, then the second of
    # each, ...), so that it reuses what that one compiled, also without a baseline.
    repeat: dict[str, int] = {}
    count: dict[tuple[str, ...], int] = {}
    for m in runnable:
        repeat[m.name] = count.get(m.killers, 0)
        count[m.killers] = repeat[m.name] + 1
    order = sorted(runnable, key=lambda m: m.killers, reverse=True)
    order.sort(key=lambda m: repeat[m.name])
    jobs += [(m.name, list(m.killers), m.name) for m in order]
    results = _run_all(jobs, args.jobs, args.timeout, fork)
    for m in selected:
        if missing[m.name]:
            results[m.name] = (-2, f"killing test file missing: {', '.join(missing[m.name])}", 0.0)

    rows: list[Outcome] = []
    baseline: Optional[Outcome] = None
    if "" in results:
        rc, output, seconds = results[""]
        detail = "" if rc == 0 else f"pytest exit {rc}: {_first_failure(output) or _last_lines(output)}"
        baseline = Outcome("(baseline, unmutated)", "passed" if rc == 0 else "FAILED", seconds, detail)
        rows.append(baseline)
    outcomes = [_outcome(m, *results[m.name]) for m in selected]
    rows += outcomes
    width = max(len(o.name) for o in rows)
    for o in rows:
        print(f"{o.name:<{width}}  {o.status:<8}  {o.seconds:5.1f}s  {o.detail}")
    killed = sum(o.status == "killed" for o in outcomes)
    total = time.perf_counter() - start
    print(f"mutation score: {killed}/{len(outcomes)} killed ({100.0 * killed / len(outcomes):.0f}%) in {total:.0f} s")
    if args.json:  # written whole, then renamed: never a partial file
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps({
            "score": [killed, len(outcomes)],
            "seconds": total,
            "baseline": None if baseline is None else vars(baseline),
            "mutants": [dict(vars(o), bug=MUTANTS[o.name].bug, killers=list(MUTANTS[o.name].killers)) for o in outcomes],
        }, indent=1))  # fmt: skip
        os.replace(tmp, args.json)
    ok = killed == len(outcomes) and (baseline is None or baseline.status == "passed")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("mutants.py: interrupted; the running pytest children were stopped", file=sys.stderr)
        sys.exit(130)
