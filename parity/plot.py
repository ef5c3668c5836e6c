"""``tokenlearner-parity ... --plot FILE.png``: a parity report as a chart (needs the ``viz`` extra).

Per module along the execution order, on a log scale: the scaled error of its output (the intermediate),
the largest scaled error of its parameters' gradients, and at the end the model output; the tolerance as a
line; failing tensors in red; the first diverging module marked. The numbers are the report's
(:class:`~.compare.TensorResult`), nothing is recomputed.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from .compare import Report, TensorResult

__all__ = ["plot_reports", "module_series"]

# Exactly equal tensors (scaled error 0) sit on this floor, which a log axis can show.
ZERO_FLOOR = 1e-17


def _value(r: TensorResult) -> float:
    """The plotted error: the scaled one; a tensor the port did not produce or shaped differently is
    drawn at the top (inf)."""
    if r.verdict in ("MISSING", "SHAPE", "NONFINITE"):
        return math.inf
    return r.scaled


def _module_of_grad(module: str, order: list[str]) -> str:
    """The module a gradient row belongs to on the x axis: its own, or its nearest recorded ancestor."""
    path = module
    while path:
        if path in order:
            return path
        path = path.rsplit("/", 1)[0] if "/" in path else ""
    return module


def module_series(report: Report) -> tuple[list[str], dict[str, list[tuple[int, float, bool]]]]:
    """``(x labels, {kind: [(x, error, failed)]})`` from the report's rows, in execution order.

    x positions: one per intermediate (in the report's order, which is execution order), then any module
    that only has gradients, then the model output. Gradients: the worst row per module, structurally-zero
    gradients left out (judged on an absolute scale, see compare.py), as ``Report.max_error`` does.
    """
    order: list[str] = []
    inter: dict[str, TensorResult] = {}
    for r in report.rows:
        if r.kind == "intermediate" and r.module not in inter:
            inter[r.module] = r
            order.append(r.module)
    grads: dict[str, TensorResult] = {}
    for r in report.rows:
        if r.kind != "gradient" or (r.structural_zero and r.passed):
            continue
        key = _module_of_grad(r.module, order)
        best = grads.get(key)
        if best is None or (not r.passed, _value(r)) > (not best.passed, _value(best)):
            grads[key] = r
    for key in grads:
        if key not in order:
            order.append(key)
    pos = {m: i for i, m in enumerate(order)}
    series: dict[str, list[tuple[int, float, bool]]] = {
        "intermediate": [(pos[m], _value(r), not r.passed) for m, r in inter.items()],
        "gradient": [(pos[m], _value(r), not r.passed) for m, r in grads.items()],
        "output": [(len(order), _value(r), not r.passed) for r in report.rows if r.kind == "output"],
    }
    return order + ["(model output)"], series


def _short_label(path: str, keep: int = 38) -> str:
    """Tick labels: Scenic paths without the ``Transformer/`` prefix, long ones cut from the left."""
    if path.startswith("Transformer/"):
        path = path[len("Transformer/") :]
    path = path.replace("MultiHeadDotProductAttention", "MHDPA")
    return path if len(path) <= keep else "..." + path[-keep:]


def _draw(ax, report: Report) -> None:
    labels, series = module_series(report)
    finite = [v for pts in series.values() for _, v, _ in pts if math.isfinite(v) and v > 0]
    top = max(finite + [report.tol]) * 30
    has_zero = any(v <= 0 for pts in series.values() for _, v, _ in pts)
    bottom = ZERO_FLOOR / 3 if has_zero else min(finite + [report.tol]) / 30
    style = {
        "intermediate": dict(color="tab:blue", marker="o", label="module output (intermediate)"),
        "gradient": dict(color="tab:green", marker="s", label="gradients (worst parameter)"),
        "output": dict(color="tab:purple", marker="D", label="model output"),
    }
    for kind, pts in series.items():
        if not pts:
            continue
        pts = sorted(pts)
        xs = [x for x, _, _ in pts]
        ys = [min(max(v, ZERO_FLOOR), top) for _, v, _ in pts]
        st = style[kind]
        ax.plot(xs, ys, linestyle="-" if kind != "output" else "none", linewidth=0.8, markersize=3.5, **st)
        bad = [(x, y) for (x, _, f), y in zip(pts, ys) if f]
        if bad:
            ax.scatter([x for x, _ in bad], [y for _, y in bad], s=40, facecolors="none", edgecolors="red",
                       linewidths=1.2, zorder=5)
    ax.axhline(report.tol, color="red", linestyle="--", linewidth=1, label=f"tolerance {report.tol:g} ({report.mode})")
    if has_zero:
        ax.axhline(ZERO_FLOOR, color="gray", linestyle=":", linewidth=0.8, label="exactly equal (0)")
    first = report.first_divergence
    if first is not None:
        x = labels.index(first.module) if first.module in labels else len(labels) - 1
        ax.axvline(x, color="red", linewidth=1.2, alpha=0.6)
        right = x > 0.6 * len(labels)
        ax.annotate(f"first diverging: {first.module}", xy=(x, top / 3), xytext=(-4 if right else 4, 0),
                    textcoords="offset points", color="red", fontsize=7, ha="right" if right else "left",
                    va="top")
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_ylabel("scaled error  max|port-ref| / max(1, max|ref|)", fontsize=7)
    step = max(1, math.ceil(len(labels) / 70))
    ticks = list(range(0, len(labels), step))
    if ticks[-1] != len(labels) - 1:
        ticks.append(len(labels) - 1)
    ax.set_xticks(ticks)
    ax.set_xticklabels([_short_label(labels[i]) for i in ticks], rotation=90, fontsize=5)
    ax.set_xlim(-0.5, len(labels) - 0.5)
    verdict = "PASS" if report.passed else "FAIL"
    ax.set_title(f"{report.subject}: {verdict} (mode {report.mode}, {report.device}, reference: "
                 f"{report.reference.split(':')[0][:60]})", fontsize=8)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.legend(fontsize=6, loc="lower left", ncol=4, framealpha=0.8)


def plot_reports(reports: Sequence[Report], path: str | os.PathLike[str], *, dpi: int = 80) -> None:
    """One chart per report, stacked, written to ``path`` (PNG) atomically."""
    from tokenlearner_torch.viz.render import require_matplotlib, save_figure_atomically

    plt = require_matplotlib()
    if not reports:
        raise ValueError("no report to plot")
    width = min(18.0, max(7.0, 0.12 * max(len(module_series(r)[0]) for r in reports) + 2))
    fig, axes = plt.subplots(len(reports), 1, figsize=(width, 4.6 * len(reports)), squeeze=False)
    try:
        for ax, rep in zip(axes[:, 0], reports):
            _draw(ax, rep)
        fig.tight_layout()
        save_figure_atomically(fig, path, dpi)
    finally:
        plt.close(fig)
