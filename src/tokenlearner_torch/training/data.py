"""Built-in data sources for ``train()`` and ``tokenlearner-train``: a distributed, deterministic, resumable
sampler over two sources.

* ``digits``: scikit-learn's bundled handwritten digits (no download): 1797 grey 8x8 images, 10 classes.
* ``image_folder``: one sub-folder per class, decoded with Pillow, Scenic's ImageNet preprocessing
  (``scenic/dataset_lib/imagenet_dataset.py``), loaded in background workers (``torch.utils.data.DataLoader``).

``build_dataset(config, rank=, world_size=)`` returns a :class:`Dataset` with the fields of Scenic's
``dataset_utils.Dataset``: ``train_iter``, ``valid_iter`` (``test_iter`` is None) and ``meta_data``; batches are
dicts of numpy arrays ``inputs [b, H, W, 3] float32``, ``label [b] int32`` (``[b, K] float32`` with
``dataset_configs.onehot_labels``) and ``batch_mask [b] float32``, where ``b = B / world_size`` is THIS
process's share of the global batch ``B = config.batch_size``.

Sampling (the same for both sources):

* The training stream is the concatenation of one permutation of the training set per epoch
  (``numpy.random.default_rng([shuffle_seed, epoch])``). Global step ``s`` (1-based, as the loop counts) takes
  stream positions ``[(s-1) B, s B)``, so every example is used exactly once per epoch across all ranks (a batch
  may straddle two epochs, as Scenic's ``ds.repeat()`` before ``ds.batch()`` does).
* Rank ``r`` of ``n`` takes rows ``[r B/n, (r+1) B/n)`` of each global batch (Scenic's ``dataset_utils.shard``
  of a host's batch over its devices; here processes play the devices).
* Random augmentation draws from ``default_rng([shuffle_seed, epoch, example_index])``: an example's crop and flip
  depend on nothing else (not on the rank, the world size, the worker or whether the run was resumed).
* ``seek(step)``: the next ``next(train_iter)`` is the batch of step ``step + 1``; identical to having drawn the
  ``step`` batches before it.
* Evaluation: ``ceil(num_eval / eval_batch_size)`` global batches in file order, the last padded with zero rows
  whose ``batch_mask`` is 0 (Scenic's ``maybe_pad_batch``), sharded the same way; the iterator repeats forever,
  as Scenic's ``valid_iter`` does, so each evaluation of that many batches sees every example once.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

from ..errors import ConfigError, TokenLearnerError
from .config import cfg_get

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "Dataset",
    "build_dataset",
    "digits_source",
    "image_folder_source",
    "StreamPlan",
    "inception_crop_box",
    "center_crop_box",
    "preprocess_train",
    "preprocess_eval",
    "IMAGENET_MEAN_RGB",
    "IMAGENET_STDDEV_RGB",
]

BUILTIN_DATASETS = ("digits", "image_folder")

# Scenic's imagenet_dataset.py: MEAN_RGB = [0.485 * 255, 0.456 * 255, 0.406 * 255], STDDEV_RGB likewise with
# 0.229, 0.224, 0.225; subtracted from and divided into pixel values in [0, 255] after the resize.
IMAGENET_MEAN_RGB = np.array([0.485 * 255, 0.456 * 255, 0.406 * 255], np.float32)
IMAGENET_STDDEV_RGB = np.array([0.229 * 255, 0.224 * 255, 0.225 * 255], np.float32)
# Scenic's CROP_PADDING: the eval crop keeps image_size / (image_size + 32) of the shorter side (224/256).
CROP_PADDING = 32

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(TokenLearnerError):
    """A data source cannot be read: a missing folder, an empty class, an image Pillow cannot decode."""


# -- the sampler ---------------------------------------------------------------------------------------------
class StreamPlan:
    """Which examples each step and each rank gets.

    ``num_train``/``num_eval`` examples; ``batch_size``/``eval_batch_size`` are GLOBAL; ``rank`` of
    ``world_size``. Pure index arithmetic (no data): ``train_rows(step)`` and ``eval_rows(i)``.
    """

    def __init__(self, *, num_train: int, num_eval: int, batch_size: int, eval_batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"config.{name} must be a positive integer, got {value!r}")
            # Scenic's train_utils.get_dataset: the global batch must split evenly over the devices.
            if value % world_size:
                raise ConfigError(f"config.{name} ({value}) must be divisible by the number of processes "
                                  f"({world_size}): it is the global batch, split evenly over the processes")
        if num_train < 1:
            raise DataError("the training set is empty")
        self.num_train, self.num_eval = int(num_train), int(num_eval)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self._perm_cache: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        """The order of the training set in ``epoch`` (0-based)."""
        perm = self._perm_cache.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_train)
            self._perm_cache = {epoch: perm}  # one epoch at a time is all a batch needs (at most two)
            return perm
        return perm

    def _local_slice(self, global_size: int) -> tuple[int, int]:
        share = global_size // self.world_size
        return self.rank * share, (self.rank + 1) * share

    def train_rows(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, epochs) of this rank's rows of global step ``step`` (1-based)."""
        if step < 1:
            raise ValueError(f"steps count from 1, got {step}")
        lo, hi = self._local_slice(self.batch_size)
        pos = (step - 1) * self.batch_size + np.arange(lo, hi, dtype=np.int64)
        epochs = pos // self.num_train
        idx = np.empty_like(pos)
        for e in np.unique(epochs):
            sel = epochs == e
            idx[sel] = self.permutation(int(e))[pos[sel] % self.num_train]
        return idx, epochs

    @property
    def num_eval_batches(self) -> int:
        """``ceil(num_eval / eval_batch_size)``, Scenic's ``steps_per_eval``."""
        return math.ceil(self.num_eval / self.eval_batch_size)

    def eval_rows(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """(example indices, mask) of this rank's rows of evaluation batch ``batch`` (0-based); padded rows
        have index -1 and mask 0."""
        lo, hi = self._local_slice(self.eval_batch_size)
        pos = batch * self.eval_batch_size + np.arange(lo, hi, dtype=np.int64)
        valid = pos < self.num_eval
        return np.where(valid, pos, -1), valid.astype(np.float32)


# -- sources -------------------------------------------------------------------------------------------------
class _Source:
    """A source: ``num_train``/``num_eval``, ``input_shape`` (H, W, C), ``num_classes``, and the examples."""

    num_train: int
    num_eval: int
    num_classes: int
    input_shape: tuple[int, int, int]

    def train_example(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError

    def eval_example(self, index: int) -> tuple[np.ndarray, int]:
        raise NotImplementedError


def _load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: ``(images [1797, 8, 8] float64, target [1797] int)``, as ``load_digits()`` returns
    them. Read from the CSV that scikit-learn ships, without importing scikit-learn (its import costs ~1.5 s
    of CPU in every training run); ``load_digits()`` itself where that file is not where it has always been."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("dataset 'digits' needs scikit-learn: pip install 'tokenlearner-torch[train]'")
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        with gzip.open(csv, "rt") as f:
            data = np.loadtxt(f, delimiter=",")
        return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


class _DigitsSource(_Source):
    """scikit-learn's digits, 8x8 grey in 0..16, as ``size x size x 3`` float32 in [-1, 1].

    Upsampling: each pixel repeated ``size / 8`` times along both axes (nearest neighbour, exact), the grey value
    copied to the 3 channels, then ``v / 8 - 1`` (0..16 -> [-1, 1]). Split (fixed): ``load_digits()`` in the
    order of ``numpy.random.default_rng(0).permutation(1797)``, the first 1500 train, the last 297 validate
    (``order`` holds that order: ``images[order[i]]``).
    """

    NUM_TRAIN = 1500

    def __init__(self, size: int = 16) -> None:
        if not isinstance(size, int) or size < 8 or size % 8:
            raise ConfigError(f"dataset_configs.image_size for 'digits' must be a multiple of 8, got {size!r}")
        images, target = _load_digits()
        rep = size // 8
        self.order = np.random.default_rng(0).permutation(len(target))
        img = images[self.order].astype(np.float32).repeat(rep, axis=1).repeat(rep, axis=2)  # [N, size, size]
        img = img / np.float32(8.0) - np.float32(1.0)
        self.images = np.ascontiguousarray(np.repeat(img[..., None], 3, axis=-1))
        self.labels = target[self.order].astype(np.int32)
        self.num_train = self.NUM_TRAIN
        self.num_eval = len(self.labels) - self.NUM_TRAIN
        self.num_classes = 10
        self.input_shape = (size, size, 3)

    def train_example(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])

    def eval_example(self, index: int) -> tuple[np.ndarray, int]:
        i = self.NUM_TRAIN + index
        return self.images[i], int(self.labels[i])


def _list_class_folders(root: Path, what: str) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DataError(f"image_folder: {what} {root} is not a directory (expected one sub-folder per class)")
    classes: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in sub.iterdir() if f.is_file() and f.suffix.lower() in _IMAGE_EXTENSIONS)
        classes[sub.name] = files
    if not classes:
        raise DataError(f"image_folder: {what} {root} has no class sub-folders")
    empty = [c for c, files in classes.items() if not files]
    if empty:
        raise DataError(f"image_folder: {what} {root}: class folder(s) without images: {', '.join(empty[:5])} "
                        f"(expected files ending in {', '.join(_IMAGE_EXTENSIONS)})")
    return classes


def _decode(path: Path) -> np.ndarray:
    """An image file as uint8 RGB ``[H, W, 3]`` (Scenic: ``decode_jpeg(channels=3)``)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception as e:  # noqa: BLE001 - Pillow raises many kinds
        raise DataError(f"image_folder: cannot decode {path}: {type(e).__name__}: {e}") from None


def inception_crop_box(height: int, width: int, rng: np.random.Generator, *, area_range=(0.08, 1.0),
                       aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0), min_object_covered: float = 0.1,
                       max_attempts: int = 10) -> Optional[tuple[int, int, int, int]]:
    """A random crop ``(y, x, h, w)`` as ``tf.image.sample_distorted_bounding_box`` draws it for Scenic's
    ``_decode_and_random_crop`` (the whole image as the one box), or None when every attempt failed.

    Per attempt: an aspect ratio ``w/h`` uniform in ``aspect_ratio_range``; the height an integer uniform
    between the heights that give ``area_range`` of the image area at that ratio (capped by the image);
    ``w = round(h * ratio)``; accepted when its area lies in ``area_range`` and it covers at least
    ``min_object_covered`` of the image (Scenic quirk: 0.1 > 0.08, so the smallest crops are 10%, not 8%);
    the offset uniform. Same algorithm and constraints as TensorFlow's op; not its random numbers.
    """
    area = float(height * width)
    min_area, max_area = area_range[0] * area, area_range[1] * area
    for _ in range(max_attempts):
        ratio = float(rng.uniform(*aspect_ratio_range))
        h = int(round(math.sqrt(min_area / ratio)))
        max_h = int(round(math.sqrt(max_area / ratio)))
        if round(max_h * ratio) > width:  # the tallest crop whose rounded width still fits
            max_h = int((width + 0.5 - 1e-7) / ratio)
            if round(max_h * ratio) > width:
                max_h -= 1
        max_h = min(max_h, height)
        h = min(h, max_h)
        if h < max_h:
            h += int(rng.integers(0, max_h - h + 1))
        w = int(round(h * ratio))
        a = float(w * h)
        if a < min_area:  # rounding: try one row taller, then one shorter
            h += 1
            w = int(round(h * ratio))
            a = float(w * h)
        if a > max_area:
            h -= 1
            w = int(round(h * ratio))
            a = float(w * h)
        if a < min_area or a > max_area or w > width or h > height or w <= 0 or h <= 0:
            continue
        if a / area < min_object_covered:
            continue
        y = int(rng.integers(0, height - h)) if h < height else 0
        x = int(rng.integers(0, width - w)) if w < width else 0
        return y, x, h, w
    return None


def center_crop_box(height: int, width: int, image_size: int, crop_padding: int = CROP_PADDING
                    ) -> tuple[int, int, int, int]:
    """Scenic's ``_decode_and_center_crop`` window ``(y, x, s, s)``: ``s = int(image_size / (image_size +
    crop_padding) * min(H, W))`` (float32 product, truncated), offsets ``((H - s) + 1) // 2``."""
    s = int(np.float32(image_size / (image_size + crop_padding)) * np.float32(min(height, width)))
    s = max(s, 1)
    return ((height - s) + 1) // 2, ((width - s) + 1) // 2, s, s


def _resize_bicubic(image: np.ndarray, size: int) -> np.ndarray:
    """``[h, w, 3]`` -> ``[size, size, 3]`` float32, bicubic (a = -0.5, half-pixel centres), unclipped and
    unrounded as TF's ``tf.image.resize(BICUBIC)``: each channel as a Pillow float ('F') image. Pillow widens the
    kernel when shrinking (antialiasing), TF's resize does not: downscaled pixels differ there."""
    from PIL import Image

    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c], np.float32), mode="F")
                        .resize((size, size), Image.Resampling.BICUBIC)) for c in range(image.shape[-1])]
    return np.stack(chans, axis=-1).astype(np.float32, copy=False)


def _normalize(image: np.ndarray) -> np.ndarray:
    return (image - IMAGENET_MEAN_RGB) / IMAGENET_STDDEV_RGB


def preprocess_train(image: np.ndarray, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """Scenic's ``preprocess_for_train`` ('default' augmentation): random crop (:func:`inception_crop_box`;
    Scenic falls back to the central crop when the crop is the whole image), bicubic resize to ``image_size``,
    a left-right flip with probability 1/2, then ``(x - MEAN_RGB) / STDDEV_RGB``. ``image``: uint8 ``[H, W, 3]``;
    returns float32 ``[image_size, image_size, 3]``."""
    h, w = image.shape[:2]
    box = inception_crop_box(h, w, rng)
    if box is None or (box[2] == h and box[3] == w):
        y, x, ch, cw = center_crop_box(h, w, image_size)
    else:
        y, x, ch, cw = box
    out = _resize_bicubic(image[y:y + ch, x:x + cw], image_size)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(_normalize(out), np.float32)


def preprocess_eval(image: np.ndarray, image_size: int, crop_padding: int = CROP_PADDING) -> np.ndarray:
    """Scenic's ``preprocess_for_eval``: the central crop of ``image_size / (image_size + crop_padding)`` of
    the shorter side (for 224: the region that resize-to-256 + central-crop-224 keeps), bicubic resize to
    ``image_size``, normalised as in training."""
    y, x, ch, cw = center_crop_box(image.shape[0], image.shape[1], image_size, crop_padding)
    return np.ascontiguousarray(_normalize(_resize_bicubic(image[y:y + ch, x:x + cw], image_size)), np.float32)


class _ImageFolderSource(_Source):
    """``train_dir``/``valid_dir``: one sub-folder per class (class ids: sorted training folder names)."""

    def __init__(self, train_dir: Path, valid_dir: Path, image_size: int, crop_padding: int) -> None:
        if not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(f"dataset_configs.image_size must be a positive integer, got {image_size!r}")
        train = _list_class_folders(train_dir, "train_dir")
        valid = _list_class_folders(valid_dir, "valid_dir")
        unknown = sorted(set(valid) - set(train))
        if unknown:
            raise DataError(f"image_folder: valid_dir {valid_dir} has classes the training set lacks: "
                            f"{', '.join(unknown[:5])}")
        self.class_names = list(train)
        ids = {c: i for i, c in enumerate(self.class_names)}
        self.train_files = [(f, ids[c]) for c, files in train.items() for f in files]
        self.eval_files = [(f, ids[c]) for c, files in valid.items() for f in files]
        self.num_train, self.num_eval = len(self.train_files), len(self.eval_files)
        self.num_classes = len(self.class_names)
        self.image_size, self.crop_padding = image_size, crop_padding
        self.input_shape = (image_size, image_size, 3)

    def train_example(self, index: int, epoch: int, seed: int) -> tuple[np.ndarray, int]:
        path, label = self.train_files[index]
        rng = np.random.default_rng([seed, epoch, index])
        return preprocess_train(_decode(path), self.image_size, rng), label

    def eval_example(self, index: int) -> tuple[np.ndarray, int]:
        path, label = self.eval_files[index]
        return preprocess_eval(_decode(path), self.image_size, self.crop_padding), label


# -- batches -------------------------------------------------------------------------------------------------
_ERROR_KEY = "__tokenlearner_error__"


def _identity(x: Any) -> Any:  # DataLoader's convert function: keep numpy (module level: picklable)
    return x


class _Batches:
    """``__getitem__(key)`` -> one batch dict; ``key`` = ('train', step) or ('eval', i). Runs in the workers."""

    def __init__(self, source: _Source, plan: StreamPlan, onehot: bool) -> None:
        self.source, self.plan, self.onehot = source, plan, onehot

    def _labels(self, labels: np.ndarray) -> np.ndarray:
        if not self.onehot:
            return labels.astype(np.int32)
        return np.eye(self.source.num_classes, dtype=np.float32)[labels]

    def train(self, step: int) -> dict[str, np.ndarray]:
        idx, epochs = self.plan.train_rows(step)
        ex = [self.source.train_example(int(i), int(e), self.plan.seed) for i, e in zip(idx, epochs)]
        return {"inputs": np.stack([x for x, _ in ex]).astype(np.float32, copy=False),
                "label": self._labels(np.array([y for _, y in ex], np.int64)),
                # Scenic's maybe_pad_batch(train=True) adds an all-ones mask.
                "batch_mask": np.ones(len(ex), np.float32)}

    def eval(self, batch: int) -> dict[str, np.ndarray]:
        idx, mask = self.plan.eval_rows(batch)
        shape = self.source.input_shape
        inputs = np.zeros((len(idx),) + tuple(shape), np.float32)
        labels = np.zeros(len(idx), np.int64)
        for row, i in enumerate(idx):
            if i >= 0:
                inputs[row], labels[row] = self.source.eval_example(int(i))
        out = {"inputs": inputs, "label": self._labels(labels), "batch_mask": mask}
        if self.onehot:  # Scenic pads with zeros: a padded row's one-hot label is all zeros
            out["label"] = out["label"] * mask[:, None]
        return out

    def __getitem__(self, key: tuple[str, int]) -> dict[str, Any]:
        kind, i = key
        try:
            return self.train(i) if kind == "train" else self.eval(i)
        except TokenLearnerError as e:
            # Handed back as data: a DataLoader worker would re-raise it wrapped in a multi-line traceback text.
            return {_ERROR_KEY: (type(e).__name__, str(e))}


class _Keys:
    """An endless sampler for the DataLoader: ('train', start), ('train', start + 1), ... (or the eval batches
    in a cycle)."""

    def __init__(self, kind: str, start: int, period: int = 0) -> None:
        self.kind, self.start, self.period = kind, start, period

    def __iter__(self) -> Iterator[tuple[str, int]]:
        i = self.start
        while True:
            yield (self.kind, i % self.period if self.period else i)
            i += 1


class _Stream:
    """An iterator whose position ``restart(start)`` can move: the object ``train_iter`` stays the same, so a
    loop that holds it sees a seek. Workers: ``num_workers`` DataLoader processes (0: in this process)."""

    def __init__(self, batches: _Batches, kind: str, num_workers: int, period: int = 0) -> None:
        self.batches, self.kind, self.num_workers, self.period = batches, kind, num_workers, period
        self._it: Optional[Iterator[dict[str, np.ndarray]]] = None
        self.restart(1 if kind == "train" else 0)

    def restart(self, start: int) -> None:
        self.close()
        keys = _Keys(self.kind, start, self.period)
        if self.num_workers == 0:
            self._it = (self.batches[k] for k in keys)
            return
        from torch.utils.data import DataLoader

        # JAX's runtime threads make a fork unsafe (a lock held by one of them at fork time stays held in the
        # child): where jax is loaded (a parity run, a test session), workers start from a fork server.
        context = "forkserver" if "jax" in sys.modules and sys.platform != "win32" else None
        loader = DataLoader(self.batches, batch_size=None, sampler=keys, num_workers=self.num_workers,
                            collate_fn=_identity, prefetch_factor=2, persistent_workers=False,
                            multiprocessing_context=context)
        self._it = iter(loader)

    def __iter__(self) -> "_Stream":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._it is None:
            raise StopIteration
        batch = next(self._it)
        if _ERROR_KEY in batch:
            kind, text = batch[_ERROR_KEY]
            raise (ConfigError if kind == "ConfigError" else DataError)(text)
        return batch

    def close(self) -> None:
        it, self._it = self._it, None
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class Dataset:
    """Scenic's ``dataset_utils.Dataset`` fields (``train_iter``, ``valid_iter``, ``test_iter`` (None),
    ``meta_data``) plus ``seek(step)`` (resume) and ``close()`` (stop the workers). ``plan`` is the sampler."""

    def __init__(self, source: _Source, plan: StreamPlan, *, onehot: bool, num_workers: int,
                 dtype_str: str = "float32") -> None:
        self.source, self.plan = source, plan
        batches = _Batches(source, plan, onehot)
        self.train_iter = _Stream(batches, "train", num_workers)
        self.valid_iter = _Stream(batches, "eval", num_workers, period=plan.num_eval_batches)
        self.test_iter = None
        self.meta_data = {
            "num_classes": source.num_classes,
            "input_shape": (-1,) + tuple(source.input_shape),
            "num_train_examples": source.num_train,
            "num_eval_examples": source.num_eval,
            "input_dtype": dtype_str,
            "target_is_onehot": onehot,
        }

    def seek(self, step: int) -> None:
        """Make the next training batch that of step ``step + 1`` (after restoring a checkpoint at ``step``)."""
        if not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"seek: expected a step >= 0, got {step!r}")
        self.train_iter.restart(int(step) + 1)

    def close(self) -> None:
        self.train_iter.close()
        self.valid_iter.close()


# -- build ---------------------------------------------------------------------------------------------------
def _resolve(path: Any, data_dir: Optional[str], key: str) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"config.dataset_configs.{key} must be a folder path, got {path!r}")
    p = Path(os.path.expanduser(os.fspath(path)))
    return p if p.is_absolute() or data_dir is None else Path(data_dir) / p


def digits_source(config: Mapping[str, Any], data_dir: Optional[str] = None) -> _Source:
    """``dataset_configs.image_size`` (16): the side of the upsampled square images."""
    return _DigitsSource(int(cfg_get(config, "dataset_configs.image_size", 16)))


def image_folder_source(config: Mapping[str, Any], data_dir: Optional[str] = None) -> _Source:
    """``dataset_configs.train_dir`` (``train``), ``valid_dir`` (``valid``): relative paths are relative to
    ``data_dir`` when it is given; ``image_size`` (224), ``crop_padding`` (Scenic's 32)."""
    ds = cfg_get(config, "dataset_configs", {}) or {}
    train_dir = _resolve(ds.get("train_dir", "train"), data_dir, "train_dir")
    valid_dir = _resolve(ds.get("valid_dir", "valid"), data_dir, "valid_dir")
    return _ImageFolderSource(train_dir, valid_dir, ds.get("image_size", 224), int(ds.get("crop_padding",
                                                                                           CROP_PADDING)))


_SOURCES: dict[str, Callable[[Mapping[str, Any], Optional[str]], _Source]] = {
    "digits": digits_source,
    "image_folder": image_folder_source,
}


def build_dataset(config: Any, *, rank: int = 0, world_size: int = 1, data_dir: Optional[str] = None
                  ) -> Dataset:
    """The built-in source ``config.dataset_name`` as a :class:`Dataset` of this process's shards.

    Reads ``batch_size`` (global), ``eval_batch_size`` (default: ``batch_size``, as Scenic),
    ``shuffle_seed`` (default: ``rng_seed``; Scenic's default None shuffles nondeterministically),
    ``data_dtype_str``, ``dataset_configs.onehot_labels`` (False) and ``dataset_configs.num_workers``
    (background loader processes; default 0 for digits, which are in memory, ``min(4, cpus)`` otherwise).
    """
    from .config import load_config

    config = load_config(config)
    name = config.get("dataset_name")
    if name not in _SOURCES:
        raise ConfigError(f"config.dataset_name must be one of the built-in sources {', '.join(BUILTIN_DATASETS)}, "
                          f"got {name!r} (the Python API train(dataset=...) accepts any dataset object)")
    batch_size = cfg_get(config, "batch_size")
    eval_batch_size = config.get("eval_batch_size") or batch_size
    seed = config.get("shuffle_seed")
    if seed is None:
        seed = config.get("rng_seed", 0)
    ds_cfg = config.get("dataset_configs") or {}
    onehot = bool(ds_cfg.get("onehot_labels", False))
    default_workers = 0 if name == "digits" else min(4, os.cpu_count() or 1)
    num_workers = ds_cfg.get("num_workers", default_workers)
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(f"config.dataset_configs.num_workers must be an integer >= 0, got {num_workers!r}")
    source = _SOURCES[name](config, data_dir)
    plan = StreamPlan(num_train=source.num_train, num_eval=source.num_eval, batch_size=batch_size,
                      eval_batch_size=eval_batch_size, seed=int(seed), rank=rank, world_size=world_size)
    return Dataset(source, plan, onehot=onehot, num_workers=num_workers,
                   dtype_str=str(config.get("data_dtype_str", "float32")))
