"""`tokenlearner-parity check`: every golden passes through the CLI; perturbed copies fail, naming the
tensor and the module; usage errors exit 2; `check` runs with jax blocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenlearner_torch.parity.cli import main

GOLDENS = Path(__file__).parent / "fixtures" / "goldens"
CASES = json.loads((GOLDENS / "index.json").read_text())["cases"]


@pytest.mark.parametrize("name", CASES)
def test_check_passes_on_golden(name, tmp_path, capsys):
    report = tmp_path / "r.json"
    assert main(["check", str(GOLDENS / name), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "PASS:" in out and "max_abs" in out
    data = json.loads(report.read_text())
    assert data["passed"] and not data["errors"]
    (rep,) = data["reports"]
    kinds = {t["kind"] for t in rep["tensors"]}
    assert kinds == {"output", "intermediate", "gradient"}
    assert rep["mode"] == "f32" and rep["first_diverging_module"] is None
    assert all(t["verdict"] == "PASS" for t in rep["tensors"])
    # the vit_* cases carry a Scenic training checkpoint: check loads the weights from it
    if (GOLDENS / name / "checkpoint").is_dir():
        assert any("checkpoint/" in n for n in rep["notes"])


def _copy(name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(GOLDENS / name, dst)
    return dst


def _perturb(npz: Path, key: str, delta: float = 1e-2) -> None:
    data = dict(np.load(npz))
    arr = data[key].copy()
    arr.flat[arr.size // 2] += delta
    data[key] = arr
    np.savez(npz, **data)


def _run_json(args, tmp_path):
    report = tmp_path / "report.json"
    code = main([*args, "--json", str(report)])
    return code, json.loads(report.read_text())


def test_perturbed_intermediate_fails_naming_tensor_and_module(tmp_path, capsys):
    case = _copy("encoder_mod_image", tmp_path)
    key = "inter/encoderblock_1/MlpBlock_0/Dense_0"
    _perturb(case / "outputs.npz", key)
    code, data = _run_json(["check", str(case)], tmp_path)
    assert code == 1
    (rep,) = data["reports"]
    assert rep["first_diverging_module"] == "encoderblock_1/MlpBlock_0/Dense_0"
    assert rep["first_diverging_tensor"] == key
    failed = [t["name"] for t in rep["tensors"] if t["verdict"] != "PASS"]
    assert failed == [key]
    text = capsys.readouterr().out
    assert "first diverging module: encoderblock_1/MlpBlock_0/Dense_0" in text
    assert "FAIL" in text and key in text


def test_perturbed_output_fails(tmp_path, capsys):
    case = _copy("v11_tokens3d", tmp_path)
    _perturb(case / "outputs.npz", "out")
    code, data = _run_json(["check", str(case)], tmp_path)
    assert code == 1
    (rep,) = data["reports"]
    assert rep["first_diverging_tensor"] == "out"
    assert rep["first_diverging_module"] == "(model output)"
    bad = [t for t in rep["tensors"] if t["verdict"] != "PASS"]
    assert [t["name"] for t in bad] == ["out"]
    # where the max is: the perturbed element
    ref = np.load(case / "outputs.npz")["out"]
    assert tuple(bad[0]["where"]) == np.unravel_index(ref.size // 2, ref.shape)
    assert "FAIL: 1 of" in capsys.readouterr().out


def test_perturbed_gradient_fails(tmp_path):
    case = _copy("fuser_norm", tmp_path)
    key = "params/token_masking/Dense_0/kernel"
    _perturb(case / "grads.npz", key)
    code, data = _run_json(["check", str(case)], tmp_path)
    assert code == 1
    (rep,) = data["reports"]
    assert rep["first_diverging_tensor"] == key
    assert rep["first_diverging_module"] == "token_masking/Dense_0"


def test_perturbed_weights_in_checkpoint_fail(tmp_path):
    """The vit_* cases load their weights from checkpoint/: a different checkpoint shows up."""
    case = _copy("vit_image_cls", tmp_path)
    shutil.rmtree(case / "checkpoint")
    from tokenlearner_torch.weights_convert.readers import read_checkpoint, write_flax_msgpack

    params = read_checkpoint(case / "params.msgpack")
    params = {k: v for k, v in params.items()}
    params["pre_logits"] = dict(params["pre_logits"])
    params["pre_logits"]["bias"] = np.asarray(params["pre_logits"]["bias"]) + 0.5
    (case / "checkpoint").mkdir()
    write_flax_msgpack(case / "checkpoint" / "checkpoint_7", params, step=7)
    code, data = _run_json(["check", str(case), "--no-grads"], tmp_path)
    assert code == 1
    assert data["reports"][0]["first_diverging_module"] == "pre_logits"


def test_check_a_folder_of_cases_and_quiet(tmp_path, capsys):
    root = tmp_path / "cases"
    root.mkdir()
    for name in ("v1_sum4d", "v1_mean3d"):
        shutil.copytree(GOLDENS / name, root / name)
    _perturb(root / "v1_mean3d" / "outputs.npz", "out")
    assert main(["check", str(root), "-q"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    verdicts = {line.split(" (")[0].rsplit("/", 1)[-1]: line.split("): ", 1)[1][:4] for line in out}
    assert verdicts == {"v1_mean3d": "FAIL", "v1_sum4d": "PASS"}


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["check"],
        ["check", "/no/such/case"],
        ["check", str(GOLDENS / "v1_sum4d"), "--mode", "nope"],
        ["check", str(GOLDENS / "v1_sum4d"), "--mode", "bf16"],  # an f32 case cannot be checked in bf16
        ["check", str(GOLDENS / "v1_sum4d"), "--device", "tpu"],
        ["frobnicate"],
        ["record", str(GOLDENS / "v1_sum4d" / "config.json")],  # -o missing
        ["live", "/no/such/config.json"],
        ["live", str(GOLDENS / "v1_sum4d"), "--input-shape", "garbage"],
    ],
)
def test_usage_errors_exit_2_with_one_line(args, capsys):
    assert main(args) == 2
    # Progress lines ("[  0.0s] importing jax and flax", printed when live runs first in a process) are not errors.
    err = "\n".join(l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("tokenlearner-parity: ["))
    if args:
        assert len(err.splitlines()) == 1, err
        assert err.startswith("tokenlearner-parity: error:")
        assert "Traceback" not in err


def test_broken_case_is_an_input_error(tmp_path, capsys):
    case = _copy("v1_sum4d", tmp_path)
    (case / "params.msgpack").write_bytes(b"not msgpack")
    assert main(["check", str(case)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "params.msgpack" in err


def test_wrong_weights_for_the_config_is_an_input_error(tmp_path, capsys):
    case = _copy("v1_sum4d", tmp_path)
    cfg = json.loads((case / "config.json").read_text())
    cfg["constructor_kwargs"]["num_tokens"] = 3
    (case / "config.json").write_text(json.dumps(cfg))
    assert main(["check", str(case)]) == 2
    assert "mis-shaped" in capsys.readouterr().err


def test_check_runs_with_jax_blocked(tmp_path):
    code = (
        "import sys\n"
        "for m in ('jax', 'jaxlib', 'flax'):\n"
        "    sys.modules[m] = None  # any import of them raises ImportError\n"
        "from tokenlearner_torch.parity.cli import main\n"
        f"rc = main(['check', {str(GOLDENS / 'vit_image_cls')!r}, {str(GOLDENS / 'fuser_norm')!r}, '-q'])\n"
        "assert sys.modules['jax'] is None\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASS") == 2


def test_live_without_jax_is_a_usage_error(tmp_path):
    code = (
        "import sys\n"
        "sys.modules['jax'] = None\n"
        "from tokenlearner_torch.parity.cli import main\n"
        f"sys.exit(main(['live', {str(GOLDENS / 'v1_sum4d')!r}]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------------------
# The accuracy rule (compare.py), the plain rule of stored cases, one convention for both commands
# ------------------------------------------------------------------------------------------------------
def test_accuracy_rule_passes_a_port_closer_to_float64_than_the_reference():
    from tokenlearner_torch.parity.compare import compare_tensor

    exact = np.array([0.5, -0.25, 1.0, 0.125])
    ref = exact + np.array([0.0, 3e-2, 0.0, 1e-7])  # the reference is off at one ill-conditioned element
    port = exact + np.array([1e-7, 1e-5, -1e-7, 0.0])
    plain = compare_tensor("t", "intermediate", "m", port, ref, 1e-4)
    assert plain.verdict == "FAIL" and plain.port_vs_f64 is None
    row = compare_tensor("t", "intermediate", "m", port, ref, 1e-4, exact=exact)
    assert row.verdict == "PASS" and row.rule == "accuracy" and row.reference_less_accurate
    assert row.port_vs_f64 == pytest.approx(1e-5) and row.ref_vs_f64 == pytest.approx(3e-2)
    assert row.max_abs == pytest.approx(3e-2 - 1e-5)  # the plain distance is still reported
    ok = compare_tensor("t", "intermediate", "m", ref + 1e-6, ref, 1e-4, exact=exact)
    assert ok.verdict == "PASS" and ok.rule == "plain" and not ok.reference_less_accurate


def test_accuracy_rule_is_elementwise():
    """A port error at one element cannot hide behind a larger reference error at another element (a rule
    on the two maxima, max|port - f64| <= max|ref - f64| + tol, would pass this port)."""
    from tokenlearner_torch.parity.compare import _describe, compare_tensor

    exact = np.zeros(4)
    ref = np.array([3e-2, 0.0, 0.0, 0.0])
    port = np.array([0.0, 1e-2, 0.0, 0.0])  # exact where the reference is off, wrong elsewhere
    row = compare_tensor("t", "gradient", "m", port, ref, 1e-4, exact=exact)
    assert row.port_vs_f64 < row.ref_vs_f64
    assert row.verdict == "FAIL" and row.rule == "" and row.excess_vs_f64 == pytest.approx(1e-2)
    assert "vs float64: port 1.00e-02, reference 3.00e-02" in _describe(row)


def test_stored_cases_keep_the_plain_rule(tmp_path):
    code, data = _run_json(["check", str(GOLDENS / "v11_tokens3d")], tmp_path)
    assert code == 0
    (rep,) = data["reports"]
    assert rep["accuracy_rule"] == "unavailable" and rep["passed_by_accuracy_rule"] == []
    assert {t["rule"] for t in rep["tensors"]} == {"plain"}
    assert all(t["port_vs_f64"] is None for t in rep["tensors"])


def test_help_is_plain_text(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "``" not in out and out.splitlines()[2].startswith("tokenlearner-parity: prove")
    assert main(["record", "--help"]) == 0
    record_help = " ".join(capsys.readouterr().out.split())
    for mode in ("f32", "tf32", "bf16", "f64"):
        assert mode in record_help.split("--mode", 2)[-1]
    for option in ("-q, --quiet", "--device", "--tol", "--no-grads", "--json"):
        assert option in record_help


def test_a_missing_source_exits_2_in_both_commands(tmp_path, capsys):
    """One convention: a usage or input error (here a missing path) exits 2, parity/conversion failure 1."""
    from tokenlearner_torch.weights_convert.cli import main as convert_main

    missing = str(tmp_path / "nope")
    assert main(["check", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tokenlearner-parity: error: {missing}: no such file or folder"
    assert convert_main([missing, "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tokenlearner-convert: error:") and missing in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    assert main(["check", str(tmp_path / "empty")]) == 2
    assert "holds no case folders" in capsys.readouterr().err


def test_check_weights_of_another_model_names_both(tmp_path, capsys):
    from tokenlearner_torch.weights_convert.cli import main as convert_main

    golden = GOLDENS / "vit_image_cls"
    out = tmp_path / "image_model"
    assert convert_main([str(golden / "checkpoint"), "-o", str(out), "--config", str(golden / "config.json"), "-q"]) == 0
    assert main(["check", str(GOLDENS / "vit_video_3dconv"), "--weights", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "image_model/ holds a TokenLearnerViT with tokenizer.type=dynamic" in err
    assert "vit_video_3dconv is a TokenLearnerViT with tokenizer.type=video" in err


@pytest.mark.parametrize("kind", ["file", "missing"])
def test_weights_that_are_not_a_folder_are_named_once(kind, tmp_path, capsys):
    """`check --weights FILE` repeated the path ("x: not a converted model folder (x: is a file, ...)")."""
    weights = tmp_path / "model.safetensors"
    if kind == "file":
        weights.write_bytes(b"not a folder")
    assert main(["check", str(GOLDENS / "v1_sum4d"), "--weights", str(weights), "-q"]) == 2
    err = capsys.readouterr().err
    state = "is a file" if kind == "file" else "no such folder"
    assert err == (f"tokenlearner-parity: error: --weights {weights}: {state}; expected a folder written by "
                   "tokenlearner-convert (model.safetensors + config.json)\n")
    assert err.count(str(weights)) == 1


def test_check_json_records_a_case_with_a_misspelled_field(tmp_path, capsys):
    case = tmp_path / "case"
    shutil.copytree(GOLDENS / "v1_sum4d", case)
    cfg = json.loads((case / "config.json").read_text())
    cfg["constructor_kwargs"]["use_sum_poolin"] = cfg["constructor_kwargs"].pop("use_sum_pooling", True)
    (case / "config.json").write_text(json.dumps(cfg))
    assert main(["check", str(case), "-q", "--json", str(tmp_path / "r.json")]) == 2
    want = (f"{case / 'config.json'}: TokenLearnerModule: unknown constructor argument 'use_sum_poolin'; "
            "did you mean 'use_sum_pooling'?")
    assert capsys.readouterr().err == f"tokenlearner-parity: error: {want}\n"
    assert json.loads((tmp_path / "r.json").read_text()) == {"passed": False, "reports": [], "errors": [want]}
