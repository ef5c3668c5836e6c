"""Token maps (tokenlearner_torch.viz) against what the genuine-Scenic goldens imply, and the pictures."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import tokenlearner_torch as tl
from tokenlearner_torch.viz import token_diversity, token_maps
from tokenlearner_torch.weights_convert import flax_to_torch

from goldens import Golden

# The layout each golden's maps must come in: a structural fact of the case (the module's input, the ViT's
# patch grid, the video folding), and how many frames/grid to expect.
EXPECTED = {
    "v11_tokens3d": ("BSN", None, None),           # [2,196,64]: a sequence, the grid is not known
    "v11_tokens4d": ("BSHW", None, (7, 7)),       # its own [2,7,7,64] input
    "v1_sum4d": ("BSHW", None, (8, 8)),
    "v1_mean3d": ("BSHW", None, (8, 8)),          # v1 reshapes [B,64,C] to a square 8x8 grid
    "fuser_norm": ("BSN", None, None),
    "fuser_4d_original": ("BSHW", None, (7, 7)),  # original [2,7,7,64]
    "encoder_mod_image": ("BSN", None, None),
    "encoder_fuser_video_t2": ("BTSN", 2, None),  # temporal_dimensions=2 folds [2,98,C] to [4,49,C]
    "vit_image_cls": ("BSHW", None, (4, 4)),      # 32x32 image, 8x8 patches
    "vit_video_3dconv": ("BTSHW", 2, (4, 4)),     # 4 frames, tubelets of 2 -> 2 token frames
}


def _model(g: Golden) -> torch.nn.Module:
    model = tl.from_scenic(g.config["scenic_class"], g.config["constructor_kwargs"])
    model.load_state_dict(flax_to_torch(model, g.params), strict=True)
    return model


def _implied(g: Golden, key: str, layout: str, frames, grid) -> np.ndarray:
    """Scenic's map from the stored intermediate: softmax (V1.1) / sigmoid (v1, TokenFuser), our axes."""
    prefix = "" if key in ("TokenLearnerModuleV11", "TokenLearnerModule", "TokenFuser") else key + "/"
    if key.split("/")[-1].startswith("TokenLearnerModule") and "V11" not in key:
        conv = g.outputs[f"inter/{prefix}Conv_3"].astype(np.float64)  # [B', H, W, S] (Flax layout)
        maps = 1 / (1 + np.exp(-conv))
        maps = maps.reshape(maps.shape[0], -1, maps.shape[-1]).transpose(0, 2, 1)  # [B', S, N]
    else:
        logits = g.outputs[f"inter/{prefix}token_masking"].astype(np.float64)  # [B', N, S]
        if "TokenFuser" in key:
            maps = 1 / (1 + np.exp(-logits))
        else:
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            maps = e / e.sum(axis=1, keepdims=True)
        maps = maps.transpose(0, 2, 1)
    b = g.inputs[0].shape[0]
    if grid is not None:
        maps = maps.reshape(*maps.shape[:2], *grid)
    if frames is not None:
        maps = maps.reshape(b, frames, *maps.shape[1:])
    return maps


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_maps_equal_what_scenics_intermediates_imply(name):
    g = Golden(name)
    model = _model(g)
    inputs = [torch.from_numpy(x) for x in g.inputs]
    with torch.no_grad():
        plain = model(*inputs)
    maps = token_maps(model, *inputs)
    layout, frames, grid = EXPECTED[name]
    cls = g.config["scenic_class"].rsplit(".", 1)[-1]
    expected_keys = set()
    for k in g.outputs:
        for leaf in ("token_masking", "Conv_3"):
            if k == f"inter/{leaf}":
                expected_keys.add(cls)
            elif k.endswith(f"/{leaf}"):
                expected_keys.add(k[len("inter/") : -len(leaf) - 1])
    assert set(maps) == expected_keys, (set(maps), expected_keys)
    for key, m in maps.items():
        assert maps.layout[key] == layout, (key, maps.layout[key])
        ref = _implied(g, key, layout, frames, grid)
        assert tuple(m.shape) == ref.shape, (key, tuple(m.shape), ref.shape)
        err = np.abs(m.numpy().astype(np.float64) - ref).max()
        assert err <= 1e-5, (key, err)
    # hooks left nothing behind and changed nothing
    with torch.no_grad():
        again = model(*inputs)
    assert torch.equal(plain, again)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in model.modules())


# ---------------------------------------------------------------------------------------------------------
# Maps of the classes without a golden: v1 inside a ViT, TokenLearnerViTRepresentation, temporal sampling.


def _vit(tokenizer: dict, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return tl.TokenLearnerViT(num_classes=3, mlp_dim=32, num_layers=2, num_heads=2, tokenizer=tokenizer,
                              hidden_size=16, representation_size=None, **kw).eval()


def _masking_reference(model, x, path):
    """The map from the port's own recorded intermediates (capture_intermediates), for classes with no
    golden: softmax / sigmoid of the token_masking or Conv_3 output, [B', S, N]."""
    _, inter = tl.capture_intermediates(model, x)
    if "TokenLearnerModuleV11" in path:
        return torch.softmax(inter[f"{path}/token_masking"].transpose(1, 2), -1)
    if "TokenFuser" in path:
        return torch.sigmoid(inter[f"{path}/token_masking"].transpose(1, 2))
    conv = inter[f"{path}/Conv_3"]  # Flax layout [B', H, W, S]
    return torch.sigmoid(conv.flatten(1, 2).transpose(1, 2))


@pytest.mark.parametrize("case", ["v1_image_nonsquare", "representation_video", "temporal_sampling_fuser"])
def test_maps_of_other_classes(case):
    torch.manual_seed(1)
    if case == "v1_image_nonsquare":
        # v1 inside a ViT on a 2x8 patch grid: v1 reshapes its 16 tokens to a 4x4 square (Scenic), the map
        # is drawn on the true 2x8 grid (the same C-order positions).
        model = _vit({"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 3, "tokenlearner_loc": 1,
                      "use_tokenfuse": False, "use_v11": False})
        x = torch.randn(2, 8, 32, 3)
        layout, shape = "BSHW", (2, 3, 2, 8)
    elif case == "representation_video":
        torch.manual_seed(0)
        model = tl.TokenLearnerViTRepresentation(
            mlp_dim=32, num_layers=2, num_heads=2, hidden_size=16, target_channel_dim=16,
            tokenizer={"type": "video", "patches": {"size": [4, 4]}, "num_tokens": 3, "tokenlearner_loc": 1,
                       "use_tokenfuse": False}).eval()
        x = torch.randn(2, 3, 8, 12, 3)  # 3 frames, 2x3 patches each
        layout, shape = "BTSHW", (2, 3, 3, 2, 3)
    else:
        model = _vit({"type": "video", "patches": {"size": [4, 4]}, "num_tokens": 2, "tokenlearner_loc": 0,
                      "use_tokenfuse": True,
                      "temporal_encoding_config": {"method": "temporal_sampling", "n_sampled_frames": 2}})
        x = torch.randn(2, 5, 8, 8, 3)  # 2 of 5 frames sampled, 2x2 patches
        layout, shape = "BTSHW", (2, 2, 2, 2, 2)
    maps = token_maps(model, x)
    assert maps, case
    for path, m in maps.items():
        assert maps.layout[path] == layout and tuple(m.shape[:2]) == shape[:2] and tuple(m.shape[-3:]) == shape[-3:]
        ref = _masking_reference(model, x, path)  # [B*T, S, N]
        torch.testing.assert_close(m.reshape(ref.shape), ref, rtol=0, atol=1e-6)


def test_no_token_learner_is_an_error():
    model = _vit({"type": "patch", "patches": {"size": [8, 8]}, "use_tokenfuse": False})
    with pytest.raises(tl.ConfigError, match="no TokenLearnerModule"):
        token_maps(model, torch.randn(1, 16, 16, 3))


def test_diversity_shows_collapse():
    g = Golden("vit_image_cls")
    model = _model(g)
    x = torch.from_numpy(g.inputs[0])
    div = token_diversity(token_maps(model, x))["Transformer/TokenLearnerModuleV11_0"]
    assert len(div.per_token) == 8 and 0 < div.mean_cosine < 0.95
    assert div.mean_cosine == pytest.approx(np.mean(div.per_token))
    # Collapse: make every token's logits equal (the last Dense's columns equal) -> identical maps.
    tm = model.Transformer.TokenLearnerModuleV11_0.token_masking.Dense_1
    with torch.no_grad():
        tm.weight.copy_(tm.weight[:1].expand_as(tm.weight))
        tm.bias.fill_(0.0)
    collapsed = token_diversity(token_maps(model, x))["Transformer/TokenLearnerModuleV11_0"]
    assert collapsed.mean_cosine == pytest.approx(1.0, abs=1e-9)
    # Disjoint maps have similarity 0; a plain dict (no layout) is refused.
    from tokenlearner_torch.viz import TokenMaps

    disjoint = TokenMaps()
    disjoint["m"] = torch.eye(4).reshape(1, 4, 2, 2)
    disjoint.layout["m"] = "BSHW"
    assert token_diversity(disjoint)["m"].mean_cosine == 0.0
    with pytest.raises(TypeError):
        token_diversity({"m": torch.eye(4)[None]})


# ---------------------------------------------------------------------------------------------------------
# tokenlearner-viz


GOLDENS_DIR = Golden("vit_image_cls").dir.parent


def _viz(capsys, *argv) -> tuple[int, str, str]:
    from tokenlearner_torch.viz.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_png(path, min_size=(300, 200)):
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], im.size
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    assert pixels.std() > 10, pixels.std()  # not blank


def _no_leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_viz_image_case_writes_a_png(tmp_path, capsys):
    out = tmp_path / "maps.png"
    rc, stdout, err = _viz(capsys, GOLDENS_DIR / "vit_image_cls", "-o", out)
    assert rc == 0, err
    assert "used as is (no resize, no normalisation)" in stdout
    assert "Transformer/TokenLearnerModuleV11_0: softmax over positions" in stdout
    assert "mean pairwise cosine similarity" in stdout
    _assert_png(out, (600, 300))
    assert _no_leftovers(tmp_path) == ["maps.png"]


def test_viz_video_from_image_files(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    frames = []
    for i in range(4):  # the 4 frames the video golden takes, 40x48: resized to 32x32
        p = tmp_path / f"frame{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(p)
        frames.append(p)
    out = tmp_path / "video.png"
    case = GOLDENS_DIR / "vit_video_3dconv"
    rc, stdout, err = _viz(capsys, case, *frames, "-o", out, "--normalize", "zero_centered")
    assert rc == 2 and "does not fit the model, which expects 32x32" in err and "--resize" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()
    rc, stdout, err = _viz(capsys, case, *frames, "-o", out, "--normalize", "zero_centered", "--resize")
    assert rc == 0, err
    assert "resized frame0.png: 40x48 -> 32x32" in stdout and "x/127.5 - 1" in stdout
    assert stdout.count("BTSHW") == 4  # two TokenLearners, two TokenFusers
    _assert_png(out, (600, 400))


@pytest.mark.parametrize("frames, resize", [(1, None), (1, "model"), (2, "model"), (4, "16x16")])
def test_viz_video_wrong_frame_count_names_it(tmp_path, capsys, frames, resize):
    """The video golden takes 4 frames of 32x32 (32 positions = 2 tubelets of 2 frames x 4x4 patches of 8x8):
    a wrong frame count is named as such, with or without --resize (which used to fail differently)."""
    from PIL import Image

    paths = []
    for i in range(frames):
        paths.append(tmp_path / f"f{i}.png")
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(paths[-1])
    out = tmp_path / "o.png"
    extra = [] if resize is None else (["--resize"] if resize == "model" else ["--resize", resize])
    rc, stdout, err = _viz(capsys, GOLDENS_DIR / "vit_video_3dconv", *paths, "-o", out, "--normalize", "unit", *extra)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and not out.exists(), err
    plural = "frame" if frames == 1 else "frames"
    assert f"error: {frames} {plural} given; " in err, err
    if resize == "16x16":  # 16x16 frames: 4 patches each, so 8 tubelets = 16 frames
        assert "with frames of 16x16 the model takes 16 frames (32 positions = 8 tubelets of 2 frames" in err, err
    elif resize is None:
        assert ("with frames of 32x32 the model takes 4 frames (32 positions = 2 tubelets of 2 frames "
                "(patches.size[2]) x 16 patches of 8x8)") in err, err
    else:
        assert "the model takes 4 frames of 32x32 or 16 frames of 16x16" in err, err


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_viz_says_it_converted_an_image_to_rgb(tmp_path, capsys, mode):
    """Grayscale and RGBA images become RGB as Pillow converts them (gray copied to 3 channels; alpha dropped,
    not composited), and the command says so on stderr, naming the file and the mode."""
    from PIL import Image

    rng = np.random.default_rng(2)
    shape = (32, 32) if mode == "L" else (32, 32, 4)
    pix = rng.integers(0, 256, shape, dtype=np.uint8)
    path = tmp_path / f"{mode}.png"
    Image.fromarray(pix, mode).save(path)
    out = tmp_path / "maps.png"
    rc, stdout, err = _viz(capsys, GOLDENS_DIR / "vit_image_cls", path, "-o", out, "--normalize", "unit")
    assert rc == 0, err
    what = {"L": "grayscale copied to R, G and B", "RGBA": "the alpha channel dropped (not composited)"}[mode]
    assert err.strip() == f"tokenlearner-viz: note: {path}: converted {mode} to RGB ({what})", err
    from tokenlearner_torch.viz.cli import _read_image

    rgb = _read_image(path)
    expected = np.repeat(pix[..., None], 3, axis=-1) if mode == "L" else pix[..., :3]
    np.testing.assert_array_equal(rgb, expected)
    rgb_path = tmp_path / "rgb.png"  # an RGB file is read as it is, and nothing is said
    Image.fromarray(expected).save(rgb_path)
    capsys.readouterr()
    np.testing.assert_array_equal(_read_image(rgb_path), expected)
    assert capsys.readouterr().err == ""


def test_viz_preprocessing_is_scenics_imagenet_normalisation(tmp_path):
    import argparse

    from PIL import Image

    from tokenlearner_torch.viz.cli import images_to_input, load_model

    model, config, _ = load_model(Golden("vit_image_cls").dir)
    pix = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pix).save(tmp_path / "a.png")
    args = argparse.Namespace(normalize="imagenet", resize=None)
    x, display = images_to_input([tmp_path / "a.png"], args, model, config, False, lambda s: None)
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    np.testing.assert_allclose(x[0], (pix - mean) / std, rtol=1e-6, atol=1e-5)
    assert x.shape == (1, 32, 32, 3) and display.shape == (1, 1, 32, 32, 3)


def _converted_folder(tmp_path, tokenizer):
    """A folder as tokenlearner-convert writes it (model.safetensors + config.json)."""
    import json

    from safetensors.torch import save_file

    kwargs = dict(num_classes=3, mlp_dim=32, num_layers=2, num_heads=2, tokenizer=tokenizer, hidden_size=16,
                  representation_size=None)
    model = _vit(tokenizer)
    model(torch.randn(1, 16, 16, 3))  # shapes from the first input, as in Flax
    folder = tmp_path / "converted"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"scenic_class": "TokenLearnerViT", "constructor_kwargs": kwargs,
                                                    "format_version": 1}))
    return folder


def test_viz_converted_folder_and_npy(tmp_path, capsys):
    folder = _converted_folder(tmp_path, {"type": "dynamic", "patches": {"size": [4, 4]}, "num_tokens": 3,
                                          "tokenlearner_loc": 1, "use_tokenfuse": False})
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(0).standard_normal((16, 16, 3)).astype(np.float32))
    out = tmp_path / "maps.png"
    rc, stdout, err = _viz(capsys, folder, x, "-o", out)
    assert rc == 0, err
    assert "maps [1, 3, 4, 4] (BSHW)" in stdout
    _assert_png(out)


@pytest.mark.parametrize(
    "what",
    ["missing_image", "missing_model", "no_token_learner", "wrong_size_npy", "token_model", "no_normalize",
     "not_png", "not_an_image", "bad_resize"],
)
def test_viz_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, what):
    out = tmp_path / "out.png"
    image_case = GOLDENS_DIR / "vit_image_cls"
    png = tmp_path / "in.png"
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(png)
    argv, expect = {
        "missing_image": ([image_case, tmp_path / "nope.png", "-o", out], "no such file"),
        "missing_model": ([tmp_path / "no_model", "-o", out], "no such folder"),
        "wrong_size_npy": ([image_case, tmp_path / "x.npy", "-o", out], "48x48 (HxW) does not fit the model, which expects 32x32"),
        "token_model": ([GOLDENS_DIR / "fuser_norm", "-o", out], "takes tokens, not images"),
        "no_normalize": ([image_case, png, "-o", out], "need --normalize"),
        "not_png": ([image_case, "-o", tmp_path / "out.jpg"], "PNG"),
        "not_an_image": ([image_case, tmp_path / "bad.png", "-o", out, "--normalize", "unit"], "cannot read as an image"),
        "bad_resize": ([image_case, png, "-o", out, "--normalize", "unit", "--resize", "big"], "expected HxW"),
        "no_token_learner": (None, "no TokenLearner or TokenFuser"),
    }[what]
    if what == "wrong_size_npy":
        np.save(tmp_path / "x.npy", np.zeros((1, 48, 48, 3), np.float32))  # 36 patches, the model has 16
    if what == "not_an_image":
        (tmp_path / "bad.png").write_bytes(b"not a png")
    if what == "no_token_learner":
        folder = _converted_folder(tmp_path, {"type": "patch", "patches": {"size": [4, 4]}, "use_tokenfuse": False})
        argv = [folder, "-o", out]
    before = set(_no_leftovers(tmp_path))
    rc, stdout, err = _viz(capsys, *argv)
    assert rc == 2, (rc, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("tokenlearner-viz: error: "), err
    assert expect in err, err
    assert "Traceback" not in err
    assert set(_no_leftovers(tmp_path)) == before  # no output, no temporary file


def test_core_imports_without_plotting_libraries(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['matplotlib'] = None; sys.modules['PIL'] = None\n"
        "import torch, tokenlearner_torch as tl\n"
        "from tokenlearner_torch.viz import token_maps\n"
        "m = tl.TokenLearnerModuleV11(num_tokens=2).eval()\n"
        "print(tuple(token_maps(m, torch.randn(1, 3, 3, 8))['TokenLearnerModuleV11'].shape))\n"
        "from tokenlearner_torch.viz.cli import main\n"
        f"sys.exit(main(['{Golden('vit_image_cls').dir}', '-o', '{tmp_path / 'x.png'}']))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "(1, 2, 3, 3)", res.stderr
    assert res.returncode == 1 and "pip install 'tokenlearner-torch[viz]'" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------------
# tokenlearner-parity --plot


def _parity(capsys, *argv) -> tuple[int, str, str]:
    from tokenlearner_torch.parity.cli import main

    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_parity_plot_series_are_the_reports_numbers():
    from tokenlearner_torch.parity import check_case
    from tokenlearner_torch.parity.plot import module_series

    rep = check_case(GOLDENS_DIR / "vit_video_3dconv", tol=1e-6)  # tighter than float32 noise: some fail
    assert not rep.passed
    labels, series = module_series(rep)
    inter = [r for r in rep.rows if r.kind == "intermediate"]
    # one point per intermediate, in the report's (execution) order, with the report's scaled error
    assert [labels[x] for x, _, _ in series["intermediate"]] == [r.module for r in inter]
    assert [v for _, v, _ in series["intermediate"]] == [r.scaled for r in inter]
    assert [f for _, _, f in series["intermediate"]] == [not r.passed for r in inter]
    # gradients: the worst per module, structural zeros that pass left out (as Report.max_error does)
    grads = [r for r in rep.rows if r.kind == "gradient" and not (r.structural_zero and r.passed)]
    assert max(v for _, v, _ in series["gradient"]) == max(r.scaled for r in grads)
    assert series["output"] == [(len(labels) - 1, rep.rows[0].scaled, not rep.rows[0].passed)]
    assert rep.first_divergence.module in labels


def test_parity_check_plot(tmp_path, capsys):
    out = tmp_path / "parity.png"
    rc, stdout, err = _parity(capsys, "check", GOLDENS_DIR / "vit_image_cls", GOLDENS_DIR / "fuser_norm",
                              "-q", "--plot", out)
    assert rc == 0, err
    assert "wrote" not in stdout + err  # -q: the summary lines only
    _assert_png(out, (500, 500))  # two charts stacked
    rc, stdout, err = _parity(capsys, "check", GOLDENS_DIR / "vit_image_cls", "-q", "--tol", "1e-7", "--plot", out)
    assert rc == 1  # a parity failure still draws its chart
    _assert_png(out)
    assert _no_leftovers(tmp_path) == ["parity.png"]


@pytest.mark.parametrize("bad", ["chart.jpg", "missing_dir/chart.png"])
def test_parity_plot_bad_path_is_a_usage_error(tmp_path, capsys, bad):
    rc, stdout, err = _parity(capsys, "check", GOLDENS_DIR / "fuser_norm", "-q", "--plot", tmp_path / bad)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--plot" in err
    assert _no_leftovers(tmp_path) == [] and stdout == ""


def test_parity_live_plot(tmp_path, capsys):
    pytest.importorskip("jax")
    out = tmp_path / "live.png"
    rc, stdout, err = _parity(capsys, "live", GOLDENS_DIR / "fuser_norm", "--no-grads", "--plot", out)
    assert rc == 0, err
    assert f"wrote {out}" in err and "wrote" not in stdout  # a progress line, on stderr
    _assert_png(out)


def _doc_pictures():
    """{file: (its text, [docs/images/X.png shown in it])} for README.md and docs/*.md (docs/ files write
    ``images/X.png``, relative to themselves)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    found = {}
    for path in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = path.read_text()
        prefix = "docs/" if path.parent == root / "docs" else ""
        shown = [prefix + rel for rel in re.findall(r"!\[[^\]]*\]\(((?:docs/)?images/[^)]+\.png)\)", text)]
        found[path.relative_to(root).as_posix()] = (text, shown)
    return root, found


def test_readme_pictures_are_committed_small_and_not_blank():
    """Every picture of README.md and docs/*.md is committed, small, a real PNG, and the SAME file shows the
    command line that makes it (``-o docs/images/X.png`` or ``--plot docs/images/X.png``)."""
    root, found = _doc_pictures()
    assert len(found["README.md"][1]) >= 2, found["README.md"][1]
    assert len({rel for _, shown in found.values() for rel in shown}) >= 5
    for name, (text, shown) in found.items():
        for rel in shown:
            path = root / rel
            assert path.stat().st_size < 200_000, (rel, path.stat().st_size)
            _assert_png(path)
            assert f"-o {rel}" in text or f"--plot {rel}" in text, f"no command line in {name} makes {rel}"


def _readme_images_script():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "make_readme_images.py"
    spec = importlib.util.spec_from_file_location("make_readme_images", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


_NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def _same_record(today: str, recorded: str, factor: float = 3.0) -> bool:
    """The same text (verdicts, module names, shapes, counts) with each floating-point number within
    ``factor`` of the recorded one: float32 noise (1e-7..2e-6 here) moves with the CPU's rounding, a stale
    picture changes words, counts or orders of magnitude."""
    if _NUMBER.sub("#", today) != _NUMBER.sub("#", recorded):
        return False
    for a, b in zip(_NUMBER.findall(today), _NUMBER.findall(recorded)):
        if a == b:
            continue
        x, y = float(a), float(b)
        if "." not in a + b and "e" not in (a + b).lower():
            return False  # integers (counts, shapes, exit status) are exact
        if x == 0.0 or y == 0.0 or (x > 0) != (y > 0) or not (1 / factor <= x / y <= factor):
            return False
    return True


def test_same_record_rule():
    rec = "FAIL: 6 of 178 tensors; max 3.22e-06 at [0,1,75]; cosine 0.781\n(exit status 1)\n"
    assert _same_record(rec.replace("3.22e-06", "2.9e-06").replace("0.781", "0.78"), rec)
    assert not _same_record(rec.replace("FAIL", "PASS"), rec)
    assert not _same_record(rec.replace("178", "179"), rec)
    assert not _same_record(rec.replace("3.22e-06", "3.22e-04"), rec)
    assert not _same_record(rec.replace("75]", "76]"), rec)
    assert not _same_record(rec.replace("mlp1", "Dense_0"), rec.replace("tensors", "tensors mlp1"))


def test_readme_pictures_match_their_commands_today(tmp_path):
    """Every golden picture's command (docs/viz.md), re-run now (into a temporary folder), prints what its
    recorded output (docs/images/<name>.txt, written with the picture by scripts/make_readme_images.py) says:
    the numbers, verdicts and first diverging module the picture shows are today's. The file that shows the
    picture shows its command."""
    script = _readme_images_script()
    _, found = _doc_pictures()
    for picture in script.PICTURES:
        homes = [name for name, (text, shown) in found.items() if picture.png in shown and picture.command in text]
        assert homes, f"no file of README.md, docs/*.md shows both {picture.png} and {picture.command}"
        recorded = picture.record.read_text()
        today = script.run(picture, tmp_path / f"{picture.name}.png")
        assert _same_record(today, recorded), (
            f"{picture.png} no longer matches its command; run `python scripts/make_readme_images.py "
            f"{picture.name}` (records on {script.environment()})\n--- recorded\n{recorded}--- today\n{today}"
        )
        _assert_png(tmp_path / f"{picture.name}.png")


def test_viz_representation_video_npy(tmp_path, capsys):
    import json

    from safetensors.torch import save_file

    kwargs = dict(mlp_dim=32, num_layers=2, num_heads=2, hidden_size=16, target_channel_dim=16,
                  tokenizer={"type": "video", "patches": {"size": [4, 4]}, "num_tokens": 3, "tokenlearner_loc": 1,
                             "use_tokenfuse": True})
    torch.manual_seed(0)
    model = tl.TokenLearnerViTRepresentation(**kwargs).eval()
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 12, 3)).astype(np.float32)  # 3 frames of 2x3 patches
    model(torch.from_numpy(x))
    folder = tmp_path / "rep"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"scenic_class": "TokenLearnerViTRepresentation",
                                                    "constructor_kwargs": kwargs, "format_version": 1}))
    np.save(tmp_path / "clip.npy", x)  # [B, T, H, W, 3] (4-D would be a batch of images for this class)
    out = tmp_path / "rep.png"
    rc, stdout, err = _viz(capsys, folder, tmp_path / "clip.npy", "-o", out)
    assert rc == 0, err
    assert "maps [1, 3, 3, 2, 3] (BTSHW)" in stdout and stdout.count("BTSHW") == 2  # TokenLearner, TokenFuser
    _assert_png(out)


def test_a_failed_write_leaves_no_file(tmp_path):
    from tokenlearner_torch.viz.render import require_matplotlib, save_figure_atomically

    plt = require_matplotlib()
    fig = plt.figure()

    def broken(fh, **kw):
        fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    fig.savefig = broken
    with pytest.raises(OSError, match="disk full"):
        save_figure_atomically(fig, tmp_path / "out.png", 50)
    plt.close(fig)
    assert list(tmp_path.iterdir()) == []
