"""The packages' namespaces show their public API only: dir(), help() and star imports."""

from __future__ import annotations

import pydoc
import subprocess
import sys

import pytest

import tokenlearner_torch
import tokenlearner_torch.weights_convert

# Helpers an __init__ uses itself, which must not show as API.
HELPERS = {"TYPE_CHECKING", "annotations", "typing", "lazy_exports", "_LAZY", "_SUBMODULES", "_lazy", "__getattr__", "__dir__",
           "_FUNCTION_MODULES"}
PACKAGES = {
    tokenlearner_torch: {"errors", "weights_convert", "parity", "training", "viz", "hub"},  # public subpackages
    tokenlearner_torch.weights_convert: set(),
}


@pytest.mark.parametrize("module", list(PACKAGES), ids=lambda m: m.__name__)
def test_dir_shows_the_public_api_only(module):
    names = dir(module)
    assert not HELPERS & set(names)
    public = {n for n in names if not (n.startswith("__") and n.endswith("__"))}
    # __all__ and the lazy names (the package keeps its classes out of __all__, so out of help()), subpackages
    assert public == set(module.__all__) | set(module._LAZY) | PACKAGES[module]
    for name in public:  # every name shown resolves (lazy ones are imported now)
        assert getattr(module, name) is not None, name
    namespace: dict = {}
    exec(f"from {module.__name__} import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(module.__all__)


@pytest.mark.parametrize("module", list(PACKAGES), ids=lambda m: m.__name__)
def test_help_lists_no_helper(module):
    text = pydoc.render_doc(module, renderer=pydoc.plaintext)
    sections: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(" "):
            current = sections.setdefault(line, [])
        elif line.startswith("    ") and not line.startswith("     "):
            current.append(line.split("(")[0].split(" =")[0].strip())
    # (PACKAGE CONTENTS lists every module file, private ones too: pydoc's own way, not the namespace.)
    shown = set(sections.get("FUNCTIONS", [])) | set(sections.get("DATA", [])) | set(sections.get("CLASSES", []))
    assert not HELPERS & shown, sorted(HELPERS & shown)
    assert "\n    __getattr__(" not in text and "\n    __dir__(" not in text  # the lazy-import functions
    for name in module.__all__:
        assert name in text, name


def test_subpackage_and_names_are_reachable_without_importing_them():
    code = (
        "import sys\n"
        "import tokenlearner_torch as tl\n"
        "convert = tl.weights_convert.convert  # no `import tokenlearner_torch.weights_convert` needed\n"
        "assert 'torch' not in sys.modules, 'the converter namespace imported torch'\n"
        "assert callable(tl.weights_convert.load_pretrained) and 'torch' in sys.modules\n"
        "assert tl.load_pretrained is tl.weights_convert.load_pretrained\n"
        "try:\n"
        "    tl.no_such_name\n"
        "except AttributeError as exc:\n"
        "    assert \"no attribute 'no_such_name'\" in str(exc)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
