"""tokenlearner-parity: prove the PyTorch port computes what Scenic computes.

  tokenlearner-parity check CASE_DIR...          stored cases (goldens format) vs the port; no jax needed
  tokenlearner-parity live CONFIG|CASE_DIR       the Flax reference and the port side by side
  tokenlearner-parity record CONFIG -o CASE_DIR  write a case of your model with the Flax reference
  tokenlearner-parity train CONFIG|CASE_DIR       K training steps vs Scenic's train_step (parity/train.py)

Exit status (as tokenlearner-convert): 0 parity holds, 1 parity failure, 2 usage or input error (bad
arguments, a missing or unreadable path, weights that do not fit the config; one line on stderr).
Progress goes to stderr, reports to stdout; -q prints only the summary line(s).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from tokenlearner_torch.cli_common import (
    EXIT_FAIL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, Parser, UsageError, config_warnings, help_exit_status,
    one_line, print_error, print_reports, write_reports_json,
)  # fmt: skip

PROG = "tokenlearner-parity"
MODE_CHOICES = ("f64", "f32", "tf32", "bf16")
ACCURACY_CHOICES = ("auto", "always", "off")  # api.ACCURACY_CHOICES, without importing the api for --help
__all__ = ["main", "EXIT_OK", "EXIT_FAIL", "EXIT_USAGE", "UsageError"]


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", parser_class=Parser, metavar="{check,live,record,train}")

    def common(sp: argparse.ArgumentParser, *, json_out: bool = True) -> None:
        sp.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the port runs (default cpu)")
        sp.add_argument("--tol", type=float, default=None, help="override the mode's tolerance (scaled error)")
        sp.add_argument("--no-grads", action="store_true", help="compare the forward pass only")
        if json_out:
            sp.add_argument("--json", metavar="FILE", help="write the report(s) as JSON ('-' for stdout)")
            sp.add_argument("--plot", metavar="FILE.png", help="draw the per-module errors along the execution order "
                            "(needs the viz extra: matplotlib)")
        sp.add_argument("-v", "--verbose", action="store_true", help="list every tensor, not only the first 40")
        sp.add_argument("-q", "--quiet", action="store_true", help="print only the summary line(s), no progress")

    c = sub.add_parser("check", help="check stored cases (no jax needed)",
                       description="The port against stored cases: output, every intermediate, every gradient. "
                       "A folder holding case folders (e.g. tests/fixtures/goldens) checks them all.")
    c.add_argument("cases", nargs="+", metavar="CASE_DIR")
    c.add_argument("--mode", choices=MODE_CHOICES, default=None,
                   help="precision mode (default: the mode the case was recorded in; f32 for the goldens)")
    c.add_argument("--weights", metavar="FOLDER", help="use the weights of a folder written by "
                   "tokenlearner-convert instead of the case's own (one case only)")
    common(c)

    def reference_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("config", metavar="CONFIG|CASE_DIR",
                        help="a JSON config file (scenic_class, constructor_kwargs, inputs shapes), the JSON text "
                        "itself ('{...}'), or a case folder")
        sp.add_argument("--checkpoint", metavar="PATH", help="the weights: a Scenic/Flax checkpoint, or a folder "
                        "written by tokenlearner-convert (default: the case's weights, or random ones)")
        sp.add_argument("--inputs", metavar="NPZ", help="inputs by name in an .npz (default: random N(0,1))")
        sp.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="shape of a random input (repeatable); overrides the config's")
        sp.add_argument("--seed", type=int, default=None, help="seed of random weights/inputs (default: config's or 0)")
        sp.add_argument("--scenic", choices=("auto", "never"), default="auto",
                        help="auto: genuine Scenic when importable, else the project's Flax reference")

    lv = sub.add_parser("live", help="run the Flax reference and the port side by side",
                        description="Runs the Flax reference (genuine Scenic when importable) and the port on the "
                        "same weights and inputs and compares every tensor.")
    reference_args(lv)
    lv.add_argument("--mode", default="f32", choices=MODE_CHOICES + ("all",), help="precision mode (default f32)")
    lv.add_argument("--no-jit", action="store_true", help="run the Flax reference eagerly")
    lv.add_argument("--accuracy", choices=ACCURACY_CHOICES, default="auto",
                    help="the accuracy rule: a tensor failing the plain rule passes when the port is elementwise as "
                    "close to a float64 run of the reference as the reference is. auto (default): run the float64 "
                    "reference when a tensor fails; always: in any case (both distances for every tensor); off")
    common(lv)

    rc = sub.add_parser("record", help="write a case of your model with the Flax reference",
                        description="Writes a case folder (goldens format) computed by the Flax reference, to commit "
                        "and check in CI without jax.")
    reference_args(rc)
    rc.add_argument("-o", "--output", required=True, metavar="CASE_DIR", help="the case folder to write")
    rc.add_argument("--mode", default="f32", choices=MODE_CHOICES,
                    help="f32 (default), tf32 (CUDA TF32 matmuls; on CPU as f32), bf16, or f64 (float64 case: "
                    "check then verifies to 1e-10)")
    rc.add_argument("--copy-checkpoint", action="store_true", help="copy --checkpoint into CASE_DIR/checkpoint/")
    rc.add_argument("--force", action="store_true", help="overwrite a non-empty CASE_DIR")
    rc.add_argument("--check", action="store_true", help="then run check on the written case (with --device, "
                    "--tol, --no-grads, --json)")
    common(rc)
    from .train import add_train_parser  # tokenlearner-parity train: parity/train.py

    add_train_parser(sub, common)
    return p


def _shapes(items: Sequence[str]) -> dict[str, list[int]] | None:
    if not items:
        return None
    out = {}
    for item in items:
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            out[name.strip()] = [int(d) for d in dims.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            raise UsageError(f"--input-shape {item!r}: expected NAME=D0,D1,... (e.g. x=2,32,32,3)") from None
    return out


def _progress(args: argparse.Namespace) -> Any:
    """A callback printing one line per phase to stderr (with the seconds since the start), silent with -q."""
    if getattr(args, "quiet", False):
        return None
    import time

    start = time.monotonic()

    def say(line: str) -> None:
        print(f"{PROG}: [{time.monotonic() - start:5.1f}s] {line}", file=sys.stderr, flush=True)

    return say


def _plot_path(args: argparse.Namespace) -> None:
    """Refuse a --plot that cannot be written before anything runs."""
    if not args.plot:
        return
    path = Path(args.plot)
    if path.suffix.lower() != ".png" or not path.parent.is_dir():
        raise UsageError(f"--plot {path}: expected a .png file in an existing folder")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'tokenlearner-torch[viz]'") from None


def _write_plot(reports: list[Any], args: argparse.Namespace) -> None:
    if args.plot and reports:
        from .plot import plot_reports

        plot_reports(reports, args.plot)
        if not args.quiet:  # a progress line: stdout keeps the reports only
            print(f"{PROG}: wrote {args.plot}", file=sys.stderr)


def _cmd_check(args: argparse.Namespace) -> int:
    from .api import check_case
    from .cases import find_cases
    from .train import check_training_case, is_training_case

    _plot_path(args)
    reports, errors = [], []
    if args.weights and (len(args.cases) != 1 or len(find_cases(args.cases[0])) != 1):
        raise UsageError("--weights takes exactly one case folder")
    if args.weights and not Path(args.weights).is_dir():
        state = "is a file" if Path(args.weights).exists() else "no such folder"
        raise UsageError(f"--weights {args.weights}: {state}; expected a folder written by tokenlearner-convert "
                         "(model.safetensors + config.json)")
    for arg in args.cases:
        found = find_cases(arg)
        if not found:
            errors.append(f"{arg}: no such file or folder" if not Path(arg).exists() else
                          f"{arg}: not a case folder (no config.json) and holds no case folders")
            continue
        for case in found:
            try:
                if is_training_case(case):  # a training case (tests/fixtures/train_goldens format): parity/train.py
                    reports.append(check_training_case(case, tol=args.tol, device=args.device))
                    continue
                reports.append(check_case(case, mode=args.mode, device=args.device, tol=args.tol,
                                          grads=not args.no_grads, weights=args.weights))
            except _input_errors() as exc:
                errors.append(one_line(exc))
    print_reports(reports, args)
    for e in errors:
        print_error(PROG, e)
    write_reports_json(reports, errors, args)
    _write_plot(reports, args)
    if errors:
        return EXIT_USAGE
    return EXIT_OK if all(r.passed for r in reports) else EXIT_FAIL


def _cmd_live(args: argparse.Namespace) -> int:
    from .api import live

    _plot_path(args)
    modes = list(MODE_CHOICES) if args.mode == "all" else [args.mode]
    reports = []
    say = _progress(args)
    for mode in modes:
        reports.append(
            live(args.config, checkpoint=args.checkpoint, inputs=args.inputs, input_shapes=_shapes(args.input_shape),
                 mode=mode, device=args.device, seed=args.seed, tol=args.tol, grads=not args.no_grads,
                 prefer_genuine=args.scenic == "auto", jit=not args.no_jit, accuracy=args.accuracy, progress=say)
        )
    print_reports(reports, args)
    write_reports_json(reports, [], args)
    _write_plot(reports, args)
    return EXIT_OK if all(r.passed for r in reports) else EXIT_FAIL


def _cmd_record(args: argparse.Namespace) -> int:
    from .api import check_case, record

    if args.copy_checkpoint and not args.checkpoint:
        raise UsageError("--copy-checkpoint needs --checkpoint")
    if (args.json or args.plot) and not args.check:
        raise UsageError("--json and --plot report the check of the written case: add --check")
    out = Path(args.output)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out}: exists and is not empty (pass --force to overwrite it)")
    if args.check:
        _plot_path(args)
    path = record(args.config, args.output, checkpoint=args.checkpoint, inputs=args.inputs,
                  input_shapes=_shapes(args.input_shape), mode=args.mode, seed=args.seed,
                  copy_checkpoint=args.copy_checkpoint, overwrite=args.force, prefer_genuine=args.scenic == "auto",
                  progress=_progress(args))
    files = ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()))
    print(f"recorded case {path} (mode {args.mode})" + ("" if args.quiet else f": {files}"))
    if args.check:
        rep = check_case(path, device=args.device, tol=args.tol, grads=not args.no_grads)
        print_reports([rep], args)
        write_reports_json([rep], [], args)
        _write_plot([rep], args)
        return EXIT_OK if rep.passed else EXIT_FAIL
    return EXIT_OK


def _input_errors() -> tuple[type[BaseException], ...]:
    from tokenlearner_torch.errors import TokenLearnerError

    from .cases import CaseError

    return (CaseError, TokenLearnerError, ValueError, OSError)


def _error_record(args: argparse.Namespace | None, text: str) -> None:
    """``--json``: an error record ``{"passed": false, "reports": [], "errors": [text]}`` when the command
    stopped on bad input before writing its reports (as ``check`` records a bad case)."""
    if args is None or not getattr(args, "json", None) or getattr(args, "json_written", False):
        return
    if args.command == "record" and not args.check:  # record's --json reports the check it did not run
        return
    try:
        write_reports_json([], [text], args)
    except UsageError:  # the --json path itself cannot be written: the error line says enough
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 pass, 1 parity failure, 2 usage or input error)."""
    parser = _parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_USAGE
        from .train import cmd_train

        handler = {"check": _cmd_check, "live": _cmd_live, "record": _cmd_record, "train": cmd_train}[args.command]
        with config_warnings(PROG):  # an experiment-config key no code reads: one warning line on stderr
            return handler(args)
    except SystemExit as exc:  # --help
        return help_exit_status(exc)
    except UsageError as exc:
        text = str(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - input problems surface as exceptions of many kinds
        text = one_line(exc) if isinstance(exc, _input_errors()) else f"{type(exc).__name__}: {one_line(exc)}"
    print_error(PROG, text)
    _error_record(args, text)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
