"""``convert(src, out, ...)``: a Scenic/Flax checkpoint to a PyTorch folder, what ``tokenlearner-convert`` runs."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tokenlearner_torch.errors import ConversionError

from .config import resolve_architecture
from .export import DTYPE_POLICIES, convert_leaves, converter_version, write_folder
from .pretrained import build_skeleton

__all__ = ["convert", "ConversionReport"]


@dataclass
class ConversionReport:
    """What a conversion read, built, skipped and wrote (the CLI prints it; ``--report`` writes it as JSON)."""

    ok: bool = False
    source: str = ""
    output: str | None = None
    format: str | None = None
    layout: str | None = None
    step: int | None = None
    source_sha256: str | None = None
    subtree: str | None = None
    scenic_class: str | None = None
    constructor_kwargs: dict[str, Any] | None = None
    field_sources: dict[str, str] = field(default_factory=dict)
    ignored_config_fields: list[str] = field(default_factory=list)
    flax_leaves_total: int = 0
    flax_leaves_consumed: int = 0
    parameters: int = 0
    parameter_bytes: int = 0
    source_dtypes: list[str] = field(default_factory=list)
    output_dtypes: list[str] = field(default_factory=list)
    dtype_policy: str = "keep"
    skipped: list[str] = field(default_factory=list)
    nonfinite: list[str] = field(default_factory=list)
    nonfinite_allowed: bool = False
    converter_version: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The human-readable coverage summary."""
        lines = []
        where = f", subtree {self.subtree}" if self.subtree else ""
        sha = (self.source_sha256 or "")[:16]
        lines.append(f"source:      {self.source} ({self.format}, layout {self.layout}, step {self.step}{where}, sha256 {sha}...)")
        if self.scenic_class:
            by: dict[str, list[str]] = {}
            for name, origin in self.field_sources.items():
                by.setdefault(origin, []).append(name)
            origins = "; ".join(f"{k}: {len(v) if k == 'checkpoint' else ', '.join(v)}" for k, v in sorted(by.items()))
            lines.append(f"model:       {self.scenic_class.rsplit('.', 1)[-1]} (fields from {origins or 'defaults'})")
        if self.ignored_config_fields:
            lines.append(f"ignored:     config fields the class does not take: {', '.join(self.ignored_config_fields)}")
        pct = 100.0 * self.flax_leaves_consumed / self.flax_leaves_total if self.flax_leaves_total else 0.0
        lines.append(f"flax leaves: {self.flax_leaves_consumed}/{self.flax_leaves_total} consumed ({pct:.0f}%)")
        lines.append(
            f"parameters:  {self.parameters:,} ({_size(self.parameter_bytes)}; source {'/'.join(self.source_dtypes)} -> "
            f"{'/'.join(self.output_dtypes)}, dtype policy {self.dtype_policy})"
        )
        lines.append(f"skipped:     {', '.join(self.skipped) if self.skipped else 'nothing'} (not parameters; never decoded)")
        if self.nonfinite:
            shown = ", ".join(self.nonfinite[:5]) + (f", ... ({len(self.nonfinite)} leaves)" if len(self.nonfinite) > 5 else "")
            lines.append(f"NON-FINITE:  NaN/Inf in {shown}{' (allowed)' if self.nonfinite_allowed else ''}")
        else:
            lines.append("non-finite:  none")
        if self.ok and self.output:
            lines.append(f"wrote:       {self.output}/ (model.safetensors, config.json)")
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n} B"


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    config: str | os.PathLike[str] | None = None,
    sets: Sequence[str] = (),
    num_classes: int | None = None,
    scenic_class: str | None = None,
    subtree: str | None = None,
    step: int | None = None,
    dtype: str = "keep",
    force: bool = False,
    allow_nonfinite: bool = False,
    report: ConversionReport | None = None,
) -> ConversionReport:
    """Convert a Scenic/Flax checkpoint into ``out/`` (``model.safetensors`` + ``config.json``).

    The architecture comes from ``config`` (golden-style JSON or Scenic experiment config), ``sets``
    (``'key=value'``, dotted keys), ``num_classes`` and the parameter tree itself. Strict: any missing,
    unexpected or mis-shaped parameter, NaN/Inf weights (unless ``allow_nonfinite``) or an undetermined field
    raises a :class:`~tokenlearner_torch.errors.TokenLearnerError`, and nothing is written. Pass a
    :class:`ConversionReport` as ``report`` to see what was found even when it raises.
    """
    from .readers import read_checkpoint_info

    rep = report if report is not None else ConversionReport()
    rep.source, rep.dtype_policy, rep.subtree = str(src), dtype, subtree
    rep.converter_version = converter_version()
    rep.nonfinite_allowed = allow_nonfinite
    if dtype not in DTYPE_POLICIES:
        from tokenlearner_torch.errors import ConfigError

        raise ConfigError(f"dtype policy {dtype!r}; expected one of {', '.join(DTYPE_POLICIES)}")
    t0 = time.perf_counter()
    params, info = read_checkpoint_info(src, step=step, subtree=subtree)
    rep.format, rep.layout, rep.step = info.format, info.layout, info.step
    rep.source_sha256, rep.skipped = info.source_sha256, list(info.skipped)
    t1 = time.perf_counter()
    arch = resolve_architecture(params, config=config, sets=sets, num_classes=num_classes, scenic_class=scenic_class)
    rep.scenic_class, rep.constructor_kwargs = arch.scenic_class, arch.kwargs
    rep.field_sources, rep.ignored_config_fields = arch.sources, arch.ignored
    model = build_skeleton(arch.scenic_class, arch.kwargs)
    t2 = time.perf_counter()
    weights = convert_leaves(model, params, dtype=dtype)
    rep.flax_leaves_total, rep.flax_leaves_consumed = weights.leaves_total, weights.leaves_consumed
    rep.parameters, rep.parameter_bytes = weights.parameters, weights.nbytes
    rep.source_dtypes, rep.output_dtypes = weights.source_dtypes, weights.output_dtypes
    rep.nonfinite = weights.nonfinite
    if weights.nonfinite and not allow_nonfinite:
        shown = ", ".join(weights.nonfinite[:3]) + (f" and {len(weights.nonfinite) - 3} more" if len(weights.nonfinite) > 3 else "")
        raise ConversionError(f"{src}: NaN/Inf weights in {len(weights.nonfinite)} leaves ({shown}); pass --allow-nonfinite to convert anyway")
    t3 = time.perf_counter()
    metadata = {
        "source_sha256": info.source_sha256,
        "source_format": info.format,
        "source_layout": info.layout,
        "step": "" if info.step is None else info.step,
        "converter_version": rep.converter_version,
        "dtype_policy": dtype,
        "scenic_class": arch.scenic_class,
        "source_name": Path(info.path).name,
        "subtree": subtree or "",
        "nonfinite_leaves": str(len(weights.nonfinite)),
    }
    write_folder(out, weights.tensors, arch.scenic_class, arch.kwargs, metadata, force=force)
    t4 = time.perf_counter()
    rep.output = str(out)
    rep.ok = True
    rep.seconds = {"read": t1 - t0, "resolve": t2 - t1, "convert": t3 - t2, "write": t4 - t3}
    return rep
