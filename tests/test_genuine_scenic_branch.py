"""The harness's "genuine Scenic when importable" branch, exercised with a Scenic-shaped package that the
test writes under tmp_path (Scenic itself is not installable from PyPI, so nothing else runs this branch).

The fake package has Scenic's real module layout, a fact read from google-research/scenic (no Scenic code
is copied): ``scenic/projects/token_learner/model.py`` defines TokenLearnerModule, TokenLearnerModuleV11,
TokenFuser, EncoderMod, EncoderModFuser, TokenLearnerViT and TokenLearnerViTRepresentation and imports
``scenic.model_lib.layers.attention_layers`` (MlpBlock), ``scenic.model_lib.layers.nn_layers`` and
``scenic.projects.baselines.vit`` (AddPositionEmbs, Encoder1DBlock) as modules; it defines none of the
latter classes itself. Each fake class is a distinct subclass of the project's Flax reference class, so
``type(module)`` proves which branch built it, and:

* the fake TokenFuser records its calls and multiplies its output by ``FUSER_SCALE``: with 2.0 the parity
  report must fail where the project's reference passes, proving the report's numbers came from the
  genuine branch, not only its label;
* the fake TokenLearnerViT reads its tokenizer the way Scenic does (``tokenizer.type``,
  ``tokenizer.patches.size``: attribute access on an ``ml_collections.ConfigDict``), so a tokenizer passed
  as a plain dict fails as it would in genuine Scenic.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator

import numpy as np
import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
ml_collections = pytest.importorskip("ml_collections")

from tokenlearner_torch.parity import api  # noqa: E402
from tokenlearner_torch.parity import flax_reference as fr  # noqa: E402
from tokenlearner_torch.parity import reference as R  # noqa: E402
from tokenlearner_torch.parity.cli import main  # noqa: E402
from tokenlearner_torch.parity.modes import get_mode  # noqa: E402

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"
FUSER_CASE = GOLDENS / "fuser_norm"  # genuine Scenic's TokenFuser(use_normalization=True, bottleneck_dim=64)

# Where each class lives in genuine Scenic (fact from its source tree; written here independently of
# parity/flax_reference.py's own table, so a wrong entry there fails this test).
SCENIC_LAYOUT = {
    "MlpBlock": "scenic.model_lib.layers.attention_layers",
    "AddPositionEmbs": "scenic.projects.baselines.vit",
    "Encoder1DBlock": "scenic.projects.baselines.vit",
    **{n: "scenic.projects.token_learner.model" for n in (
        "TokenLearnerModule", "TokenLearnerModuleV11", "TokenFuser", "EncoderMod", "EncoderModFuser",
        "TokenLearnerViT", "TokenLearnerViTRepresentation")},
}

# Minimal constructor kwargs per class (the required fields of Scenic's constructors).
TOKENIZER = {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 2, "tokenlearner_loc": 1,
             "use_tokenfuse": True, "use_v11": True}
KWARGS = {
    "MlpBlock": {"mlp_dim": 8},
    "AddPositionEmbs": {},
    "Encoder1DBlock": {"mlp_dim": 8, "num_heads": 2},
    "TokenLearnerModule": {"num_tokens": 2},
    "TokenLearnerModuleV11": {"num_tokens": 2},
    "TokenFuser": {},
    "EncoderMod": {"num_layers": 1, "mlp_dim": 8, "num_heads": 2},
    "EncoderModFuser": {"num_layers": 1, "mlp_dim": 8, "num_heads": 2},
    "TokenLearnerViT": {"num_classes": 3, "mlp_dim": 16, "num_layers": 2, "num_heads": 2, "tokenizer": TOKENIZER,
                        "hidden_size": 8, "representation_size": 4},
    "TokenLearnerViTRepresentation": {"mlp_dim": 16, "num_layers": 2, "num_heads": 2, "tokenizer": TOKENIZER,
                                      "hidden_size": 8, "target_channel_dim": 4},
}
TINY_VIT = {
    "scenic_class": "scenic.projects.token_learner.model.TokenLearnerViT",
    "constructor_kwargs": {**KWARGS["TokenLearnerViT"], "classifier": "gap", "dropout_rate": 0.0,
                           "attention_dropout_rate": 0.0},
    "inputs": [{"name": "x", "shape": [2, 8, 8, 3]}],
}

_HEADER = "from tokenlearner_torch.parity import flax_reference as _fr\n"
_FILES = {
    "scenic/__init__.py": "",
    "scenic/model_lib/__init__.py": "",
    "scenic/model_lib/layers/__init__.py": "",
    "scenic/model_lib/layers/attention_layers.py": _HEADER + "class MlpBlock(_fr.MlpBlock):\n    pass\n",
    "scenic/model_lib/layers/nn_layers.py": "",
    "scenic/projects/__init__.py": "",
    "scenic/projects/baselines/__init__.py": "",
    "scenic/projects/baselines/vit.py": _HEADER + textwrap.dedent("""
        class AddPositionEmbs(_fr.AddPositionEmbs):
            pass

        class Encoder1DBlock(_fr.Encoder1DBlock):
            pass
        """),
    "scenic/projects/token_learner/__init__.py": "",
    "scenic/projects/token_learner/model.py": _HEADER + textwrap.dedent("""
        from scenic.model_lib.layers import attention_layers  # noqa: F401 - Scenic's imports, as modules
        from scenic.model_lib.layers import nn_layers  # noqa: F401
        from scenic.projects.baselines import vit  # noqa: F401

        FUSER_SCALE = {scale!r}
        CALLS = []


        class TokenFuser(_fr.TokenFuser):
            def __call__(self, inputs, original, deterministic):
                CALLS.append("TokenFuser")
                return FUSER_SCALE * super().__call__(inputs, original, deterministic)


        class TokenLearnerViT(_fr.TokenLearnerViT):
            def __call__(self, x, *, train, debug=False):
                CALLS.append("TokenLearnerViT")
                # Scenic reads its tokenizer by attribute: a plain dict would raise here, as in Scenic.
                assert self.tokenizer.type and self.tokenizer.patches.size
                return super().__call__(x, train=train, debug=debug)


        class TokenLearnerModule(_fr.TokenLearnerModule):
            pass


        class TokenLearnerModuleV11(_fr.TokenLearnerModuleV11):
            pass


        class EncoderMod(_fr.EncoderMod):
            pass


        class EncoderModFuser(_fr.EncoderModFuser):
            pass


        class TokenLearnerViTRepresentation(_fr.TokenLearnerViTRepresentation):
            pass
        """),
}


def _forget() -> None:
    """Drop the cached availability answer in every loaded copy of flax_reference (the repo's `parity`
    package and the installed `tokenlearner_torch.parity` are distinct module objects of the same file)."""
    for name in ("tokenlearner_torch.parity.flax_reference", "parity.flax_reference"):
        module = sys.modules.get(name)
        if module is not None:
            module.forget_genuine_scenic()


@pytest.fixture
def scenic_sandbox(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Hide any installed Scenic for the test and remove every `scenic*` module it imported afterwards."""
    for name in [n for n in sys.modules if n == "scenic" or n.startswith("scenic.")]:
        monkeypatch.delitem(sys.modules, name)
    _forget()
    yield
    for name in [n for n in sys.modules if n == "scenic" or n.startswith("scenic.")]:
        del sys.modules[name]  # monkeypatch then restores what was there before
    _forget()


@pytest.fixture
def no_scenic(scenic_sandbox: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Scenic importable, even where one is installed (a None entry makes `import scenic` fail)."""
    monkeypatch.setitem(sys.modules, "scenic", None)


@pytest.fixture
def fake_scenic(scenic_sandbox: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Callable[..., ModuleType]:
    """``make(scale=1.0, broken=None)``: write the Scenic-shaped package, put it first on sys.path and
    return its ``token_learner.model`` (or, with ``broken``, a model.py that raises that error on import)."""

    def make(scale: float = 1.0, broken: str | None = None) -> ModuleType | None:
        root = tmp_path / "site"
        for rel, text in _FILES.items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text.replace("{scale!r}", repr(scale)))
        if broken:
            (root / "scenic/projects/token_learner/model.py").write_text(f"raise {broken}\n")
        monkeypatch.syspath_prepend(str(root))
        _forget()
        if broken:
            return None
        import importlib

        return importlib.import_module("scenic.projects.token_learner.model")

    return make


def _output_row(report: object) -> object:
    rows = [row for row in report.rows if row.kind == "output"]
    assert len(rows) == 1
    return rows[0]


def test_without_scenic_the_project_reference_is_used(no_scenic):
    assert not fr.genuine_scenic_available()
    assert fr.genuine_scenic_origin() is None
    assert fr.genuine_scenic_unavailable_reason() == ""  # no `scenic` at all: nothing to explain
    assert R.reference_name() == "project Flax reference (tokenlearner_torch.parity.flax_reference)"
    for name, kwargs in KWARGS.items():
        assert type(fr.build_reference_module(name, kwargs)) is fr._REFERENCE_CLASSES[name]
    report = api.live(FUSER_CASE, mode="f32", accuracy="off")
    assert report.passed, report.summary()
    assert report.reference == "live: project Flax reference (tokenlearner_torch.parity.flax_reference)"


def test_genuine_branch_builds_scenic_classes_from_their_modules(fake_scenic):
    model = fake_scenic()
    assert fr.genuine_scenic_available()
    assert fr.genuine_scenic_origin() == model.__file__
    assert fr.genuine_scenic_unavailable_reason() == ""
    assert R.reference_name() == f"genuine Scenic (scenic.projects.token_learner.model from {model.__file__})"
    for name, kwargs in KWARGS.items():
        module = fr.build_reference_module(f"scenic.projects.token_learner.model.{name}", kwargs)
        scenic_cls = getattr(sys.modules[SCENIC_LAYOUT[name]], name)
        assert type(module) is scenic_cls, name
        assert scenic_cls is not fr._REFERENCE_CLASSES[name]
        # `--scenic never` (prefer_genuine=False) keeps the project's class while Scenic is importable.
        assert type(fr.build_reference_module(name, kwargs, prefer_genuine=False)) is fr._REFERENCE_CLASSES[name]
    # Scenic's TokenLearnerViT takes an ml_collections.ConfigDict (nested ones too) and a jnp dtype.
    vit = R.reference_module("TokenLearnerViT", KWARGS["TokenLearnerViT"], get_mode("bf16"))
    assert isinstance(vit.tokenizer, ml_collections.ConfigDict)
    assert list(vit.tokenizer.patches.size) == [4, 4]
    assert np.dtype(vit.dtype) == np.dtype("bfloat16")
    assert R.reference_name(prefer_genuine=False).startswith("project Flax reference")
    with pytest.raises(ValueError, match="unknown Scenic class 'Nope'"):
        fr.build_reference_module("Nope", {})


def test_live_runs_genuine_scenic_and_says_so(fake_scenic):
    """A faithful fake: the golden (genuine Scenic's numbers) passes, the fake's classes did the work,
    and the report names the genuine reference and the file it came from."""
    model = fake_scenic()
    report = api.live(FUSER_CASE, mode="f32", accuracy="off")
    assert report.passed, report.summary()
    assert report.reference == f"live: genuine Scenic (scenic.projects.token_learner.model from {model.__file__})"
    assert "TokenFuser" in model.CALLS
    # TokenLearnerViT through the genuine branch: the tokenizer dict arrives as a ConfigDict.
    model.CALLS.clear()
    report = api.live(TINY_VIT, mode="f32", accuracy="off", grads=False)
    assert report.passed, report.summary()
    assert report.reference.startswith("live: genuine Scenic")
    assert "TokenLearnerViT" in model.CALLS  # traced by init (random weights) and by the run


def test_marked_fake_scenic_changes_the_numbers(fake_scenic, tmp_path):
    """The fake's TokenFuser doubles its output: the report against it must fail (its reference output is
    exactly twice genuine Scenic's golden output), and `--scenic never` must pass on the same case."""
    fake_scenic(scale=2.0)
    report = api.live(FUSER_CASE, mode="f32", accuracy="off", grads=False)
    assert not report.passed
    row = _output_row(report)
    assert row.verdict == "FAIL"
    golden = np.load(FUSER_CASE / "outputs.npz")["out"]
    # port == golden (to 1e-5) and ref == 2 * golden, so max|port - ref| == max|golden| up to that noise.
    assert row.max_abs == pytest.approx(float(np.abs(golden).max()), rel=1e-4)

    out = tmp_path / "report.json"
    assert main(["live", str(FUSER_CASE), "--scenic", "auto", "--no-grads", "--accuracy", "off", "-q",
                 "--json", str(out)]) == 1
    assert json.loads(out.read_text())["reports"][0]["reference"].startswith("live: genuine Scenic")
    assert main(["live", str(FUSER_CASE), "--scenic", "never", "--no-grads", "--accuracy", "off", "-q",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["reports"][0]["reference"].startswith("live: project Flax reference")


def test_f64_raises_the_genuine_mlpblock_dtype(fake_scenic):
    """f64 mode: Scenic's MlpBlock defaults to float32; inside float64_mlp_blocks the genuine class (the one
    Scenic's model.py reaches through `attention_layers.MlpBlock`) defaults to float64, and is restored."""
    fake_scenic()
    attention_layers = sys.modules["scenic.model_lib.layers.attention_layers"]
    base = attention_layers.MlpBlock
    assert np.dtype(base(mlp_dim=4).dtype) == np.dtype("float32")
    with R.float64_mlp_blocks():
        assert np.dtype(attention_layers.MlpBlock(mlp_dim=4).dtype) == np.dtype("float64")
        assert np.dtype(fr.MlpBlock(mlp_dim=4).dtype) == np.dtype("float64")
    assert attention_layers.MlpBlock is base
    with R.float64_mlp_blocks(prefer_genuine=False):
        assert attention_layers.MlpBlock is base


def test_a_scenic_that_fails_to_import_falls_back_and_says_why(fake_scenic):
    """A Scenic checkout whose model.py cannot import (genuine vit.py needs tensorflow) is not used, and
    the report says so instead of silently naming the project's reference."""
    fake_scenic(broken="ModuleNotFoundError(\"No module named 'tensorflow'\")")
    assert not fr.genuine_scenic_available()
    assert "No module named 'tensorflow'" in fr.genuine_scenic_unavailable_reason()
    assert R.reference_name() == ("project Flax reference (tokenlearner_torch.parity.flax_reference); genuine "
                                  "Scenic not importable: ModuleNotFoundError: No module named 'tensorflow'")
    assert type(fr.build_reference_module("TokenFuser", {})) is fr.TokenFuser
