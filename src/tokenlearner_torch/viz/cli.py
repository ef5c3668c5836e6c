"""``tokenlearner-viz``: the maps of every TokenLearner / TokenFuser of a model, drawn over its input.

  tokenlearner-viz MODEL_FOLDER IMAGE... -o maps.png --normalize imagenet [--resize]
  tokenlearner-viz CASE_DIR -o maps.png                 a case folder's own inputs.npz
  tokenlearner-viz MODEL_FOLDER inputs.npy -o maps.png  model-ready arrays, used as they are

MODEL_FOLDER: a folder written by tokenlearner-convert (model.safetensors + config.json), or a case folder
(config.json + checkpoint/ or params.msgpack, as tests/fixtures/goldens/*). The model must take images or
videos (TokenLearnerViT, TokenLearnerViTRepresentation).

Inputs: image files (png, jpg, ... through Pillow; for a video model, the frames of one video in order),
or one .npy/.npz holding the model's input ([B, H, W, 3] / [B, T, H, W, 3], or without B), used as is.
Image files are never resized or normalised silently: --normalize is required and a size other than the
model's needs --resize. What was done is printed.

Exit status: 0 written, 2 usage or input error (nothing written), 1 failure (nothing written).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..cli_common import (
    EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Parser, UsageError, help_exit_status, print_error,
)  # fmt: skip

PROG = "tokenlearner-viz"
IMAGE_CLASSES = ("TokenLearnerViT", "TokenLearnerViTRepresentation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")

# The normalisations of Scenic's input pipelines, applied to 0..255 RGB pixels. The one choice that
# changes numbers lives here.
NORMALIZATIONS = {
    # scenic/dataset_lib/imagenet_dataset.py (dataset 'imagenet', used by the TokenLearner ImageNet config):
    # (pixel - 255 * mean) / (255 * std), per RGB channel.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # scenic/projects/vivit/data/video_tfrecord_dataset.py, zero_centering=True (its default): [-1, 1].
    "zero_centered": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # the same with zero_centering=False: [0, 1].
    "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}
NORMALIZATION_TEXT = {
    "imagenet": "(x/255 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225) (Scenic's 'imagenet' dataset)",
    "zero_centered": "x/127.5 - 1, in [-1, 1] (Scenic's video datasets, zero_centering=True)",
    "unit": "x/255, in [0, 1] (Scenic's video datasets, zero_centering=False)",
}


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", metavar="MODEL_FOLDER", help="converted folder or case folder")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image files, or one .npy/.npz (default: the case folder's inputs.npz)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.png", help="the PNG to write")
    p.add_argument("--normalize", choices=tuple(NORMALIZATIONS), metavar="{" + ",".join(NORMALIZATIONS) + "}",
                   help="required for image files: " + "; ".join(f"{k}: {v}" for k, v in NORMALIZATION_TEXT.items()))
    p.add_argument("--resize", nargs="?", const="model", metavar="HxW",
                   help="resize image files (bicubic, whole image) to the model's size (square patch grid), "
                        "or to HxW")
    p.add_argument("--examples", type=int, default=4, metavar="K",
                   help="draw the first K examples of the batch (default 4)")
    p.add_argument("--dpi", type=int, default=80, help="resolution of the PNG (default 80)")
    return p


# ---------------------------------------------------------------------------------------------------------
# The model


def _short(scenic_class: str) -> str:
    return scenic_class.rsplit(".", 1)[-1]


def load_model(folder: Path) -> tuple[Any, dict[str, Any], Optional[Path]]:
    """``(model in eval mode, config, case folder or None)`` from a converted folder or a case folder."""
    import tokenlearner_torch as tl

    if not folder.exists():
        raise UsageError(f"{folder}: no such folder (expected a converted folder or a case folder)")
    if not folder.is_dir():
        raise UsageError(f"{folder}: is a file; MODEL_FOLDER is a converted folder or a case folder")
    if (folder / "model.safetensors").is_file():
        from tokenlearner_torch.weights_convert.pretrained import read_folder_config

        return tl.load_pretrained(folder), read_folder_config(folder), None
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: neither model.safetensors nor config.json (expected a converted folder "
                         "or a case folder)")
    from tokenlearner_torch.parity.cases import load_json, load_params
    from tokenlearner_torch.weights_convert import flax_to_torch

    config = load_json(folder / "config.json")
    if not isinstance(config.get("scenic_class"), str) or not isinstance(config.get("constructor_kwargs"), dict):
        raise UsageError(f"{folder / 'config.json'}: expected 'scenic_class' and 'constructor_kwargs'")
    model = tl.from_scenic(config["scenic_class"], config["constructor_kwargs"])
    params, _ = load_params(folder)
    model.load_state_dict(flax_to_torch(model, params), strict=True)
    return model.eval(), config, folder


def _tokenizer(config: dict[str, Any]) -> dict[str, Any]:
    return dict(config["constructor_kwargs"].get("tokenizer") or {})


def _patch(config: dict[str, Any]) -> tuple[int, int]:
    size = (_tokenizer(config).get("patches") or {}).get("size")
    return int(size[0]), int(size[1])


def _video_method(model: Any, config: dict[str, Any]) -> Optional[str]:
    if _short(config["scenic_class"]) == "TokenLearnerViTRepresentation":
        return "frames"  # every frame embedded on its own
    tok = _tokenizer(config)
    if tok.get("type") != "video":
        return None
    return (tok.get("temporal_encoding_config") or {}).get("method")


def token_frames(method: Optional[str], config: dict[str, Any], n_frames: int) -> list[list[int]]:
    """The input frames behind each token frame (Scenic's folding): tubelets, sampled frames, or each."""
    if method == "3d_conv":
        ft = int(_tokenizer(config)["patches"]["size"][2])
        return [list(range(k * ft, (k + 1) * ft)) for k in range(n_frames // ft)]
    if method == "temporal_sampling":
        from tokenlearner_torch.models import sampled_frame_indices

        n = int(_tokenizer(config)["temporal_encoding_config"]["n_sampled_frames"])
        return [[int(i)] for i in sampled_frame_indices(n_frames, n)]
    return [[k] for k in range(n_frames)]


def expected_frame_size(model: Any, config: dict[str, Any], n_frames: int) -> tuple[Optional[tuple[int, int]], int]:
    """``(square frame size or None, patches per frame)`` that the position embedding fixes."""
    positions = int(model.Transformer.posembed_input.pos_embedding.shape[1])
    method = _video_method(model, config)
    t = len(token_frames(method, config, n_frames)) if method else 1
    per_frame = positions // max(t, 1)
    g = math.isqrt(per_frame)
    fh, fw = _patch(config)
    return ((g * fh, g * fw) if g * g == per_frame and t else None), per_frame


def frames_needed(model: Any, config: dict[str, Any], h: int, w: int) -> Optional[tuple[int, bool, str]]:
    """``(frames, at_least, why)`` a video model takes at frames of ``h`` x ``w``, or None if no count fits.

    The position embedding fixes the tokens: token frames x patches per frame. ``at_least``: frame sampling
    takes any clip of ``n_sampled_frames`` frames or more."""
    positions = int(model.Transformer.posembed_input.pos_embedding.shape[1])
    fh, fw = _patch(config)
    per_frame = (h // fh) * (w // fw)
    if per_frame == 0 or positions % per_frame:
        return None
    t = positions // per_frame
    method = _video_method(model, config)
    grid = f"{per_frame} patches of {fh}x{fw}"
    if method == "3d_conv":
        ft = int(_tokenizer(config)["patches"]["size"][2])
        return t * ft, False, f"{positions} positions = {t} tubelets of {ft} frames (patches.size[2]) x {grid}"
    if method == "temporal_sampling":
        n = int(_tokenizer(config)["temporal_encoding_config"]["n_sampled_frames"])
        if t != n:
            return None
        return n, True, f"{positions} positions = {n} sampled frames (n_sampled_frames) x {grid}"
    return t, False, f"{positions} positions = {t} frames x {grid}"


def _frames_text(n: int) -> str:
    return f"{n} frame" + ("" if n == 1 else "s")


def check_frame_count(n_frames: int, hw: Optional[tuple[int, int]], model: Any, config: dict[str, Any]) -> None:
    """UsageError naming the frame count unless ``n_frames`` frames (of ``hw``; None: any square size, as
    ``--resize`` makes them) give the tokens the video model's position embedding was made for."""
    fh, fw = _patch(config)
    if hw is not None:
        need = frames_needed(model, config, *hw)
        if need is None:
            return  # no frame count fits this size: check_fits names the size
        k, at_least, why = need
        if n_frames == k or (at_least and n_frames > k):
            return
        raise UsageError(f"{_frames_text(n_frames)} given; with frames of {hw[0]}x{hw[1]} the model takes "
                         f"{_frames_text(k)}{' or more' if at_least else ''} ({why})")
    square, _ = expected_frame_size(model, config, n_frames)
    if square is not None:
        return
    positions = int(model.Transformer.posembed_input.pos_embedding.shape[1])
    fits = []  # the (frames, square size) pairs the position embedding allows
    for t in range(1, positions + 1):
        g = math.isqrt(positions // t)
        if positions % t == 0 and g * g == positions // t:
            need = frames_needed(model, config, g * fh, g * fw)
            if need is not None:
                fits.append(f"{_frames_text(need[0])}{' or more' if need[1] else ''} of {g * fh}x{g * fw}")
    raise UsageError(f"{_frames_text(n_frames)} given; the model takes " + (" or ".join(fits[:3]) or "another count")
                     + f" ({positions} positions of {fh}x{fw} patches)")


# ---------------------------------------------------------------------------------------------------------
# The inputs


# What converting a Pillow image mode to RGB does, said on stderr (never silently).
_CONVERSIONS = {
    "L": "grayscale copied to R, G and B",
    "LA": "grayscale copied to R, G and B; the alpha channel dropped (not composited)",
    "RGBA": "the alpha channel dropped (not composited)",
    "P": "palette colours looked up",
    "PA": "palette colours looked up; the alpha channel dropped (not composited)",
    "CMYK": "CMYK converted by Pillow's formula (no colour profile)",
    "1": "black and white to 0 / 255",
}


def _read_image(path: Path) -> np.ndarray:
    """An image file as [H, W, 3] uint8 RGB; any other mode is converted, and the conversion said on stderr."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            mode = im.mode
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise UsageError(f"{path}: cannot read as an image ({exc})") from None
    if mode != "RGB":
        what = _CONVERSIONS.get(mode, "Pillow's conversion")
        print(f"{PROG}: note: {path}: converted {mode} to RGB ({what})", file=sys.stderr)
    return rgb


def _resize(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.Resampling.BICUBIC))


def _parse_hw(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
        if h <= 0 or w <= 0:
            raise ValueError
    except ValueError:
        raise UsageError(f"--resize {text!r}: expected HxW, e.g. 224x224") from None
    return h, w


def check_fits(what: Any, h: int, w: int, model: Any, config: dict[str, Any], n_frames: int, hint: str = "") -> None:
    """UsageError unless frames of ``h`` x ``w`` give the patches the position embedding was made for."""
    square, per_frame = expected_frame_size(model, config, n_frames)
    fh, fw = _patch(config)
    if (h // fh) * (w // fw) != per_frame:
        want = f"{square[0]}x{square[1]}" if square else f"(H/{fh})*(W/{fw}) = {per_frame} patches"
        raise UsageError(f"{what}: {h}x{w} (HxW) does not fit the model, which expects {want} "
                         f"({per_frame} patches of {fh}x{fw} per frame){hint}")


def images_to_input(paths: list[Path], args: argparse.Namespace, model: Any, config: dict[str, Any],
                    video: bool, say) -> tuple[np.ndarray, np.ndarray]:
    """``(model input, display frames in [0, 1])`` from image files, printing every step."""
    if args.normalize is None:
        raise UsageError("image files need --normalize, the normalisation the model was trained with: "
                         + "; ".join(f"{k} = {v}" for k, v in NORMALIZATION_TEXT.items()))
    imgs = [_read_image(p) for p in paths]
    n_frames = len(imgs) if video else 1
    if video:  # the frame count first: with a wrong one, no frame size fits
        given = None if args.resize == "model" else (_parse_hw(args.resize) if args.resize else imgs[0].shape[:2])
        check_frame_count(n_frames, given, model, config)
    square, per_frame = expected_frame_size(model, config, n_frames)
    fh, fw = _patch(config)
    if args.resize is not None:
        target = square if args.resize == "model" else _parse_hw(args.resize)
        if target is None:
            raise UsageError(f"the model's {per_frame} patches per frame are not a square grid: give --resize HxW")
    for p, img in zip(paths, imgs):
        h, w = img.shape[:2]
        say(f"read {p}: {h}x{w} (HxW) RGB")
    out = []
    for p, img in zip(paths, imgs):
        h, w = img.shape[:2]
        if args.resize is not None and (h, w) != target:
            img = _resize(img, target)
            say(f"resized {p.name}: {h}x{w} -> {target[0]}x{target[1]} (HxW; bicubic, whole image, no crop)")
            h, w = target
        check_fits(p, h, w, model, config, n_frames, hint="; pass --resize")
        out.append(img)
    if len({im.shape for im in out}) > 1:
        raise UsageError("the images differ in size after preprocessing: " +
                         ", ".join(f"{p.name} {im.shape[0]}x{im.shape[1]}" for p, im in zip(paths, out)))
    pixels = np.stack(out).astype(np.float32)  # [N, H, W, 3], 0..255
    mean, std = (np.asarray(v, np.float32) * 255 for v in NORMALIZATIONS[args.normalize])
    x = (pixels - mean) / std
    say(f"normalised: {NORMALIZATION_TEXT[args.normalize]}")
    display = pixels / 255.0
    if video:
        return x[None], display[None]  # one video: [1, T, H, W, 3]
    return x, display[:, None]


def _minmax(x: np.ndarray) -> np.ndarray:
    lo = x.min(axis=tuple(range(1, x.ndim)), keepdims=True)
    hi = x.max(axis=tuple(range(1, x.ndim)), keepdims=True)
    return (x - lo) / np.where(hi > lo, hi - lo, 1.0)


def array_input(path: Path, name: str, video: bool, say, either: bool = False) -> np.ndarray:
    """The model input from a .npy or .npz (key ``name``, or its only array), used as it is.

    ``either``: the model takes images and videos alike (TokenLearnerViTRepresentation): a 5-D array is a
    batch of videos, a 4-D one a batch of images."""
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                keys = [k for k in data.files if k != "cotangent"]
                key = name if name in keys else (keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise UsageError(f"{path}: no array '{name}' (has {', '.join(data.files) or 'none'})")
                x = np.asarray(data[key])
                say(f"read {path}['{key}']: shape {list(x.shape)} {x.dtype}, used as is (no resize, no normalisation)")
        else:
            x = np.load(path, allow_pickle=False)
            say(f"read {path}: shape {list(x.shape)} {x.dtype}, used as is (no resize, no normalisation)")
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    if either:
        video = x.ndim == 5
    rank = 5 if video else 4
    if x.ndim == rank - 1:
        x = x[None]
    if x.ndim != rank or x.shape[-1] != 3:
        layout = "[B, T, H, W, 3] or [T, H, W, 3]" if video else "[B, H, W, 3] or [H, W, 3]"
        raise UsageError(f"{path}: shape {list(x.shape)}; the model takes {layout} (channel-last RGB)")
    if not np.issubdtype(x.dtype, np.floating):
        raise UsageError(f"{path}: dtype {x.dtype}; expected the model's float input (already normalised)")
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, say) -> Path:
    import torch

    from tokenlearner_torch.viz import MAP_KINDS, map_modules, token_diversity, token_maps

    from .render import render_token_maps, require_matplotlib, save_figure_atomically

    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise UsageError(f"-o {out}: the output is a PNG file (name it *.png)")
    if not out.parent.is_dir():
        raise UsageError(f"-o {out}: the folder {out.parent} does not exist")
    if args.examples < 1:
        raise UsageError(f"--examples {args.examples}: must be >= 1")
    paths = [Path(p) for p in args.inputs]
    for p in paths:
        if not p.is_file():
            raise UsageError(f"{p}: no such file")
    require_matplotlib()

    model, config, case = load_model(Path(args.model))
    cls = _short(config["scenic_class"])
    if not map_modules(model):
        raise UsageError(f"{args.model}: the {cls} has no TokenLearner or TokenFuser (tokenizer type "
                         f"{_tokenizer(config).get('type')!r}): there are no token maps to draw")
    if cls not in IMAGE_CLASSES:
        raise UsageError(f"{args.model}: {cls} takes tokens, not images; tokenlearner-viz draws models that take "
                         f"images or videos ({', '.join(IMAGE_CLASSES)}); use tokenlearner_torch.viz.token_maps")
    method = _video_method(model, config)
    video = method is not None and method != "frames"

    arrays = [p for p in paths if p.suffix.lower() in (".npy", ".npz")]
    images = [p for p in paths if p.suffix.lower() in IMAGE_SUFFIXES]
    other = [p for p in paths if p not in arrays and p not in images]
    if other:
        raise UsageError(f"{other[0]}: unknown input type (expected an image file: "
                         f"{', '.join(IMAGE_SUFFIXES)}; or .npy/.npz)")
    if arrays and (images or len(arrays) > 1):
        raise UsageError("give either image files or one .npy/.npz, not both")
    if not images and (args.normalize or args.resize):
        raise UsageError("--normalize/--resize apply to image files; arrays are used as they are")
    if images:
        x, display = images_to_input(images, args, model, config, video, say)
    else:
        if not arrays:
            if case is None or not (case / "inputs.npz").is_file():
                raise UsageError(f"{args.model}: no inputs given and no case inputs.npz there: pass image files "
                                 "or a .npy/.npz")
            arrays = [case / "inputs.npz"]
        x = array_input(arrays[0], "x", video, say, either=cls == "TokenLearnerViTRepresentation")
        check_fits(arrays[0], x.shape[-3], x.shape[-2], model, config, x.shape[1] if x.ndim == 5 else 1)
        display = _minmax(x) if x.ndim == 5 else _minmax(x)[:, None]
        say("display: each example min-max scaled to [0, 1] (its values, not pixels)")

    if x.shape[0] > args.examples:
        say(f"drawing examples 0-{args.examples - 1} of {x.shape[0]} (--examples to change)")
        x, display = x[: args.examples], display[: args.examples]
    maps = token_maps(model, torch.from_numpy(x))
    div = token_diversity(maps)
    n_frames = display.shape[1]
    groups = token_frames(method, config, n_frames) if x.ndim == 5 else [[0]]
    backgrounds = np.stack([display[:, g].mean(axis=1) for g in groups], axis=1)  # [B, T', H, W, 3]
    fh, fw = _patch(config)
    drawn, labels = {}, {}
    modules = dict(map_modules(model))
    for path, m in maps.items():
        layout = maps.layout[path]
        arr = m.numpy()
        if "T" not in layout:
            arr = arr[:, None]
        if layout.endswith("N"):
            raise RuntimeError(f"{path}: the patch grid of its maps is unknown ({layout})")
        if arr.shape[1] != backgrounds.shape[1]:
            raise RuntimeError(f"{path}: {arr.shape[1]} token frames but {backgrounds.shape[1]} frame groups")
        drawn[path] = arr
        kind = MAP_KINDS[type(modules[path])]
        labels[path] = f"{path}\n{kind}\ntoken similarity (mean cos) {div[path].mean_cosine:.2f}"
        say(f"{path}: {kind}, maps {list(m.shape)} ({layout}), mean pairwise cosine similarity "
            f"{div[path].mean_cosine:.3f}")
    gh, gw = next(iter(drawn.values())).shape[-2:]
    backgrounds = backgrounds[:, :, : gh * fh, : gw * fw]  # the area the patch grid covers (VALID conv)
    titles = None
    if x.ndim == 5:
        titles = [f"frames {g[0]}-{g[-1]}" if len(g) > 1 else f"frame {g[0]}" for g in groups]
    title = f"{cls} from {args.model}: token maps (each row one colour scale)"
    fig = render_token_maps(backgrounds, drawn, labels, frame_titles=titles, title=title)
    try:
        save_figure_atomically(fig, out, args.dpi)
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    say(f"wrote {out}")
    return out


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:400]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 written, 2 usage or input error, 1 failure)."""
    from tokenlearner_torch.errors import TokenLearnerError

    try:
        args = _parser().parse_args(argv)
        run(args, print)
        return EXIT_OK
    except SystemExit as exc:  # --help
        return help_exit_status(exc)
    except (UsageError, TokenLearnerError) as exc:
        print_error(PROG, _one_line(exc))
        return EXIT_USAGE
    except ImportError as exc:
        print_error(PROG, _one_line(exc))
        return EXIT_FAIL
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - a failure, said in one line
        print_error(PROG, f"{type(exc).__name__}: {_one_line(exc)}")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
