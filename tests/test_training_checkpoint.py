"""Scenic TrainState checkpoints: OptaxChain <-> optax's state tree for every chain Scenic builds (against optax
itself), the file round trip, atomic writes, a corrupt newest checkpoint, another model's checkpoint."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from loop_goldens import LoopCase, RecordingWriter, flat

from tokenlearner_torch.errors import CheckpointError
from tokenlearner_torch.training import ScenicTrainer, list_checkpoints, read_train_state, restore_newest, train, write_checkpoint
from tokenlearner_torch.training.checkpoint import TrainState

CASE = LoopCase("public_loop")
META = {"num_classes": 3, "input_shape": [-1, 8, 8, 3], "target_is_onehot": False}
BASE = {
    "model_name": "token_learner_classification", "rng_seed": 3,
    "lr_configs": {"learning_rate_schedule": "compound", "factors": "constant", "base_learning_rate": 0.1},
    "model": {"hidden_size": 16, "mlp_dim": 16, "num_heads": 2, "num_layers": 1, "representation_size": None,
              "classifier": "gap", "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
              "tokenizer": {"type": "patch", "patches": {"size": [4, 4]}, "num_tokens": 2,
                            "tokenlearner_loc": 1, "use_tokenfuse": False, "use_v11": True}},
}  # fmt: skip


def _optax_chain(name, params):
    """The chain Scenic's get_optimizer builds for each case, written out with optax's own calls."""
    import jax
    import optax

    lr = lambda count: 0.1  # noqa: E731
    not_rank1 = jax.tree_util.tree_map(lambda x: x.ndim != 1, params)
    frozen = {k: jax.tree_util.tree_map(lambda x, f=(k == "embedding"): f, v) for k, v in params.items()}
    unfrozen = jax.tree_util.tree_map(lambda f: not f, frozen)
    return {
        "adam": lambda: optax.chain(optax.adam(lr, b1=0.8, b2=0.9)),
        "adamw": lambda: optax.chain(optax.adamw(lr, weight_decay=0.1)),
        "adamw_mask": lambda: optax.chain(optax.adamw(lr, weight_decay=0.1, mask=not_rank1)),
        "sgd": lambda: optax.chain(optax.sgd(lr)),
        "momentum": lambda: optax.chain(optax.sgd(lr, momentum=0.9)),
        "nesterov": lambda: optax.chain(optax.sgd(lr, momentum=0.9, nesterov=True)),
        "nesterov_no_momentum": lambda: optax.chain(optax.sgd(lr, nesterov=True)),
        "adam_clip": lambda: optax.chain(optax.clip_by_global_norm(0.5), optax.adam(lr)),
        "adam_freeze": lambda: optax.chain(optax.masked(optax.adam(lr), unfrozen), optax.masked(optax.set_to_zero(), frozen)),
        "sgd_wd": lambda: optax.chain(optax.add_decayed_weights(0.01), optax.sgd(lr, momentum=0.9)),
        "sgd_wd_mask": lambda: optax.chain(optax.add_decayed_weights(0.01, not_rank1), optax.sgd(lr, momentum=0.9)),
    }[name]()


CONFIGS = {
    "adam": {"optimizer": "adam", "optimizer_configs": {"beta1": 0.8, "beta2": 0.9}},
    "adamw": {"optimizer": "adamw", "optimizer_configs": {"weight_decay": 0.1}},
    "adamw_mask": {"optimizer": "adam", "optimizer_configs": {"weight_decay": 0.1}, "skip_scale_and_bias_regularization": True},
    "sgd": {"optimizer": "sgd", "optimizer_configs": {}},
    "momentum": {"optimizer": "momentum", "optimizer_configs": {}},
    "nesterov": {"optimizer": "nesterov", "optimizer_configs": {"momentum": 0.9}},
    "nesterov_no_momentum": {"optimizer": "nesterov", "optimizer_configs": {}},
    "adam_clip": {"optimizer": "adam", "optimizer_configs": {},
                  "grad_clip_configs": {"clip_method": "clip_by_global_norm", "clip_value": 0.5}},
    "adam_freeze": {"optimizer": "adam", "optimizer_configs": {"freeze_params_reg_exp": "^embedding"}},
    "sgd_wd": {"optimizer": "momentum", "optimizer_configs": {"weight_decay": 0.01}},
    "sgd_wd_mask": {"optimizer": "momentum", "optimizer_configs": {"weight_decay": 0.01}, "skip_scale_and_bias_regularization": True},
}  # fmt: skip


def _trainer(name):
    return ScenicTrainer({**BASE, **CONFIGS[name]}, META)


def _leaves(tree):
    return {k: np.asarray(v) for k, v in flat(tree).items() if not (isinstance(v, dict) and not v)}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_opt_state_tree_is_optax_state_both_ways(name):
    """Same random gradients through the port's chain and optax's for 2 steps: the port's exported tree has
    optax's structure, dtypes (int32 counts) and values; optax's tree imported into the port re-exports bitwise."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    from flax import serialization

    trainer = _trainer(name)
    params = jax.tree_util.tree_map(jax.numpy.asarray, trainer.params())
    tx = _optax_chain(name, params)
    opt_state = tx.init(params)
    rng = np.random.default_rng(0)
    by_path = {s.name: s for s in trainer.specs}
    for _ in range(2):
        grads = {p: rng.normal(size=np.shape(v)).astype(np.float32) for p, v in flat(trainer.params()).items()}
        for p, g in grads.items():
            by_path[p].param.grad = trainer._leaf_to_torch(p, g)
        trainer.optimizer.step()
        from tokenlearner_torch.weights_convert.layouts import unflatten_tree

        updates, opt_state = tx.update(jax.tree_util.tree_map(jax.numpy.asarray, unflatten_tree(grads)), opt_state, params)
        params = jax.tree_util.tree_map(lambda a, b: a + b, params, updates)
    want = jax.device_get(serialization.to_state_dict(opt_state))
    got = trainer.opt_state_tree()
    assert flat(got).keys() == flat(want).keys()
    for path, ref in _leaves(want).items():
        value = np.asarray(flat(got)[path])
        assert value.dtype == ref.dtype and value.shape == ref.shape, path
        if ref.dtype.kind in "iu":
            assert int(value) == int(ref) == 2, path
        else:
            np.testing.assert_allclose(value, ref, rtol=1e-5, atol=1e-6, err_msg=path)
    fresh = _trainer(name)
    fresh.load_opt_state_tree(want)
    again = fresh.opt_state_tree()
    assert flat(again).keys() == flat(want).keys()
    for path, ref in _leaves(want).items():
        assert np.asarray(flat(again)[path]).tobytes() == ref.tobytes(), path


def test_port_checkpoint_round_trip_is_bitwise(tmp_path):
    trainer = _trainer("adamw_mask")
    trainer.train_step({"inputs": np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32), "label": np.array([0, 2])})
    state = TrainState(global_step=1, params=trainer.params(), opt_state=trainer.opt_state_tree(), rng=np.array([0, 3], np.uint32),
                       metadata={"chrono": {"accum_examples_seen": 2}, "torch_rng": trainer.rng_state()})  # fmt: skip
    path = write_checkpoint(tmp_path, state, 1)
    back = read_train_state(path)
    want = state.to_state_dict()
    assert flat(back).keys() == flat(want).keys()
    for k, v in _leaves(want).items():
        assert np.asarray(flat(back)[k]).dtype == v.dtype and np.asarray(flat(back)[k]).tobytes() == v.tobytes(), k
    other = _trainer("adamw_mask")
    other.load_params(back["params"])
    other.load_opt_state_tree(back["opt_state"])
    for k, v in _leaves(state.opt_state).items():
        assert np.asarray(flat(other.opt_state_tree())[k]).tobytes() == v.tobytes(), k


def _state(step):
    return TrainState(global_step=step, params={"w": np.full(3, step, np.float32)}, opt_state={}, metadata={})


def test_atomic_write_crash_leaves_previous_intact(tmp_path, monkeypatch):
    from tokenlearner_torch.weights_convert import msgpack_io

    write_checkpoint(tmp_path, _state(3), 3)
    before = (tmp_path / "checkpoint_3").read_bytes()

    def crash(fp, tree):  # dies halfway through the data
        fp.write(b"\x86partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(msgpack_io, "write_tree", crash)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, _state(5), 5)
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]
    # A kill -9 leaves the temporary file behind: it is never taken for a checkpoint.
    (tmp_path / ".checkpoint_5.tmp-0123456789ab").write_bytes(b"\x86partial")
    path, tree = restore_newest(tmp_path)
    assert path.name == "checkpoint_3" and path.read_bytes() == before
    assert int(tree["global_step"]) == 3


def test_unreadable_newest_is_reported_and_previous_used(tmp_path):
    write_checkpoint(tmp_path, _state(3), 3)
    good = write_checkpoint(tmp_path, _state(5), 5)
    good.write_bytes(good.read_bytes()[:20])  # truncated
    with pytest.warns(RuntimeWarning, match="checkpoint_5"):
        path, tree = restore_newest(tmp_path)
    assert path.name == "checkpoint_3" and int(tree["global_step"]) == 3
    (tmp_path / "checkpoint_3").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="no readable checkpoint"):
            restore_newest(tmp_path)


def test_max_checkpoint_keep_counts_existing(tmp_path):
    for step in (0, 2, 4, 6):
        write_checkpoint(tmp_path, _state(step), step, keep=3)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 6]


def test_checkpoint_of_another_model_is_one_line_naming_params(tmp_path):
    pmap2 = LoopCase("public_pmap2")
    wd = pmap2.workdir(tmp_path)  # no TokenFuser, 2 heads: another model than public_loop's
    with pytest.raises(CheckpointError) as err:
        train(config=CASE.config, dataset=CASE.dataset(), workdir=str(wd), writer=RecordingWriter())
    msg = str(err.value)
    assert "\n" not in msg and "checkpoint_0" in msg and "another model" in msg and "TokenFuser_0" in msg


def test_optimizer_state_of_another_optimizer_is_named(tmp_path):
    wd = CASE.workdir(tmp_path)
    config = {**CASE.config, "optimizer": "adam", "optimizer_configs": {}}  # the checkpoint holds sgd's trace
    with pytest.raises(CheckpointError) as err:
        train(config=config, dataset=CASE.dataset(), workdir=str(wd), writer=RecordingWriter())
    msg = str(err.value)
    assert "\n" not in msg and "opt_state/0/0 has ['trace'], expected ['count', 'mu', 'nu']" in msg
