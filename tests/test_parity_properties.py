"""Property-based parity: random configurations of every class and option, Flax reference vs port in
`live` mode on CPU. Every example runs f64 (structural, <= 1e-10) and one of f32 / tf32 / bf16.

Budget: PARITY_EXAMPLES (default 4) examples per class, 7 classes; derandomized so CI is reproducible.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tokenlearner_torch.parity import api  # noqa: E402

EXAMPLES = int(os.environ.get("PARITY_EXAMPLES", "4"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: each example costs seconds
)
ints = st.integers


@st.composite
def encoder_body(draw, cls: str):
    heads = draw(ints(1, 2))
    hidden = heads * draw(st.sampled_from([4, 8]))  # >= 4 channels per head: bf16 noise stays ~1e-2
    layers = draw(ints(1, 3))
    kw = {
        "num_layers": layers,
        "mlp_dim": draw(ints(4, 16)),
        "num_heads": heads,
        "num_tokens": draw(ints(1, 3)),
        # includes locations >= num_layers (no TokenLearner at all)
        "tokenlearner_loc": draw(ints(0, layers + 1)),
        "use_v11": draw(st.booleans()),
        "dropout_rate": draw(st.sampled_from([0.0, 0.1])),
        "attention_dropout_rate": draw(st.sampled_from([0.0, 0.1])),
        "tokenizer_type": draw(st.sampled_from(["patch", "dynamic", "video"])),
    }
    t = draw(ints(1, 3)) if kw["tokenizer_type"] == "video" else 1
    kw["temporal_dimensions"] = t
    # TokenLearner v1 needs a square token grid per frame; v1.1 takes any count
    n = draw(ints(1, 6)) if kw["use_v11"] else draw(ints(1, 3)) ** 2
    b = draw(ints(1, 2))
    return {"scenic_class": cls, "constructor_kwargs": kw, "inputs": [{"name": "inputs", "shape": [b, t * n, hidden]}]}


@st.composite
def tokenizer(draw, use_v11: bool, video_methods: bool):
    kind = draw(st.sampled_from(["patch", "dynamic", "video"] if video_methods else ["patch", "dynamic"]))
    tok = {
        "type": kind,
        "num_tokens": draw(ints(1, 3)),
        "tokenlearner_loc": draw(ints(0, 3)),
        "use_tokenfuse": draw(st.booleans()),
        "use_v11": use_v11,
    }
    return tok


@st.composite
def vit(draw, cls: str):
    heads = draw(ints(1, 2))
    hidden = heads * draw(st.sampled_from([4, 8]))
    layers = draw(ints(1, 2))
    use_v11 = draw(st.booleans())
    tok = draw(tokenizer(use_v11, video_methods=cls == "TokenLearnerViT"))
    tok["tokenlearner_loc"] = min(tok["tokenlearner_loc"], layers + 1)
    fh, fw = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2]))
    gh = draw(ints(1, 3))
    gw = gh if not use_v11 else draw(ints(1, 3))  # v1: square grid per frame
    b = draw(ints(1, 2))
    kw = {
        "mlp_dim": draw(ints(4, 16)), "num_layers": layers, "num_heads": heads, "hidden_size": hidden,
        "tokenizer": tok, "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
    }
    if cls == "TokenLearnerViT":
        kw["num_classes"] = draw(ints(1, 4))
        kw["representation_size"] = draw(st.one_of(st.none(), ints(1, 4)))
        kw["classifier"] = draw(st.sampled_from(["gap", "gmp", "gsp"]))
        if tok["type"] == "video":
            method = draw(st.sampled_from(["3d_conv", "temporal_sampling"]))
            if method == "3d_conv":
                ft = draw(ints(1, 2))
                t = ft * draw(ints(1, 2))
                tok["patches"] = {"size": [fh, fw, ft]}
                tok["temporal_encoding_config"] = {"method": "3d_conv", "kernel_init_method": "central_frame_initializer"}
            else:
                t = draw(ints(2, 4))
                tok["patches"] = {"size": [fh, fw]}
                tok["temporal_encoding_config"] = {"method": "temporal_sampling", "n_sampled_frames": draw(ints(1, t))}
            shape = [b, t, gh * fh, gw * fw, 3]
        else:
            tok["patches"] = {"size": [fh, fw]}
            shape = [b, gh * fh, gw * fw, 3]
    else:  # TokenLearnerViTRepresentation: an image, or a video embedded frame by frame
        kw["target_channel_dim"] = hidden  # accepted and unused by Scenic; the port requires it
        kw["use_concat_final"] = draw(st.booleans())
        tok["patches"] = {"size": [fh, fw]}
        if draw(st.booleans()):
            if tok["type"] != "patch":
                tok["type"] = "video"
            shape = [b, draw(ints(1, 2)), gh * fh, gw * fw, 3]
        else:
            shape = [b, gh * fh, gw * fw, 3]
    return {"scenic_class": cls, "constructor_kwargs": kw, "inputs": [{"name": "x", "shape": shape}]}


@st.composite
def module(draw, cls: str):
    b, c = draw(ints(1, 2)), draw(st.sampled_from([2, 4, 8]))
    if cls == "TokenLearnerModule":
        kw = {"num_tokens": draw(ints(1, 4)), "use_sum_pooling": draw(st.booleans())}
        if draw(st.booleans()):
            shapes = [("inputs", [b, draw(ints(1, 4)) ** 2, c])]  # 3D must be square
        else:
            shapes = [("inputs", [b, draw(ints(1, 4)), draw(ints(1, 4)), c])]
    elif cls == "TokenLearnerModuleV11":
        kw = {"num_tokens": draw(ints(1, 4)), "bottleneck_dim": draw(ints(1, 8)),
              "dropout_rate": draw(st.sampled_from([0.0, 0.1]))}
        if draw(st.booleans()):
            shapes = [("inputs", [b, draw(ints(1, 10)), c])]  # any length
        else:
            shapes = [("inputs", [b, draw(ints(1, 4)), draw(ints(1, 4)), c])]  # non-square allowed
    else:  # TokenFuser
        kw = {"use_normalization": draw(st.booleans()), "bottleneck_dim": draw(ints(1, 8)),
              "dropout_rate": draw(st.sampled_from([0.0, 0.1]))}
        s = draw(ints(1, 4))
        if draw(st.booleans()):
            original = [b, draw(ints(1, 10)), c]
        else:
            original = [b, draw(ints(1, 4)), draw(ints(1, 4)), c]
        shapes = [("inputs", [b, s, c]), ("original", original)]
    return {"scenic_class": cls, "constructor_kwargs": kw, "inputs": [{"name": n, "shape": s} for n, s in shapes]}


STRATEGIES = {
    "TokenLearnerModule": module("TokenLearnerModule"),
    "TokenLearnerModuleV11": module("TokenLearnerModuleV11"),
    "TokenFuser": module("TokenFuser"),
    "EncoderMod": encoder_body("EncoderMod"),
    "EncoderModFuser": encoder_body("EncoderModFuser"),
    "TokenLearnerViT": vit("TokenLearnerViT"),
    "TokenLearnerViTRepresentation": vit("TokenLearnerViTRepresentation"),
}


def _check(config, other_mode, seed):
    report = api.live(config, mode="f64", seed=seed)
    assert report.passed, report.to_text()
    assert report.max_error(structural=True) <= 1e-10
    report = api.live(config, mode=other_mode, seed=seed)
    assert report.passed, report.to_text()


@pytest.mark.parametrize("cls", list(STRATEGIES))
def test_live_parity_random_configs(cls):
    @SETTINGS
    @given(config=STRATEGIES[cls], other_mode=st.sampled_from(["f32", "tf32", "bf16"]), seed=ints(0, 2**16))
    def run(config, other_mode, seed):
        _check(config, other_mode, seed)

    run()
