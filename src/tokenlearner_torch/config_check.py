"""One checker for every config the project reads (work in progress: the registry follows in the next commit)."""

from __future__ import annotations

__all__ = ["ConfigWarning"]


class ConfigWarning(UserWarning):
    """A key of an experiment config that no code reads (a likely typo); ``strict=True`` makes it an error."""
