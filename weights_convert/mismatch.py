"""The error for a parameter tree that does not fit a model: every problem listed, readable, with hints.

:class:`ParamsMismatchError` keeps the complete lists (missing, unexpected and mis-shaped leaves, the latter
with the Flax shape found and the one the model expects); its message is one complete summary line, then
indented detail lines showing the first few of each kind. :func:`structure_hints` compares the two trees'
landmarks (patch embedding rank, depth, widths, heads, classes, TokenLearner version...) and says, in words,
what tells that the model is evidently another one than the checkpoint's. No torch here.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Sequence

from tokenlearner_torch.errors import ConversionError

__all__ = ["MisshapedLeaf", "Hint", "ParamsMismatchError", "structure_hints"]

SHOWN = 5  # entries of each kind in the message; the error's attributes and --report hold all of them

Shape = tuple[int, ...]
PartShape = tuple["int | None", ...]  # None: a size the model does not fix yet (a lazy parameter)


def _show(shape: PartShape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class MisshapedLeaf:
    """A leaf present on both sides with the wrong shape (Flax layout on both sides)."""

    path: str
    found: Shape
    expected: PartShape | None  # None where the model does not say; a None size: not fixed yet
    reason: str = ""  # e.g. "rank 4, expected 5", "4 heads, the model has num_heads=2"

    def describe(self) -> str:
        expected = _show(self.expected) if self.expected is not None else "?"
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.path}: found {_show(self.found)}, expected {expected}{why}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["found"] = list(self.found)
        d["expected"] = None if self.expected is None else list(self.expected)
        return d


@dataclass(frozen=True)
class Hint:
    """One landmark that differs: ``short`` for the summary line, ``detail`` for its own line."""

    short: str
    detail: str


class ParamsMismatchError(ConversionError):
    """Flax parameters that do not fit a model; ``missing``, ``unexpected``, ``misshaped`` hold every problem.

    ``str(error)``: the first line is a complete summary (counts, and what differs when the model is
    evidently another one), then indented lines show the first few entries of each kind.
    """

    def __init__(
        self,
        title: str,
        missing: Sequence[str],
        unexpected: Sequence[str],
        misshaped: Sequence[MisshapedLeaf],
        hints: Sequence[Hint] = (),
        notes: Sequence[str] = (),
        another: str = "it looks like another model",
    ) -> None:
        self.title = title
        self.another = another
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshaped = list(misshaped)
        self.hints = list(hints)
        self.notes = list(notes)
        super().__init__(self.message())

    def __str__(self) -> str:
        return self.message()

    def with_context(self, title: str, another: str | None = None) -> ParamsMismatchError:
        """The same lists under another title (and another lead for the hints)."""
        return ParamsMismatchError(title, self.missing, self.unexpected, self.misshaped, self.hints, self.notes, another or self.another)

    @property
    def truncated(self) -> bool:
        """Whether the message leaves entries out (the attributes, and the converter's report, hold all)."""
        return any(len(x) > SHOWN for x in (self.missing, self.unexpected, self.misshaped))

    def summary_line(self) -> str:
        counts = f"{len(self.missing)} missing, {len(self.unexpected)} unexpected, {len(self.misshaped)} mis-shaped"
        line = f"{self.title}: {counts}"
        if self.hints:
            shown = ", ".join(h.short for h in self.hints[:3]) + (", ..." if len(self.hints) > 3 else "")
            line += f"; {self.another} (checkpoint vs model: {shown})"
        return line

    def message(self) -> str:
        lines = [self.summary_line()]
        lines += [f"  hint: {h.detail}" for h in self.hints]
        lines += [f"  hint: {n}" for n in self.notes]
        for kind, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("mis-shaped", [m.describe() for m in self.misshaped]),
        ):
            if not items:
                continue
            more = f", first {SHOWN}" if len(items) > SHOWN else ""
            lines.append(f"  {kind} ({len(items)}{more}):")
            lines += [f"    {item}" for item in items[:SHOWN]]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The complete lists, JSON-ready (the converter's ``--report`` holds this as ``mismatch``)."""
        return {
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "misshaped": [m.to_dict() for m in self.misshaped],
            "hints": [h.detail for h in self.hints] + list(self.notes),
        }


# --------------------------------------------------------------------------------------------
# What tells that the model is another one than the checkpoint's
# --------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"(?:^|/)encoderblock_(\d+)/")


def _find(shapes: Mapping[str, PartShape | None], suffix: str) -> PartShape | None:
    """The shape of the first leaf whose path is ``suffix`` or ends with ``/suffix``."""
    for path, shape in shapes.items():
        if shape is not None and (path == suffix or path.endswith("/" + suffix)):
            return shape
    return None


def _has(shapes: Mapping[str, Any], pattern: str) -> bool:
    pat = re.compile(pattern)
    return any(pat.search(p) for p in shapes)


def _patches(shape: Shape) -> tuple[str, str]:
    """(what the embedding kernel's rank says in one word, and in words)."""
    if len(shape) == 5:
        return "video", "3-D patches (a video model)"
    if len(shape) == 4:
        return "image", "2-D patches (an image model)"
    return f"rank {len(shape)}", f"a rank-{len(shape)} kernel"


def structure_hints(tree: Mapping[str, Shape], model: Mapping[str, PartShape | None]) -> list[Hint]:
    """The landmarks in which the checkpoint's tree (``{flax path: shape}``) and the model's differ.

    ``model`` maps each Flax path the model expects to its Flax shape (None, or None sizes, where the model
    does not fix them yet).
    Each landmark is compared only where both sides have it; an empty list means nothing evident.
    """
    hints: list[Hint] = []

    def dim(label: str, suffix: str, axis: int) -> None:
        a, b = _find(tree, suffix), _find(model, suffix)
        if a is not None and b is not None and len(a) == len(b) and b[axis] is not None and a[axis] != b[axis]:
            hints.append(Hint(f"{label} {a[axis]} vs {b[axis]}", f"{label}: the checkpoint has {a[axis]}, the model {b[axis]} ({suffix} {_show(a)} vs {_show(b)})"))

    emb_t, emb_m = _find(tree, "embedding/kernel"), _find(model, "embedding/kernel")
    if emb_t is not None and emb_m is not None:
        if len(emb_t) != len(emb_m):
            (kind_t, words_t), (kind_m, words_m) = _patches(emb_t), _patches(emb_m)
            hints.append(Hint(
                f"{kind_t} vs {kind_m} patch embedding",
                f"the checkpoint embeds {words_t}: embedding/kernel {_show(emb_t)}; the model {words_m}: {_show(emb_m)}",
            ))  # fmt: skip
        elif emb_t[:-2] != emb_m[:-2]:
            hints.append(Hint(f"patch {_show(emb_t[:-2])} vs {_show(emb_m[:-2])}", f"patch size: the checkpoint's embedding/kernel is {_show(emb_t)}, the model's {_show(emb_m)}"))
    blocks_t = {int(m.group(1)) for p in tree if (m := _BLOCK.search(p))}
    blocks_m = {int(m.group(1)) for p in model if (m := _BLOCK.search(p))}
    if blocks_t and blocks_m and len(blocks_t) != len(blocks_m):
        hints.append(Hint(f"{len(blocks_t)} vs {len(blocks_m)} encoder blocks", f"depth: the checkpoint has {len(blocks_t)} encoder blocks, the model {len(blocks_m)} (num_layers)"))
    dim("hidden size", "encoderblock_0/LayerNorm_0/scale", 0)
    dim("heads", "encoderblock_0/MultiHeadDotProductAttention_0/query/kernel", 1)
    dim("MLP width", "encoderblock_0/MlpBlock_0/Dense_0/kernel", -1)
    dim("classes", "output_projection/kernel", -1)
    dim("representation size", "pre_logits/kernel", -1)
    dim("tokens", "TokenLearnerModuleV11_0/token_masking/Dense_1/kernel", -1)
    dim("tokens", "TokenLearnerModule_0/Conv_3/kernel", -1)
    for label, pattern in (
        ("TokenLearner v1.1", r"(^|/)TokenLearnerModuleV11_\d+/"),
        ("TokenLearner v1", r"(^|/)TokenLearnerModule_\d+/"),
        ("TokenFuser", r"(^|/)TokenFuser_\d+/"),
        ("classification head", r"(^|/)output_projection/"),
        ("pre_logits", r"(^|/)pre_logits/"),
    ):
        in_tree, in_model = _has(tree, pattern), _has(model, pattern)
        if in_tree != in_model:
            yes, no = ("checkpoint", "model") if in_tree else ("model", "checkpoint")
            hints.append(Hint(f"{label} {'yes vs no' if in_tree else 'no vs yes'}", f"the {yes} has a {label}, the {no} has none"))
    return hints
