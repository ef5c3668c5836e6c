"""The built-in data sources (training/data.py): the distributed sampler's properties (every example once per
epoch across ranks, ranks' shares = the one-process batch, determinism, seek == skipping, Scenic's eval padding),
the digits as scikit-learn holds them, Scenic's ImageNet preprocessing (crop windows and normalisation
constants hand-derived from scenic/dataset_lib/imagenet_dataset.py), and the one-line errors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from tokenlearner_torch.errors import ConfigError
from tokenlearner_torch.training.data import (
    DataError,
    StreamPlan,
    build_dataset,
    center_crop_box,
    inception_crop_box,
    preprocess_eval,
    preprocess_train,
)

if importlib.util.find_spec("sklearn") is None:  # found, not imported: the digits are its CSV file (1.2 s less)
    pytest.skip("scikit-learn (the digits data source) is not installed", allow_module_level=True)


def _digits_cfg(**kw):
    cfg = {"dataset_name": "digits", "batch_size": 24, "eval_batch_size": 100, "rng_seed": 7}
    cfg.update(kw)
    return cfg


# -- the sampler ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_example_once_per_epoch_across_ranks(world):
    n, b = 50, 12  # 50 is not a multiple of 12: batches straddle epochs
    plans = [StreamPlan(num_train=n, num_eval=0, batch_size=b, eval_batch_size=b, seed=3, rank=r, world_size=world)
             for r in range(world)]
    steps = 3 * n // b + 1  # more than three epochs
    rows = []
    for s in range(1, steps + 1):
        for p in plans:  # rank order = Scenic's shard order
            idx, ep = p.train_rows(s)
            rows.extend(zip(idx.tolist(), ep.tolist()))
    for e in range(3):
        seen = sorted(i for i, ep in rows if ep == e)
        assert seen == list(range(n)), f"epoch {e} is not a permutation of the training set"
    # Each epoch's order is its own shuffle.
    assert [i for i, ep in rows if ep == 0] != [i for i, ep in rows if ep == 1]


def test_ranks_concatenated_equal_the_one_process_batch():
    one = build_dataset(_digits_cfg())
    two = [build_dataset(_digits_cfg(), rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full = next(one.train_iter)
        parts = [next(d.train_iter) for d in two]
        for key in ("inputs", "label", "batch_mask"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
        assert parts[0]["inputs"].shape[0] == 12  # rank 0 holds rows [0, 12) of the global 24


def test_deterministic_and_seed_dependent():
    a, b = build_dataset(_digits_cfg()), build_dataset(_digits_cfg())
    c = build_dataset(_digits_cfg(shuffle_seed=8))
    la = [next(a.train_iter)["label"] for _ in range(4)]
    lb = [next(b.train_iter)["label"] for _ in range(4)]
    lc = [next(c.train_iter)["label"] for _ in range(4)]
    np.testing.assert_array_equal(np.stack(la), np.stack(lb))
    assert not np.array_equal(np.stack(la), np.stack(lc))


@pytest.mark.parametrize("k", [0, 5, 62, 63])  # 62 steps of 24 = one epoch (1500) minus 12: straddles epochs
def test_seek_equals_skipping(k):
    skipped = build_dataset(_digits_cfg())
    for _ in range(k):
        next(skipped.train_iter)
    sought = build_dataset(_digits_cfg())
    next(sought.train_iter)  # a position to move away from
    it = sought.train_iter  # the loop may hold the iterator object from before the seek
    sought.seek(k)
    for _ in range(2):
        x, y = next(skipped.train_iter), next(it)
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["label"], y["label"])


def test_eval_padding_masks_and_shards():
    # 297 validation digits, eval batch 100: ceil(297/100) = 3 batches, the last with 97 real rows (Scenic's
    # maybe_pad_batch: zero rows, batch_mask 0), sharded 50/50 over 2 ranks, then the iterator repeats.
    full = build_dataset(_digits_cfg())
    assert full.plan.num_eval_batches == 3
    batches = [next(full.valid_iter) for _ in range(4)]
    assert [float(b["batch_mask"].sum()) for b in batches[:3]] == [100.0, 100.0, 97.0]
    last = batches[2]
    assert np.all(last["inputs"][97:] == 0) and np.all(last["label"][97:] == 0)
    assert np.all(last["batch_mask"][:97] == 1)
    np.testing.assert_array_equal(batches[3]["inputs"], batches[0]["inputs"])  # repeats, aligned
    ranks = [build_dataset(_digits_cfg(), rank=r, world_size=2) for r in range(2)]
    shards = [[next(d.valid_iter) for _ in range(3)] for d in ranks]
    assert float(shards[1][2]["batch_mask"].sum()) == 47.0  # rows 50..99 of the last batch: 47 real
    for i in range(3):
        np.testing.assert_array_equal(np.concatenate([shards[0][i]["inputs"], shards[1][i]["inputs"]]),
                                      batches[i]["inputs"])


def test_onehot_labels_and_meta_data():
    d = build_dataset(_digits_cfg(dataset_configs={"onehot_labels": True}))
    b = next(d.train_iter)
    assert b["label"].shape == (24, 10) and np.all(b["label"].sum(1) == 1)
    last = [next(d.valid_iter) for _ in range(3)][2]
    assert np.all(last["label"][97:] == 0)  # padded rows: no class
    assert d.meta_data == {"num_classes": 10, "input_shape": (-1, 16, 16, 3), "num_train_examples": 1500,
                           "num_eval_examples": 297, "input_dtype": "float32", "target_is_onehot": True}


def test_digits_are_read_without_importing_sklearn(monkeypatch):
    """The digits come from scikit-learn's CSV without its (slow) import, equal to load_digits() element for
    element; where the CSV is not found, load_digits() itself."""
    import sys
    from pathlib import Path

    from sklearn.datasets import load_digits

    from tokenlearner_torch.training import data

    ref = load_digits()
    with monkeypatch.context() as m:
        for name in [k for k in sys.modules if k.startswith("sklearn.")] + ["sklearn.datasets"]:
            m.setitem(sys.modules, name, None)  # load_digits (any scikit-learn submodule) would now raise
        images, target = data._load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
    assert images.dtype == ref.images.dtype and images.shape == (1797, 8, 8)
    monkeypatch.setattr(Path, "is_file", lambda self: False)
    images, target = data._load_digits()
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)


def test_digits_are_sklearns_upsampled():
    from sklearn.datasets import load_digits

    ref = load_digits()
    d = build_dataset(_digits_cfg(eval_batch_size=297))
    v = next(d.valid_iter)
    # The split: load_digits() shuffled by default_rng(0).permutation(1797), validation = the last 297;
    # 0..16 -> v/8 - 1; pixel (y, x) repeated over the 2x2 block (2y..2y+1, 2x..2x+1) of all 3 channels.
    order = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(v["label"], ref.target[order[1500:]])
    img = ref.images[order[1500 + 5]]
    for (y, x) in [(0, 0), (3, 4), (7, 7)]:
        np.testing.assert_array_equal(v["inputs"][5, 2 * y:2 * y + 2, 2 * x:2 * x + 2, :],
                                      np.full((2, 2, 3), img[y, x] / 8.0 - 1.0, np.float32))
    # Training examples come from the first 1500 only, each once per epoch.
    labels = np.concatenate([next(d.train_iter)["label"] for _ in range(1500 // 24)])
    counts = np.bincount(labels, minlength=10)
    expected = np.bincount(ref.target[order[:1500]], minlength=10)
    assert np.all(counts <= expected) and counts.sum() == 1488


# -- Scenic's ImageNet preprocessing -------------------------------------------------------------------------
def test_normalisation_constants_from_scenic():
    # scenic/dataset_lib/imagenet_dataset.py: MEAN_RGB = [0.485 * 255, 0.456 * 255, 0.406 * 255]
    # = [123.675, 116.28, 103.53]; STDDEV_RGB = [0.229 * 255, 0.224 * 255, 0.225 * 255] = [58.395, 57.12, 57.375];
    # normalize_image subtracts, then divides. A constant image stays constant under crop + bicubic resize.
    img = np.empty((40, 52, 3), np.uint8)
    img[...] = (200, 100, 50)
    expected = np.array([(200 - 123.675) / 58.395, (100 - 116.28) / 57.12, (50 - 103.53) / 57.375], np.float32)
    out = preprocess_eval(img, 24)
    assert out.shape == (24, 24, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=0, atol=2e-5)
    out = preprocess_train(img, 24, np.random.default_rng(0))
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=0, atol=2e-5)


def test_center_crop_window_hand_derived():
    # Scenic's _decode_and_center_crop, image_size 224, CROP_PADDING 32, a 501x375 (HxW) image:
    # s = int(224 / 256 * 375) = int(328.125) = 328; offsets ((501 - 328) + 1) // 2 = 87, ((375 - 328) + 1) // 2 = 24
    # (odd margins: the extra row/column goes before the crop).
    assert center_crop_box(501, 375, 224) == (87, 24, 328, 328)
    # 32x32 target on a 64x48 image: s = int(32 / 64 * 48) = 24; ((64 - 24) + 1) // 2 = 20, ((48 - 24) + 1) // 2 = 12.
    assert center_crop_box(64, 48, 32) == (20, 12, 24, 24)


def test_inception_crop_statistics():
    rng = np.random.default_rng([2026, 1])
    h, w = 120, 160
    boxes = [inception_crop_box(h, w, rng) for _ in range(3000)]
    found = [b for b in boxes if b is not None]
    assert len(found) >= 0.99 * len(boxes)  # 10 attempts almost never all fail on a 4:3 image
    y, x, ch, cw = (np.array(v) for v in zip(*found))
    assert np.all(y >= 0) and np.all(x >= 0) and np.all(y + ch <= h) and np.all(x + cw <= w)
    frac = ch * cw / (h * w)
    # Scenic's area_range (0.08, 1.0) AND min_object_covered 0.1 (the whole image is the box): >= 10%.
    assert frac.min() >= 0.1 and frac.max() <= 1.0
    assert frac.min() < 0.12 and frac.max() > 0.9  # the whole range is reached
    ratio = cw / ch  # width / height in [3/4, 4/3], up to the rounding of the width (+-0.5 px)
    assert np.all(ratio >= 0.75 - 0.5 / ch) and np.all(ratio <= 4 / 3 + 0.5 / ch)
    # The ratio is uniform on [3/4, 4/3] (linear, not log): P(ratio < 1) = (1 - 3/4) / (4/3 - 3/4) = 3/7.
    assert abs(np.mean(ratio < 1) - 3 / 7) < 0.05
    # Offsets uniform: the crop centre averages to the image centre.
    assert abs(np.mean(y + ch / 2) - h / 2) < 2.0 and abs(np.mean(x + cw / 2) - w / 2) < 2.5


def test_train_flip_rate_and_determinism():
    img = np.zeros((30, 30, 3), np.uint8)
    img[:, :15] = 255  # left half white: a flip moves it right
    flips = 0
    for i in range(400):
        out = preprocess_train(img, 16, np.random.default_rng([0, 0, i]))
        flips += out[:, :8].mean() < out[:, 8:].mean()
    # Binomial(400, 1/2): mean 200, sd 10; 5 sd either way.
    assert 150 < flips < 250
    a = preprocess_train(img, 16, np.random.default_rng([1, 2, 3]))
    b = preprocess_train(img, 16, np.random.default_rng([1, 2, 3]))
    np.testing.assert_array_equal(a, b)


def _write_folder(root, sizes, classes=("cat", "dog", "emu")):
    from PIL import Image

    rng = np.random.default_rng(5)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i, (hh, ww) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (hh, ww, 3), dtype=np.uint8)).save(root / c / f"{i}.png")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    _write_folder(root / "train", [(30, 40), (24, 24), (40, 28), (36, 36)])
    _write_folder(root / "valid", [(30, 30), (20, 44)])
    return root


def _folder_cfg(**ds):
    return {"dataset_name": "image_folder", "batch_size": 4, "eval_batch_size": 4, "rng_seed": 1,
            "dataset_configs": {"train_dir": "train", "valid_dir": "valid", "image_size": 16, **ds}}


def test_image_folder_workers_seek_and_shards(folder):
    inline = build_dataset(_folder_cfg(num_workers=0), data_dir=str(folder))
    assert inline.meta_data["num_classes"] == 3 and inline.meta_data["num_train_examples"] == 12
    ref = [next(inline.train_iter) for _ in range(5)]  # 5 steps of 4 over 12 images: crosses two epochs
    assert ref[0]["inputs"].shape == (4, 16, 16, 3)
    workers = build_dataset(_folder_cfg(num_workers=2), data_dir=str(folder))
    try:
        workers.seek(3)  # background processes, resumed at step 4: the same crops and flips
        for want in ref[3:]:
            got = next(workers.train_iter)
            np.testing.assert_array_equal(got["inputs"], want["inputs"])
            np.testing.assert_array_equal(got["label"], want["label"])
        ev = [next(workers.valid_iter) for _ in range(2)]
        assert [float(b["batch_mask"].sum()) for b in ev] == [4.0, 2.0]
    finally:
        workers.close()
    halves = [build_dataset(_folder_cfg(num_workers=0), rank=r, world_size=2, data_dir=str(folder))
              for r in range(2)]
    np.testing.assert_array_equal(np.concatenate([next(h.train_iter)["inputs"] for h in halves]),
                                  ref[0]["inputs"])


# -- one-line errors -----------------------------------------------------------------------------------------
def test_errors_are_one_line(folder, tmp_path):
    with pytest.raises(ConfigError, match=r"digits, image_folder.*any dataset object") as e:
        build_dataset(_digits_cfg(dataset_name="imagenet"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"batch_size \(24\) must be divisible by the number of processes \(5\)"):
        build_dataset(_digits_cfg(), rank=0, world_size=5)
    with pytest.raises(ConfigError, match=r"eval_batch_size \(100\) must be divisible .* \(3\)"):
        build_dataset(_digits_cfg(batch_size=24), rank=0, world_size=3)
    with pytest.raises(DataError, match="train_dir .*nowhere is not a directory"):
        build_dataset(_folder_cfg(train_dir=str(tmp_path / "nowhere")), data_dir=str(folder))
    bad = tmp_path / "bad"
    _write_folder(bad / "train", [(20, 20)], classes=("a",))
    _write_folder(bad / "valid", [(20, 20)], classes=("a",))
    (bad / "train" / "a" / "0.png").write_bytes(b"not a png")
    d = build_dataset(_folder_cfg(num_workers=1), data_dir=str(bad))  # decoded in a worker process
    try:
        with pytest.raises(DataError, match=r"cannot decode .*0\.png") as e:
            next(d.train_iter)
        assert "\n" not in str(e.value)
    finally:
        d.close()
