"""The project's main job in one command: a Scenic training checkpoint in, PyTorch weights out, parity proven.

1. ``tokenlearner-convert`` converts a bundled genuine-Scenic checkpoint (a TokenLearner ViT for video with
   TokenFuser, trained state with Adam moments) into ``out/demo/`` (model.safetensors + config.json).
2. ``tokenlearner-parity check`` loads those converted weights into the port, runs the inputs Scenic was run
   on, and compares the output, every intermediate and every gradient with what Scenic computed.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASE = Path("tests/fixtures/goldens/vit_video_3dconv")
OUT = Path("out/demo")


def run(command: str, *args: str) -> int:
    print(f"\n$ {shlex.join([command, *args])}", flush=True)
    # The console scripts installed beside this interpreter (the project's virtual environment).
    return subprocess.call([str(Path(sys.executable).parent / command), *args], cwd=ROOT)


def main() -> int:
    print(__doc__.strip())
    (ROOT / OUT.parent).mkdir(exist_ok=True)
    convert = run("tokenlearner-convert", str(CASE / "checkpoint"), "-o", str(OUT),
                  "--config", str(CASE / "config.json"), "--force")
    if convert != 0:
        return convert
    return run("tokenlearner-parity", "check", str(CASE), "--weights", str(OUT))


if __name__ == "__main__":
    sys.exit(main())
