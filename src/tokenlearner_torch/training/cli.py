"""``tokenlearner-train``: run a Scenic experiment config as a training job (``train()`` on a built-in source).

    tokenlearner-train --config CONFIG.py[:ARG]|CONFIG.json --workdir DIR [--device cpu|cuda|cuda:N]
                       [--set key.sub=value ...] [--data_dir DIR] [--strict] [-q]

Scenic's ``main.py`` flags (``--config``, ``--workdir``) plus what a PyTorch user expects. The data come from
``config.dataset_name`` (``digits`` or ``image_folder``, :mod:`tokenlearner_torch.training.data`); the job
restores the newest ``checkpoint_<step>`` of ``--workdir`` and continues, so re-running the same command after
a crash or a Ctrl-C resumes it. Under ``torchrun`` each process trains its share of every global batch; only
rank 0 prints and writes.

Output: a progress bar on stderr when stderr is a terminal (step/total, loss, learning rate, steps/s, ETA;
redrawn at most 4 times a second, reading the loss from the device only then); otherwise one plain line per
train summary and per evaluation (the scalars Scenic writes at those steps). ``-q``: errors only.

Exit status: 0 trained; 1 the run failed; 2 a usage or input error (bad arguments, config, data or
checkpoint), one line on stderr, never a traceback; 130 interrupted (Ctrl-C or SIGTERM: the lead writes a
checkpoint of the last completed step first).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TextIO

from ..cli_common import (
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    Parser,
    UsageError,
    config_warnings,
    help_exit_status,
    one_line,
    print_error,
)

PROG = "tokenlearner-train"
_REDRAW_S = 0.25  # the bar syncs with the device at most this often


def _parser() -> Parser:
    p = Parser(prog=PROG, description="Train a TokenLearner ViT from a Scenic experiment config, as Scenic's "
               "classification_trainer.train() does (resumes from the newest checkpoint in --workdir).")
    p.add_argument("--config", required=True, metavar="CONFIG",
                   help="Scenic experiment config: a .py with get_config() (path.py:ARG calls get_config(ARG)) "
                        "or a .json")
    p.add_argument("--workdir", required=True, metavar="DIR",
                   help="checkpoints, metrics.jsonl and TensorBoard events; an existing run there is resumed")
    p.add_argument("--device", metavar="DEV", help="cpu, cuda or cuda:N (default: cpu; under torchrun with "
                   "CUDA: cuda:LOCAL_RANK)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, dotted for nested ones (e.g. num_training_steps=100, "
                        "lr_configs.base_learning_rate=1e-3); values are JSON when they parse; repeatable")
    p.add_argument("--data_dir", metavar="DIR", help="folder that relative dataset_configs paths "
                   "(image_folder's train_dir/valid_dir) are relative to")
    p.add_argument("--strict", action="store_true", help="a config key that no code reads is an error "
                   "(default: a warning)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return p


# -- config --------------------------------------------------------------------------------------------------
def _load(args: Any) -> dict[str, Any]:
    """The config file with ``--set`` applied, then checked once (unknown keys: a warning, with ``--strict``
    a ConfigError)."""
    from ..config_check import check_experiment_config
    from ..weights_convert.config import apply_sets, parse_set
    from .config import load_config, vit_model_fields

    config = load_config(args.config, check=False)
    apply_sets(config, [parse_set(item) for item in args.sets])
    check_experiment_config(config, strict=args.strict, model_fields=vit_model_fields())
    return config


def _device(text: Optional[str]) -> Optional[str]:
    if text is None:
        return None
    import torch

    try:
        dev = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r}: expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text!r}: expected cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return str(dev)


# -- output --------------------------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """The hook ``hook(step, logs)`` the loop calls after each step, and a tee of the summary writer.

    On a terminal: one bar line redrawn (``\\r``) at most every 0.25 s; the loss and learning rate are read
    from the device only then (one sync per redraw, none per step). Otherwise: one line per ``write_scalars``
    call of the loop (its train summaries and evaluations), nothing per step.
    """

    def __init__(self, total: int, *, stream: TextIO, tty: bool, enabled: bool = True) -> None:
        self.total, self.stream, self.tty, self.enabled = total, stream, tty, enabled
        self.first_step: Optional[int] = None
        self.t0 = 0.0
        self.last_draw = 0.0
        self.valid: dict[str, float] = {}
        self.pending: dict[str, float] = {}
        self.drawn = False

    def _rate(self, step: int, now: float) -> float:
        if self.first_step is None or step <= self.first_step or now <= self.t0:
            return float("nan")
        return (step - self.first_step) / (now - self.t0)

    def __call__(self, step: int, logs: Mapping[str, Any]) -> None:
        now = time.monotonic()
        if self.first_step is None:  # time from the end of the first step: excludes start-up and compilation
            self.first_step, self.t0 = step, now
            return
        if not (self.enabled and self.tty) or (now - self.last_draw < _REDRAW_S and step != self.total):
            return
        self.last_draw = now
        rate = self._rate(step, now)
        loss, lr = _scalar(logs.get("loss")), _scalar(logs.get("learning_rate"))
        eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
        width = 24
        done = int(width * step / max(self.total, 1))
        bar = "#" * done + "." * (width - done)
        valid = "".join(f" {k}={v:.4g}" for k, v in self.valid.items())
        line = (f"[{bar}] {step}/{self.total} loss={loss:.4f} lr={lr:.3g} {rate:.2f} steps/s "
                f"ETA {_duration(eta)}{valid}")
        self.stream.write("\r" + line[:160].ljust(100))
        self.stream.flush()
        self.drawn = True

    def scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """A summary the loop writes: remembered for the bar; off a terminal, one plain line per train summary
        (its metrics and learning rate; the loop writes them in two calls) and one per evaluation."""
        vals = {k: _scalar(v) for k, v in scalars.items()}
        for key in ("valid_accuracy", "valid_prec@1", "valid_loss"):
            if key in vals:
                self.valid[key] = vals[key]
        if not self.enabled or self.tty:
            return
        self.pending.update({k: v for k, v in vals.items() if not k.startswith("l2_")})
        if "learning_rate" in vals or any(k.startswith("valid_") for k in vals) or "num_trainable_params" in vals:
            self._print(step)

    def _print(self, step: int) -> None:
        now = time.monotonic()
        rate = self._rate(step, now)
        eta = (self.total - step) / rate if rate == rate and rate > 0 else float("nan")
        shown = " ".join(f"{k}={v:.6g}" for k, v in self.pending.items())
        timing = f" ({rate:.2f} steps/s, ETA {_duration(eta)})" if rate == rate else ""
        print(f"{PROG}: step {step}/{self.total}: {shown}{timing}", file=self.stream, flush=True)
        self.pending = {}

    def end(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _scalar(value: Any) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return float("nan")


class _TeeWriter:
    """The loop's writer, reporting each ``write_scalars`` to :class:`Progress` too."""

    def __init__(self, inner: Any, progress: Progress) -> None:
        self.inner, self.progress = inner, progress

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        self.inner.write_scalars(step, scalars)
        self.progress.scalars(step, scalars)

    def __getattr__(self, name: str) -> Any:  # flush, close, ... of the inner writer
        return getattr(self.inner, name)


def _newest_checkpoint(workdir: str) -> Optional[str]:
    best = None
    for p in Path(workdir).glob("checkpoint_*"):
        tail = p.name[len("checkpoint_"):]
        if tail.isdigit() and (best is None or int(tail) > best[0]):
            best = (int(tail), p.name)
    return best[1] if best else None


# -- the run -------------------------------------------------------------------------------------------------
class _Signals:
    """SIGTERM handled as Ctrl-C: it goes to the SIGINT handler in force (the loop's, which finishes the step,
    writes a checkpoint and raises KeyboardInterrupt; else KeyboardInterrupt at once)."""

    def __init__(self) -> None:
        self.terminated = False
        self._previous: Any = None

    def _on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002 - signal's API
        self.terminated = True
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler) and handler is not signal.default_int_handler:
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> "_Signals":
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def run(args: Any, *, stderr: TextIO) -> int:
    from .data import build_dataset
    from .distributed import get_context
    from .loop import get_num_training_steps, train
    from .writers import MetricsWriter

    config = _load(args)
    device = _device(args.device)
    ctx = get_context(device)
    try:
        dataset = build_dataset(config, rank=ctx.rank, world_size=ctx.world_size, data_dir=args.data_dir)
        try:
            total, _ = get_num_training_steps(config, dataset.meta_data)
            progress = Progress(total, stream=stderr, tty=stderr.isatty(), enabled=ctx.is_lead and not args.quiet)
            writer = _TeeWriter(MetricsWriter(args.workdir), progress) if ctx.is_lead else None
            try:
                _, train_summary, eval_summary = train(config=config, dataset=dataset, workdir=args.workdir,
                                                       writer=writer, device=device, hooks=(progress,),
                                                       context=ctx)
            finally:
                progress.end()
                if writer is not None:
                    writer.close()
        finally:
            dataset.close()
    finally:
        ctx.close()
    if ctx.is_lead and not args.quiet:
        summary = {**{f"train_{k}": v for k, v in (train_summary or {}).items()},
                   **{f"valid_{k}": v for k, v in (eval_summary or {}).items()}}
        shown = " ".join(f"{k}={_scalar(v):.6g}" for k, v in summary.items()) or "nothing left to train"
        print(f"{PROG}: done: {total} steps; {shown}; newest checkpoint: "
              f"{Path(args.workdir) / (_newest_checkpoint(args.workdir) or '-')}", file=stderr, flush=True)
    return EXIT_OK


def _input_errors() -> tuple[type[BaseException], ...]:
    from ..errors import TokenLearnerError

    return (TokenLearnerError, UsageError)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit status (0 trained, 1 failed, 2 usage or input error, 130 interrupted)."""
    stderr = sys.stderr
    workdir = None
    signals = _Signals()
    try:
        args = _parser().parse_args(argv)
        workdir = args.workdir
        with signals, config_warnings(PROG):
            return run(args, stderr=stderr)
    except SystemExit as exc:  # --help
        return help_exit_status(exc)
    except KeyboardInterrupt:
        what = "terminated (SIGTERM)" if signals.terminated else "interrupted"
        ckpt = _newest_checkpoint(workdir) if workdir and os.path.isdir(workdir) else None
        where = f"; newest checkpoint: {Path(workdir) / ckpt} (run the same command to resume)" if ckpt else ""
        print_error(PROG, f"{what}{where}")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        if isinstance(exc, _input_errors()):
            print_error(PROG, one_line(exc))
            return EXIT_USAGE
        print_error(PROG, f"{type(exc).__name__}: {one_line(exc)}")
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
