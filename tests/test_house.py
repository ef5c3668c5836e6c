"""The house: the package's import graph has no circle, and ``help(tokenlearner_torch)`` stays short.

The import graph is read from the source with ``ast`` (nothing is imported): every module under
``tokenlearner_torch`` (``src/tokenlearner_torch``, and ``weights_convert/`` and ``parity/``, which install as its
subpackages), with an edge for every ``import`` / ``from ... import`` of another of its modules, at module level
and inside functions alike (a function-level import is a circle that waits for its first call). Importing
``a.b.c`` runs ``a.b``'s ``__init__`` too, so that is an edge as well. Imports under ``if TYPE_CHECKING:``
never run and are not edges. A call ``importlib.import_module("tokenlearner_torch.x")`` (or ``(".x",
"tokenlearner_torch")``, or ``__import__``) with a constant name is an edge too: resolving a module by name
at call time hides no dependency from this test.

No edge is exempt: ``HubMixin`` (the modules' base class, in conventions.py) runs the folder and Hub code of
``folder.py``, which sits below it and takes the class from the registry that ``HubMixin.__init_subclass__``
fills, so nothing on the ground floor reaches a model, ``scenic.py``, ``hub.py`` or ``weights_convert``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "tokenlearner_torch": ROOT / "src" / "tokenlearner_torch",
    "tokenlearner_torch.weights_convert": ROOT / "weights_convert",
    "tokenlearner_torch.parity": ROOT / "parity",
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the installed package."""
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_by_name(node: ast.AST) -> str | None:
    """The absolute module name a call ``importlib.import_module(NAME[, PACKAGE])`` / ``import_module(...)`` /
    ``__import__(NAME)`` imports, when NAME (and PACKAGE, for a relative NAME) are constants; else None."""
    if not isinstance(node, ast.Call) or not node.args:
        return None
    fn = node.func
    called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else None
    if called not in ("import_module", "__import__"):
        return None
    name = node.args[0]
    if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
        return None
    if not name.value.startswith("."):
        return name.value
    package = node.args[1] if len(node.args) > 1 and called == "import_module" else None
    package = package or next((k.value for k in node.keywords if k.arg == "package"), None)
    if not (isinstance(package, ast.Constant) and isinstance(package.value, str)):
        return None
    level = len(name.value) - len(name.value.lstrip("."))
    base = package.value.split(".")[: len(package.value.split(".")) - (level - 1)]
    return ".".join(base + ([name.value[level:]] if name.value[level:] else []))


def _imports(tree: ast.AST, in_function: bool = False):
    """``(node, in_function)`` for every import statement that can run (not under ``if TYPE_CHECKING:``), and
    every import-by-name call with a constant name."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), in_function)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _import_by_name(node) is not None:
            yield node, in_function
        yield from _imports(node, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom | ast.Call, modules: dict[str, Path]) -> set[str]:
    """The package modules an import statement (or import-by-name call) runs: the named module and every
    package above it."""
    if isinstance(node, ast.Call):
        names = [_import_by_name(node)]
    elif isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            origin = ".".join(base + ([node.module] if node.module else []))
        else:
            origin = node.module or ""
        # `from a import b`: b may be a submodule (then it is imported) or a name defined in a
        names = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in modules else origin for alias in node.names]
    out = set()
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            prefix = ".".join(parts[:i])
            if prefix in modules and prefix != module and not module.startswith(prefix + "."):
                out.add(prefix)
    return out


def import_graph(function_level: bool = True) -> dict[str, dict[str, str]]:
    """``{module: {imported module: "line N (module level|in a function)"}}`` of the package."""
    modules = _modules()
    graph: dict[str, dict[str, str]] = {m: {} for m in modules}
    for module, path in modules.items():
        for node, in_function in _imports(ast.parse(path.read_text(), str(path))):
            if in_function and not function_level:
                continue
            how = "importlib, " if isinstance(node, ast.Call) else ""
            where = f"line {node.lineno} ({how}{'in a function' if in_function else 'module level'})"
            for target in _targets(module, path, node, modules):
                graph[module].setdefault(target, where)
    return graph


def find_cycle(graph: dict[str, dict[str, str]]) -> list[str] | None:
    """One import circle ``[a, b, ..., a]`` of ``graph``, or None (depth-first search, deterministic order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def _describe(cycle: list[str], graph: dict[str, dict[str, str]]) -> str:
    short = lambda m: m.removeprefix("tokenlearner_torch.")  # noqa: E731
    return " -> ".join(
        f"{short(a)} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])
    ) + f" -> {short(cycle[-1])}"


@pytest.mark.parametrize("function_level", [False, True], ids=["module-level", "with-function-level"])
def test_the_package_has_no_import_circle(function_level):
    graph = import_graph(function_level)
    assert len(graph) > 40 and "tokenlearner_torch.conventions" in graph  # the walk found the package
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {_describe(cycle, graph)}"


def test_no_import_by_name_of_the_package_and_the_old_upward_edge_closes_a_circle():
    """The package resolves none of its own modules by name (every edge is a plain import, seen above); and the
    edge this file once allowed (conventions -> hub, HubMixin reaching the folder code above the models) would
    still close a circle, so the floor plan, not an exemption, is what keeps the graph clean."""
    graph = import_graph(True)
    by_name = {(a, b) for a, edges in graph.items() for b, where in edges.items() if "importlib" in where}
    assert by_name == set()
    graph["tokenlearner_torch.conventions"]["tokenlearner_torch.hub"] = "the old call-time edge"
    cycle = find_cycle(graph)
    assert cycle is not None and "conventions (the old call-time edge) -> hub" in _describe(cycle, graph)


def test_import_by_name_calls_are_edges():
    """The call forms the scan reads, on source text (so a blind scan cannot pass the tests above)."""
    src = (
        "import importlib\nfrom importlib import import_module\n"
        "def f():\n    importlib.import_module('tokenlearner_torch.hub')\n"
        "def g():\n    import_module('.scenic', 'tokenlearner_torch')\n"
        "def h():\n    importlib.import_module('..models', package='tokenlearner_torch.training')\n"
        "__import__('tokenlearner_torch.layers')\n"
        "importlib.import_module(some_name)\n"  # not a constant: nothing to read
    )
    found = [_import_by_name(node) for node, _ in _imports(ast.parse(src)) if isinstance(node, ast.Call)]
    assert found == ["tokenlearner_torch.hub", "tokenlearner_torch.scenic", "tokenlearner_torch.models",
                     "tokenlearner_torch.layers"]  # fmt: skip


def test_the_cycle_finder_finds_circles():
    """The finder itself, on a graph with a known circle and on the package's graph with one edge added."""
    toy = {"a": {"b": "x"}, "b": {"c": "x"}, "c": {"a": "x"}, "d": {"a": "x"}}
    assert find_cycle(toy) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": "x"}, "b": {}}) is None
    graph = import_graph(False)
    assert find_cycle(graph) is None
    # The circle this file was written against: the modules' base class importing the class registry.
    graph["tokenlearner_torch.conventions"]["tokenlearner_torch.scenic"] = "added by the test"
    cycle = find_cycle(graph)
    assert cycle is not None and "tokenlearner_torch.conventions" in cycle and "tokenlearner_torch.scenic" in cycle
    assert "conventions (added by the test) -> scenic" in _describe(cycle, graph)


def test_edges_are_read_at_both_levels():
    """Known imports, so a parser that silently sees nothing fails here: a module-level one, a function-level
    one, a package __init__ that an import runs, and a TYPE_CHECKING-only one that is not an edge."""
    graph = import_graph(True)
    models = graph["tokenlearner_torch.models"]
    assert "module level" in models["tokenlearner_torch.conventions"]
    assert "module level" in models["tokenlearner_torch.layers"]
    pretrained = graph["tokenlearner_torch.weights_convert.pretrained"]
    assert "in a function" in pretrained["tokenlearner_torch.scenic"]
    assert "module level" in graph["tokenlearner_torch.hub"]["tokenlearner_torch.scenic"]
    # `from .weights_convert.pretrained import ...` in a top-level module runs weights_convert's __init__ too
    node = ast.parse("from .weights_convert.pretrained import load_pretrained\n").body[0]
    hub_path = PACKAGE_DIRS["tokenlearner_torch"] / "hub.py"
    assert _targets("tokenlearner_torch.hub", hub_path, node, _modules()) == {
        "tokenlearner_torch.weights_convert", "tokenlearner_torch.weights_convert.pretrained"}  # fmt: skip
    assert "tokenlearner_torch.scenic" not in graph["tokenlearner_torch"]  # TYPE_CHECKING only
    assert "tokenlearner_torch.scenic" not in import_graph(False)["tokenlearner_torch.weights_convert.pretrained"]


GROUND_FLOOR = ("tokenlearner_torch.errors", "tokenlearner_torch.config_check", "tokenlearner_torch.folder",
                "tokenlearner_torch.conventions")  # fmt: skip


def _reachable(graph: dict[str, dict[str, str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_convention_floor_imports_no_model():
    """The ground floor, bottom to top (errors < config_check < folder < conventions): each file imports only the
    ones below it, function-level imports included, so HubMixin's save / load / push reach no model, no class
    registry module and no weights_convert; and importing conventions loads none of them (nor torch: the
    converter imports it while torch loads in a thread)."""
    graph = import_graph(True)
    for i, module in enumerate(GROUND_FLOOR):
        assert set(graph[module]) <= set(GROUND_FLOOR[:i]), (module, graph[module])
    assert set(graph["tokenlearner_torch.conventions"]) == {
        "tokenlearner_torch.errors", "tokenlearner_torch.config_check", "tokenlearner_torch.folder"}  # fmt: skip
    assert _reachable(graph, "tokenlearner_torch.conventions") == set(GROUND_FLOOR[:-1])
    code = (
        "import sys, tokenlearner_torch.conventions as c\n"
        "print(sorted(m for m in sys.modules if m.startswith('tokenlearner_torch.') or m == 'torch'))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    # the package's own __init__ loads _lazy (its lazy-export helper) and errors; then the floor, nothing else
    expected = sorted(["tokenlearner_torch._lazy", *GROUND_FLOOR])
    assert res.stdout.strip() == str(expected), res.stdout


def test_the_registry_fills_as_classes_are_defined():
    """HubMixin.__init_subclass__ registers a port module's classes when that module runs, in a fresh
    interpreter: after token_learner (which imports layers) the ViTs are known names but not yet classes
    (port_class gives None), a name no port class has is a ConfigError, and after scenic all ten resolve."""
    code = (
        "from tokenlearner_torch import conventions as c\n"
        "assert c.port_classes() == {}\n"
        "import tokenlearner_torch.token_learner\n"
        "got = sorted(n.rsplit('.', 1)[1] for n in c.port_classes())\n"
        "assert got == ['AddPositionEmbs', 'Encoder1DBlock', 'MlpBlock', 'TokenFuser', 'TokenLearnerModule',"
        " 'TokenLearnerModuleV11'], got\n"
        "assert c.port_class('TokenLearnerViT') is None\n"
        "assert c.port_class('TokenFuser').__module__ == 'tokenlearner_torch.token_learner'\n"
        "import tokenlearner_torch.scenic as s\n"
        "assert c.port_class(c.SCENIC_NAMES['TokenLearnerViT']) is s.SCENIC_CLASSES[c.SCENIC_NAMES['TokenLearnerViT']]\n"
        "assert len(c.port_classes()) == len(c.SCENIC_NAMES) == 10\n"
        "try:\n    c.port_class('TokenLearnerVit')\nexcept c.ConfigError as e:\n    print(e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("unknown Scenic class 'TokenLearnerVit'; expected one of AddPositionEmbs, "), res.stdout


def test_help_of_the_package_is_short_and_says_where_to_start():
    """help(tokenlearner_torch) is a page, not 13,000 lines of nn.Module methods: the docstring names the
    commands and the places to start; the classes are attributes (dir() lists them) documented in their
    modules, and help() on one of them still shows its own constructor."""
    import pydoc

    import tokenlearner_torch as tl

    text = pydoc.render_doc(tl, renderer=pydoc.plaintext)
    lines = text.splitlines()
    assert len(lines) < 400, len(lines)
    assert text.count("Methods inherited from torch.nn.modules.module.Module") == 0
    doc = tl.__doc__
    for name in ("tokenlearner-convert", "tokenlearner-parity", "tokenlearner-viz", "tokenlearner-train",
                 "load_pretrained", "from_scenic", "tokenlearner_torch.training", "tokenlearner_torch.viz",
                 "README.md", "docs/"):
        assert name in doc, name
    for name in ("TokenLearnerViT", "TokenFuser", "ShapeError", "ConfigError"):
        assert name in dir(tl) and name in doc, name
    from tokenlearner_torch import ShapeError, TokenLearnerViT  # explicit imports still work

    assert issubclass(ShapeError, tl.TokenLearnerError)
    vit_help = pydoc.render_doc(TokenLearnerViT, renderer=pydoc.plaintext)
    assert "num_classes" in vit_help and "forward_features" in vit_help


def test_the_session_shares_one_jax_compilation_cache():
    """tests/conftest.py: every worker and every subprocess of a test session compiles into one JAX cache (a
    large part of why the suite fits its time on 2 cores); losing it in a refactor must not go unnoticed."""
    import os

    jax = pytest.importorskip("jax")
    folder = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    assert folder and Path(folder).is_dir()
    assert jax.config.jax_compilation_cache_dir == folder
    assert float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]) == 0
    probe = "import jax, os; print(jax.config.jax_compilation_cache_dir == os.environ['JAX_COMPILATION_CACHE_DIR'])"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True", done.stderr[-2000:]
