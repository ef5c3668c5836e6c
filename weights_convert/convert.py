"""``convert(src, out, ...)``: a Scenic/Flax checkpoint to a PyTorch folder, what ``tokenlearner-convert`` runs."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from tokenlearner_torch.errors import ConfigError, ConversionError

from .layouts import flatten_tree
from .mismatch import ParamsMismatchError
from .writer import DTYPE_POLICIES, FORMAT_VERSION, StagedFolder, plan_from_flax

# This module imports no torch: `convert` reads the checkpoint and writes the weights while torch loads in
# another thread.
__all__ = ["convert", "ConversionReport", "DTYPE_POLICIES", "converter_version"]

# What the conversion needs once the weights are written: the model skeleton and the strict check (torch).
_TORCH_MODULES = ("tokenlearner_torch.weights_convert.export", "tokenlearner_torch.weights_convert.pretrained")


def converter_version() -> str:
    try:
        from importlib.metadata import version

        return f"tokenlearner-torch {version('tokenlearner-torch')}"
    except Exception:  # not installed as a distribution
        import tokenlearner_torch

        return f"tokenlearner-torch {getattr(tokenlearner_torch, '__version__', 'unknown')}"


class _ImportInBackground:
    """Import modules in a daemon thread; :meth:`wait` joins it and re-raises what the import raised.

    Importing torch takes 2-3 s on the machines the converter targets, about as long as reading a ViT-B/16
    checkpoint and writing its weights. Both run meanwhile (the sha256, numpy's copies and file writes release
    the GIL), which keeps the whole command within the time flax takes to restore the same file. The caller
    must have imported what it uses while the thread runs (numpy, the readers, the writer), so no import lock
    is shared with it.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if any(name not in sys.modules for name in names):
            self._thread = threading.Thread(target=self._run, args=(names,), name="tokenlearner-import", daemon=True)
            self._thread.start()

    def _run(self, names: Sequence[str]) -> None:
        # torch's import allocates millions of objects and triggers ~0.2 s of cyclic garbage collection that
        # finds nothing to free; the collector is paused for the import's duration only.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            for name in names:
                importlib.import_module(name)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self._error = exc
        finally:
            if paused:
                gc.enable()

    def wait(self) -> float:
        """Block until the imports are done; return the seconds spent waiting."""
        t0 = time.perf_counter()
        if self._thread is not None:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return time.perf_counter() - t0


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
    # When the tree does not fit the model: the complete lists (missing, unexpected, misshaped with the Flax
    # shapes found and expected) and the hints; the error message shows only the first entries.
    mismatch: dict[str, Any] | None = None

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
            parts = []
            order = ("checkpoint", "config", "--num-classes", "--set")
            for origin, names in sorted(by.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)):
                if origin == "checkpoint":
                    parts.append(f"{len(names)} inferred from the checkpoint's shapes")
                elif origin == "config":
                    parts.append(f"{len(names)} from the config")
                else:  # --set, --num-classes: name them
                    parts.append(f"{origin} {', '.join(names)}")
            lines.append(f"model:       {self.scenic_class.rsplit('.', 1)[-1]} (fields: {'; '.join(parts) or 'Scenic defaults'})")
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
    from .config import resolve_architecture
    from .readers import read_checkpoint_deferred

    rep = report if report is not None else ConversionReport()
    rep.source, rep.dtype_policy, rep.subtree = str(src), dtype, subtree
    rep.converter_version = converter_version()
    rep.nonfinite_allowed = allow_nonfinite
    if dtype not in DTYPE_POLICIES:
        raise ConfigError(f"dtype policy {dtype!r}; expected one of {', '.join(DTYPE_POLICIES)}")
    torch_ready = _ImportInBackground(_TORCH_MODULES)
    with StagedFolder(out, force=force) as staged, contextlib.ExitStack() as cleanup:
        t0 = time.perf_counter()
        # The source's sha256 may still be computing (a thread): it is only needed in the final metadata.
        params, info, digest, release = read_checkpoint_deferred(src, step=step, subtree=subtree)
        cleanup.callback(digest.close)
        rep.format, rep.layout, rep.step = info.format, info.layout, info.step
        rep.skipped = list(info.skipped)
        metadata = {
            "source_sha256": "0" * 64,  # the header keeps room for the real one
            "source_format": info.format,
            "source_layout": info.layout,
            "step": "" if info.step is None else info.step,
            "converter_version": rep.converter_version,
            "dtype_policy": dtype,
            "scenic_class": "",
            "source_name": Path(info.path).name,
            "subtree": subtree or "",
            "nonfinite_leaves": "0",
        }
        t1 = time.perf_counter()
        # Written from the Flax names alone while torch loads; checked against the real model below. Each leaf
        # is read once (NaN/Inf checked as it is written), then its source pages are released.
        early = plan_from_flax(flatten_tree(params), dtype) if isinstance(params, dict) else None
        if early is not None:
            staged.write_weights(early, metadata, release=release, check_nonfinite=True)
        t2 = time.perf_counter()
        waited = torch_ready.wait()
        from .export import plan_leaves
        from .pretrained import build_skeleton

        t3 = time.perf_counter()
        arch = resolve_architecture(params, config=config, sets=sets, num_classes=num_classes, scenic_class=scenic_class)
        rep.scenic_class, rep.constructor_kwargs = arch.scenic_class, arch.kwargs
        rep.field_sources, rep.ignored_config_fields = arch.sources, arch.ignored
        model = build_skeleton(arch.scenic_class, arch.kwargs)
        try:
            plan = plan_leaves(model, params, dtype=dtype, check_nonfinite=False)  # strict: raises on any misfit
        except ParamsMismatchError as exc:
            rep.mismatch = exc.to_dict()
            short = arch.scenic_class.rsplit(".", 1)[-1]
            if config is not None:
                title = f"{src}: does not fit the {short} of the config {config}" + (" with the set values" if sets else "")
                another = f"the config{' with the set values' if sets else ''} evidently describes another model"
            else:
                title, another = f"{src}: does not fit the {short} built from its shapes and the given fields", None
            raise exc.with_context(title, another) from None
        if early is not None and early.same_layout(plan):
            plan.nonfinite = early.nonfinite
        else:  # the early write read a name differently, or could not plan: write from the model's table
            staged.write_weights(plan, metadata, release=release, check_nonfinite=True)
        rep.flax_leaves_total = rep.flax_leaves_consumed = len(plan.leaves)
        rep.parameters, rep.parameter_bytes = plan.parameters, plan.nbytes
        rep.source_dtypes, rep.output_dtypes = plan.source_dtypes, plan.output_dtypes
        rep.nonfinite = plan.nonfinite
        if plan.nonfinite and not allow_nonfinite:
            shown = ", ".join(plan.nonfinite[:3]) + (f" and {len(plan.nonfinite) - 3} more" if len(plan.nonfinite) > 3 else "")
            raise ConversionError(f"{src}: NaN/Inf weights in {len(plan.nonfinite)} leaves ({shown}); pass --allow-nonfinite to convert anyway")
        t4 = time.perf_counter()
        rep.source_sha256 = info.source_sha256 = digest.hexdigest()
        metadata.update(source_sha256=info.source_sha256, scenic_class=arch.scenic_class, nonfinite_leaves=str(len(plan.nonfinite)))
        if not staged.set_metadata(metadata):  # outgrew the header's room: write the file again
            staged.write_weights(plan, metadata, release=release)
        staged.commit({"scenic_class": arch.scenic_class, "constructor_kwargs": dict(arch.kwargs), "format_version": FORMAT_VERSION})
        t5 = time.perf_counter()
    rep.output = str(out)
    rep.ok = True
    # "torch_import_wait" is start-up (torch still loading after the weights were written), not the
    # conversion's own work. "write" includes putting the leaves in torch layout and the NaN/Inf check, which
    # happen as they are written; "resolve" includes a rewrite if the early write did not match the model;
    # "finish" the source hash (if still running), metadata, config.json, fsync and rename.
    rep.seconds = {"read": t1 - t0, "write": t2 - t1, "torch_import_wait": waited, "resolve": t4 - t3, "finish": t5 - t4}
    return rep
