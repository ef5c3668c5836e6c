"""The mutation check (``scripts/mutants.py``): every deliberate bug it knows must make its tests fail.

The slow test runs the whole check (each mutant in its own pytest child process, only its killing tests);
the fast ones check the registry: the bugs issue 20 lists are all there, and every killing test id names a
test file that exists.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "mutants.py"

# The mutants issue 20 requires ("What done means: mutants die"), by the names mutants.py gives them.
REQUIRED = {
    "layer_norm_xla_cpu_runs_fused",  # numerics("xla_cpu") silently running the fused LayerNorm
    "decay_mask_ignored",  # skip_scale_and_bias_regularization ignored
    "surgery_inflations_swapped",  # average and central frame inflations swapped
    "encoder_dropout_removed",  # one dropout site of the encoder block removed ...
    "encoder_dropout_moved",  # ... or moved
    "bf16_tokenlearner_in_bf16",  # a module meant to stay float32 under the bf16 policy computing in bf16
    "lr_one_step_late",  # the learning rate read one step late
    "reset_parameters_skips_pos_embedding",  # reset_parameters after to_empty leaving a parameter uninitialised
}


def _registry():
    spec = importlib.util.spec_from_file_location("mutants_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.MUTANTS


def test_every_required_mutant_is_registered_with_existing_killing_tests():
    mutants = _registry()
    assert REQUIRED <= set(mutants), sorted(REQUIRED - set(mutants))
    for m in mutants.values():
        assert m.bug and m.killers, m.name
        for node_id in m.killers:
            assert (ROOT / node_id.split("::")[0]).is_file(), f"{m.name}: {node_id} names no test file"


def test_unknown_mutant_is_a_one_line_usage_error():
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "no_such_mutant"], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "no_such_mutant" in done.stderr
    assert "Traceback" not in done.stderr


# About 20 s of CPU: one pytest child per mutant, plus the unmutated baseline. The baseline stays (no
# --no-baseline, although the suite runs the same tests): it shows the killing tests passing in the very setup
# the mutants run in (forked children, the shared JAX cache), so a kill is the mutant's doing; it costs ~1 s net,
# as the mutants reuse the Flax references it compiles.
@pytest.mark.slow
def test_every_mutant_is_killed(tmp_path):
    report = tmp_path / "mutants.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", str(report)], capture_output=True, text=True,
                          cwd=ROOT, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["baseline"]["status"] == "passed"
    assert [m["name"] for m in result["mutants"] if m["status"] != "killed"] == []
    assert result["score"][0] == result["score"][1] == len(_registry())
