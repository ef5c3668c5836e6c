"""Hugging Face Hub: save_pretrained / from_pretrained / push_to_hub, offline, on the converter's folder format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

import tokenlearner_torch as tl
from tokenlearner_torch import folder, hub
from tokenlearner_torch.errors import ConfigError
from tokenlearner_torch.weights_convert import convert

from goldens import Golden

pytest.importorskip("huggingface_hub", reason="the hub extra: pip install 'tokenlearner-torch[hub]'")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().flatten().view(torch.uint8)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Same keys, dtypes, shapes and bytes."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), k


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A folder written by the converter (genuine Scenic checkpoint of the video 3d_conv ViT with fuser)."""
    g = Golden("vit_video_3dconv")
    out = tmp_path_factory.mktemp("hub") / "converted"
    assert convert(g.dir / "checkpoint", out, config=g.dir / "config.json").ok
    return out


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = Golden("vit_image_cls").config
    return tl.from_scenic(cfg["scenic_class"], cfg["constructor_kwargs"], input_shapes=[(32, 32, 3)])


def test_converter_folder_loads_through_from_pretrained(converted):
    g = Golden("vit_video_3dconv")
    model = tl.TokenLearnerViT.from_pretrained(converted)
    assert type(model) is tl.TokenLearnerViT and not model.training
    _state_equal(model, tl.load_pretrained(converted))
    with torch.no_grad():
        out = model(torch.from_numpy(g.inputs[0]))
    assert float((out - torch.from_numpy(g.outputs["out"])).abs().max()) < 1e-4
    assert type(hub.from_pretrained(converted)) is tl.TokenLearnerViT  # the module-level loader


def test_save_pretrained_is_the_converter_format(converted, tmp_path):
    model = tl.TokenLearnerViT.from_pretrained(converted)
    out = tmp_path / "saved"
    assert model.save_pretrained(out) is None
    assert {"model.safetensors", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    assert json.loads((out / "config.json").read_text()) == json.loads((converted / "config.json").read_text())
    again = tl.load_pretrained(out)  # the converter's loader reads it
    _state_equal(model, again)
    # back to Scenic from a save_pretrained folder, as from a converted one: bitwise
    from tokenlearner_torch.weights_convert import to_flax_checkpoint
    from tokenlearner_torch.weights_convert.readers import read_checkpoint
    from tokenlearner_torch.weights_convert.mapping import flatten_tree

    to_flax_checkpoint(out, tmp_path / "checkpoint_1", step=1)
    a, b = flatten_tree(read_checkpoint(tmp_path / "checkpoint_1")), flatten_tree(Golden("vit_video_3dconv").params)
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("name", ["v11_tokens3d", "fuser_4d_original", "v1_sum4d", "encoder_fuser_video_t2"])
def test_round_trip_every_kind_both_loaders(name, tmp_path):
    """Built from shapes, saved, loaded back by from_pretrained and load_pretrained: bitwise, same outputs."""
    g = Golden(name)
    torch.manual_seed(1)
    shapes = [tuple(x.shape[1:]) for x in g.inputs]
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"], input_shapes=shapes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no zero-initialised tensor left
    model.save_pretrained(tmp_path / "m")
    cls = type(model)
    for loaded in (cls.from_pretrained(tmp_path / "m"), tl.load_pretrained(tmp_path / "m")):
        assert type(loaded) is cls
        _state_equal(model, loaded)
        xs = [torch.from_numpy(x) for x in g.inputs]
        with torch.no_grad():
            assert torch.equal(model.eval()(*xs), loaded(*xs))


def test_bfloat16_model_round_trip(tmp_path):
    model = _vit().to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    loaded = tl.TokenLearnerViT.from_pretrained(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    _state_equal(model, loaded)


def test_reset_classifier_is_saved_and_a_changed_module_refused(tmp_path):
    """The folder describes the module as it is now: a new head (timm's reset_classifier) is saved with its
    class count; a module whose structure no longer matches its constructor arguments is refused."""
    model = _vit()
    model.reset_classifier(3)
    model.save_pretrained(tmp_path / "three")
    assert json.loads((tmp_path / "three" / "config.json").read_text())["constructor_kwargs"]["num_classes"] == 3
    _state_equal(model, tl.load_pretrained(tmp_path / "three"))
    model.reset_classifier(0)  # no head: not a Scenic TokenLearnerViT any more
    with pytest.raises(ConfigError, match="changed since construction.*output_projection"):
        model.save_pretrained(tmp_path / "headless")
    assert not (tmp_path / "headless").exists()


def test_errors(converted, tmp_path):
    with pytest.raises(ConfigError, match="holds a TokenLearnerViT, not a TokenFuser"):
        tl.TokenFuser.from_pretrained(converted)
    from tokenlearner_torch.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no such folder"):
        tl.TokenLearnerViT.from_pretrained(tmp_path / "missing", local_files_only=True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        tl.TokenLearnerViT.from_pretrained(tmp_path / "empty")
    lazy = tl.TokenLearnerModuleV11(num_tokens=4)
    with pytest.raises(ConfigError, match="input shapes"):
        lazy.save_pretrained(tmp_path / "lazy")
    cf = tl.TokenLearnerModuleV11(num_tokens=4, channels_first=True)
    cf(torch.randn(1, 8, 3, 3))
    with pytest.raises(ConfigError, match="channels_first"):
        cf.save_pretrained(tmp_path / "cf")
    assert not (tmp_path / "lazy" / "model.safetensors").exists() and not (tmp_path / "cf" / "model.safetensors").exists()


def _fake_hub(monkeypatch, repo_root: Path, calls: list):
    """huggingface_hub's network functions replaced by a local 'Hub' (repo_root/<user>/<name>/...)."""
    import huggingface_hub
    from huggingface_hub import hub_mixin

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("HfApi", token))

        def create_repo(self, repo_id, private=None, exist_ok=False):
            calls.append(("create_repo", repo_id, private))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()), kwargs["commit_message"]))
            shutil.copytree(folder_path, repo_root / repo_id, dirs_exist_ok=True)
            return f"https://huggingface.co/{repo_id}/commit/0"

    def fake_download(repo_id, filename, revision=None, cache_dir=None, **kwargs):
        calls.append(("hf_hub_download", repo_id, filename, revision))
        src = repo_root / repo_id / filename
        if not src.exists():
            raise huggingface_hub.errors.EntryNotFoundError(f"{repo_id}/{filename}")
        snap = Path(cache_dir) / repo_id.replace("/", "--") / (revision or "main")
        snap.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, snap / filename)
        return str(snap / filename)

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    monkeypatch.setattr(hub_mixin, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)


def test_push_to_hub_and_download_through_the_mixin(monkeypatch, tmp_path):
    """push_to_hub goes through PyTorchModelHubMixin (create_repo, one upload_folder of the saved folder);
    from_pretrained of a repo id downloads config.json and model.safetensors (huggingface_hub's network calls
    replaced by a local fake: no network in tests)."""
    calls: list = []
    _fake_hub(monkeypatch, tmp_path / "remote", calls)
    model = _vit()
    url = model.push_to_hub("someone/tl-vit", token="t0k", commit_message="first")
    assert url == "https://huggingface.co/someone/tl-vit/commit/0"
    assert ("create_repo", "someone/tl-vit", None) in calls
    upload = next(c for c in calls if c[0] == "upload_folder")
    assert upload[2] == ["README.md", "config.json", "model.safetensors"] and upload[3] == "first"
    card = (tmp_path / "remote" / "someone/tl-vit" / "README.md").read_text()
    assert "tokenlearner-torch" in card  # the mixin's model card with the library name
    calls.clear()
    loaded = tl.TokenLearnerViT.from_pretrained("someone/tl-vit", cache_dir=tmp_path / "cache", revision="v1")
    assert {c[2] for c in calls if c[0] == "hf_hub_download"} == {"config.json", "model.safetensors"}
    assert all(c[3] == "v1" for c in calls if c[0] == "hf_hub_download")
    _state_equal(model, loaded)
    # save_pretrained(push_to_hub=True) is the same path
    calls.clear()
    model.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/other")
    assert [c[0] for c in calls] == ["HfApi", "create_repo", "upload_folder"]


def test_without_huggingface_hub_one_line_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    monkeypatch.setattr(folder, "_ADAPTER", None)
    model = _vit()
    for call in (
        lambda: model.save_pretrained(tmp_path / "x"),
        lambda: model.push_to_hub("a/b"),
        lambda: tl.TokenLearnerViT.from_pretrained(tmp_path / "x"),
    ):
        with pytest.raises(ImportError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message and "tokenlearner-torch[hub]" in message and "huggingface_hub" in message
    assert not (tmp_path / "x").exists()
    # the folder format itself needs no Hub library: load_pretrained still reads converted folders
    from tokenlearner_torch.weights_convert.convert import convert as convert_folder

    g = Golden("vit_image_cls")
    convert_folder(g.dir / "checkpoint", tmp_path / "converted", config=g.dir / "config.json")
    loaded = tl.load_pretrained(tmp_path / "converted")
    with torch.no_grad():
        out = loaded(torch.from_numpy(g.inputs[0]))
    ref = torch.from_numpy(g.outputs["out"])  # genuine Scenic's output
    assert (out - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_the_mixin_loads_without_the_class_registry_module(converted, tmp_path):
    """HubMixin (on the ground floor) resolves a folder's class from the registry its subclasses fill, so in a
    fresh interpreter that imported only token_learner.py, TokenFuser.from_pretrained loads a converted
    genuine-Scenic TokenFuser and computes Scenic's stored output, without importing scenic.py, models.py,
    hub.py or weights_convert. A folder of a class not imported yet (the ViT) is another class: the same
    'holds a' error as ever from TokenFuser, and from HubMixin itself an error saying what to import."""
    g = Golden("fuser_4d_original")
    assert convert(g.dir / "params.msgpack", tmp_path / "fuser", config=g.dir / "config.json").ok
    np_inputs = tmp_path / "inputs.npz"
    shutil.copy(g.dir / "inputs.npz", np_inputs)
    code = f"""
import sys, numpy as np, torch
from tokenlearner_torch.conventions import HubMixin
from tokenlearner_torch.errors import CheckpointError, ConfigError
from tokenlearner_torch.token_learner import TokenFuser
model = TokenFuser.from_pretrained({str(tmp_path / "fuser")!r})
data = np.load({str(np_inputs)!r})
with torch.no_grad():
    out = model(*[torch.from_numpy(data[n]) for n in {g.input_names!r}])
np.save({str(tmp_path / "out.npy")!r}, out.numpy())
for call in (lambda: TokenFuser.from_pretrained({str(converted)!r}), lambda: HubMixin.from_pretrained({str(converted)!r})):
    try:
        call()
    except (CheckpointError, ConfigError) as exc:
        print(type(exc).__name__, exc)
print(sorted(m for m in ("tokenlearner_torch.scenic", "tokenlearner_torch.models", "tokenlearner_torch.hub",
                         "tokenlearner_torch.weights_convert") if m in sys.modules))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == (f"ConfigError {converted}: holds a TokenLearnerViT, not a TokenFuser (load it with "
                        "TokenLearnerViT.from_pretrained or tokenlearner_torch.from_pretrained)")  # fmt: skip
    assert lines[1].startswith(f"CheckpointError {converted / 'config.json'}: TokenLearnerViT's module is not "
                               "imported yet; import tokenlearner_torch.scenic")  # fmt: skip
    assert lines[2] == "[]"
    expected = g.outputs["out"]
    assert float(np.abs(np.load(tmp_path / "out.npy") - expected).max()) < 1e-5
