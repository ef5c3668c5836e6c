"""Token maps drawn over their input: one PNG (needs the ``viz`` extra: matplotlib)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["render_token_maps", "save_figure_atomically", "require_matplotlib"]


def require_matplotlib():
    """matplotlib.pyplot on the Agg backend, or ImportError naming the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "drawing needs matplotlib: pip install 'tokenlearner-torch[viz]' (matplotlib, Pillow)"
        ) from None
    return plt


def save_figure_atomically(fig, path: str | os.PathLike[str], dpi: int) -> Path:
    """Write ``fig`` as PNG to ``path`` through a temporary file in the same folder, renamed into place:
    an interrupted or failed write leaves no partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png", dpi=dpi)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 is for the temporary name only
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def render_token_maps(
    frames: np.ndarray,
    maps: Mapping[str, np.ndarray],
    labels: Mapping[str, str],
    *,
    frame_titles: Optional[Sequence[str]] = None,
    title: str = "",
    panel_inches: float = 1.0,
):
    """A figure: per example, a row with the input frame(s), then one row per module.

    ``frames``: ``[B, T, H, W, 3]`` in [0, 1], the background of each token frame (``T = 1`` for images).
    ``maps``: ``{path: [B, T, S, h, w]}``; token ``s`` of frame ``t`` is drawn in column ``s * T + t``
    (a frame strip per token), upsampled to the frame by nearest neighbour (one cell per patch).
    ``labels``: the text beside each module's row. Each row shares one colour scale (its min..max).
    """
    plt = require_matplotlib()
    b, t = frames.shape[:2]
    s_max = max(m.shape[2] for m in maps.values())
    cols = s_max * t
    rows_per_example = 1 + len(maps)
    fig, axes = plt.subplots(
        b * rows_per_example, cols, figsize=(panel_inches * cols + 1.8, panel_inches * b * rows_per_example + 0.5),
        squeeze=False,
    )
    h, w = frames.shape[2:4]
    gray = frames.mean(axis=-1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.axis("off")
    for i in range(b):
        r0 = i * rows_per_example
        for ti in range(t):
            ax = axes[r0, ti]
            ax.axis("on")
            ax.imshow(frames[i, ti], interpolation="nearest")
            ax.set_title(frame_titles[ti] if frame_titles else ("input" if t == 1 else f"frame {ti}"), fontsize=7)
        axes[r0, 0].set_ylabel(f"example {i}", fontsize=7)
        for r, (path, m) in enumerate(maps.items(), start=1):
            lo, hi = float(m[i].min()), float(m[i].max())
            for si in range(m.shape[2]):
                for ti in range(t):
                    ax = axes[r0 + r, si * t + ti]
                    ax.axis("on")
                    ax.imshow(gray[i, ti], cmap="gray", vmin=0, vmax=1, extent=(0, w, h, 0))
                    ax.imshow(m[i, ti, si], cmap="inferno", alpha=0.6, vmin=lo, vmax=hi if hi > lo else lo + 1,
                              interpolation="nearest", extent=(0, w, h, 0))
                    if t > 1:  # a frame strip per token: every panel says which
                        ax.set_title(f"token {si}, t{ti}", fontsize=6)
                    elif r == 1:
                        ax.set_title(f"token {si}", fontsize=7)
            text = f"{labels.get(path, path)}\ncolours {lo:.2g} (dark) .. {hi:.2g} (light)"
            axes[r0 + r, 0].set_ylabel(text, fontsize=6, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return fig
