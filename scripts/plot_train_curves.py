"""Draw a training run's curves (TensorBoard's scalars panel, as a PNG) from the ``metrics.jsonl`` that
``tokenlearner-train`` / ``train()`` write in the workdir.

    python scripts/plot_train_curves.py /tmp/digits_run -o docs/images/train_curves.png

Panels: loss (train and valid), accuracy (train and valid; ``prec@1`` for sigmoid models), learning rate, and
the gradient norm after clipping (``l2_grads``). A step written twice (a resumed run repeats the steps after
its checkpoint) keeps its last value. Needs matplotlib (the ``viz`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PANELS = [
    ("loss", ["train_loss", "valid_loss"]),
    ("accuracy", ["train_accuracy", "valid_accuracy", "train_prec@1", "valid_prec@1"]),
    ("learning rate", ["learning_rate"]),
    ("gradient norm (l2_grads)", ["l2_grads"]),
]


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """``{name: {step: value}}`` from a metrics.jsonl (one JSON object per line with a ``step``)."""
    series: dict[str, dict[int, float]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            step = int(rec.pop("step"))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{n}: not a metrics record with a 'step' ({e})") from None
        for name, value in rec.items():
            if isinstance(value, (int, float)):
                series.setdefault(name, {})[step] = float(value)
    return series


def plot(series: dict[str, dict[int, float]], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (label, names) in zip(axes, PANELS):
        for name in names:
            if name in series:
                steps = sorted(series[name])
                ax.plot(steps, [series[name][s] for s in steps], marker="o" if name.startswith("valid") else None,
                        markersize=3, linewidth=1.5, label=name)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if label == "loss":
            ax.set_yscale("log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, out)  # complete or absent
    finally:
        plt.close(fig)
        if tmp.exists():
            tmp.unlink()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", help="the run's workdir (or its metrics.jsonl)")
    p.add_argument("-o", "--output", required=True, help="the PNG to write")
    p.add_argument("--title", default=None, help="figure title (default: the workdir)")
    args = p.parse_args(argv)
    src = Path(args.workdir)
    src = src / "metrics.jsonl" if src.is_dir() else src
    try:
        series = read_metrics(src)
        if not series:
            raise ValueError(f"{src}: no metrics")
        plot(series, Path(args.output), args.title or str(src.parent))
    except (OSError, ValueError, ImportError) as e:
        print(f"plot_train_curves: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
