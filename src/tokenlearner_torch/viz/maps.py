"""The spatial (and per-frame) maps of every TokenLearner and TokenFuser, read through forward hooks.

What a map is, per module (the quantity the module itself weights positions with):

* ``TokenLearnerModuleV11``: softmax over positions of its ``token_masking`` output;
* ``TokenLearnerModule`` (v1): sigmoid of its ``Conv_3`` output;
* ``TokenFuser``: sigmoid of its ``token_masking`` output (the mix of token ``s`` at each position).

The hooks sit on those submodules (Scenic parameter-tree names, which do not change) and only read their
outputs: the model's outputs are untouched and nothing runs twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from ..errors import ConfigError, ShapeError
from ..token_learner import TokenFuser, TokenLearnerModule, TokenLearnerModuleV11

__all__ = ["token_maps", "token_diversity", "TokenMaps", "TokenDiversity", "MAP_KINDS", "map_modules"]

# What each module's map is: printed by the command and stated in the picture.
MAP_KINDS = {
    TokenLearnerModuleV11: "softmax over positions of token_masking",
    TokenLearnerModule: "sigmoid of Conv_3",
    TokenFuser: "sigmoid of token_masking (mix)",
}


def map_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(Scenic path, module)`` of every TokenLearner / TokenFuser in ``model``, in registration order.

    The path is the Flax module path (``Transformer/TokenLearnerModuleV11_0``); a model that *is* one of
    these modules is keyed by its class name (Flax's root path is empty).
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, tuple(MAP_KINDS)):
            found.append((name.replace(".", "/") if name else type(module).__name__, module))
    return found


class _Record:
    """What the hooks of one TokenLearner / TokenFuser saw during the forward pass."""

    def __init__(self) -> None:
        self.own_grid: Optional[tuple[int, int]] = None  # the module's own 4-D input (or v1's conv grid)
        self.maps: Optional[Tensor] = None  # [B', S, P]


def _grid_of(x: Any, channels_first: bool) -> Optional[tuple[int, int]]:
    if isinstance(x, Tensor) and x.ndim == 4:
        return (int(x.shape[2]), int(x.shape[3])) if channels_first else (int(x.shape[1]), int(x.shape[2]))
    return None


def _install(module: nn.Module, rec: _Record) -> list[Any]:
    """Hooks on ``module`` (its input grid) and on the submodule whose output gives its map."""
    is_fuser = isinstance(module, TokenFuser)
    cf = bool(getattr(module, "channels_first", False))

    def pre(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        if rec.maps is not None:
            return  # a module called twice keeps its first call, as capture_intermediates does
        if is_fuser:
            x = args[1] if len(args) > 1 else kwargs.get("original")
        else:
            x = args[0] if args else kwargs.get("inputs")
        rec.own_grid = _grid_of(x, cf)

    def masking(mod: nn.Module, args: tuple, out: Tensor) -> None:
        if rec.maps is not None:
            return
        logits = out.detach().float().transpose(1, 2)  # [B', N, S] -> [B', S, N]
        rec.maps = torch.sigmoid(logits) if is_fuser else torch.softmax(logits, dim=-1)

    def conv(mod: nn.Module, args: tuple, out: Tensor) -> None:
        if rec.maps is not None:
            return
        out = out.detach().float()
        if not getattr(mod, "channels_first_output", False):
            out = out.movedim(-1, 1)
        b, s, h, w = out.shape  # [B', S, H, W]: v1 knows its grid (square for [B, N, C] input)
        if rec.own_grid is None:
            rec.own_grid = (h, w)
        rec.maps = torch.sigmoid(out.reshape(b, s, h * w))

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True)]
    if isinstance(module, TokenLearnerModule):
        handles.append(module.Conv_3.register_forward_hook(conv))
    else:
        handles.append(module.token_masking.register_forward_hook(masking))
    return handles


class TokenMaps(dict):
    """``{Scenic path: maps}`` as returned by :func:`token_maps`, with ``layout[path]`` naming the axes:
    ``"BSHW"``, ``"BTSHW"``, ``"BSN"`` or ``"BTSN"`` (a 4-D tensor alone could be either of two)."""

    def __init__(self) -> None:
        super().__init__()
        self.layout: dict[str, str] = {}


def token_maps(model: nn.Module, *inputs: Tensor, **call_kwargs: Any) -> TokenMaps:
    """The map of every TokenLearner / TokenFuser of ``model`` on ``inputs`` (Scenic's call order).

    Runs ``model(*inputs, **call_kwargs)`` once under ``torch.no_grad()`` with forward hooks (its outputs
    are not changed; use ``model.eval()`` for Scenic's deterministic mode) and returns a dict
    ``{Scenic path: maps}`` (a :class:`TokenMaps`), float32, detached, each with one of these shapes:

    * ``[B, S, H, W]``: the module's grid is known: its own ``[B, H, W, C]`` input (or TokenFuser's
      ``original``), v1's square grid, or a ViT's patch grid;
    * ``[B, T, S, H, W]``: video: the model folds ``T`` frames into the batch for the module (Scenic's
      ``[n, t*hw, c] -> [n*t, hw, c]``), one map per frame;
    * ``[B, S, N]`` / ``[B, T, S, N]``: the module sees a token sequence whose grid cannot be known
      (e.g. ``EncoderMod`` given ``[B, N, C]``).

    ``S`` is the number of tokens; for a TokenFuser ``maps[..., s, :]`` is the weight of token ``s`` at
    each position. Paths are Flax module paths (``Transformer/TokenLearnerModuleV11_0``); a model that is
    itself a TokenLearner or TokenFuser is keyed by its class name. A model without any raises ConfigError.
    """
    targets = map_modules(model)
    if not targets:
        raise ConfigError(
            f"{type(model).__name__} has no TokenLearnerModule, TokenLearnerModuleV11 or TokenFuser "
            "(a 'patch' tokenizer, or tokenlearner_loc >= num_layers?): it has no token maps"
        )
    if not inputs or not isinstance(inputs[0], Tensor) or inputs[0].ndim == 0:
        raise ShapeError("token_maps(model, *inputs): give the model's inputs, batch first")
    batch = int(inputs[0].shape[0])
    video_input = inputs[0].ndim == 5

    records = {path: _Record() for path, _ in targets}
    handles = []
    patch_grid: dict[str, int] = {}
    embedding = getattr(model, "embedding", None)
    if isinstance(embedding, nn.Module) and not isinstance(model, tuple(MAP_KINDS)):
        # The ViTs' patch embedding: its output's last spatial axis is the width of the patch grid
        # (for temporal_sampling the sampled frames are stacked along the height, not the width).
        def embed_hook(mod: nn.Module, args: tuple, out: Tensor) -> None:
            if "width" not in patch_grid and isinstance(out, Tensor) and out.ndim >= 4:
                cf = getattr(mod, "channels_first_output", False)
                patch_grid["width"] = int(out.shape[-1] if cf else out.shape[-2])

        handles.append(embedding.register_forward_hook(embed_hook))
    for path, module in targets:
        handles += _install(module, records[path])
    try:
        with torch.no_grad():
            model(*inputs, **call_kwargs)
    finally:
        for h in handles:
            h.remove()

    result = TokenMaps()
    for path, _ in targets:
        rec = records[path]
        if rec.maps is None:
            continue  # not called on this input
        maps = rec.maps
        folded, s, p = maps.shape
        if folded % batch:
            raise ShapeError(f"{path}: saw a batch of {folded}, not a multiple of the input batch {batch}")
        frames = folded // batch
        grid = rec.own_grid
        width = patch_grid.get("width")
        if width and p % width == 0:
            grid = (p // width, width)
        layout = "BSN"
        if grid is not None and grid[0] * grid[1] == p:
            maps = maps.reshape(folded, s, *grid)
            layout = "BSHW"
        if video_input or frames > 1:
            maps = maps.reshape(batch, frames, *maps.shape[1:])
            layout = "BT" + layout[1:]
        result[path] = maps
        result.layout[path] = layout
    return result


@dataclass(frozen=True)
class TokenDiversity:
    """How alike the tokens' maps of one module are (cosine similarity of the flattened maps).

    ``mean_cosine``: mean over token pairs (and examples, frames); 1 means every token has the same map
    (collapse), 0 disjoint maps. ``per_token[s]``: mean cosine of token ``s`` to the other tokens.
    """

    mean_cosine: float
    per_token: tuple[float, ...]


def _diversity(maps: Tensor, layout: str) -> TokenDiversity:
    token_axis = layout.index("S")
    s = maps.shape[token_axis]
    if s < 2:
        raise ShapeError(f"token diversity needs at least 2 tokens, got {s}")
    flat = maps.reshape(-1, s, math.prod(maps.shape[token_axis + 1 :])).double()  # [G, S, P]
    unit = flat / flat.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    cos = unit @ unit.transpose(1, 2)  # [G, S, S]
    others = (cos.sum(-1) - cos.diagonal(dim1=1, dim2=2)) / (s - 1)  # [G, S]
    per_token = others.mean(0)
    return TokenDiversity(float(per_token.mean()), tuple(float(v) for v in per_token))


def token_diversity(maps: TokenMaps) -> dict[str, TokenDiversity]:
    """Per module of ``token_maps(...)``: the mean pairwise cosine similarity of its tokens' maps.

    Computed per example and per frame (a video token's map in one frame against the other tokens' maps
    in the same frame), then averaged. Near 1: the tokens collapsed to one map. Maps are non-negative, so
    the figure lies in [0, 1].
    """
    layout = getattr(maps, "layout", None)
    if layout is None:
        raise TypeError("token_diversity takes what token_maps returned (it names each tensor's axes)")
    return {path: _diversity(m, layout[path]) for path, m in maps.items()}
