"""The documentation's examples run, from the repository root, and check what they print.

Runs every ```python block of README.md (each must carry the marker) and every block of docs/*.md marked
runnable: ``<!-- runnable -->`` on the line before the fence (docs/testing.md). A runnable block must contain
an ``assert``; the numbers the blocks show in their comments are asserted in the block against an
independent quantity, or below against values this test computes without the port.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- runnable -->"
_FENCE = re.compile(r"^(?P<marker><!-- runnable -->\n)?```python\n(?P<code>.*?)^```", flags=re.S | re.M)


def _blocks(path: Path) -> list[tuple[bool, str]]:
    """(marked runnable, code) of every ```python block of ``path``."""
    return [(m.group("marker") is not None, m.group("code")) for m in _FENCE.finditer(path.read_text())]


def _runnable() -> list[tuple[str, str]]:
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for index, (marked, code) in enumerate(_blocks(path)):
            if marked:
                found.append((f"{path.relative_to(ROOT)}[python block {index}]", code))
    return found


RUNNABLE = _runnable()
_OUTPUTS: dict[str, str] = {}


def _run(name: str, code: str, monkeypatch) -> str:
    """Execute one block from the repository root; return what it printed (cached per session)."""
    if name not in _OUTPUTS:
        monkeypatch.chdir(ROOT)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, name, "exec"), {"__name__": "__readme__"})
        _OUTPUTS[name] = out.getvalue()
    return _OUTPUTS[name]


def _block_with(text: str) -> tuple[str, str]:
    hits = [(n, c) for n, c in RUNNABLE if text in c]
    assert len(hits) == 1, f"expected one runnable block showing {text!r}, found {[n for n, _ in hits]}"
    return hits[0]


def test_every_readme_python_block_is_runnable():
    blocks = _blocks(ROOT / "README.md")
    assert len(blocks) >= 2
    unmarked = [i for i, (marked, _) in enumerate(blocks) if not marked]
    assert not unmarked, f"README.md python blocks {unmarked} lack the {MARKER} line before their fence"


def test_the_docs_have_runnable_examples():
    # The blocks that used to run from README.md run from their new homes.
    files = {name.split("[")[0] for name, _ in RUNNABLE}
    assert {"README.md", "docs/modules.md", "docs/converter.md", "docs/parity.md", "docs/training.md",
            "docs/viz.md"} <= files, files


def test_marker_is_found_only_before_a_fence():
    # A marker anywhere else is a typo that would silently leave a block unrun.
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() == MARKER:
                where = f"{path.name}:{i + 1}"
                assert i + 1 < len(lines) and lines[i + 1] == "```python", f"{where}: {MARKER} not before ```python"


@pytest.mark.parametrize("name,code", RUNNABLE, ids=[n for n, _ in RUNNABLE])
def test_runnable_block_asserts_and_runs(name, code, monkeypatch):
    tree = ast.parse(code)
    assert any(isinstance(node, ast.Assert) for node in ast.walk(tree)), f"{name} asserts nothing"
    _run(name, code, monkeypatch)


def test_converter_example_leaf_count_is_the_goldens(monkeypatch):
    """"79/79" against the number of array leaves under the golden checkpoint's ``params``, read with msgpack
    directly (flax's msgpack extension type 1 is an ndarray), not by the converter's reader."""
    import msgpack

    name, code = _block_with("79/79")
    ckpt = sorted((ROOT / "tests/fixtures/goldens/vit_image_cls/checkpoint").glob("checkpoint_*"))[-1]

    def leaves(node) -> int:
        if isinstance(node, dict):
            return sum(leaves(v) for v in node.values())
        return 1 if isinstance(node, msgpack.ExtType) and node.code == 1 else 0

    tree = msgpack.unpackb(ckpt.read_bytes(), raw=False, strict_map_key=False)
    n = leaves(tree["params"])
    assert n == 79  # what the block's comment shows
    assert f"flax leaves: {n}/{n} consumed (100%)" in _run(name, code, monkeypatch)


def test_parity_example_error_is_against_scenic(monkeypatch):
    """The printed error is the golden's stored Scenic output against the port, of float32 rounding size: the
    comment's 4.7683716e-07 = 2**-21, a few float32 ulps of logits of this size."""
    name, code = _block_with("4.7683716e-07")
    printed = float(_run(name, code, monkeypatch).split()[0])
    scenic = np.load(ROOT / "tests/fixtures/goldens/vit_image_cls/outputs.npz")["out"]
    ulp = np.spacing(np.float32(np.abs(scenic).max()))
    assert 0 < printed <= 16 * ulp, (printed, ulp)
    assert np.float32(4.7683716e-07) == np.float32(2.0**-21)


def test_v11_parameter_count_by_hand(monkeypatch):
    """13256 = LayerNorm (scale + bias over C = 192) + token_masking's Dense_0 (192 -> 64, bottleneck_dim) +
    Dense_1 (64 -> 8 tokens), each kernel plus bias."""
    name, code = _block_with("13256")
    assert 2 * 192 + (192 * 64 + 64) + (64 * 8 + 8) == 13256
    assert _run(name, code, monkeypatch).splitlines()[0] == "13256"
