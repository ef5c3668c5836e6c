"""ScenicTrainer against genuine Scenic training runs (tests/fixtures/train_goldens): per-step loss, learning
rate and pre-clip gradient norm, the surgery result, and the parameters and optax state after K steps."""

from __future__ import annotations

import numpy as np
import pytest
from goldens import scaled_error
from train_goldens import TRAIN_CASES, TrainCase

from tokenlearner_torch.training import ScenicTrainer
from tokenlearner_torch.weights_convert.layouts import flatten_tree

LOSS_RTOL, LR_TOL, GRAD_NORM_RTOL = 1e-5, 1e-6, 1e-5
PARAM_TOL, NOISE_PARAM_TOL, SURGERY_TOL = 1e-4, 1e-2, 1e-6


def _run(case: TrainCase):
    trainer = ScenicTrainer(case.config, case.dataset_meta_data)
    surgery_err = None
    if case.is_surgery:
        trainer.load_params(case.tree("params_target_init"))
        trainer.init_from_train_state(case.tree("params_restored"), case.meta["surgery"]["source_config"])
        ref, got = flatten_tree(case.tree("params_after_surgery")), flatten_tree(trainer.params())
        assert set(got) == set(ref)
        surgery_err = {k: scaled_error(got[k], ref[k]) for k in ref}
    else:
        trainer.load_params(case.tree("params_init"))
    logs = [trainer.train_step(case.batch(k)) for k in range(len(case.steps))]
    return trainer, logs, surgery_err


_RESULTS: dict = {}
SURGERY_CASES = [name for name in TRAIN_CASES if TrainCase(name).is_surgery]


def _result(name: str):
    if name not in _RESULTS:  # each case is trained once per session, for all the tests below
        case = TrainCase(name)
        _RESULTS[name] = (case, *_run(case))
    return _RESULTS[name]


@pytest.fixture(params=TRAIN_CASES)
def run(request):
    return _result(request.param)


@pytest.mark.parametrize("name", SURGERY_CASES)
def test_surgery_matches_scenic(name):
    case, _, _, surgery_err = _result(name)
    worst = max(surgery_err, key=surgery_err.get)
    assert surgery_err[worst] <= SURGERY_TOL, f"{case.name}: {worst} differs by {surgery_err[worst]:.3g} after surgery"


def test_steps_match_scenic(run):
    case, _, logs, _ = run
    # The learning rate relative to the run's largest: a cosine near its end loses relative precision in
    # float32 (1 + cos(x) cancels), in Scenic as in the port.
    lr_scale = max(max(abs(r["learning_rate"]) for r in case.steps), 1e-12)
    for k, (log, ref) in enumerate(zip(logs, case.steps)):
        assert abs(log["loss"] - ref["loss"]) <= LOSS_RTOL * abs(ref["loss"]), (case.name, k, log["loss"], ref["loss"])
        assert abs(log["learning_rate"] - ref["learning_rate"]) <= LR_TOL * lr_scale, (
            case.name, k, log["learning_rate"], ref["learning_rate"])
        g_ref = ref["grad_norm_pre_clip"]
        assert abs(log["grad_norm"] - g_ref) <= GRAD_NORM_RTOL * g_ref, (case.name, k, log["grad_norm"], g_ref)
        assert abs(log["l2_grads"] - ref["l2_grads_logged"]) <= GRAD_NORM_RTOL * ref["l2_grads_logged"]
        assert set(log["metrics"]) == set(ref["metrics"])
        for name, (total, normalizer) in ref["metrics"].items():
            got_total, got_norm = log["metrics"][name]
            assert got_norm == normalizer and abs(got_total - total) <= LOSS_RTOL * max(abs(total), 1.0), (case.name, k, name)


def test_final_params_match_scenic(run):
    case, trainer, _, _ = run
    ref, got = flatten_tree(case.tree("params_final")), flatten_tree(trainer.params())
    assert set(got) == set(ref)
    failures = []
    for path in sorted(ref):
        tol = NOISE_PARAM_TOL if path in case.noise_sensitive else PARAM_TOL
        err = scaled_error(got[path], ref[path])
        if err > tol:
            failures.append(f"{path}: {err:.3g} > {tol}")
    assert not failures, f"{case.name}: " + "; ".join(failures)
    assert trainer.global_step == len(case.steps)


def _optax_leaves(node, key):
    """The {'mu': tree} style entries of a stored optax state, found by name anywhere in the chain."""
    if isinstance(node, dict):
        if key in node:
            return node[key]
        for value in node.values():
            found = _optax_leaves(value, key)
            if found is not None:
                return found
    return None


def test_final_optimizer_state_matches_scenic(run):
    case, trainer, _, _ = run
    compared = 0
    for key in ("mu", "nu", "trace"):
        stored = _optax_leaves(case.opt_state, key)
        if stored is None:
            continue
        ref, got = flatten_tree(stored), flatten_tree(trainer.optimizer_state(key))
        assert set(got) == set(ref)
        top = max(float(np.abs(v).max()) for v in ref.values())
        for path in ref:
            # Near-zero-gradient params (noise-sensitive, or a second moment 1e-6 below the largest) carry
            # rounding noise in their moments; their parameters are checked above.
            if path in case.noise_sensitive or (key == "nu" and float(np.abs(ref[path]).max()) < 1e-6 * top):
                continue
            ref_arr = np.asarray(ref[path], dtype=np.float64)
            # nu is a mean of squares: compare it relative to its own scale.
            err = np.abs(got[path] - ref_arr).max() / max(np.abs(ref_arr).max(), 1e-30 if key == "nu" else 1.0)
            assert err <= (1e-4 if key != "nu" else 1e-3), f"{case.name}: {key}/{path} differs by {err:.3g}"
            compared += 1
    assert compared > 0


def _stored_counts(node) -> list[int]:
    """Every optax ``count`` in a stored opt_state (Adam's and the schedule's), in any nesting of the chain."""
    if isinstance(node, dict):
        return [c for key, value in node.items() for c in ([int(value)] if key == "count" else _stored_counts(value))]
    return []


def _port_counts(trainer) -> list[int]:
    """The port's optax counts: one per counted transform (per-parameter copies of one value)."""
    found: dict[str, set[int]] = {}

    def walk(state: dict, prefix: str) -> None:
        for key, value in state.items():
            if key == "count":
                found.setdefault(prefix, set()).add(int(value))
            elif isinstance(value, dict):
                walk(value, f"{prefix}/{key}")

    for spec in trainer.specs:
        walk(trainer.optimizer.state[spec.param], "")
    assert all(len(values) == 1 for values in found.values()), found
    return [next(iter(values)) for values in found.values()]


def test_final_optimizer_counts_match_scenic(run):
    """optax's step counts after K steps (Adam's bias-correction count and the schedule's): Scenic stores
    K in each; the port must hold as many counters, each at K."""
    case, trainer, _, _ = run
    stored = _stored_counts(case.opt_state)
    assert stored and set(stored) == {len(case.steps)}
    assert sorted(_port_counts(trainer)) == sorted(stored), (case.name, _port_counts(trainer), stored)


def test_every_stored_case_is_checked():
    """The index names every case folder of tests/fixtures/train_goldens (a case copied in is never skipped)."""
    from train_goldens import TRAIN_GOLDENS

    folders = sorted(p.name for p in TRAIN_GOLDENS.iterdir() if (p / "config.json").is_file())
    assert sorted(TRAIN_CASES) == folders and len(folders) == 7
