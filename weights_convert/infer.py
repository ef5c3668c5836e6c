"""Architecture inference: which Scenic module, with which kwargs, a Flax parameter tree belongs to.

The tree fixes a lot (hidden size, depth, heads, MLP width, patch size, v1 or v1.1, fuser, num_tokens,
representation size, classes) and leaves some fields open (where a TokenLearner sits in an ``EncoderMod``,
the classifier, whether a 2-D patch embedding is a 'dynamic' image tokenizer or a 'video' one with
temporal sampling...). :func:`infer_architecture` returns what is fixed, and names what is open in
``undetermined`` (dotted field names, e.g. ``tokenizer.tokenlearner_loc``); :data:`FIELD_HINTS` says what
each open field means and which values it takes. Fields that do not change the computation (dropout rates,
``dtype``) are left out of the kwargs, so Scenic's defaults apply.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, NamedTuple

from tokenlearner_torch.errors import ConfigError

__all__ = ["infer_architecture", "Architecture", "FIELD_HINTS", "field_hint"]

PREFIX = "scenic.projects.token_learner.model."

#: What each field that a tree may leave open means, and the values it takes.
FIELD_HINTS: dict[str, str] = {
    "classifier": "pooling before the head: gap | gmp | gsp",
    "tokenizer.tokenlearner_loc": "index of the encoder block the TokenLearner runs before (int)",
    "tokenlearner_loc": "index of the encoder block the TokenLearner runs before (int)",
    "tokenizer.type": "dynamic (images) | video (a 2-D patch embedding with temporal_sampling)",
    "tokenizer.temporal_encoding_config.n_sampled_frames": "frames sampled from a video (int)",
    "tokenizer_type": "dynamic | video (both run a TokenLearner; video folds temporal_dimensions)",
    "temporal_dimensions": "frames folded into the batch for the TokenLearner (int, Scenic default 1)",
    "target_channel_dim": "unused by Scenic's TokenLearnerViTRepresentation, but required (int)",
}


def field_hint(name: str) -> str:
    """The hint of :data:`FIELD_HINTS` for a field, or an empty string."""
    return FIELD_HINTS.get(name, "")


class Architecture(NamedTuple):
    """``scenic_class`` (dotted name), ``kwargs`` (nested dicts) and the ``undetermined`` field names."""

    scenic_class: str
    kwargs: dict[str, Any]
    undetermined: list[str]


def _shape(tree: Mapping[str, Any], *path: str) -> tuple[int, ...] | None:
    node: Any = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    shape = getattr(node, "shape", None)
    return tuple(int(d) for d in shape) if shape is not None else None


def _numbered(tree: Mapping[str, Any], prefix: str) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}_(\d+)$")
    return sorted(int(m.group(1)) for k in tree if (m := pat.match(str(k))))


def _need(shape: tuple[int, ...] | None, rank: int, what: str) -> tuple[int, ...]:
    if shape is None or len(shape) != rank:
        got = "missing" if shape is None else f"shape {list(shape)}"
        raise ConfigError(f"cannot infer the architecture: {what} is {got} (expected a rank-{rank} array)")
    return shape


def _encoder_fields(enc: Mapping[str, Any], where: str) -> dict[str, Any]:
    """num_layers, mlp_dim, num_heads, hidden size and the TokenLearner/TokenFuser facts of an encoder tree."""
    blocks = _numbered(enc, "encoderblock")
    if not blocks:
        raise ConfigError(f"cannot infer the architecture: no encoderblock_<i> under {where or 'the top'}")
    if blocks != list(range(len(blocks))):
        raise ConfigError(f"cannot infer the architecture: encoder blocks under {where or 'the top'} are numbered {blocks} (expected 0..{len(blocks) - 1})")
    b0 = enc["encoderblock_0"]
    q = _need(_shape(b0, "MultiHeadDotProductAttention_0", "query", "kernel"), 3, "encoderblock_0 attention query/kernel")
    mlp = _need(_shape(b0, "MlpBlock_0", "Dense_0", "kernel"), 2, "encoderblock_0/MlpBlock_0/Dense_0/kernel")
    v11 = _numbered(enc, "TokenLearnerModuleV11")
    v1 = _numbered(enc, "TokenLearnerModule")
    fusers = _numbered(enc, "TokenFuser")
    if v11 and v1:
        raise ConfigError("cannot infer the architecture: both TokenLearnerModule_* and TokenLearnerModuleV11_* modules are present")
    out: dict[str, Any] = {
        "num_layers": len(blocks),
        "mlp_dim": mlp[1],
        "num_heads": q[1],
        "hidden": q[0],
        "tl_count": len(v11 or v1),
        "use_v11": not v1,
        "fusers": len(fusers),
        "num_tokens": None,
    }
    if v11:
        d1 = _need(_shape(enc, "TokenLearnerModuleV11_0", "token_masking", "Dense_1", "kernel"), 2, "TokenLearnerModuleV11_0/token_masking/Dense_1/kernel")
        out["num_tokens"] = d1[1]
    elif v1:
        c3 = _need(_shape(enc, "TokenLearnerModule_0", "Conv_3", "kernel"), 4, "TokenLearnerModule_0/Conv_3/kernel")
        out["num_tokens"] = c3[-1]
    if fusers and not (v11 or v1):
        raise ConfigError("cannot infer the architecture: TokenFuser modules without TokenLearner modules")
    return out


def _loc_fields(enc: dict[str, Any], prefix: str) -> tuple[dict[str, Any], list[str]]:
    """tokenlearner_loc / use_tokenfuse from the counts; the loc is open for EncoderMod."""
    kw: dict[str, Any] = {}
    open_: list[str] = []
    if enc["fusers"]:
        if enc["fusers"] != enc["tl_count"]:
            raise ConfigError(f"cannot infer the architecture: {enc['fusers']} TokenFusers but {enc['tl_count']} TokenLearners (EncoderModFuser has one of each per layer)")
        kw["tokenlearner_loc"] = enc["num_layers"] - enc["fusers"]
    elif enc["tl_count"] == 1:
        open_.append(prefix + "tokenlearner_loc")  # before which block: the tree does not say
    elif enc["tl_count"] > 1:
        raise ConfigError(f"cannot infer the architecture: {enc['tl_count']} TokenLearners without TokenFusers (EncoderMod has one)")
    return kw, open_


def _vit(tree: Mapping[str, Any]) -> Architecture:
    enc = _encoder_fields(tree["Transformer"], "Transformer")
    emb = _shape(tree, "embedding", "kernel")
    if emb is None or len(emb) not in (4, 5):
        raise ConfigError(f"cannot infer the architecture: embedding/kernel is {list(emb) if emb else 'missing'} (expected [ph, pw, 3, C] or [pt, ph, pw, 3, C])")
    open_: list[str] = []
    has_tl = enc["tl_count"] > 0
    tok: dict[str, Any] = {"use_tokenfuse": bool(enc["fusers"]), "use_v11": enc["use_v11"]}
    if len(emb) == 5:
        ft, fh, fw = emb[0], emb[1], emb[2]
        tok["type"] = "video"
        tok["patches"] = {"size": [fh, fw, ft]}  # Scenic order [fh, fw, ft]
        tok["temporal_encoding_config"] = {"method": "3d_conv"}
    else:
        tok["patches"] = {"size": [emb[0], emb[1]]}
        if has_tl:
            open_.append("tokenizer.type")  # 'dynamic', or 'video' with temporal_sampling
        else:
            tok["type"] = "patch"  # no TokenLearner: computes as 'patch' (or 'dynamic' past the last layer)
    if has_tl:
        tok["num_tokens"] = enc["num_tokens"]
        loc_kw, loc_open = _loc_fields(enc, "tokenizer.")
        tok.update(loc_kw)
        open_ += loc_open
    else:
        # Unused when no TokenLearner is built: a location past the last block says exactly that.
        tok["num_tokens"] = 8
        tok["tokenlearner_loc"] = enc["num_layers"]
        tok["use_tokenfuse"] = False
    kwargs: dict[str, Any] = {
        "mlp_dim": enc["mlp_dim"],
        "num_layers": enc["num_layers"],
        "num_heads": enc["num_heads"],
        "tokenizer": tok,
        "hidden_size": emb[-1],
    }
    if "output_projection" in tree:
        head = _need(_shape(tree, "output_projection", "kernel"), 2, "output_projection/kernel")
        kwargs["num_classes"] = head[1]
        pre = _shape(tree, "pre_logits", "kernel")
        kwargs["representation_size"] = _need(pre, 2, "pre_logits/kernel")[1] if "pre_logits" in tree else None
        open_.append("classifier")
        cls = "TokenLearnerViT"
    else:
        open_.append("target_channel_dim")
        cls = "TokenLearnerViTRepresentation"
        if len(emb) == 5:
            raise ConfigError("cannot infer the architecture: a 3-D patch embedding without output_projection (TokenLearnerViTRepresentation embeds frames with a 2-D convolution)")
        tok.pop("temporal_encoding_config", None)
        if "tokenizer.type" in open_:
            open_.remove("tokenizer.type")
            tok["type"] = "dynamic"  # the representation model folds frames itself; type only gates the TokenLearner
    return Architecture(PREFIX + cls, kwargs, open_)


def _encoder(tree: Mapping[str, Any]) -> Architecture:
    enc = _encoder_fields(tree, "")
    kwargs: dict[str, Any] = {"num_layers": enc["num_layers"], "mlp_dim": enc["mlp_dim"], "num_heads": enc["num_heads"]}
    open_: list[str] = []
    if enc["tl_count"]:
        kwargs["num_tokens"] = enc["num_tokens"]
        kwargs["use_v11"] = enc["use_v11"]
        open_.append("tokenizer_type")
        loc_kw, loc_open = _loc_fields(enc, "")
        kwargs.update(loc_kw)
        open_ += loc_open
    else:
        kwargs["tokenizer_type"] = "patch"
    cls = "EncoderModFuser" if enc["fusers"] else "EncoderMod"
    return Architecture(PREFIX + cls, kwargs, open_)


def infer_architecture(params: Mapping[str, Any]) -> Architecture:
    """Infer ``(scenic_class, kwargs, undetermined)`` from a Flax ``params`` tree (nested dicts of arrays).

    Recognised trees: TokenLearnerViT (image/dynamic/video 3d_conv, with or without fuser, v1 or v1.1,
    with or without ``pre_logits``), TokenLearnerViTRepresentation, EncoderMod, EncoderModFuser,
    TokenLearnerModuleV11, TokenLearnerModule and TokenFuser. Raises :class:`ConfigError` for a tree that is
    none of these.
    """
    if not isinstance(params, Mapping) or not params:
        raise ConfigError("cannot infer the architecture from an empty or non-dict parameter tree")
    keys = set(map(str, params))
    if "embedding" in keys and "Transformer" in keys:
        return _vit(params)
    if "encoderblock_0" in keys or "posembed_input" in keys:
        return _encoder(params)
    if "token_masking" in keys and "Dense_0" in keys:
        d1 = _need(_shape(params, "token_masking", "Dense_0", "kernel"), 2, "token_masking/Dense_0/kernel")
        return Architecture(
            PREFIX + "TokenFuser",
            {"use_normalization": "fuser_mix_norm1" in keys, "bottleneck_dim": d1[1]},
            [],
        )
    if "token_masking" in keys:
        d0 = _need(_shape(params, "token_masking", "Dense_0", "kernel"), 2, "token_masking/Dense_0/kernel")
        d1 = _need(_shape(params, "token_masking", "Dense_1", "kernel"), 2, "token_masking/Dense_1/kernel")
        return Architecture(PREFIX + "TokenLearnerModuleV11", {"num_tokens": d1[1], "bottleneck_dim": d0[1]}, [])
    if "Conv_3" in keys:
        c3 = _need(_shape(params, "Conv_3", "kernel"), 4, "Conv_3/kernel")
        # Sum or mean pooling is a scaling the tree cannot show.
        return Architecture(PREFIX + "TokenLearnerModule", {"num_tokens": c3[-1]}, ["use_sum_pooling"])
    shown = ", ".join(sorted(keys)[:12])
    raise ConfigError(
        f"cannot infer the architecture: top-level keys {shown} match no TokenLearner model "
        "(pass --config FILE, or --subtree PATH to pick one module out of a larger model)"
    )


FIELD_HINTS["use_sum_pooling"] = "TokenLearnerModule pooling: true (sum) | false (mean)"
