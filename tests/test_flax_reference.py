"""The project's Flax reference of Scenic's TokenLearner (parity/flax_reference.py) against the goldens.

For every golden case (produced by genuine Scenic): the parameter tree of ``init``, the output, every
captured intermediate and every gradient must be reproduced; Scenic's zero-initialized parameters must be
zero after ``init``. Options no golden covers are checked for shapes, parameter trees and simple
semantics on tiny models (mostly with ``jax.eval_shape``, which compiles nothing).
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
import jax.numpy as jnp  # noqa: E402
from flax.serialization import msgpack_restore  # noqa: E402

from tokenlearner_torch.parity import flax_reference as fr  # noqa: E402

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"
CASES = json.loads((GOLDENS / "index.json").read_text())["cases"]
TOL = 1e-4  # relative to max(1, |ref|), per element
# XLA compile time dominates this file. The golden comparisons use the default jit options (they give
# bitwise the goldens' numbers); the tiny-model checks, which compare nothing at 1e-4, use a lower XLA
# backend optimization level, which halves compile time (eager execution costs more: one compile per op).
FAST = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _key(seed: int = 0):
    # A PRNG that is cheap to compile (threefry costs seconds per new shape on CPU); the tests look at
    # shapes and zero patterns, not at values.
    return jax.random.key(seed, impl="unsafe_rbg")


# --------------------------------------------------------------------------------------------------------
# Golden cases
# --------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _golden(case: str) -> dict:
    folder = GOLDENS / case
    config = json.loads((folder / "config.json").read_text())
    inputs = np.load(folder / "inputs.npz")
    return {
        "config": config,
        "params": msgpack_restore((folder / "params.msgpack").read_bytes()),
        "inputs": [inputs[name] for name in config["input_order"]],
        "cotangent": inputs["cotangent"],
        "outputs": dict(np.load(folder / "outputs.npz")),
        "grads": dict(np.load(folder / "grads.npz")),
        "module": fr.build_flax_module(config["scenic_class"], config["constructor_kwargs"]),
    }


@functools.lru_cache(maxsize=None)
def _run(case: str) -> tuple[np.ndarray, dict, dict]:
    """(out, intermediates, grads) from one compile, default jit options (bitwise what the goldens used)."""
    g = _golden(case)
    return fr.reference_outputs(g["module"], g["params"], g["inputs"], g["config"]["call_kwargs"],
                                g["cotangent"])


def _max_err(actual: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(actual.astype(np.float64) - ref) / np.maximum(1.0, np.abs(ref)), initial=0.0))


def _assert_close(actual: np.ndarray, ref: np.ndarray, name: str) -> None:
    assert actual.shape == ref.shape, f"{name}: shape {actual.shape} != golden {ref.shape}"
    err = _max_err(actual, ref)
    assert err <= TOL, f"{name}: max error {err:.3g} relative to max(1, |ref|) > {TOL}"


def _structurally_zero(config: dict, key: str) -> bool:
    """Gradients that are mathematically zero in Scenic (stored values are rounding noise)."""
    parts = key.split("/")
    cls = config["scenic_class"].rsplit(".", 1)[-1]
    owner = parts[-4] if len(parts) >= 4 else cls  # the module holding token_masking / Dense_0
    if key.endswith("MultiHeadDotProductAttention_0/key/bias"):
        return True  # softmax over keys is invariant to a per-query constant
    if key.endswith("token_masking/Dense_1/bias"):
        return owner.startswith("TokenLearnerModuleV11")  # softmax over positions
    if key.endswith("/Dense_0/bias") and not key.endswith("token_masking/Dense_0/bias"):
        owner = parts[-3] if len(parts) >= 3 else cls
        fuser_norm = config["constructor_kwargs"].get("use_normalization", True) or owner != cls
        return owner.startswith("TokenFuser") and fuser_norm  # removed by fuser_mix_norm2
    return False


def _flat_shapes(tree) -> dict[str, list[int]]:
    return {key: list(value.shape) for key, value in fr.flatten_tree(tree).items()}


def _init_shapes(module, inputs, call_kwargs) -> dict[str, list[int]]:
    """Parameter shapes of ``module.init`` (traced only, nothing compiled)."""
    return _flat_shapes(jax.eval_shape(lambda *xs: module.init(jax.random.PRNGKey(0), *xs, **call_kwargs),
                                       *inputs))


def _out_shape(module, inputs, call_kwargs) -> tuple[int, ...]:
    """Output shape of ``module.init_with_output`` (traced only)."""
    fn = lambda *xs: module.init_with_output(jax.random.PRNGKey(0), *xs, **call_kwargs)[0]  # noqa: E731
    return tuple(jax.eval_shape(fn, *inputs).shape)


@pytest.mark.parametrize("case", CASES)
def test_param_tree_matches_golden(case):
    g = _golden(case)
    shapes = _init_shapes(g["module"], g["inputs"], g["config"]["call_kwargs"])
    assert shapes == g["config"]["param_shapes"]
    assert _flat_shapes(g["params"]) == g["config"]["param_shapes"]


@pytest.mark.parametrize("case", CASES)
def test_output_matches_golden(case):
    g = _golden(case)
    out, _, _ = _run(case)
    assert out.dtype == np.float32
    assert list(out.shape) == g["config"]["output"]["shape"]
    _assert_close(out, g["outputs"]["out"], f"{case}/out")


@pytest.mark.parametrize("case", CASES)
def test_intermediates_match_golden(case):
    g = _golden(case)
    _, inter, _ = _run(case)
    golden = {k[len("inter/"):]: v for k, v in g["outputs"].items() if k.startswith("inter/")}
    assert sorted("inter/" + k for k in golden) == sorted(g["config"]["intermediates"])
    assert set(inter) == set(golden), f"extra {set(inter) - set(golden)}, missing {set(golden) - set(inter)}"
    for key, ref in golden.items():
        _assert_close(inter[key], ref, f"{case}/inter/{key}")


@pytest.mark.parametrize("case", CASES)
def test_grads_match_golden(case):
    g = _golden(case)
    _, _, grads = _run(case)
    golden = g["grads"]
    assert set(grads) == set(golden)
    # A mathematically zero gradient is rounding noise of the size of the case's largest gradients'
    # rounding error, so its tolerance scales with max |g| over the case (SCENIC_BEHAVIOUR.md).
    noise_atol = TOL * max(1.0, max(float(np.max(np.abs(v))) for v in golden.values()))
    for key, ref in golden.items():
        if _structurally_zero(g["config"], key):
            assert grads[key].shape == ref.shape
            err = float(np.max(np.abs(grads[key] - ref)))
            assert err <= noise_atol, f"{key}: {err:.3g} > {noise_atol:.3g}"
        else:
            _assert_close(grads[key], ref, f"{case}/{key}")


# EncoderMod / EncoderModFuser are left out here only to save compile time: the ViT cases init the same
# encoder code (as their `Transformer`) with a superset of its zero-initialized parameters.
ZERO_INIT_CASES = [c for c in CASES if c not in ("encoder_mod_image", "encoder_fuser_video_t2")]


@pytest.mark.parametrize("case", ZERO_INIT_CASES)
def test_init_zeros_where_scenic_does(case):
    g = _golden(case)
    config = g["config"]
    specs = [jax.ShapeDtypeStruct(tuple(i["shape"]), jnp.float32) for i in config["inputs"]]
    # lazy_init skips the forward computation: only the initializers are compiled.
    variables = g["module"].lazy_init(_key(config["seed"]), *specs, **config["call_kwargs"])
    flat = {k[len("params/"):]: np.asarray(v) for k, v in fr.flatten_tree(variables).items()}
    zero = sorted(k for k, v in flat.items() if not np.any(v))
    assert zero == sorted(config["scenic_zero_initialized_params"])
    for key, fraction in config.get("scenic_partially_zero_initialized_params", {}).items():
        assert np.mean(flat[key] == 0) == pytest.approx(fraction)
    kernel = flat.get("embedding/kernel")
    for axis in (0, 2):
        expected = config.get(f"init_embedding_kernel_nonzero_axis{axis}_indices")
        if expected is not None:
            other = tuple(a for a in range(kernel.ndim) if a != axis)
            assert np.flatnonzero(np.any(kernel != 0, axis=other)).tolist() == expected


# --------------------------------------------------------------------------------------------------------
# Options without a golden (tiny models)
# --------------------------------------------------------------------------------------------------------
def _vit(**overrides) -> fr.TokenLearnerViT:
    kwargs = dict(
        num_classes=3,
        mlp_dim=16,
        num_layers=2,
        num_heads=2,
        hidden_size=8,
        representation_size=None,
        classifier="gap",
        tokenizer={"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 2, "tokenlearner_loc": 1,
                   "use_tokenfuse": False},
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
    )
    kwargs.update(overrides)
    return fr.build_flax_module("TokenLearnerViT", kwargs)


def _video_tokenizer(**temporal) -> dict:
    return {"type": "video", "patches": {"size": [4, 4, 2]}, "num_tokens": 2, "tokenlearner_loc": 1,
            "use_tokenfuse": False, "temporal_encoding_config": temporal}


def _random_params(module, inputs, call_kwargs, seed: int = 0) -> dict:
    """Random O(1) parameters with the tree of ``module.init`` (compiling an init costs seconds, this
    costs nothing): kernels N(0,1)/sqrt(fan_in), LayerNorm scales 1 + 0.1 N, other vectors 0.05 N."""
    shapes = jax.eval_shape(lambda *xs: module.init(jax.random.PRNGKey(0), *xs, **call_kwargs), *inputs)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        x = rng.normal(size=leaf.shape)
        if len(leaf.shape) >= 2:
            x /= np.sqrt(np.prod(leaf.shape) / leaf.shape[-1])
        else:
            x = 1 + 0.1 * x if jax.tree_util.keystr(path).endswith("['scale']") else 0.05 * x
        return x.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


IMAGE = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)


def test_frame_sampling_indices():
    video = np.arange(5)[None, :, None, None, None] * np.ones((1, 5, 1, 1, 1))
    assert fr.sample_frames_uniformly(video, 2)[0, :, 0, 0, 0].tolist() == [2, 3]
    assert fr.sample_frames_uniformly(video, 1)[0, :, 0, 0, 0].tolist() == [2]  # round(2.5) = 2 (to even)
    assert fr.sample_frames_uniformly(video, 5)[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    assert fr.sample_frames_uniformly(video, 9)[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    video8 = np.arange(8)[None, :, None, None, None] * np.ones((1, 8, 1, 1, 1))
    assert fr.sample_frames_uniformly(video8, 3)[0, :, 0, 0, 0].tolist() == [2, 4, 6]


def test_temporal_sampling_stacks_frames_along_height():
    tokenizer = _video_tokenizer(method="temporal_sampling", n_sampled_frames=2)
    tokenizer["patches"] = {"size": [4, 4]}
    model = _vit(tokenizer=tokenizer)
    video = np.random.default_rng(1).normal(size=(2, 5, 8, 8, 3)).astype(np.float32)
    shapes = _init_shapes(model, [video], {"train": False})
    assert shapes["params/embedding/kernel"] == [4, 4, 3, 8]
    assert shapes["params/Transformer/posembed_input/pos_embedding"] == [1, 2 * 2 * 2, 8]  # t_s * h' * w'
    assert not any("TokenFuser" in k for k in shapes)

    variables = _random_params(model, [video], {"train": False})
    out, inter = fr.apply_reference(model, variables, [video], {"train": False}, compiler_options=FAST)
    assert out.shape == (2, 3)
    # Frames [2, 3] stacked along H, then one 2D patch conv.
    stacked = np.concatenate([video[:, 2], video[:, 3]], axis=1)  # [2, 16, 8, 3]
    kernel = np.asarray(variables["params"]["embedding"]["kernel"])
    patches = stacked.reshape(2, 4, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5)  # [n, 4, 2, fh, fw, c]
    expected = np.einsum("nhwabc,abcd->nhwd", patches, kernel) + np.asarray(variables["params"]["embedding"]["bias"])
    np.testing.assert_allclose(inter["embedding"], expected, rtol=1e-5, atol=1e-5)
    # The TokenLearner sees the two frames separately: [n*t_s, h'w', c] -> [n*t_s, tokens, c].
    assert inter["Transformer/TokenLearnerModuleV11_0"].shape == (4, 2, 8)
    assert inter["Transformer/encoderblock_1"].shape == (2, 4, 8)


@pytest.mark.parametrize("method", [None, "central_frame_initializer", "average_frame_initializer"])
def test_3d_conv_kernel_layout(method):
    model = _vit(tokenizer=_video_tokenizer(method="3d_conv", kernel_init_method=method))
    spec = jax.ShapeDtypeStruct((2, 4, 8, 8, 3), jnp.float32)
    shapes = _init_shapes(model, [spec], {"train": False})
    assert shapes["params/embedding/kernel"] == [2, 4, 4, 3, 8]  # patches.size (fh, fw, ft) = (4, 4, 2)
    assert shapes["params/Transformer/posembed_input/pos_embedding"] == [1, 2 * 2 * 2, 8]


def test_frame_initializers():
    shape = (2, 4, 4, 3, 8)  # (kt, kh, kw, c_in, c_out)
    base = jax.nn.initializers.normal(1.0)
    kernel = np.asarray(fr.central_frame_initializer(base)(_key(), shape))
    # Scenic quirk: index shape[0] // 2 = 1 kept along the patch width (axis 2), in both time slices.
    assert np.flatnonzero(np.any(kernel != 0, axis=(0, 1, 3, 4))).tolist() == [1]
    assert np.all(np.any(kernel != 0, axis=(1, 2, 3, 4)))
    assert np.mean(kernel == 0) == pytest.approx(0.75)
    kernel = np.asarray(fr.average_frame_initializer(base)(_key(), shape))
    np.testing.assert_array_equal(kernel[0], kernel[1])
    assert np.all(kernel != 0)
    with pytest.raises(ValueError, match="5D"):
        fr.central_frame_initializer(base)(_key(), (4, 4, 3, 8))


def test_patch_tokenizer_has_no_token_learner():
    tokenizer = {"type": "patch", "patches": {"size": [4, 4]}, "use_tokenfuse": False}  # no num_tokens/loc
    shapes = _init_shapes(_vit(tokenizer=tokenizer), [IMAGE], {"train": False})
    assert not any("TokenLearner" in k or "TokenFuser" in k for k in shapes)
    assert shapes["params/Transformer/posembed_input/pos_embedding"] == [1, 4, 8]
    assert _out_shape(_vit(tokenizer=tokenizer), [IMAGE], {"train": False}) == (2, 3)


@pytest.mark.parametrize("classifier,reduce", [("gmp", np.max), ("gsp", np.sum)])  # gap: the goldens
def test_classifier_pooling(classifier, reduce):
    model = _vit(classifier=classifier)
    variables = _random_params(_vit(), [IMAGE], {"train": False})  # the same tree for every classifier
    assert _flat_shapes(variables) == _init_shapes(model, [IMAGE], {"train": False})
    _, inter = fr.apply_reference(model, variables, [IMAGE], {"train": False}, compiler_options=FAST)
    np.testing.assert_allclose(inter["pre_logits"], reduce(inter["Transformer"], axis=1), rtol=1e-6, atol=1e-6)


def test_token_classifier_is_a_key_error_as_in_scenic():
    with pytest.raises(KeyError):
        _init_shapes(_vit(classifier="token"), [IMAGE], {"train": False})


def test_representation_size():
    shapes = _init_shapes(_vit(representation_size=5), [IMAGE], {"train": False})
    assert shapes["params/pre_logits/kernel"] == [8, 5]
    assert shapes["params/output_projection/kernel"] == [5, 3]
    shapes = _init_shapes(_vit(representation_size=None), [IMAGE], {"train": False})
    assert not any(k.startswith("params/pre_logits") for k in shapes)
    assert shapes["params/output_projection/kernel"] == [8, 3]


def test_v1_inside_encoder_mod():
    encoder = fr.EncoderMod(num_layers=2, mlp_dim=16, num_heads=2, tokenizer_type="dynamic", num_tokens=3,
                            tokenlearner_loc=1, use_v11=False, dropout_rate=0.0, attention_dropout_rate=0.0)
    tokens = np.zeros((2, 16, 8), np.float32)
    shapes = _init_shapes(encoder, [tokens], {"train": False})
    assert shapes["params/TokenLearnerModule_0/Conv_0/kernel"] == [3, 3, 8, 3]
    assert shapes["params/TokenLearnerModule_0/Conv_3/kernel"] == [3, 3, 3, 3]
    assert "params/TokenLearnerModule_0/LayerNorm_0/scale" in shapes
    assert not any("V11" in k for k in shapes)
    assert _out_shape(encoder, [tokens], {"train": False}) == (2, 3, 8)
    # Non-square token count: a clear ValueError (Scenic dies in a reshape with a TypeError).
    with pytest.raises(ValueError, match="square"):
        _init_shapes(encoder, [np.zeros((2, 15, 8), np.float32)], {"train": False})


def test_v1_and_v11_quirks_from_scenic_behaviour():
    # V1 with more tokens than positions is accepted.
    assert _out_shape(fr.TokenLearnerModule(num_tokens=20), [np.zeros((2, 9, 8), np.float32)], {}) == (2, 20, 8)
    # V11 accepts any length and non-square 4D.
    assert _out_shape(fr.TokenLearnerModuleV11(num_tokens=4), [np.zeros((2, 3, 5, 8), np.float32)],
                      {"deterministic": True}) == (2, 4, 8)
    # TokenFuser: no channel check (the output follows `inputs`) and always 3D.
    fuser_inputs = [np.zeros((2, 4, 16), np.float32), np.zeros((2, 3, 3, 24), np.float32)]
    assert _out_shape(fr.TokenFuser(), fuser_inputs, {"deterministic": True}) == (2, 9, 16)


def test_encoder_mod_fuser_with_v1_names_and_shapes():
    encoder = fr.EncoderModFuser(num_layers=3, mlp_dim=16, num_heads=2, tokenizer_type="video",
                                 temporal_dimensions=2, num_tokens=2, tokenlearner_loc=1, use_v11=False,
                                 dropout_rate=0.0, attention_dropout_rate=0.0)
    tokens = np.zeros((2, 2 * 16, 8), np.float32)
    shapes = _init_shapes(encoder, [tokens], {"train": False})
    owners = sorted({k.split("/")[1] for k in shapes if "Token" in k})
    assert owners == ["TokenFuser_0", "TokenFuser_1", "TokenLearnerModule_0", "TokenLearnerModule_1"]
    assert shapes["params/TokenFuser_0/token_masking/Dense_0/kernel"] == [8, 64]  # default bottleneck 64
    assert _out_shape(encoder, [tokens], {"train": False}) == tokens.shape


def test_encoder_mod_video_folding_and_late_location():
    kwargs = dict(num_layers=2, mlp_dim=16, num_heads=2, num_tokens=3, dropout_rate=0.0,
                  attention_dropout_rate=0.0)
    tokens = np.zeros((2, 2 * 9, 8), np.float32)
    video = fr.EncoderMod(tokenizer_type="video", temporal_dimensions=2, tokenlearner_loc=1, **kwargs)
    assert _out_shape(video, [tokens], {"train": False}) == (2, 2 * 3, 8)
    late = fr.EncoderMod(tokenizer_type="dynamic", tokenlearner_loc=2, **kwargs)  # loc >= num_layers
    shapes = _init_shapes(late, [tokens], {"train": False})
    assert not any("TokenLearner" in k for k in shapes)
    assert _out_shape(late, [tokens], {"train": False}) == tokens.shape


def test_bf16_applies_to_encoder_blocks_only():
    model = _vit(dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    param_dtypes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x, train=False), IMAGE)
    assert {v.dtype for v in jax.tree_util.tree_leaves(param_dtypes)} == {jnp.dtype(jnp.float32)}
    variables = _random_params(_vit(), [IMAGE], {"train": False})
    out, inter = fr.apply_reference(model, variables, [IMAGE], {"train": False}, as_float32=False,
                                    compiler_options=FAST)
    assert out.dtype == np.float32
    assert inter["Transformer/encoderblock_0/LayerNorm_0"].dtype == jnp.bfloat16
    assert inter["Transformer/encoderblock_1/MlpBlock_0"].dtype == jnp.bfloat16
    for key in ("embedding", "Transformer/posembed_input", "Transformer/TokenLearnerModuleV11_0",
                "Transformer/encoderblock_0", "Transformer/encoder_norm", "output_projection"):
        assert inter[key].dtype == np.float32, key
    ref_out, _ = fr.apply_reference(_vit(), variables, [IMAGE], {"train": False}, capture_intermediates=False,
                                    compiler_options=FAST)
    np.testing.assert_allclose(out, ref_out, atol=5e-2)


def test_representation_model():
    tokenizer = {"type": "video", "patches": {"size": [4, 4]}, "num_tokens": 2, "tokenlearner_loc": 1,
                 "use_tokenfuse": False}
    model = fr.build_flax_module("TokenLearnerViTRepresentation", dict(
        mlp_dim=16, num_layers=2, num_heads=2, tokenizer=tokenizer, hidden_size=8, dropout_rate=0.0,
        attention_dropout_rate=0.0, target_channel_dim=7, use_concat_final=True))
    video = np.zeros((2, 3, 8, 8, 3), np.float32)
    shapes = _init_shapes(model, [video], {"train": False})
    assert shapes["params/embedding/kernel"] == [4, 4, 3, 8]
    assert shapes["params/Transformer/posembed_input/pos_embedding"] == [1, 3 * 4, 8]
    assert not any("output_projection" in k or "pre_logits" in k for k in shapes)
    assert _out_shape(model, [video], {"train": False}) == (2, 3 * 2, 8)  # TokenLearner per frame


def test_tokenizer_config_rules():
    base = _vit().tokenizer
    no_fuse = {k: v for k, v in base.items() if k != "use_tokenfuse"}
    with pytest.raises(AttributeError, match="use_tokenfuse"):
        _init_shapes(_vit(tokenizer=no_fuse), [IMAGE], {"train": False})
    with pytest.raises(ValueError, match="Unknown tokenizer type"):
        _init_shapes(_vit(tokenizer={**base, "type": "foo"}), [IMAGE], {"train": False})
    with pytest.raises(AssertionError, match="Unknown temporal encoding method"):
        _init_shapes(_vit(tokenizer=_video_tokenizer(method="x")), [np.zeros((1, 4, 8, 8, 3), np.float32)],
                     {"train": False})
    assert any("TokenLearnerModuleV11_0" in k for k in _init_shapes(_vit(), [IMAGE], {"train": False}))
    v1 = _init_shapes(_vit(tokenizer={**base, "use_v11": False}), [IMAGE], {"train": False})
    assert any("TokenLearnerModule_0/Conv_0" in k for k in v1)
    fused = _init_shapes(_vit(tokenizer={**base, "use_tokenfuse": True}), [IMAGE], {"train": False})
    assert "params/Transformer/TokenFuser_0/Dense_0/kernel" in fused


def test_configdict_tokenizer_if_available():
    ml_collections = pytest.importorskip("ml_collections")
    tokenizer = ml_collections.ConfigDict(copy.deepcopy(_vit().tokenizer))
    assert _init_shapes(_vit(tokenizer=tokenizer), [IMAGE], {"train": False}) == \
        _init_shapes(_vit(), [IMAGE], {"train": False})


def test_train_mode_runs_with_dropout_rng():
    model = _vit(dropout_rate=0.1, attention_dropout_rate=0.1)
    fn = lambda x: model.init_with_output(  # noqa: E731
        {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, x, train=True)[0]
    assert jax.eval_shape(fn, IMAGE).shape == (2, 3)


def test_factories():
    short = fr.build_flax_module("TokenFuser", {"use_normalization": False})
    dotted = fr.build_flax_module("scenic.projects.token_learner.model.TokenFuser", {"use_normalization": False})
    assert type(short) is type(dotted) is fr.TokenFuser and short.use_normalization is False
    assert fr.build_flax_module("Encoder1DBlock", {"mlp_dim": 4, "num_heads": 1, "dtype": "bfloat16"}).dtype \
        == jnp.bfloat16
    with pytest.raises(ValueError, match="unknown Scenic class"):
        fr.build_flax_module("TokenLearnerModuleMixer", {})
    with pytest.raises(ValueError, match="unknown dtype"):
        fr.build_flax_module("Encoder1DBlock", {"mlp_dim": 4, "num_heads": 1, "dtype": "int3"})
    reference = fr.build_reference_module("TokenFuser", {}, prefer_genuine=False)
    assert isinstance(reference, fr.TokenFuser)
    if not fr.genuine_scenic_available():  # falls back to this project's reference
        assert isinstance(fr.build_reference_module("TokenFuser", {}), fr.TokenFuser)


def test_mlp_block_intermediate_names():
    block = fr.MlpBlock(mlp_dim=6, out_dim=2, dropout_rate=0.0)
    x = np.ones((1, 3, 4), np.float32)
    variables = _random_params(block, [x], {"deterministic": True})
    assert _flat_shapes(variables) == {
        "params/Dense_0/kernel": [4, 6], "params/Dense_0/bias": [6],
        "params/Dense_1/kernel": [6, 2], "params/Dense_1/bias": [2],
    }
    _, inter = fr.apply_reference(block, variables, [x], {"deterministic": True}, compiler_options=FAST)
    assert set(inter) == {"Dense_0", "mlp1", "Dense_1", "mlp2"}
    np.testing.assert_allclose(inter["mlp1"], jax.nn.gelu(inter["Dense_0"], approximate=True), rtol=1e-6)


@pytest.mark.parametrize("case", ["v11_tokens3d"])
def test_default_compile_path(case):
    """apply_reference / reference_grads (the goldens' cases use reference_outputs), inputs passed as a
    name -> array mapping."""
    g = _golden(case)
    names = g["config"]["input_order"]
    inputs = dict(zip(names, g["inputs"]))
    out, inter = fr.apply_reference(g["module"], g["params"], inputs, g["config"]["call_kwargs"])
    _assert_close(out, g["outputs"]["out"], "out")
    for key, value in inter.items():
        _assert_close(value, g["outputs"]["inter/" + key], key)
    grads = fr.reference_grads(g["module"], g["params"], inputs, g["config"]["call_kwargs"], g["cotangent"])
    assert set(grads) == set(g["grads"])
    for key, ref in g["grads"].items():
        if not _structurally_zero(g["config"], key):
            _assert_close(grads[key], ref, key)
