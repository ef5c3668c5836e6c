#!/usr/bin/env bash
# One entry point for newcomers and CI: sets up a virtual environment (once), then runs a job.
#   bash run.sh demo   convert a bundled Scenic checkpoint and prove the port equals Scenic on it
#   bash run.sh test   the whole test suite (what CI runs)
#   bash run.sh bench  the speed benchmark: its table goes to a temporary folder (path printed); add --write
#                      to update benchmarks/results/cpu.md, e.g. bash run.sh bench --quick (a smoke run)
set -euo pipefail
cd "$(dirname "$0")"

job="${1:-}"
case "$job" in
  demo|test|bench) shift ;;
  *) echo "usage: bash run.sh demo|test|bench [args...]" >&2; exit 2 ;;
esac

venv=.venv
if [ ! -x "$venv/bin/python" ]; then
  # System packages stay visible, so a machine that already has torch/jax (a GPU box) keeps its builds.
  # No pip of its own when the system's is recent enough (it installs into the venv): 3.5 s less.
  "${PYTHON:-python3}" -m venv --system-site-packages --without-pip "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip >= 22: editable installs from pyproject.toml alone (PEP 660).
if ! python -c 'import sys, pip; sys.exit(int(pip.__version__.split(".")[0]) < 22)' >/dev/null 2>&1; then
  python -m ensurepip --upgrade >/dev/null
fi
torch_wheel=()
if ! python -c "import torch" >/dev/null 2>&1; then
  # The CPU wheel; an unpinned torch would pull a multi-GB CUDA build. One pip run installs it with the rest.
  torch_wheel=("torch==2.13.0")
fi
python -m pip install -q ${torch_wheel[@]+"${torch_wheel[@]}"} -e ".[test]"

case "$job" in
  demo) python scripts/demo.py "$@" ;;
  test)
    # Two pytest workers per two cores (at most 4), one intra-op thread each: most of the suite is
    # single-threaded (jax compiles, Python, subprocesses), and torch's OpenMP threads slow down sharply
    # when they outnumber the cores. Set TEST_WORKERS=0 to run in one process.
    workers="${TEST_WORKERS:-$(python -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')}"
    if [ "$workers" -gt 1 ]; then
      OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" python -m pytest -q -n "$workers" --dist worksteal "$@"
    else
      python -m pytest -q "$@"
    fi ;;
  bench) python benchmarks/bench_speed.py "$@" ;;
esac
