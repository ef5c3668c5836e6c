"""``training.train()`` against genuine Scenic ``classification_trainer.train()`` runs (tests/fixtures/loop_goldens):
every scalar of every ``write_scalars`` call, the checkpoints kept, the final parameters and optimiser state,
the resumed run, and Flax/optax continuing from the port's own mid-run checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from loop_goldens import LoopCase, RecordingWriter, compare_scalars, flat, params_errors, scaled_error

from tokenlearner_torch.training import list_checkpoints, read_train_state, train

CASE = LoopCase("public_loop")
PARAM_TOL, NOISE_TOL = 1e-4, 1e-2

# Scenic's `gflops` is XLA's cost analysis of the one-example forward; the port counts matmuls and convs with
# torch's FlopCounterMode (2 flops per multiply-add, no elementwise ops): 0.000534 vs Scenic's 0.000315 on this
# case (1.70x). Not the same quantity, so it is left out of the 1e-4 comparison and checked for its range only.
NOT_SCENIC = ("gflops",)
GFLOPS_RATIO = (1.5, 1.9)


def _param_tol(case: LoopCase, path: str) -> float:
    return NOISE_TOL if path in case.meta["noise_sensitive_params"] else PARAM_TOL


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted run from workdir_step0 (shared by the tests that inspect it)."""
    wd = CASE.workdir(tmp_path_factory.mktemp("loop"))
    writer = RecordingWriter()
    state, train_summary, eval_summary = train(config=CASE.config, dataset=CASE.dataset(), workdir=str(wd), writer=writer)
    return wd, writer, state, train_summary, eval_summary


def test_every_scalar_as_scenic_writes_it(full_run):
    _, writer, _, _, _ = full_run
    want = CASE.meta["scalars"]
    assert compare_scalars(writer.calls, want, skip=NOT_SCENIC) == []
    ratio = writer.calls[0]["gflops"] / want[0]["gflops"]
    assert GFLOPS_RATIO[0] < ratio < GFLOPS_RATIO[1], ratio


def test_checkpoints_kept_as_scenic_keeps_them(full_run):
    wd, _, _, _, _ = full_run
    assert [p.name for _, p in list_checkpoints(wd)] == CASE.meta["checkpoints_written_by_scenic"]
    assert sorted(p.name for p in wd.iterdir() if p.name.startswith("checkpoint")) == CASE.meta["checkpoints_written_by_scenic"]


def test_final_params_and_optimizer_state(full_run):
    wd, _, state, _, _ = full_run
    assert state.global_step == CASE.meta["final_global_step"]
    ref = CASE.read("params_final.msgpack")["params"]
    errors = params_errors(state.params, ref)
    bad = {p: e for p, e in errors.items() if e > _param_tol(CASE, p)}
    assert not bad, bad
    final = read_train_state(wd / f"checkpoint_{CASE.meta['final_global_step']}")
    assert int(final["global_step"]) == CASE.meta["final_global_step"]
    errors = params_errors(final["params"], ref)
    assert max(errors.values()) <= PARAM_TOL
    got, want = flat(final["opt_state"]), flat(CASE.read("opt_state_final.msgpack"))
    assert set(got) == set(want)
    for path, ref_value in want.items():
        ref_value = np.asarray(ref_value)
        assert np.asarray(got[path]).dtype == ref_value.dtype, path
        if ref_value.dtype.kind in "iu":  # optax's counts (int32)
            assert np.array_equal(got[path], ref_value), path
        else:
            assert scaled_error(got[path], ref_value) <= PARAM_TOL, path


def test_returned_summaries(full_run):
    _, _, _, train_summary, eval_summary = full_run
    for got, want in ((train_summary, CASE.meta["train_summary"]), (eval_summary, CASE.meta["eval_summary"])):
        assert set(got) == set(want)
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-7), k


def test_resume_from_scenic_mid_checkpoint(tmp_path):
    wd = CASE.workdir(tmp_path, "ckpt_mid")
    ds = CASE.dataset()
    writer = RecordingWriter()
    state, _, eval_summary = train(config=CASE.config, dataset=ds, workdir=str(wd), writer=writer)
    assert ds.train_calls == CASE.meta["steps"] - 3  # seek(3): the batches of steps 4.. only
    assert compare_scalars(writer.calls, CASE.meta["scalars_resumed_from_mid"]) == []
    errors = params_errors(state.params, CASE.read("params_final.msgpack")["params"])
    assert max(errors.values()) <= PARAM_TOL
    for k, v in CASE.meta["eval_summary_resumed"].items():
        assert eval_summary[k] == pytest.approx(v, rel=1e-4, abs=1e-7)


def _flax_train_state_class():
    import flax
    import optax  # noqa: F401

    @flax.struct.dataclass
    class TrainState:  # Scenic's train_utils.TrainState, field for field
        tx: object = flax.struct.field(default=None, pytree_node=False)
        opt_state: object = None
        params: object = flax.struct.field(default_factory=dict)
        global_step: int = 0
        model_state: object = flax.struct.field(default_factory=dict)
        rng: object = None
        metadata: object = None

    return TrainState


@pytest.mark.slow  # ~30 s: jax compiles the Flax reference's gradient
def test_flax_restores_port_checkpoint_and_optax_lands_on_port_params(full_run, tmp_path):
    """Scenic's restore: flax.training.checkpoints.restore_checkpoint into a TrainState whose opt_state is
    optax's own tx.init(params); then optax steps on with gradients of the project's Flax reference."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("flax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp
    from flax.training import checkpoints

    from tokenlearner_torch.parity.flax_reference import TokenLearnerViT as FlaxViT

    _, _, full_state, _, _ = full_run
    cfg = CASE.config
    # The port writes checkpoint_3 (mid_checkpoint) in the uninterrupted run and prunes it later: rerun to 3.
    cfg3 = json.loads(json.dumps(cfg))
    cfg3["num_training_steps"] = 3
    wd = CASE.workdir(tmp_path)
    train(config=cfg3, dataset=CASE.dataset(), workdir=str(wd), writer=RecordingWriter())
    assert (wd / "checkpoint_3").is_file()
    # Hand-derived from the config: constant * cosine_decay(steps_per_cycle=6, restarts), base 0.05.
    lr_fn = lambda count: jnp.float32(0.05) * 0.5 * (1.0 + jnp.cos(jnp.pi * (count % 6) / 6.0))  # noqa: E731
    tx = optax.chain(optax.sgd(learning_rate=lr_fn, momentum=0.9, nesterov=True))  # Scenic: 'nesterov' + momentum
    model = FlaxViT(num_classes=5, mlp_dim=64, num_layers=2, num_heads=4, tokenizer=cfg["model"]["tokenizer"],
                    hidden_size=32, representation_size=None, dropout_rate=0.0, attention_dropout_rate=0.0)  # fmt: skip
    params0 = jax.tree_util.tree_map(jnp.asarray, CASE.read("workdir_step0/checkpoint_0")["params"])
    TrainState = _flax_train_state_class()
    target = TrainState(tx=tx, opt_state=tx.init(params0), params=params0, global_step=0, model_state={},
                        rng=jax.random.PRNGKey(cfg["rng_seed"]),
                        metadata={"chrono": {"accum_program_time": 0.0, "accum_train_time": 0.0,
                                             "accum_pause_time": 0.0, "accum_examples_seen": 0}})  # fmt: skip
    restored = checkpoints.restore_checkpoint(str(wd), target)
    assert int(restored.global_step) == 3
    assert int(restored.opt_state[0][1].count) == 3

    def loss_fn(p, x, y, mask):
        logits = model.apply({"params": p}, x, train=True)
        t = jax.nn.one_hot(y, 5) * (1 - 0.1) + 0.1 / 5  # label_smoothing 0.1
        ce = -(t * jax.nn.log_softmax(logits)).sum(-1)
        loss = (ce * mask).sum() / (mask.sum() + 1e-8)
        l2 = sum(jnp.sum(q**2) for q in jax.tree_util.tree_leaves(p) if q.ndim > 1)
        return loss + 0.5 * 1e-4 * l2  # l2_decay_factor

    grad_fn = jax.jit(jax.grad(loss_fn))
    params, opt_state = restored.params, restored.opt_state
    with jax.default_matmul_precision("highest"):
        for k in range(3, CASE.meta["steps"]):
            b = CASE.train_batch(k)
            grads = grad_fn(params, jnp.asarray(b["inputs"]), jnp.asarray(b["label"]), jnp.asarray(b["batch_mask"]))
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
    errors = params_errors(full_state.params, jax.device_get(params))
    bad = {p: e for p, e in errors.items() if e > PARAM_TOL}
    assert not bad, bad


# ------------------------------------------------------------------------------------------------------------
# Bitwise resume with dropout and mixup, Ctrl-C, hooks, the default writer, config.checkpoint=False.

TINY = {
    "model_name": "token_learner_classification", "batch_size": 4, "eval_batch_size": 4, "rng_seed": 7,
    "num_training_steps": 6, "log_eval_steps": 3, "log_summary_steps": 2, "checkpoint_steps": 2,
    "checkpoint": True, "max_checkpoint_keep": 2, "optimizer": "adam",
    "optimizer_configs": {"beta1": 0.9, "beta2": 0.999, "weight_decay": 0.1},
    "lr_configs": {"learning_rate_schedule": "compound", "factors": "constant", "base_learning_rate": 1e-3},
    "mixup": {"alpha": 0.5}, "label_smoothing": None, "l2_decay_factor": None, "max_grad_norm": 1.0,
    "model": {"hidden_size": 16, "mlp_dim": 32, "num_heads": 2, "num_layers": 1, "representation_size": None,
              "classifier": "gap", "dropout_rate": 0.2, "attention_dropout_rate": 0.1,
              "tokenizer": {"type": "patch", "patches": {"size": [4, 4]}, "num_tokens": 4,
                            "tokenlearner_loc": 1, "use_tokenfuse": False, "use_v11": True}},
}  # fmt: skip
META = {"num_classes": 3, "input_shape": [-1, 8, 8, 3], "target_is_onehot": True, "num_train_examples": 24, "num_eval_examples": 6}


class Synthetic:
    """Batches drawn from the step index (seekable): what the built-in sources do."""

    meta_data = META

    def __init__(self):
        self.step = 0
        self.train_iter = self._train()
        self.valid_iter = self._valid()

    def seek(self, step):
        self.step = step

    def _batch(self, seed, n=4):
        rng = np.random.default_rng(seed)
        labels = np.eye(3, dtype=np.float32)[rng.integers(0, 3, n)]  # one-hot: mixup needs them
        return {"inputs": rng.normal(size=(n, 8, 8, 3)).astype(np.float32), "label": labels}

    def _train(self):
        while True:
            self.step += 1
            yield self._batch(self.step)

    def _valid(self):
        j = 0
        while True:
            j += 1
            b = self._batch(10_000 + j % 2)
            b["batch_mask"] = np.array([1, 1, 1, j % 2], np.float32)
            yield b


def test_interrupted_and_resumed_is_bitwise_the_uninterrupted_run(tmp_path):
    torch.manual_seed(123)
    ref_state, ref_train, _ = train(config=TINY, dataset=Synthetic(), workdir=str(tmp_path / "a"), writer=RecordingWriter())

    def ctrl_c_at_4(step, logs):
        assert isinstance(logs["loss"], torch.Tensor)  # hooks get device tensors, no host sync forced
        if step == 4:
            raise KeyboardInterrupt

    torch.manual_seed(123)
    with pytest.raises(KeyboardInterrupt):
        train(config=TINY, dataset=Synthetic(), workdir=str(tmp_path / "b"), writer=RecordingWriter(), hooks=[ctrl_c_at_4])
    # step 3 was a scheduled checkpoint; Ctrl-C after step 4 wrote checkpoint_4 (max_checkpoint_keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path / "b")] == [3, 4]
    torch.manual_seed(999)  # the resumed run takes its random state from the checkpoint, not from here
    state, _, _ = train(config=TINY, dataset=Synthetic(), workdir=str(tmp_path / "b"), writer=RecordingWriter())
    assert state.global_step == ref_state.global_step == 6
    for path, value in flat(ref_state.params).items():
        assert np.array_equal(flat(state.params)[path], value), path
    for path, value in flat(ref_state.opt_state).items():
        assert np.array_equal(flat(state.opt_state)[path], value), path


def test_fresh_runs_with_dropout_are_reproducible_without_seeding_by_the_caller(tmp_path):
    """train() seeds torch's generator (dropout) from config.rng_seed (torch seeds each process randomly):
    two fresh runs from different global states give the same params; another rng_seed gives others."""
    cfg = dict(TINY, num_training_steps=3, checkpoint=False)
    runs = []
    for i, seed in enumerate((cfg["rng_seed"], cfg["rng_seed"], cfg["rng_seed"] + 1)):
        torch.manual_seed(1000 + i)  # the caller's state must not matter
        state, _, _ = train(config=dict(cfg, rng_seed=seed), dataset=Synthetic(), workdir=str(tmp_path / str(i)),
                            writer=RecordingWriter())
        runs.append(flat(state.params))
    head = "output_projection/kernel"
    assert all(np.array_equal(runs[0][p], runs[1][p]) for p in runs[0])
    assert not np.array_equal(runs[0][head], runs[2][head])


def test_default_writer_jsonl_and_tensorboard(tmp_path):
    cfg = dict(TINY, num_training_steps=3, checkpoint=False)
    state, train_summary, eval_summary = train(config=cfg, dataset=Synthetic(), workdir=str(tmp_path))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(x) for x in lines[:2]] == [["num_trainable_params", "step"] if "gflops" not in lines[0] else
                                              ["gflops", "num_trainable_params", "step"],
                                              ["step", "train_accuracy", "train_loss"]]  # fmt: skip
    assert lines[-1]["step"] == 3 and lines[-1]["valid_loss"] == pytest.approx(eval_summary["loss"])
    assert lines[0]["num_trainable_params"] == sum(p.numel() for p in state.trainer.model.parameters())
    pytest.importorskip("tensorboard")
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert not list_checkpoints(tmp_path)  # config.checkpoint False: nothing written


def test_checkpoint_false_neither_restores_nor_writes(tmp_path):
    import shutil

    shutil.copy(CASE.dir / "workdir_step0" / "checkpoint_0", tmp_path / "checkpoint_5")  # another model
    cfg = dict(TINY, num_training_steps=2, checkpoint=False)
    state, _, _ = train(config=cfg, dataset=Synthetic(), workdir=str(tmp_path), writer=RecordingWriter())
    assert state.global_step == 2
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5]
