"""Architecture inference from parameter trees, config files and --set values."""

from __future__ import annotations

import inspect
import json

import pytest

import tokenlearner_torch as tl
from tokenlearner_torch.errors import ConfigError
from tokenlearner_torch.scenic import _resolve, _scenic_parameters
from tokenlearner_torch.weights_convert import flax_to_torch, infer_architecture
from tokenlearner_torch.weights_convert.config import load_config_file, parse_set, resolve_architecture

from goldens import CASES, Golden

# Exactly what each golden's tree leaves open.
UNDETERMINED = {
    "v11_tokens3d": [],
    "v11_tokens4d": [],
    "v1_sum4d": ["use_sum_pooling"],
    "v1_mean3d": ["use_sum_pooling"],
    "fuser_norm": [],
    "fuser_4d_original": [],
    "encoder_mod_image": ["tokenizer_type", "tokenlearner_loc"],
    "encoder_fuser_video_t2": ["tokenizer_type"],
    "vit_image_cls": ["tokenizer.type", "tokenizer.tokenlearner_loc", "classifier"],
    "vit_video_3dconv": ["classifier"],
}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


def _defaults(cls_name):
    return {n: p.default for n, p in _scenic_parameters(_resolve(cls_name)).items() if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("name", CASES)
def test_inference_recovers_golden_kwargs(name):
    g = Golden(name)
    arch = infer_architecture(g.params)
    assert arch.scenic_class == g.config["scenic_class"]
    assert arch.undetermined == UNDETERMINED[name]
    golden = _flat(g.config["constructor_kwargs"])
    defaults = _defaults(arch.scenic_class)
    for key, value in _flat(arch.kwargs).items():
        expected = golden.get(key, defaults.get(key, "<absent>"))
        if key == "tokenizer.use_v11" and key not in golden:
            expected = True  # Scenic's default
        assert value == expected, (key, value, expected)
    # Inferred + the golden's values of the open fields = a model the golden params fit.
    sets = [f"{f}={json.dumps(_flat(g.config['constructor_kwargs']).get(f, _defaults(arch.scenic_class).get(f)))}" for f in arch.undetermined]
    if "temporal_dimensions" in g.config["constructor_kwargs"]:  # asked for once tokenizer_type=video is given
        sets.append(f"temporal_dimensions={g.config['constructor_kwargs']['temporal_dimensions']}")
    resolved = resolve_architecture(g.params, sets=sets)
    model = tl.from_scenic(resolved.scenic_class, resolved.kwargs)
    model.load_state_dict(flax_to_torch(model, g.params), strict=True)


@pytest.mark.parametrize("name", [n for n in CASES if UNDETERMINED[n]])
def test_error_lists_exactly_the_open_fields(name):
    g = Golden(name)
    with pytest.raises(ConfigError) as err:
        resolve_architecture(g.params)
    msg = str(err.value)
    assert f"{len(UNDETERMINED[name])} field(s)" in msg
    for f in UNDETERMINED[name]:
        assert f"--set {f}=..." in msg
    assert "\n" not in msg


def test_video_tokenizer_asks_for_sampling_and_temporal_dims():
    g = Golden("vit_image_cls")
    with pytest.raises(ConfigError, match=r"n_sampled_frames"):
        resolve_architecture(g.params, sets=["tokenizer.type=video", "tokenizer.tokenlearner_loc=2", "classifier=gap"])
    r = resolve_architecture(g.params, sets=["tokenizer.type=video", "tokenizer.tokenlearner_loc=2", "classifier=gap",
                                             "tokenizer.temporal_encoding_config.n_sampled_frames=2"])
    assert r.kwargs["tokenizer"]["temporal_encoding_config"] == {"method": "temporal_sampling", "n_sampled_frames": 2}
    e = Golden("encoder_fuser_video_t2")
    with pytest.raises(ConfigError, match=r"temporal_dimensions"):
        resolve_architecture(e.params, sets=["tokenizer_type=video"])
    r = resolve_architecture(e.params, sets=["tokenizer_type=video", "temporal_dimensions=2"])
    assert r.kwargs["temporal_dimensions"] == 2 and r.sources["num_layers"] == "checkpoint"


def test_unknown_tree_is_an_error():
    with pytest.raises(ConfigError, match="match no TokenLearner model"):
        infer_architecture({"foo": {"kernel": __import__("numpy").zeros((2, 2))}})
    with pytest.raises(ConfigError):
        infer_architecture({})


def test_parse_set():
    assert parse_set("a.b=3") == ("a.b", 3)
    assert parse_set("classifier=gap") == ("classifier", "gap")
    assert parse_set("x=[16, 16]") == ("x", [16, 16])
    assert parse_set("r=null") == ("r", None) and parse_set("r=None") == ("r", None)
    assert parse_set("u=True") == ("u", True)
    with pytest.raises(ConfigError):
        parse_set("novalue")


SCENIC_PY = '''
import ml_collections

def get_config():
  config = ml_collections.ConfigDict()
  config.experiment_name = 'tl'
  config.model_name = 'token_learner_multilabel_classification'
  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 64
  config.model.num_heads = 4
  config.model.mlp_dim = 128
  config.model.num_layers = 4
  config.model.representation_size = 32
  config.model.classifier = 'gap'
  config.model.dropout_rate = 0.0
  config.model.attention_dropout_rate = 0.0
  config.model.stochastic_depth = 0.1
  config.model.tokenizer = ml_collections.ConfigDict()
  config.model.tokenizer.type = 'dynamic'
  config.model.tokenizer.patches = ml_collections.ConfigDict({'size': (8, 8)})
  config.model.tokenizer.num_tokens = 8
  config.model.tokenizer.tokenlearner_loc = 2
  config.model.tokenizer.use_tokenfuse = False
  config.model_dtype_str = 'float32'
  return config
'''


def test_scenic_experiment_config_py_and_json(tmp_path):
    g = Golden("vit_image_cls")
    py = tmp_path / "tl_config.py"
    py.write_text(SCENIC_PY)
    cls, kwargs, _ = load_config_file(py, num_classes=10)
    assert cls is None and kwargs["num_classes"] == 10 and kwargs["tokenizer"]["patches"]["size"] == [8, 8]
    r = resolve_architecture(g.params, config=py, num_classes=10)
    assert r.ignored == ["stochastic_depth"]
    model = tl.from_scenic(r.scenic_class, r.kwargs)
    model.load_state_dict(flax_to_torch(model, g.params), strict=True)
    js = tmp_path / "cfg.json"
    js.write_text(json.dumps({"model": kwargs, "model_dtype_str": "float32"}))
    r2 = resolve_architecture(g.params, config=js)
    assert r2.kwargs["tokenizer"] == r.kwargs["tokenizer"] and r2.kwargs["classifier"] == "gap"
    # the ConfigDict of the .py file comes back as plain dicts (what from_scenic and config.json take)
    assert type(kwargs["tokenizer"]) is dict and type(kwargs["tokenizer"]["patches"]) is dict


def test_bad_config_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config_file(bad)
    other = tmp_path / "other.json"
    other.write_text("{\"a\": 1}")
    with pytest.raises(ConfigError, match="neither"):
        load_config_file(other)
    nofn = tmp_path / "nofn.py"
    nofn.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="get_config"):
        load_config_file(nofn)
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.json")
