"""A misspelled config key is never silently ignored (issue 19, part 1): tokenlearner_torch.config_check.

Model and tokenizer fields: an unknown key is a ConfigError naming it and the closest known one, from every
entry point (from_scenic, the classes, the converter's --set / --config, case files, parity live/check).
Experiment configs: a key no code reads is a ConfigWarning naming the closest known key; strict=True /
--strict makes it a ConfigError (exit 2). The registry of experiment keys cannot fall behind the code: a
scan of training/*.py finds every key read and asks that it be registered.

Each example is the issue's, on inputs the port did not produce: the goldens' configs (genuine Scenic's), the
genuine-Scenic training golden softmax_label_smoothing (its stored per-step learning rates), Scenic's own
im1k config.
"""

from __future__ import annotations

import ast
import copy
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest

import tokenlearner_torch as tl
from tokenlearner_torch import config_check as cc
from tokenlearner_torch.config_check import ConfigWarning
from tokenlearner_torch.errors import ConfigError
from tokenlearner_torch.parity.cases import port_class
from tokenlearner_torch.training.config import vit_model_fields

ROOT = Path(__file__).resolve().parents[1]
FIX = Path(__file__).resolve().parent / "fixtures"
GOLDEN = FIX / "goldens" / "vit_image_cls"
TRAIN_CASE = FIX / "train_goldens" / "softmax_label_smoothing"
USE_V1L = "unknown tokenizer field 'use_v1l'; did you mean 'use_v11'?"
HIDEN = "TokenLearnerViT: unknown constructor argument 'hiden_size'; did you mean 'hidden_size'?"


def _golden_config() -> dict:
    return json.loads((GOLDEN / "config.json").read_text())


def _tiny_kwargs(**tokenizer) -> dict:
    tok = {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 4, "tokenlearner_loc": 1,
           "use_tokenfuse": False, **tokenizer}  # fmt: skip
    return {"num_classes": 3, "mlp_dim": 32, "num_layers": 2, "num_heads": 2, "tokenizer": tok, "hidden_size": 16,
            "representation_size": None}  # fmt: skip


def _train_case_config() -> dict:
    return json.loads((TRAIN_CASE / "config.json").read_text())


def _check_experiment(config, **kw) -> list[str]:
    """The checker as the port's trainer and converter call it: the ``model`` section takes TokenLearnerViT's
    fields (config_check sits below the models, so its callers pass them)."""
    return cc.check_experiment_config(config, model_fields=vit_model_fields(), **kw)


# ---------------------------------------------------------------------------------------------------------
# Model and tokenizer fields: errors


def test_correct_use_v11_key_changes_the_model():
    """Why the typo matters: use_v11=False builds Scenic's V1 TokenLearnerModule; a typo'd key would leave the
    default (V1.1) in place."""
    v1 = tl.from_scenic("TokenLearnerViT", _tiny_kwargs(use_v11=False))
    names = {type(m).__name__ for m in v1.modules()}
    assert "TokenLearnerModule" in names and "TokenLearnerModuleV11" not in names


@pytest.mark.parametrize("entry", ["from_scenic", "TokenLearnerViT", "TokenLearnerViTRepresentation", "ConfigDict"])
def test_tokenizer_typo_is_an_error_naming_the_closest_field(entry):
    kwargs = _tiny_kwargs(use_v1l=False)
    with pytest.raises(ConfigError) as err:
        if entry == "from_scenic":
            tl.from_scenic("TokenLearnerViT", kwargs)
        elif entry == "TokenLearnerViT":
            tl.TokenLearnerViT(**kwargs)
        elif entry == "TokenLearnerViTRepresentation":
            rep = {k: v for k, v in kwargs.items() if k not in ("num_classes", "representation_size")}
            tl.TokenLearnerViTRepresentation(**rep, target_channel_dim=8)
        else:
            ml_collections = pytest.importorskip("ml_collections")
            tl.TokenLearnerViT(**{**kwargs, "tokenizer": ml_collections.ConfigDict(kwargs["tokenizer"])})
    assert str(err.value) == USE_V1L


def test_nested_tokenizer_typos_name_their_section():
    video = {"type": "video", "patches": {"size": [4, 4, 2]}, "num_tokens": 4, "tokenlearner_loc": 1,
             "use_tokenfuse": False, "temporal_encoding_config": {"method": "3d_conv", "kernel_init_metod": None}}
    with pytest.raises(ConfigError, match=r"^unknown tokenizer.temporal_encoding_config field 'kernel_init_metod'; "
                       r"did you mean 'kernel_init_method'\?$"):  # fmt: skip
        tl.TokenLearnerViT(**{**_tiny_kwargs(), "tokenizer": video})
    with pytest.raises(ConfigError, match=r"^unknown tokenizer.patches field 'sise'; did you mean 'size'\?$"):
        tl.from_scenic("TokenLearnerViT", _tiny_kwargs(patches={"sise": [4, 4]}))


def test_constructor_typo_names_the_closest_field():
    kwargs = _tiny_kwargs()
    kwargs["hiden_size"] = kwargs.pop("hidden_size")
    with pytest.raises(ConfigError) as err:
        tl.from_scenic("TokenLearnerViT", kwargs)
    assert str(err.value) == HIDEN


def test_constructor_fields_come_from_the_signatures():
    import inspect

    for name, cls in tl.scenic.SCENIC_CLASSES.items():
        sig = [n for n, p in inspect.signature(cls.__init__).parameters.items()
               if n != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]  # fmt: skip
        assert list(cc.constructor_fields(cls)) == sig
        assert port_class(name) is cls and port_class(name.rsplit(".", 1)[1]) is cls  # the case files' resolver
    assert port_class("NoSuchModule") is None
    with pytest.raises(TypeError, match="takes a class"):  # a name: its caller resolves it (no registry below)
        cc.constructor_fields("TokenLearnerViT")


def test_case_config_near_miss_is_named():
    cfg = _golden_config()
    cfg["constructor_kwarg"] = cfg.pop("constructor_kwargs")
    with pytest.raises(ConfigError, match=r"^x\.json: unknown field 'constructor_kwarg'; did you mean 'constructor_kwargs'\?$"):
        cc.check_case_config(cfg, "x.json", resolve=port_class)


def test_case_config_checks_the_kwargs_of_the_class_the_resolver_gives():
    """Inside constructor_kwargs through the caller's resolver: a typo is named (with the file), a class the
    port does not have is left to from_scenic, and without a resolver only the top level is checked."""
    cfg = _golden_config()
    cfg["constructor_kwargs"]["hiden_size"] = cfg["constructor_kwargs"].pop("hidden_size")
    with pytest.raises(ConfigError) as err:
        cc.check_case_config(cfg, "x.json", resolve=port_class)
    assert str(err.value) == f"x.json: {HIDEN}"
    asked = []
    cc.check_case_config(cfg, "x.json", resolve=lambda name: asked.append(name))  # unknown class: no check
    assert asked == [cfg["scenic_class"]]
    cc.check_case_config(cfg, "x.json")
    with pytest.raises(ConfigError, match=r"^TokenLearnerViT: unknown constructor argument 'hiden_size'"):
        cc.check_constructor_kwargs(tl.TokenLearnerViT, cfg["constructor_kwargs"])


def test_every_golden_and_scenic_config_passes_without_a_word():
    """No false alarm on genuine configs: the goldens' case files, the training goldens' experiment configs
    (genuine Scenic runs) and Scenic's own im1k config."""
    from tokenlearner_torch.training import load_config

    for path in sorted((FIX / "goldens").glob("*/config.json")):
        cc.check_case_config(json.loads(path.read_text()), str(path), resolve=port_class)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        for path in sorted((FIX / "train_goldens").glob("*/config.json")):
            meta = json.loads(path.read_text())
            assert _check_experiment(meta["config"]) == []
            if meta.get("surgery"):
                assert _check_experiment(meta["surgery"]["source_config"]) == []
        load_config(FIX / "scenic_configs" / "im1k_token_learner_config.py", strict=True)


# ---------------------------------------------------------------------------------------------------------
# Experiment configs: warnings, strict errors


def test_lr_schedule_typo_warns_and_strict_refuses():
    cfg = _train_case_config()["config"]
    bad = copy.deepcopy(cfg)
    bad["lr_configs"]["learning_rate_schedul"] = bad["lr_configs"].pop("learning_rate_schedule")
    want = "config key 'lr_configs.learning_rate_schedul' is read by no code; did you mean 'lr_configs.learning_rate_schedule'?"
    with pytest.warns(ConfigWarning) as record:
        assert _check_experiment(bad) == [want]
    assert [str(w.message) for w in record] == [want]
    with pytest.raises(ConfigError, match="learning_rate_schedul.*did you mean 'lr_configs.learning_rate_schedule'"):
        _check_experiment(bad, strict=True)


def test_top_level_near_miss_warns_other_scenic_keys_pass():
    cfg = _train_case_config()["config"]
    cfg["label_smothing"] = cfg.pop("label_smoothing")
    cfg["log_large_summary_steps"] = 100  # Scenic's generic key: the port does not read it, no near miss: accepted
    cfg["dataset_configs"] = {"pp_train": "decode|flip"}  # Scenic's datasets own their keys
    cfg["my_project_note"] = "x"
    with pytest.warns(ConfigWarning, match=r"^config key 'label_smothing' is read by no code; did you mean 'label_smoothing'\?$"):
        assert len(_check_experiment(cfg)) == 1


def test_tokenizer_typo_in_an_experiment_config_is_an_error_even_without_strict():
    cfg = _train_case_config()["config"]
    cfg["model"]["tokenizer"]["use_v1l"] = False
    with pytest.raises(ConfigError, match=r"^unknown model.tokenizer field 'use_v1l'; did you mean 'use_v11'\?$"):
        _check_experiment(cfg)
    with pytest.raises(ConfigError, match=r"^unknown model.tokenizer field 'use_v1l'"):
        cc.check_experiment_config(cfg)  # without model fields too: the tokenizer rule needs no class


def test_model_section_is_checked_against_the_fields_the_caller_gives():
    """A typo directly under `model` (where TokenLearnerViT's fields live) warns with the fields the trainer
    passes; model_fields=None (the caller names no model) leaves that section's own keys unchecked rather than
    warning on every genuine field, while its subsections are still checked."""
    cfg = _train_case_config()["config"]
    cfg["model"]["hiden_size"] = cfg["model"].pop("hidden_size")
    want = "config key 'model.hiden_size' is read by no code; did you mean 'model.hidden_size'?"
    with pytest.warns(ConfigWarning):
        assert _check_experiment(cfg) == [want]
    assert set(vit_model_fields()) == set(cc.constructor_fields(tl.TokenLearnerViT)) >= {"hidden_size", "tokenizer"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        assert cc.check_experiment_config(_train_case_config()["config"]) == []
    cfg["model"]["patches"] = {"sise": [4, 4]}
    with pytest.warns(ConfigWarning):
        assert cc.check_experiment_config(cfg) == [
            "config key 'model.patches.sise' is read by no code; did you mean 'model.patches.size'?"
        ]


def test_scenic_trainer_with_the_typo_warns_and_strict_refuses():
    """The issue's numbers: the genuine Scenic run of softmax_label_smoothing logged 0.05 / 0.025 / 0.0033 at
    steps 0 / 3 / 5 (cosine over 6 steps); with `learning_rate_schedul` the schedule falls back to the constant
    0.05 and label_smothing to no smoothing: each now says so, and strict=True refuses."""
    from tokenlearner_torch.training import ScenicTrainer

    meta = _train_case_config()
    stored = json.loads((TRAIN_CASE / "steps.json").read_text())["steps"]
    good = ScenicTrainer(meta["config"], meta["dataset_meta_data"])
    for step in (0, 3, 5):
        assert float(good.lr_fn(step)) == pytest.approx(stored[step]["learning_rate"], rel=1e-6)
    assert [round(stored[s]["learning_rate"], 4) for s in (0, 3, 5)] == [0.05, 0.025, 0.0033]
    assert good.loss_fn.label_smoothing == 0.1

    bad = copy.deepcopy(meta["config"])
    bad["lr_configs"]["learning_rate_schedul"] = bad["lr_configs"].pop("learning_rate_schedule")
    bad["label_smothing"] = bad.pop("label_smoothing")
    with pytest.warns(ConfigWarning) as record:
        trainer = ScenicTrainer(bad, meta["dataset_meta_data"])
    assert float(trainer.lr_fn(5)) == pytest.approx(0.05)  # what it does with the typo: now never silently
    messages = sorted(str(w.message) for w in record)
    assert any("'label_smothing'" in m and "'label_smoothing'" in m for m in messages)
    assert any("learning_rate_schedul'" in m and "learning_rate_schedule'" in m for m in messages)
    with pytest.raises(ConfigError, match="strict config check: 2 key"):
        ScenicTrainer(bad, meta["dataset_meta_data"], strict=True)


# ---------------------------------------------------------------------------------------------------------
# The command lines


def _err_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return err.strip()[len(f"{prog}: error: "):]


def test_convert_set_typo_is_an_error_and_writes_nothing(tmp_path, capsys):
    from tokenlearner_torch.weights_convert.cli import main

    out = tmp_path / "out"
    rc = main([str(GOLDEN / "checkpoint"), "-o", str(out), "--config", str(GOLDEN / "config.json"),
               "--set", "tokenizer.use_v1l=false"])  # fmt: skip
    assert rc == 2 and not out.exists()
    assert _err_line(capsys, "tokenlearner-convert") == USE_V1L


@pytest.mark.parametrize("typo", ["use_v1l", "constructor_kwarg", "hiden_size"])
def test_convert_config_file_typos(typo, tmp_path, capsys):
    from tokenlearner_torch.weights_convert.cli import main

    cfg = _golden_config()
    if typo == "use_v1l":
        cfg["constructor_kwargs"]["tokenizer"]["use_v1l"] = False
        want = f"{tmp_path / 'c.json'}: {USE_V1L}"
    elif typo == "constructor_kwarg":
        cfg["constructor_kwarg"] = cfg.pop("constructor_kwargs")
        want = f"{tmp_path / 'c.json'}: unknown field 'constructor_kwarg'; did you mean 'constructor_kwargs'?"
    else:
        cfg["constructor_kwargs"]["hiden_size"] = cfg["constructor_kwargs"].pop("hidden_size")
        want = f"{tmp_path / 'c.json'}: {HIDEN}"
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    rc = main([str(GOLDEN / "checkpoint"), "-o", str(tmp_path / "out"), "--config", str(tmp_path / "c.json")])
    assert rc == 2 and not (tmp_path / "out").exists()
    assert _err_line(capsys, "tokenlearner-convert") == want


def test_convert_scenic_experiment_config_warns_in_one_line(tmp_path, capsys):
    """A Scenic experiment config (.py) whose model section has a key no code reads: converted, one warning."""
    from tokenlearner_torch.weights_convert.cli import main

    kw = _golden_config()["constructor_kwargs"]
    model = {k: v for k, v in kw.items() if k != "num_classes"}
    model["dropout_rat"] = model.pop("dropout_rate")
    py = tmp_path / "exp_config.py"
    py.write_text("import ml_collections\n\ndef get_config():\n    return ml_collections.ConfigDict("
                  f"{{'model_name': 'token_learner_classification', 'model': {model!r}}})\n")
    rc = main([str(GOLDEN / "checkpoint"), "-o", str(tmp_path / "out"), "--config", str(py), "--num-classes", "10", "-q"])
    err = capsys.readouterr().err
    assert rc == 0 and (tmp_path / "out" / "model.safetensors").is_file()
    assert err == ("tokenlearner-convert: warning: config key 'model.dropout_rat' is read by no code; "
                   "did you mean 'model.dropout_rate'?\n")


def test_parity_live_names_the_field_as_the_converter_does(tmp_path, capsys):
    pytest.importorskip("flax")
    from tokenlearner_torch.parity.cli import main as parity
    from tokenlearner_torch.weights_convert.cli import main as convert

    cfg = _golden_config()
    cfg["constructor_kwargs"]["hiden_size"] = cfg["constructor_kwargs"].pop("hidden_size")
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert convert([str(GOLDEN / "checkpoint"), "-o", str(tmp_path / "o"), "--config", str(path)]) == 2
    converter = _err_line(capsys, "tokenlearner-convert")
    assert parity(["live", str(path), "-q", "--scenic", "never"]) == 2
    assert _err_line(capsys, "tokenlearner-parity") == converter == f"{path}: {HIDEN}"


def test_parity_check_case_with_a_tokenizer_typo(tmp_path, capsys):
    from tokenlearner_torch.parity.cli import main as parity

    case = tmp_path / "case"
    shutil.copytree(GOLDEN, case)
    cfg = _golden_config()
    cfg["constructor_kwargs"]["tokenizer"]["use_v1l"] = False
    (case / "config.json").write_text(json.dumps(cfg))
    assert parity(["check", str(case), "-q"]) == 2
    assert _err_line(capsys, "tokenlearner-parity") == f"{case / 'config.json'}: {USE_V1L}"


def _typo_train_case(tmp_path: Path) -> Path:
    case = tmp_path / "train_case"
    shutil.copytree(TRAIN_CASE, case)
    meta = _train_case_config()
    lr = meta["config"]["lr_configs"]
    lr["learning_rate_schedul"] = lr.pop("learning_rate_schedule")
    (case / "config.json").write_text(json.dumps(meta))
    return case


def test_parity_train_warns_and_strict_exits_2(tmp_path, capsys):
    """`tokenlearner-parity train` on the genuine Scenic training case with `learning_rate_schedul`: one
    warning line naming the key and the right one (the run then differs from Scenic's schedule: FAIL);
    --strict: exit 2 before any step."""
    from tokenlearner_torch.parity.cli import main as parity

    case = _typo_train_case(tmp_path)
    want = ("config key 'lr_configs.learning_rate_schedul' is read by no code; did you mean "
            "'lr_configs.learning_rate_schedule'?")  # fmt: skip
    assert parity(["train", str(case), "--strict", "-q"]) == 2
    assert _err_line(capsys, "tokenlearner-parity") == f"strict config check: 1 key(s) no code reads: {want}"
    rc = parity(["train", str(case), "-q", "--steps", "4"])
    out, err = capsys.readouterr()
    assert err == f"tokenlearner-parity: warning: {want}\n"  # once, although the config is read twice
    assert rc == 1 and "FAIL" in out  # the constant 0.05 against Scenic's 0.025 at step 3


def test_parity_train_config_strict_exits_2(tmp_path, capsys):
    pytest.importorskip("optax")
    from tokenlearner_torch.parity.cli import main as parity

    cfg = _train_case_config()["config"]
    cfg["label_smothing"] = cfg.pop("label_smoothing")
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(cfg))
    assert parity(["train", str(path), "--strict", "--num-classes", "10", "--input-shape", "24,24,3", "-q"]) == 2
    assert "did you mean 'label_smoothing'?" in _err_line(capsys, "tokenlearner-parity")


# ---------------------------------------------------------------------------------------------------------
# The registry cannot fall behind the code


# Where the training code keeps configs: a read counts when its receiver's text matches (config, self.config,
# cfg, opt_cfg, lr_configs, init_from, model, kwargs of the optimizer, the tokenizer, mixup, ds = dataset_configs).
CONFIG_RECEIVER = re.compile(r"config|cfg|^model$|init_from|grad_clip|^kwargs$|tokenizer|mixup|^ds$|lr_")


def _keys_read(path: Path) -> set[str]:
    """String keys that training code reads from a config: ``cfg_get(c, "a.b")``, ``_need(c, "k", ...)``, and
    on a config-like receiver (:data:`CONFIG_RECEIVER`) ``x.get/pop/setdefault("k")``, ``x["k"]``, ``"k" in x``."""
    found = set()

    def configish(node: ast.AST) -> bool:
        return bool(CONFIG_RECEIVER.search(ast.unparse(node)))

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            fn = node.func
            if isinstance(fn, ast.Name) and fn.id in ("cfg_get", "_need"):
                key = node.args[1] if len(node.args) > 1 else None
            elif isinstance(fn, ast.Attribute) and fn.attr in ("get", "pop", "setdefault") and configish(fn.value):
                key = node.args[0] if node.args else None
            else:
                continue
            if isinstance(key, ast.Constant):
                found.add(key.value)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and configish(node.value):
            found.add(node.slice.value)
        elif isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant):
            if any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops) and configish(node.comparators[0]):
                found.add(node.left.value)
    return {k for k in found if isinstance(k, str)}


# Keys read from config-like receivers that are not experiment-config keys (a training case's config.json
# wraps the config; the optimizer's kwargs are optax's names after translation). Adding one here is a decision
# reviewers see; a config key goes into config_check.EXPERIMENT_KEYS instead.
NOT_CONFIG = {"config", "dataset_meta_data"}


def test_every_key_the_training_code_reads_is_registered():
    def fields(spec: dict) -> set[str]:
        return set(spec).union(*(fields(v) for v in spec.values() if isinstance(v, dict)))

    registered = set().union(*cc.experiment_sections(vit_model_fields()).values()) | fields(cc.TOKENIZER_FIELDS)
    unregistered = {}
    for path in sorted((ROOT / "src" / "tokenlearner_torch" / "training").glob("*.py")):
        for key in _keys_read(path):
            if "." in key:  # cfg_get's dotted paths: the exact section is known
                ok = cc.is_registered(key, vit_model_fields())
            else:
                ok = key in registered or key in NOT_CONFIG
            if not ok:
                unregistered.setdefault(key, []).append(path.name)
    assert unregistered == {}, f"register these in config_check.EXPERIMENT_KEYS (or NOT_CONFIG here): {unregistered}"


def test_registry_scan_sees_a_new_key(tmp_path):
    """The scan is not vacuous: a read of an unregistered key is found, a registered dotted path passes."""
    src = tmp_path / "m.py"
    src.write_text("def f(config):\n    return config.get('warmup_stepz'), cfg_get(config, 'lr_configs.total_steps')\n")
    keys = _keys_read(src)
    assert keys == {"warmup_stepz", "lr_configs.total_steps"}
    fields = vit_model_fields()
    assert cc.is_registered("lr_configs.total_steps", fields) and not cc.is_registered("lr_configs.warmup_stepz", fields)
    assert cc.is_registered("model.tokenizer.temporal_encoding_config.method", fields)
    assert cc.is_registered("dataset_configs.anything", fields)  # datasets own their keys
    assert cc.is_registered("model.hidden_size", fields) and not cc.is_registered("model.hidden_size", ())


def test_parity_train_does_not_import_the_cli():
    """The import circle parity/cli.py <-> parity/train.py is gone: both use tokenlearner_torch.cli_common."""
    tree = ast.parse((ROOT / "parity" / "train.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "cli" not in imported and "tokenlearner_torch.cli_common" in imported
    for path in ("parity/cli.py", "weights_convert/cli.py", "src/tokenlearner_torch/viz/cli.py"):
        text = (ROOT / path).read_text()
        assert "cli_common import" in text and "class UsageError" not in text and "EXIT_OK, EXIT_FAIL" not in text


def test_strict_error_is_a_one_line_usage_error_for_clis():
    with pytest.raises(ConfigError) as err:
        _check_experiment({"lr_configs": {"base_learning_rate": 1.0, "warmup_step": 3}, "batch_sise": 2}, strict=True)
    text = str(err.value)
    assert "\n" not in text and "'batch_sise'" in text and "'lr_configs.warmup_steps'" in text
