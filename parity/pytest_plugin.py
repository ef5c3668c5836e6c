"""pytest integration of the parity harness.

Enable it in a ``conftest.py`` (or a test module)::

    pytest_plugins = ["tokenlearner_torch.parity.pytest_plugin"]

Then::

    from tokenlearner_torch.parity.pytest_plugin import parity_cases

    @pytest.mark.parametrize("case", parity_cases("tests/parity_cases"))
    def test_port_matches_scenic(case, parity):
        parity.check(case)                       # stored case, no jax needed

    def test_my_config_live(parity):
        parity.live("configs/my_model.json", mode="f64")   # needs jax + flax

The ``parity`` fixture raises ``AssertionError`` carrying the full report when a tensor differs; its
``device`` comes from ``--parity-device`` (default cpu), the accuracy rule of ``live`` from
``--parity-accuracy`` (auto, always, off; default auto: a tensor failing the plain rule passes when the
port is elementwise as close to a float64 reference run as the reference is), and ``check`` / ``live`` /
``assert_parity`` return the :class:`~tokenlearner_torch.parity.compare.Report`. Heavy imports happen only
when used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

__all__ = ["parity_cases", "ParityHelper"]


def parity_cases(root: str | os.PathLike[str], *, marks: Any = ()) -> list[Any]:
    """One ``pytest.param`` per case folder under ``root`` (id = folder name), for ``parametrize``.

    A relative ``root`` is taken from the current directory; an empty or missing folder gives no
    parameters (pytest then reports the test as skipped)."""
    from .cases import find_cases

    return [pytest.param(p, id=p.name, marks=marks) for p in find_cases(Path(root))]


class ParityHelper:
    """What the ``parity`` fixture returns."""

    def __init__(self, device: str = "cpu", accuracy: str = "auto") -> None:
        self.device = device
        self.accuracy = accuracy

    def check(self, case: str | os.PathLike[str], **kwargs: Any):
        """Assert that the port matches a stored case (no jax); returns the report."""
        from .api import check_case

        kwargs.setdefault("device", self.device)
        report = check_case(case, **kwargs)
        if not report.passed:
            raise AssertionError(report.to_text())
        return report

    def live(self, config_or_case: Any, **kwargs: Any):
        """Assert parity of the Flax reference and the port on a config/case (needs jax); returns the report."""
        pytest.importorskip("jax")
        pytest.importorskip("flax")
        from .api import live

        kwargs.setdefault("device", self.device)
        kwargs.setdefault("accuracy", self.accuracy)
        report = live(config_or_case, **kwargs)
        if not report.passed:
            raise AssertionError(report.to_text())
        return report

    def assert_parity(self, *args: Any, **kwargs: Any):
        from .api import assert_parity

        kwargs.setdefault("device", self.device)
        kwargs.setdefault("accuracy", self.accuracy)
        return assert_parity(*args, **kwargs)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tokenlearner-parity")
    group.addoption("--parity-device", default=None, choices=("cpu", "cuda"),
                    help="device of the `parity` fixture (default cpu)")
    group.addoption("--parity-accuracy", default=None, choices=("auto", "always", "off"),
                    help="accuracy rule of parity.live / parity.assert_parity (default auto: a float64 reference "
                    "run when a tensor fails the plain rule)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "parity: a tokenlearner-torch parity check")


@pytest.fixture
def parity(request: pytest.FixtureRequest) -> ParityHelper:
    """Assert helpers of the parity harness: ``parity.check(case)``, ``parity.live(config)``."""
    device = request.config.getoption("--parity-device", default=None) or "cpu"
    accuracy = request.config.getoption("--parity-accuracy", default=None) or "auto"
    return ParityHelper(device, accuracy)
