"""Scenic's fine-tuning surgery for TokenLearner (``init_token_learner_from_train_state`` and the ViViT
helpers it calls), on Flax parameter trees of numpy arrays. No scipy: Scenic's
``scipy.ndimage.zoom(order=1)`` is linear interpolation with aligned corners (output index ``i`` reads input
coordinate ``i * (n_in - 1) / (n_out - 1)``), computed here in float64 and returned in the input dtype.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, MutableMapping, Sequence

import numpy as np

from ..errors import ConfigError, ShapeError
from .config import cfg_get

__all__ = [
    "zoom_linear",
    "interpolate_positional_embeddings",
    "interpolate_1d_positional_embeddings",
    "tile_positional_embeddings",
    "resize_position_embedding",
    "inflate_embedding",
    "init_token_learner_from_train_state",
    "POSEMB_SIZE_CHANGES",
    "INFLATION_METHODS",
]

POSEMB_SIZE_CHANGES = ("resize", "tile", "resize_tile")
INFLATION_METHODS = ("average_frame_initializer", "central_frame_initializer")


def _zoom_axis(a: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    n_in = a.shape[axis]
    if n_out == n_in:
        return a
    step = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
    coords = np.arange(n_out, dtype=np.float64) * step
    lo = np.minimum(np.floor(coords).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (coords - lo).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
    return np.take(a, lo, axis=axis) * (1.0 - frac) + np.take(a, hi, axis=axis) * frac


def zoom_linear(array: np.ndarray, output_shape: Sequence[int]) -> np.ndarray:
    """``scipy.ndimage.zoom(array, zoom, order=1)`` for the output shape it would produce (aligned corners)."""
    array = np.asarray(array)
    if len(output_shape) != array.ndim:
        raise ShapeError(f"zoom_linear: output shape {list(output_shape)} has rank {len(output_shape)}, the array {array.ndim}")
    out = array.astype(np.float64)
    for axis, n in enumerate(output_shape):
        if int(n) < 1:
            raise ShapeError(f"zoom_linear: output size {n} on axis {axis}")
        out = _zoom_axis(out, axis, int(n))
    return out.astype(array.dtype)


def _side(n: int, what: str) -> int:
    side = int(np.sqrt(n))
    if side * side != n:
        raise ShapeError(f"{what}: {n} tokens are not a square grid (Scenic's resize assumes square images and patches)")
    return side


def interpolate_positional_embeddings(grid: np.ndarray, n_tokens: int) -> np.ndarray:
    """ViViT's resize: ``[n, d]`` on a square grid -> ``[1, n_tokens, d]`` by aligned-corner linear zoom."""
    g_in, g_out = _side(len(grid), "the restored position embedding"), _side(n_tokens, "the target position embedding")
    factor = g_out / g_in
    size = int(round(g_in * factor))  # scipy's output size for this zoom factor
    resized = zoom_linear(np.asarray(grid).reshape(g_in, g_in, -1), (size, size, grid.shape[-1]))
    return resized.reshape(1, size * size, -1)


def interpolate_1d_positional_embeddings(grid: np.ndarray, n_tokens: int) -> np.ndarray:
    """ViViT's temporal resize: ``[n, d]`` -> ``[1, n_tokens, d]`` (linear, aligned corners)."""
    size = int(round(len(grid) * (n_tokens / len(grid))))
    return zoom_linear(np.asarray(grid), (size, grid.shape[-1]))[None]


def tile_positional_embeddings(grid: np.ndarray, n_tokens: int) -> np.ndarray:
    """ViViT's tile: ``[n, d]`` repeated ``int(n_tokens / n)`` times -> ``[1, n_tokens, d]``."""
    repeats = int(n_tokens / len(grid))
    if repeats * len(grid) != n_tokens:
        raise ShapeError(f"tile: {n_tokens} target tokens are not a multiple of the {len(grid)} restored ones")
    return np.concatenate([np.asarray(grid)] * repeats, axis=0)[None]


def resize_position_embedding(target: np.ndarray, restored: np.ndarray, config: Mapping[str, Any],
                              restored_config: Mapping[str, Any], is_temporal: bool = False) -> np.ndarray:  # fmt: skip
    """ViViT's ``init_posemb`` for one ``pos_embedding`` ``[1, N, d]``: the restored one, adapted to ``target``'s length.

    ``config.init_from.positional_embed_size_change`` chooses ``resize``, ``tile`` or ``resize_tile`` (per-frame
    resize, then tiled over frames); a ``token`` classifier's first token is handled as ViViT does. With
    ``init_from.restore_positional_embedding=False`` the target is returned unchanged.
    """
    init_from = cfg_get(config, "init_from", {}) or {}
    if not init_from.get("restore_positional_embedding", True):
        return target
    if restored.shape == target.shape:
        return restored
    ntok = target.shape[1]
    target_token = cfg_get(config, "model.classifier", None) == "token"
    restored_token = cfg_get(restored_config, "model.classifier", None) == "token"
    if restored_token:
        grid = restored[0, 1:]
        cls_tok = restored[:, :1] if target_token else restored[:, :0]
    else:
        grid = restored[0]
        cls_tok = target[:, :1] if target_token else restored[:, :0]
    if target_token:
        ntok -= 1
    if len(grid) != ntok:
        change = init_from.get("positional_embed_size_change")
        if is_temporal:
            grid = interpolate_1d_positional_embeddings(grid, ntok)
        elif change == "resize":
            grid = interpolate_positional_embeddings(grid, ntok)
        elif change == "tile":
            grid = tile_positional_embeddings(grid, ntok)
        elif change == "resize_tile":
            method = cfg_get(config, "model.temporal_encoding_config.method")
            if method == "temporal_sampling":
                per_frame = int(ntok / cfg_get(config, "model.temporal_encoding_config.n_sampled_frames"))
            elif method == "3d_conv":
                n_frames = cfg_get(config, "dataset_configs.num_frames") // cfg_get(config, "model.patches.size")[2]
                per_frame = ntok // n_frames
            else:
                raise ConfigError(f"resize_tile: unknown temporal encoding method {method!r}")
            grid = tile_positional_embeddings(interpolate_positional_embeddings(grid, per_frame)[0], ntok)
        else:
            raise ConfigError(f"the position embedding changes length ({len(grid)} -> {ntok} tokens): set "
                              f"config.init_from.positional_embed_size_change to one of {POSEMB_SIZE_CHANGES}")  # fmt: skip
    else:
        grid = grid[None]
    out = np.concatenate([cls_tok, grid], axis=1) if target_token else grid
    return np.asarray(out).astype(target.dtype)


def inflate_embedding(target_kernel: np.ndarray, restored_kernel: np.ndarray, method: str) -> np.ndarray:
    """A 2-D patch kernel ``[h, w, c, d]`` inflated to the 3-D kernel ``[t, h, w, c, d]`` of ``target_kernel``.

    ``average_frame_initializer``: every frame ``kernel / t`` (filter inflation); ``central_frame_initializer``:
    frame ``t // 2`` is the kernel, the others 0 (on the time axis, unlike ViViT's module initialiser).
    """
    target_kernel, restored_kernel = np.asarray(target_kernel), np.asarray(restored_kernel)
    if target_kernel.shape[1:] != restored_kernel.shape:
        raise ShapeError(f"inflate_embedding: all kernel dimensions but time must be equal, {list(target_kernel.shape)} "
                         f"vs {list(restored_kernel.shape)}")  # fmt: skip
    t = target_kernel.shape[0]
    if method == "average_frame_initializer":
        return np.tile(restored_kernel[None], [t, 1, 1, 1, 1]) / t
    if method == "central_frame_initializer":
        # Scenic returns this as float64 numpy (np.zeros); the port keeps the kernel's dtype (lossless).
        out = np.zeros(target_kernel.shape, dtype=restored_kernel.dtype)
        out[t // 2] = restored_kernel
        return out
    raise ConfigError(f"unknown temporal_encoding_config.kernel_init_method {method!r}; expected one of {INFLATION_METHODS}")


def _init_embedding(params: MutableMapping[str, Any], restored: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    init_from = cfg_get(config, "init_from", {}) or {}
    if not init_from.get("restore_input_embedding", True):
        return
    kernel, restored_kernel = params["embedding"]["kernel"], np.asarray(restored["kernel"])
    if kernel.shape != restored_kernel.shape:
        method = cfg_get(config, "model.tokenizer.temporal_encoding_config.method", None)
        if method != "3d_conv":
            raise ConfigError("the embedding kernels differ in shape: only a 3d_conv video target can inflate an image kernel")
        kim = cfg_get(config, "model.tokenizer.temporal_encoding_config.kernel_init_method", None)
        restored_kernel = inflate_embedding(kernel, restored_kernel, kim)
    params["embedding"] = dict(params["embedding"], kernel=restored_kernel, bias=np.asarray(restored["bias"]))


def init_token_learner_from_train_state(params: Mapping[str, Any], restored_params: Mapping[str, Any],
                                        config: MutableMapping[str, Any],
                                        restored_config: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Scenic's TokenLearner fine-tuning surgery: the target ``params`` updated from ``restored_params``.

    ``output_projection``: the target's own (the head reset); ``pre_logits``: restored if the target has a
    ``representation_size``, dropped otherwise; ``Transformer/posembed_input``: :func:`resize_position_embedding`;
    ``embedding``: restored, inflated to 3-D when the target is a ``3d_conv`` video model; everything else:
    restored. ``config`` is the target's experiment config (its ``init_from`` and ``model``); as Scenic does,
    a video target's ``config['model']`` gains copies of the tokenizer's ``temporal_encoding_config`` and
    ``patches`` (Scenic quirk: the surgery mutates the config). Returns a new tree; inputs are not modified.
    """
    out: dict[str, Any] = copy.deepcopy({k: dict(v) if isinstance(v, Mapping) else v for k, v in params.items()})
    for key, value in restored_params.items():
        if key == "output_projection":
            continue
        if key == "pre_logits":
            if cfg_get(config, "model.representation_size", None) is None:
                out.pop(key, None)
            else:
                if not cfg_get(restored_config, "model.representation_size", None):
                    raise ConfigError("restored params have pre_logits but the restored config has no representation_size")
                out[key] = copy.deepcopy(value)
        elif key == "Transformer":
            for sub, sub_value in value.items():
                if sub == "posembed_input":
                    tokenizer = cfg_get(config, "model.tokenizer", {}) or {}
                    if tokenizer.get("temporal_encoding_config"):
                        config["model"]["temporal_encoding_config"] = copy.deepcopy(tokenizer["temporal_encoding_config"])
                        config["model"]["patches"] = copy.deepcopy(tokenizer["patches"])
                    target_pe = out["Transformer"]["posembed_input"]["pos_embedding"]
                    new_pe = resize_position_embedding(np.asarray(target_pe), np.asarray(sub_value["pos_embedding"]),
                                                       config, restored_config, is_temporal=False)  # fmt: skip
                    out["Transformer"]["posembed_input"] = {"pos_embedding": new_pe}
                else:
                    out["Transformer"][sub] = copy.deepcopy(sub_value)
        elif key == "embedding":
            _init_embedding(out, value, config)
        else:
            out[key] = copy.deepcopy(value)
    return out
