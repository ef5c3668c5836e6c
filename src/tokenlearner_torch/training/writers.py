"""The training job's default summary writer: TensorBoard event files and ``metrics.jsonl`` in the workdir.

Any object with clu's ``write_scalars(step, {name: value})`` (and optionally ``flush()``/``close()``) can
replace it; this one writes each call as one JSON line ``{"step": step, name: value, ...}`` (appended, so a
resumed run continues the file) and, when the ``tensorboard`` package is importable (the ``train`` extra),
the same scalars through ``torch.utils.tensorboard``. Without it, it says so once and writes the JSONL only.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["MetricsWriter", "NullWriter"]

log = logging.getLogger(__name__)
_warned_no_tensorboard = False


class MetricsWriter:
    """``write_scalars(step, scalars)``, ``flush()``, ``close()``: ``<workdir>/metrics.jsonl`` + TensorBoard.

    ``tensorboard``: True (required: ImportError if missing), False (JSONL only) or None (if importable).
    """

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: Optional[bool] = None) -> None:
        global _warned_no_tensorboard
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.workdir / "metrics.jsonl"
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                if tensorboard:
                    raise
                if not _warned_no_tensorboard:
                    _warned_no_tensorboard = True
                    log.warning("the tensorboard package is not installed (pip install 'tokenlearner-torch[train]'): "
                                "writing %s only, no TensorBoard event files", self.jsonl_path)  # fmt: skip
            else:
                self._tb = SummaryWriter(log_dir=str(self.workdir))

    @property
    def has_tensorboard(self) -> bool:
        return self._tb is not None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        values = {str(k): float(v) for k, v in scalars.items()}
        # JSON has no NaN/inf: written as strings, so that a diverged metric is still visible.
        line = {"step": int(step), **{k: (v if math.isfinite(v) else str(v)) for k, v in values.items()}}
        self._jsonl.write(json.dumps(line) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(k, v, global_step=int(step))

    def flush(self) -> None:
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._jsonl.closed:
            self.flush()
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class NullWriter:
    """The writer of non-lead processes: Scenic writes summaries on the lead host only."""

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
