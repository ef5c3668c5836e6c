"""What every command line of the project shares: exit codes, usage errors, one-line error text, JSON output
and config warnings on stderr.

Used by ``tokenlearner-convert`` (weights_convert/cli.py), ``tokenlearner-parity`` (parity/cli.py and
parity/train.py), ``tokenlearner-viz`` (viz/cli.py) and ``tokenlearner-train`` (training/cli.py). It imports
nothing of the project at module level, so any command module may import it without a circle.

The conventions:

* exit status :data:`EXIT_OK` (0) success, :data:`EXIT_FAIL` (1) the work failed (parity does not hold, a
  conversion or a training run failed), :data:`EXIT_USAGE` (2) a usage or input error (bad arguments, a
  missing or unreadable file, a config that does not fit), :data:`EXIT_INTERRUPTED` (130) Ctrl-C;
* a usage error is a :class:`UsageError`; :class:`Parser` raises one for bad arguments (instead of
  argparse's usage dump and ``SystemExit(2)``);
* an error is ONE line on stderr: ``PROG: error: <text>`` (:func:`print_error`, :func:`one_line`), never a
  traceback;
* ``--json FILE`` / ``--json -`` output goes through :func:`emit_json` (complete file or nothing); reports
  (parity, training) print with :func:`print_reports` and go to JSON with :func:`write_reports_json`;
* a config warning (:class:`tokenlearner_torch.config_check.ConfigWarning`: a key no code reads) is one line
  ``PROG: warning: <text>`` on stderr inside :func:`config_warnings`; with ``--strict`` the checker raises
  a :class:`~tokenlearner_torch.errors.ConfigError` instead (exit 2).

A typical ``main``::

    def main(argv=None) -> int:
        try:
            args = _parser().parse_args(argv)
            with config_warnings(PROG):
                return run(args)
        except SystemExit as exc:            # --help
            return help_exit_status(exc)
        except UsageError as exc:
            print_error(PROG, str(exc))
            return EXIT_USAGE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional, Sequence, TextIO

__all__ = [
    "EXIT_OK",
    "EXIT_FAIL",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "UsageError",
    "Parser",
    "one_line",
    "print_error",
    "help_exit_status",
    "emit_json",
    "write_text_atomic",
    "config_warnings",
    "print_reports",
    "write_reports_json",
]

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad arguments or input named on the command line: one line on stderr, exit status 2."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`UsageError` with one line (no usage dump):
    ``"<argparse's message> (see <prog> --help)"``. Pass ``parser_class=Parser`` to ``add_subparsers`` so that
    a subcommand's errors name the subcommand's ``--help``."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def one_line(exc: BaseException) -> str:
    """An exception's text as one line: its first line, then ``(+N more lines: a; b; c)`` when it has more."""
    text = str(exc).strip() or type(exc).__name__
    first, *rest = text.splitlines()
    if not rest:
        return first
    shown = "; ".join(line.strip() for line in rest[:3])
    return f"{first} (+{len(rest)} more lines: {shown})"


def print_error(prog: str, text: str, *, kind: str = "error", file: Optional[TextIO] = None) -> None:
    """``PROG: <kind>: <text>`` on stderr (``kind``: ``error``, ``usage error``, ``warning``)."""
    print(f"{prog}: {kind}: {text}", file=file or sys.stderr, flush=True)


def help_exit_status(exc: SystemExit) -> int:
    """The status of argparse's ``SystemExit`` (``--help`` / ``--version``: 0); any other code is a usage error."""
    if exc.code is None:
        return EXIT_OK
    return exc.code if isinstance(exc.code, int) else EXIT_USAGE


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and a rename: the file is
    complete or absent (never partial). An ``OSError`` propagates; the temporary file is removed."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def emit_json(payload: Any, dest: str, *, option: str = "--json", indent: int = 2) -> None:
    """Write ``payload`` as JSON to ``dest``: ``'-'`` prints it on stdout, anything else is a file written
    atomically. A file that cannot be written is a :class:`UsageError` naming ``option`` and the path."""
    text = json.dumps(payload, indent=indent, default=str)
    if dest == "-":
        print(text, flush=True)
        return
    try:
        write_text_atomic(dest, text + "\n")
    except OSError as exc:
        raise UsageError(f"{option} {dest}: cannot write ({exc.strerror or exc})") from None


def print_reports(reports: Sequence[Any], args: argparse.Namespace) -> None:
    """Reports (objects with ``subject``, ``passed``, ``summary()``, ``to_text(verbose=)``: the parity and
    training reports) on stdout: the full text of each, or with ``args.quiet`` one summary line each."""
    quiet, verbose = bool(getattr(args, "quiet", False)), bool(getattr(args, "verbose", False))
    for rep in reports:
        if quiet:
            print(f"{rep.subject}: {rep.summary()}")
        else:
            print(rep.to_text(verbose=verbose))
            print()
    if len(reports) > 1 and not quiet:
        print(f"{sum(r.passed for r in reports)} of {len(reports)} passed")


def write_reports_json(reports: Sequence[Any], errors: Sequence[str], args: argparse.Namespace) -> None:
    """``--json FILE|-`` (``args.json``; nothing when unset): ``{"passed", "reports", "errors"}``, where
    ``passed`` needs at least one report, all passing, and no error. Sets ``args.json_written`` so that a
    command's error handler writes an error record only when nothing was written."""
    dest = getattr(args, "json", None)
    if not dest:
        return
    payload = {
        "passed": bool(reports) and all(r.passed for r in reports) and not errors,
        "reports": [r.to_dict() for r in reports],
        "errors": list(errors),
    }
    args.json_written = True
    emit_json(payload, dest)


@contextlib.contextmanager
def config_warnings(prog: str, file: Optional[TextIO] = None) -> Iterator[None]:
    """Inside the block, each :class:`~tokenlearner_torch.config_check.ConfigWarning` prints once as
    ``PROG: warning: <text>`` on stderr (no file/line prefix, no source line); other warnings keep Python's
    handling. The same text is printed once even when a config is checked twice (loaded, then trained)."""
    from .config_check import ConfigWarning  # lazy: a CLI's --help stays fast

    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", ConfigWarning)
        original = warnings.showwarning

        def show(message, category, filename, lineno, file_=None, line=None):  # noqa: ANN001 - warnings' API
            if isinstance(category, type) and issubclass(category, ConfigWarning):
                text = str(message)
                if text not in seen:
                    seen.add(text)
                    print_error(prog, text, kind="warning", file=file)
                return
            original(message, category, filename, lineno, file_, line)

        warnings.showwarning = show
        yield
