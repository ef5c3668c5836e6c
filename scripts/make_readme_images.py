"""Regenerate the documentation's golden pictures (docs/viz.md), each by its own command, and record its output.

    python scripts/make_readme_images.py            # all pictures -> docs/images/<name>.png and <name>.txt
    python scripts/make_readme_images.py parity_chart

Each picture is drawn by the command line docs/viz.md shows beside it (run in-process, from the repository
root, on one CPU thread so that float32 sums are taken in one order); ``docs/images/<name>.txt`` holds that command line,
everything it printed (stdout and stderr, in order) and its exit status. tests/test_viz.py re-runs every
command into a temporary folder and compares its output with the recorded one: a picture whose numbers no
longer match the code fails there, and this script makes it match again.
"""

from __future__ import annotations

import contextlib
import io
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
IMAGES = "docs/images"


@dataclass(frozen=True)
class Picture:
    """One golden picture: ``program argv`` writes ``docs/images/<name>.png`` (the argument after ``flag``)."""

    name: str
    program: str  # the console script: tokenlearner-viz or tokenlearner-parity
    argv: tuple[str, ...]

    @property
    def png(self) -> str:
        return f"{IMAGES}/{self.name}.png"

    @property
    def record(self) -> Path:
        return ROOT / IMAGES / f"{self.name}.txt"

    @property
    def command(self) -> str:
        """The command line as docs/viz.md shows it."""
        return shlex.join([self.program, *self.argv])


PICTURES = (
    Picture("token_maps_image", "tokenlearner-viz",
            ("tests/fixtures/goldens/vit_image_cls", "-o", f"{IMAGES}/token_maps_image.png", "--dpi", "70")),
    Picture("token_maps_video", "tokenlearner-viz",
            ("tests/fixtures/goldens/vit_video_3dconv", "-o", f"{IMAGES}/token_maps_video.png", "--examples", "1",
             "--dpi", "60")),
    # The default tolerance: every point is float32 noise (3e-7..2e-6 scaled), two decades under the line. A
    # tolerance inside that noise would make the verdict and the first diverging module depend on the CPU.
    Picture("parity_chart", "tokenlearner-parity",
            ("check", "tests/fixtures/goldens/vit_video_3dconv", "-q", "--plot",
             f"{IMAGES}/parity_chart.png")),
)  # fmt: skip


def _entry_point(program: str) -> Callable[[Sequence[str]], int]:
    if program == "tokenlearner-viz":
        from tokenlearner_torch.viz.cli import main
    elif program == "tokenlearner-parity":
        from tokenlearner_torch.parity.cli import main
    else:
        raise ValueError(f"unknown program {program!r}")
    return main


def run(picture: Picture, png: Optional[Path] = None) -> str:
    """Run ``picture``'s command (drawing into ``png``, default its docs/images path) from the repository root on
    one CPU thread; return its record: the command line, what it printed, its exit status. Paths in the
    output read as the documented command wrote them."""
    import os

    import torch

    out = str(png) if png is not None else picture.png
    argv = [out if a == picture.png else a for a in picture.argv]
    buffer = io.StringIO()
    threads = torch.get_num_threads()
    cwd = os.getcwd()
    try:
        os.chdir(ROOT)
        torch.set_num_threads(1)  # one summation order for the float32 numbers the record holds
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            status = _entry_point(picture.program)(argv)
    finally:
        torch.set_num_threads(threads)
        os.chdir(cwd)
    printed = buffer.getvalue().replace(out, picture.png)
    return f"$ {picture.command}\n{printed}(exit status {status})\n"


def environment() -> str:
    """Where a record was made (its float32 numbers are this machine's and this torch's)."""
    import torch

    return f"torch {torch.__version__}, {platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


def main(names: Sequence[str] = ()) -> int:
    known = {p.name: p for p in PICTURES}
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"make_readme_images.py: error: unknown picture {unknown[0]!r}; the pictures are: "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    for picture in [known[n] for n in names] or list(PICTURES):
        text = run(picture)
        picture.record.write_text(text)
        print(f"wrote {picture.png} and {picture.record.relative_to(ROOT)} ({environment()})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
