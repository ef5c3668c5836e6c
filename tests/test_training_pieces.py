"""The training pieces on their own: losses against optax and numpy, the surgery functions against scipy and
Scenic's formulas, config reading, and ScenicTrainer's initialisation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tokenlearner_torch.errors import ConfigError, ShapeError
from tokenlearner_torch.training import (
    ScenicClassificationLoss,
    ScenicTrainer,
    inflate_embedding,
    init_token_learner_from_train_state,
    load_config,
    resize_position_embedding,
    weighted_sigmoid_cross_entropy,
    weighted_softmax_cross_entropy,
    zoom_linear,
)

RNG = np.random.default_rng([12, 2026])


# -- losses -------------------------------------------------------------------------------------------------
def _np_targets(labels, c, ls):
    t = np.eye(c)[labels]
    return t * (1 - ls) + ls / c if ls is not None else t


@pytest.mark.parametrize("ls", [None, 0.1])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_loss_matches_optax_and_formula(ls, masked):
    optax = pytest.importorskip("optax")
    logits = RNG.normal(size=(5, 7)).astype(np.float32) * 3
    labels = RNG.integers(0, 7, size=5)
    mask = np.array([1, 0, 1, 1, 0], np.float32) if masked else None
    t = _np_targets(labels, 7, ls)
    per_example = np.asarray(optax.softmax_cross_entropy(logits, t.astype(np.float32)), np.float64)
    weights = mask if masked else np.ones(5)
    want = (per_example * weights).sum() / (weights.sum() + 1e-8)
    got = weighted_softmax_cross_entropy(torch.from_numpy(logits), torch.from_numpy(np.eye(7, dtype=np.float32)[labels]),
                                         None if mask is None else torch.from_numpy(mask), ls)  # fmt: skip
    assert abs(float(got) - want) <= 1e-6 * abs(want)


@pytest.mark.parametrize("ls", [None, 0.2])
def test_sigmoid_loss_is_summed_over_classes(ls):
    optax = pytest.importorskip("optax")
    logits = RNG.normal(size=(4, 6)).astype(np.float32) * 4
    multi_hot = (RNG.random(size=(4, 6)) < 0.3).astype(np.float32)
    t = multi_hot * (1 - ls) + ls / 6 if ls is not None else multi_hot
    per = np.asarray(optax.sigmoid_binary_cross_entropy(logits, t.astype(np.float32)), np.float64)
    want = per.sum() / (4 + 1e-8)  # Scenic: summed over classes and examples, divided by the batch size
    got = weighted_sigmoid_cross_entropy(torch.from_numpy(logits), torch.from_numpy(multi_hot), None, ls)
    assert abs(float(got) - want) <= 1e-6 * abs(want)


def test_loss_module_l2_term_and_errors():
    loss = ScenicClassificationLoss("softmax", num_classes=3, l2_decay_factor=1e-2)
    logits, labels = torch.randn(2, 3), torch.tensor([0, 2])
    kernel = torch.randn(4, 3)
    plain = ScenicClassificationLoss("softmax", num_classes=3)(logits, labels)
    got = loss(logits, labels, None, [kernel])
    assert abs(float(got - plain) - 0.5 * 1e-2 * float((kernel.double() ** 2).sum())) < 1e-6
    with pytest.raises(ConfigError, match="l2_params"):
        loss(logits, labels)
    with pytest.raises(ShapeError, match="integer class ids"):
        ScenicClassificationLoss("softmax", num_classes=3)(logits, torch.randn(2))
    with pytest.raises(ShapeError, match="one-hot"):
        ScenicClassificationLoss("sigmoid", num_classes=3, target_is_onehot=True)(logits, labels)
    with pytest.raises(ConfigError, match="loss kind"):
        ScenicClassificationLoss("hinge", num_classes=3)


# -- surgery ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,out", [((4, 4, 3), (6, 6, 3)), ((7, 7, 2), (3, 3, 2)), ((5, 3), (9, 3)), ((6, 2), (1, 2))])
def test_zoom_linear_matches_scipy(shape, out):
    ndimage = pytest.importorskip("scipy.ndimage")
    a = RNG.normal(size=shape).astype(np.float32)
    zoom = [o / s for o, s in zip(out, shape)]
    ref = ndimage.zoom(a, zoom, order=1)
    assert ref.shape == out
    got = zoom_linear(a, out)
    assert got.dtype == a.dtype
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def _cfg(change=None, classifier="gap", **model):
    return {"init_from": {"positional_embed_size_change": change} if change else {},
            "model": {"classifier": classifier, **model}}


def test_resize_position_embedding_modes():
    ndimage = pytest.importorskip("scipy.ndimage")
    src = RNG.normal(size=(1, 16, 5)).astype(np.float32)
    # resize: 4x4 -> 6x6, scipy's aligned-corner linear zoom
    got = resize_position_embedding(np.zeros((1, 36, 5), np.float32), src, _cfg("resize"), _cfg())
    ref = ndimage.zoom(src[0].reshape(4, 4, 5), (1.5, 1.5, 1), order=1).reshape(1, 36, 5)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # tile: repeated per frame, bitwise
    got = resize_position_embedding(np.zeros((1, 32, 5), np.float32), src, _cfg("tile"), _cfg())
    assert np.array_equal(got[0, 16:], src[0]) and np.array_equal(got[0, :16], src[0])
    # resize_tile for a 3d_conv video: frames = num_frames // patches.size[2]
    cfg = _cfg("resize_tile", temporal_encoding_config={"method": "3d_conv"}, patches={"size": [4, 4, 2]})
    cfg["dataset_configs"] = {"num_frames": 4}
    got = resize_position_embedding(np.zeros((1, 72, 5), np.float32), src, cfg, _cfg())
    np.testing.assert_allclose(got[0, :36], ref[0], atol=1e-6)
    assert np.array_equal(got[0, 36:], got[0, :36])
    # temporal_sampling: tokens per frame = ntok / n_sampled_frames
    cfg = _cfg("resize_tile", temporal_encoding_config={"method": "temporal_sampling", "n_sampled_frames": 3})
    got = resize_position_embedding(np.zeros((1, 108, 5), np.float32), src, cfg, _cfg())
    np.testing.assert_allclose(got[0, 72:], ref[0], atol=1e-6)
    # same length: the restored embedding as is; restore_positional_embedding=False: the target's
    assert resize_position_embedding(np.zeros_like(src), src, _cfg(), _cfg()) is src
    target = np.ones((1, 36, 5), np.float32)
    no = {"init_from": {"restore_positional_embedding": False}, "model": {"classifier": "gap"}}
    assert resize_position_embedding(target, src, no, _cfg()) is target
    with pytest.raises(ConfigError, match="positional_embed_size_change"):
        resize_position_embedding(target, src, _cfg(), _cfg())
    with pytest.raises(ShapeError, match="square"):
        resize_position_embedding(np.zeros((1, 20, 5), np.float32), src, _cfg("resize"), _cfg())


def test_resize_position_embedding_class_token():
    src = RNG.normal(size=(1, 17, 3)).astype(np.float32)  # a 'token' source: class token + 4x4 grid
    target = RNG.normal(size=(1, 37, 3)).astype(np.float32)
    got = resize_position_embedding(target, src, _cfg("resize", classifier="token"), _cfg(classifier="token"))
    assert np.array_equal(got[0, 0], src[0, 0]) and got.shape == (1, 37, 3)
    got = resize_position_embedding(target[:, 1:], src, _cfg("resize"), _cfg(classifier="token"))
    np.testing.assert_allclose(got, zoom_linear(src[0, 1:].reshape(4, 4, 3), (6, 6, 3)).reshape(1, 36, 3))


def test_inflate_embedding_both_initialisers():
    kernel2d = RNG.normal(size=(4, 4, 3, 8)).astype(np.float32)
    target = np.zeros((3, 4, 4, 3, 8), np.float32)
    avg = inflate_embedding(target, kernel2d, "average_frame_initializer")
    assert all(np.array_equal(avg[t], kernel2d / 3) for t in range(3))
    central = inflate_embedding(target, kernel2d, "central_frame_initializer")
    assert np.array_equal(central[1], kernel2d) and not central[0].any() and not central[2].any()
    assert central.dtype == np.float32
    with pytest.raises(ConfigError, match="kernel_init_method"):
        inflate_embedding(target, kernel2d, None)
    with pytest.raises(ShapeError, match="all kernel dimensions"):
        inflate_embedding(target, kernel2d[:2], "average_frame_initializer")


def test_surgery_head_pre_logits_and_video_config_quirk():
    def tree(rep, video=False):
        t = {"Transformer": {"posembed_input": {"pos_embedding": RNG.normal(size=(1, 16, 4)).astype(np.float32)},
                             "encoder_norm": {"scale": RNG.normal(size=4).astype(np.float32)}},
             "embedding": {"kernel": RNG.normal(size=(2, 4, 4, 3, 4) if video else (4, 4, 3, 4)).astype(np.float32),
                           "bias": RNG.normal(size=4).astype(np.float32)},
             "output_projection": {"kernel": np.zeros((rep or 4, 5), np.float32), "bias": np.full(5, -10.0, np.float32)}}
        if rep:
            t["pre_logits"] = {"kernel": RNG.normal(size=(4, rep)).astype(np.float32), "bias": np.zeros(rep, np.float32)}
        return t

    source, source_cfg = tree(6), {"model": {"representation_size": 6, "classifier": "gap"}}
    tokenizer = {"patches": {"size": [4, 4, 2]}, "temporal_encoding_config": {"method": "3d_conv",
                 "kernel_init_method": "average_frame_initializer"}}  # fmt: skip
    config = {"init_from": {}, "model": {"representation_size": None, "classifier": "gap", "tokenizer": tokenizer}}
    target = tree(None, video=True)
    out = init_token_learner_from_train_state(target, source, config, source_cfg)
    assert "pre_logits" not in out  # dropped: the target has no representation_size
    assert out["output_projection"]["bias"].tolist() == [-10.0] * 5  # the head reset: the target's own
    assert np.array_equal(out["embedding"]["kernel"][1], source["embedding"]["kernel"] / 2)
    assert np.array_equal(out["Transformer"]["encoder_norm"]["scale"], source["Transformer"]["encoder_norm"]["scale"])
    # Scenic quirk kept: the surgery copies the tokenizer's temporal config and patches into config.model.
    assert config["model"]["temporal_encoding_config"] == tokenizer["temporal_encoding_config"]
    assert config["model"]["patches"] == tokenizer["patches"]
    kept = init_token_learner_from_train_state(tree(6), source, {"init_from": {}, "model": {"representation_size": 6,
                                               "classifier": "gap", "tokenizer": {}}}, source_cfg)  # fmt: skip
    assert np.array_equal(kept["pre_logits"]["kernel"], source["pre_logits"]["kernel"])


# -- config reading -----------------------------------------------------------------------------------------
SMALL = {
    "model_name": "token_learner_classification", "rng_seed": 5, "init_head_bias": -10.0,
    "model": {"hidden_size": 16, "mlp_dim": 32, "num_layers": 2, "num_heads": 2, "representation_size": None,
              "classifier": "gap", "dropout_rate": 0.0, "attention_dropout_rate": 0.0, "stochastic_depth": 0.1,
              "tokenizer": {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 4, "tokenlearner_loc": 1,
                            "use_tokenfuse": False}},
    "optimizer": "momentum", "optimizer_configs": {}, "max_grad_norm": None,
    "lr_configs": {"base_learning_rate": 0.1},
}
META = {"num_classes": 5, "input_shape": [-1, 16, 16, 3], "target_is_onehot": False}


def test_load_config_sources(tmp_path):
    ml_collections = pytest.importorskip("ml_collections")
    py = tmp_path / "exp.py"
    py.write_text("import ml_collections\n\ndef get_config(runlocal=''):\n  c = ml_collections.ConfigDict()\n"
                  "  c.batch_size = 8 if runlocal else 4096\n  c.model = ml_collections.ConfigDict({'a': [1, 2]})\n"
                  "  return c\n")  # fmt: skip
    assert load_config(py) == {"batch_size": 4096, "model": {"a": [1, 2]}}
    assert load_config(f"{py}:runlocal")["batch_size"] == 8
    assert load_config(ml_collections.ConfigDict({"x": {"y": 1}})) == {"x": {"y": 1}}
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"config": {"x": 1}, "dataset_meta_data": {}}))
    assert load_config(js) == {"x": 1}
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.py")
    (tmp_path / "bad.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config(tmp_path / "bad.py")
    with pytest.raises(ConfigError, match="a config must be"):
        load_config(3)


# -- the trainer's own initialisation --------------------------------------------------------------------------
def test_trainer_starts_from_scenic_init():
    a, b = ScenicTrainer(SMALL, META), ScenicTrainer(SMALL, META)
    pa = a.params()
    assert np.array_equal(pa["output_projection"]["bias"], np.full(5, -10.0, np.float32))  # init_head_bias
    assert not pa["output_projection"]["kernel"].any()  # Scenic's zero head kernel
    assert np.array_equal(pa["Transformer"]["posembed_input"]["pos_embedding"],
                          b.params()["Transformer"]["posembed_input"]["pos_embedding"])  # seeded by rng_seed
    assert pa["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 16, 16)
    logs = a.train_step({"inputs": RNG.normal(size=(2, 16, 16, 3)).astype(np.float32), "label": np.array([1, 3])})
    assert {"loss", "learning_rate", "grad_norm", "l2_grads", "l2_params", "l2_updates"} <= set(logs)
    assert logs["learning_rate"] == pytest.approx(0.1) and a.global_step == 1
    assert len(a.optimizer.transforms) == 2  # 'momentum' -> sgd: trace(0.9) + learning rate


def test_trainer_errors():
    with pytest.raises(ConfigError, match="model_name"):
        ScenicTrainer({**SMALL, "model_name": "vit_multilabel_classification"}, META)
    with pytest.raises(ShapeError, match="one-hot"):  # mixup needs one-hot labels, as Scenic's
        ScenicTrainer({**SMALL, "mixup": {"alpha": 0.2}}, META).train_step(
            {"inputs": np.zeros((2, 16, 16, 3), np.float32), "label": np.array([1, 2])})
    with pytest.raises(ConfigError, match="input_shape"):
        ScenicTrainer(SMALL, {"num_classes": 5})
    trainer = ScenicTrainer(SMALL, META)
    with pytest.raises(ShapeError, match="label"):
        trainer.train_step({"inputs": np.zeros((2, 16, 16, 3), np.float32)})
    with pytest.raises(ShapeError, match="batch size"):
        trainer.train_step({"inputs": np.zeros((2, 16, 16, 3), np.float32), "label": np.array([1, 2, 3])})


@pytest.mark.parametrize("kim", ["average_frame_initializer", "central_frame_initializer"])
def test_trainer_image_to_video_surgery_then_training(kim):
    source = ScenicTrainer(SMALL, META)  # image model, 16x16 -> 4x4 grid
    video_tok = {"type": "video", "patches": {"size": [4, 4, 2]}, "num_tokens": 4, "tokenlearner_loc": 1,
                 "use_tokenfuse": True, "temporal_encoding_config": {"method": "3d_conv", "kernel_init_method": kim}}
    target_cfg = {**SMALL, "model": {**SMALL["model"], "tokenizer": video_tok}, "dataset_configs": {"num_frames": 4},
                  "init_from": {"positional_embed_size_change": "resize_tile"}, "optimizer": "adam",
                  "optimizer_configs": {"weight_decay": 0.1}, "skip_scale_and_bias_regularization": True}
    target = ScenicTrainer(target_cfg, {"num_classes": 3, "input_shape": [-1, 4, 24, 24, 3]})
    src = source.params()
    target.init_from_train_state(src, SMALL)
    got = target.params()
    kernel = src["embedding"]["kernel"]
    if kim == "average_frame_initializer":
        assert all(np.array_equal(got["embedding"]["kernel"][t], kernel / 2) for t in range(2))
    else:
        assert np.array_equal(got["embedding"]["kernel"][1], kernel) and not got["embedding"]["kernel"][0].any()
    pe = got["Transformer"]["posembed_input"]["pos_embedding"]
    assert pe.shape == (1, 72, 16)  # 2 frames x 6x6 patches: resized per frame, then tiled
    want = zoom_linear(src["Transformer"]["posembed_input"]["pos_embedding"][0].reshape(4, 4, 16), (6, 6, 16))
    np.testing.assert_allclose(pe[0, 36:].reshape(6, 6, 16), want, atol=1e-7)
    assert target.config["model"]["patches"] == video_tok["patches"]  # Scenic's config mutation, kept
    assert np.array_equal(got["output_projection"]["bias"], np.full(3, -10.0, np.float32))  # head reset
    x = RNG.normal(size=(2, 4, 24, 24, 3)).astype(np.float32)
    for _ in range(2):
        logs = target.train_step({"inputs": x, "label": np.array([0, 2]), "batch_mask": np.array([1.0, 0.0])})
        assert np.isfinite(logs["loss"]) and logs["metrics"]["loss"][1] == 1.0


def test_surgery_from_a_scenic_checkpoint_folder():
    from train_goldens import TrainCase

    case = TrainCase("finetune_surgery")  # init_from.checkpoint_path: a Scenic msgpack checkpoint (step 100)
    trainer = ScenicTrainer(case.config, case.dataset_meta_data)
    trainer.load_params(case.dir / "params_target_init.msgpack")
    trainer.init_from_train_state(case.dir / case.config["init_from"]["checkpoint_path"])  # config: init_from.model_config
    want, got = case.tree("params_after_surgery"), trainer.params()
    assert np.array_equal(got["Transformer"]["posembed_input"]["pos_embedding"],
                          want["Transformer"]["posembed_input"]["pos_embedding"])
    assert np.array_equal(got["pre_logits"]["kernel"], want["pre_logits"]["kernel"])


def test_mixup_in_train_step():
    from tokenlearner_torch.training.mixup import mixup, sample_mixup_weight

    x, y = torch.randn(3, 2, 2, 1), torch.eye(3)
    mx, my = mixup(x, y, 0.7)
    assert torch.allclose(mx[0], 0.7 * x[0] + 0.3 * x[2]) and torch.allclose(my[1], y[1])
    draws = [sample_mixup_weight(0.4, torch.Generator().manual_seed(s)) for s in range(200)]
    assert 0.0 < min(draws) and max(draws) < 1.0 and abs(np.mean(draws) - 0.5) < 0.08  # Beta(a, a): mean 1/2
    meta = {**META, "target_is_onehot": True}
    cfg = {**SMALL, "mixup": {"alpha": 0.5}}
    batch = {"inputs": RNG.normal(size=(2, 16, 16, 3)).astype(np.float32), "label": np.eye(5, dtype=np.float32)[[1, 3]]}
    mixed = ScenicTrainer(cfg, meta)
    logs = mixed.train_step(batch)
    w = logs["mixup_weight"]
    plain = ScenicTrainer(SMALL, meta)  # the same init (rng_seed); fed the batch mixed by hand
    xm, ym = mixup(torch.from_numpy(batch["inputs"]), torch.from_numpy(batch["label"]), w)
    assert plain.train_step({"inputs": xm, "label": ym})["loss"] == pytest.approx(logs["loss"], rel=1e-6)
