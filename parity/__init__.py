"""Parity harness: proves the port computes what Scenic computes.

``check_case`` / ``live`` / ``record`` / ``assert_parity`` (see :mod:`.api`), the CLI
``tokenlearner-parity`` (:mod:`.cli`), pytest integration (:mod:`.pytest_plugin`). Attributes load lazily,
and nothing here imports jax unless a Flax reference is run
(``check`` never does).
"""

from __future__ import annotations

from typing import Any

__all__ = ["assert_parity", "check_case", "live", "record", "Report", "CaseError", "MODES"]


def __getattr__(name: str) -> Any:
    if name in ("assert_parity", "check_case", "live", "record"):
        from . import api

        return getattr(api, name)
    if name == "Report":
        from .compare import Report

        return Report
    if name == "CaseError":
        from .cases import CaseError

        return CaseError
    if name == "MODES":
        from .modes import MODES

        return MODES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
