"""Names a package exports but imports on first access (PEP 562)."""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

# The names every module has; dir() keeps them. Everything else it shows is public API.
_MODULE_DUNDERS = ("__all__", "__builtins__", "__cached__", "__doc__", "__file__", "__loader__", "__name__", "__package__", "__path__", "__spec__", "__version__")


def lazy_exports(
    package: str, table: Mapping[str, str], namespace: dict[str, Any], submodules: Sequence[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``.

    ``table`` maps each lazy name to the relative module defining it (``{"from_scenic": ".scenic"}``);
    ``submodules`` names public subpackages reachable as attributes without importing them first
    (``("weights_convert",)``). To export a new public name, add it to the table (and to ``__all__``, which
    the packages build from the table); a new public subpackage, to ``submodules``.

    ``__dir__`` (and so ``dir()`` and tab completion) shows the public API only: ``__all__``, the lazy names,
    the public subpackages and the standard module attributes; not the helpers an ``__init__`` uses itself, nor
    these two functions.

    Why lazily: importing torch costs 2-3 s of `tokenlearner-convert`'s start-up, which it spends reading the
    checkpoint instead; so the packages on that path import their torch-using names only when asked.
    """

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is not None:
            value = getattr(importlib.import_module(module, package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        # __all__ may leave out lazy names (the package keeps its classes out of help()): dir() lists them all.
        public = set(namespace.get("__all__", ())) | set(table) | set(submodules)
        return sorted(public | {n for n in _MODULE_DUNDERS if n in namespace})

    return __getattr__, __dir__
