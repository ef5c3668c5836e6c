"""Property-based parity: random configurations of every class and option, Flax reference vs port in
`live` mode on CPU. Every example runs f64 (structural, <= 1e-10) and one of f32 / tf32 / bf16, judged by
the harness's verdict (plain rule, else the accuracy rule against a float64 reference run).

Reproducible across machines and months: hypothesis is pinned in the `test` extra and derandomized, and
EXPLICIT holds a committed example set per class that runs whatever hypothesis draws (including examples
that once failed). A failing example's message starts with the `tokenlearner-parity live` command line
that replays it. Budget: PARITY_EXAMPLES (default 4) drawn examples per class, 7 classes, plus EXPLICIT.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, settings  # noqa: E402
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


def _cfg(cls, kwargs, *inputs):
    return {"scenic_class": cls, "constructor_kwargs": kwargs,
            "inputs": [{"name": n, "shape": list(shape)} for n, shape in inputs]}


_PATCH = {"type": "dynamic", "num_tokens": 2, "tokenlearner_loc": 1, "use_tokenfuse": True}
# (config, other_mode, seed): run before the drawn examples, whatever the hypothesis version draws.
EXPLICIT = {
    "TokenLearnerModule": [
        (_cfg("TokenLearnerModule", {"num_tokens": 3, "use_sum_pooling": True}, ("inputs", [2, 3, 4, 8])), "bf16", 7),
    ],
    "TokenLearnerModuleV11": [
        # Failed the plain rule with hypothesis 6.155.2 (derandomized): LayerNorm over 2 channels of a row whose
        # two values are 1.4512 and 1.4576 is ill-conditioned; Flax's E[x^2] - E[x]^2 is 2.8e-2 off float64 in
        # the input gradient there, the port 7e-5. The accuracy rule passes it.
        (_cfg("TokenLearnerModuleV11", {"num_tokens": 1, "bottleneck_dim": 3, "dropout_rate": 0.1},
              ("inputs", [2, 4, 2])), "f32", 4046),
        (_cfg("TokenLearnerModuleV11", {"num_tokens": 4, "bottleneck_dim": 8, "dropout_rate": 0.0},
              ("inputs", [1, 3, 2, 8])), "bf16", 12),
    ],
    "TokenFuser": [
        (_cfg("TokenFuser", {"use_normalization": True, "bottleneck_dim": 3, "dropout_rate": 0.1},
              ("inputs", [2, 3, 4]), ("original", [2, 3, 2, 4])), "tf32", 11),
        (_cfg("TokenFuser", {"use_normalization": False, "bottleneck_dim": 5, "dropout_rate": 0.0},
              ("inputs", [1, 2, 8]), ("original", [1, 7, 8])), "f32", 2),
    ],
    "EncoderMod": [
        (_cfg("EncoderMod", {"num_layers": 2, "mlp_dim": 8, "num_heads": 2, "num_tokens": 2, "tokenlearner_loc": 1,
                             "use_v11": False, "dropout_rate": 0.1, "attention_dropout_rate": 0.0,
                             "tokenizer_type": "video", "temporal_dimensions": 2},
              ("inputs", [1, 8, 8])), "f32", 3),
    ],
    "EncoderModFuser": [
        (_cfg("EncoderModFuser", {"num_layers": 3, "mlp_dim": 6, "num_heads": 1, "num_tokens": 3, "tokenlearner_loc": 1,
                                  "use_v11": True, "dropout_rate": 0.0, "attention_dropout_rate": 0.1,
                                  "tokenizer_type": "dynamic", "temporal_dimensions": 1},
              ("inputs", [2, 5, 8])), "bf16", 5),
    ],
    "TokenLearnerViT": [
        (_cfg("TokenLearnerViT", {
            "mlp_dim": 8, "num_layers": 2, "num_heads": 2, "hidden_size": 8, "num_classes": 3,
            "representation_size": 4, "classifier": "gsp", "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
            "tokenizer": {**_PATCH, "type": "video", "use_v11": True, "patches": {"size": [2, 2, 2]},
                          "temporal_encoding_config": {"method": "3d_conv",
                                                       "kernel_init_method": "central_frame_initializer"}}},
              ("x", [1, 4, 4, 6, 3])), "f32", 9),
    ],
    "TokenLearnerViTRepresentation": [
        (_cfg("TokenLearnerViTRepresentation", {
            "mlp_dim": 8, "num_layers": 1, "num_heads": 1, "hidden_size": 4, "target_channel_dim": 4,
            "use_concat_final": True, "dropout_rate": 0.0, "attention_dropout_rate": 0.0,
            "tokenizer": {**_PATCH, "type": "video", "use_v11": False, "patches": {"size": [2, 2]}}},
              ("x", [2, 2, 4, 4, 3])), "bf16", 1),
    ],
}


def replay_command(config, mode, seed) -> str:
    """The command line that reruns one example outside pytest."""
    text = json.dumps(config, separators=(",", ":"))
    return f"tokenlearner-parity live {shlex.quote(text)} --mode {mode} --seed {seed}"


def _check(config, other_mode, seed):
    for mode in ("f64", other_mode):
        # f64 compiles the reference with LLVM -O0 (the same HLO; half the compile time): it only changes
        # whether LLVM contracts multiply-adds, ~1e-16 in float64, far below the 1e-10 it is held to. The
        # other mode keeps the compile Flax users run, whose fused multiply-adds its rule is about.
        # The replay command compiles as users do: in float64 its verdict is the same.
        report = api.live(config, mode=mode, seed=seed, fast_compile=mode == "f64")
        ok = report.passed and (mode != "f64" or report.max_error(structural=True) <= 1e-10)
        if not ok:
            raise AssertionError(f"replay: {replay_command(config, mode, seed)}\n{report.to_text()}")


@pytest.mark.slow
@pytest.mark.parametrize("cls", list(STRATEGIES))
def test_live_parity_random_configs(cls):
    def run(config, other_mode, seed):
        _check(config, other_mode, seed)

    for config, mode, seed in EXPLICIT[cls]:
        run = example(config=config, other_mode=mode, seed=seed)(run)
    SETTINGS(given(config=STRATEGIES[cls], other_mode=st.sampled_from(["f32", "tf32", "bf16"]),
                   seed=ints(0, 2**16))(run))()


def test_explicit_examples_are_valid_draws():
    """Every committed example lies in its strategy's space (class, and a live config the CLI accepts)."""
    for cls, examples in EXPLICIT.items():
        assert examples, cls
        for config, mode, seed in examples:
            assert config["scenic_class"] == cls and mode in ("f32", "tf32", "bf16") and 0 <= seed <= 2**16
            assert api.resolve_config(json.dumps(config))[0] == config  # the replay command's inline JSON


def test_a_failing_example_prints_its_replay_command(monkeypatch):
    """The message of a failing example starts with a command line that reruns it."""
    from tokenlearner_torch.parity import cli

    config, _, seed = EXPLICIT["TokenLearnerModule"][0]
    monkeypatch.setattr(api, "live", lambda cfg, mode, seed, **_: _failing(mode))
    with pytest.raises(AssertionError) as info:
        _check(config, "bf16", seed)
    first = str(info.value).splitlines()[0]
    assert first.startswith("replay: tokenlearner-parity live '{")
    argv = shlex.split(first[len("replay: tokenlearner-parity "):])
    assert argv[-4:] == ["--mode", "f64", "--seed", str(seed)]
    # the command parses, and its inline config is the example's
    args = cli._parser().parse_args(argv)
    assert api.resolve_config(args.config)[0] == config and args.seed == seed


def _failing(mode):
    from tokenlearner_torch.parity.compare import Report, TensorResult

    row = TensorResult("out", "output", "(model output)", [1], "FAIL", 1e-10, max_abs=1.0, scaled=1.0)
    return Report("x", mode, "cpu", "test", 1e-10, [row])
