"""Session-wide test settings: a shared JAX compilation cache, and the files with long tests first.

One JAX persistent compilation cache per test session, shared by the xdist workers and every subprocess the
tests start (command-line runs, rank processes, mutant children): many tests compile the same Flax reference
(the goldens' models, the documented examples, the CLI runs of the same case), and a cache hit loads the
executable XLA compiled the first time, so no number can change. The folder is temporary (made before the
workers start, removed at the end); a cache set in the environment is left as it is.
"""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
_owned: list[str] = []


def pytest_configure(config) -> None:
    if os.environ.get(_CACHE_ENV):  # set by the user, or by the controller for this xdist worker
        return
    folder = tempfile.mkdtemp(prefix="tokenlearner-jax-cache-")
    _owned.append(folder)
    os.environ[_CACHE_ENV] = folder
    # Every compile is worth keeping here: the references are small and compile in a fraction of a second.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def pytest_unconfigure(config) -> None:
    for folder in _owned:
        shutil.rmtree(folder, ignore_errors=True)
        if os.environ.get(_CACHE_ENV) == folder:
            del os.environ[_CACHE_ENV]


def pytest_collection_modifyitems(config, items) -> None:
    """Files with a test marked ``slow`` run first (each file's tests stay together and in order, so module
    fixtures are built once): the long tests start while the short ones can still fill the other workers."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.path not in slow_files)
