"""Every public module documents its forward's shapes and its own constructor (issue 9, §2.8)."""

from __future__ import annotations

import inspect

import pytest
from torch import nn

import tokenlearner_torch as tl
from tokenlearner_torch import layers

PUBLIC = sorted(
    {n for n in layers.__all__ if isinstance(getattr(layers, n), type)}
    | {n for n in dir(tl) if isinstance(getattr(tl, n), type) and issubclass(getattr(tl, n), nn.Module)}
)


@pytest.mark.parametrize("name", PUBLIC)
def test_forward_states_shapes_and_init_is_documented(name):
    cls = getattr(layers, name, None) or getattr(tl, name)
    forward = inspect.getdoc(cls.forward) or ""
    assert cls.forward.__module__.startswith("tokenlearner_torch"), f"{name}.forward is torch's own"
    assert "[" in forward and "->" in forward or "shape" in forward, f"{name}.forward: no shapes in {forward!r}"
    init_doc = inspect.getdoc(cls.__init__) or ""
    assert init_doc and init_doc != inspect.getdoc(nn.Module.__init__), f"{name}.__init__ shows torch's generic text"
