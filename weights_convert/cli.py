"""``tokenlearner-convert``: Scenic/Flax checkpoints to PyTorch folders, and back.

    tokenlearner-convert SRC -o OUT [--config FILE] [--set KEY=VALUE ...] [--num-classes N] [--subtree PATH]
                         [--step N] [--dtype keep|float32|bfloat16] [--force] [--allow-nonfinite]
                         [--report FILE] [--verify] [--quiet]
    tokenlearner-convert --to-flax FOLDER -o FILE_OR_DIR [--step N] [--wrap optax-trainstate|variables|bare]

Exit status: 0 converted; 1 the conversion failed (the checkpoint does not fit the model, NaN/Inf weights, the
output could not be written); 2 a usage or input error (bad arguments, fields to pass, a missing or unreadable
source or config, an existing output without --force). The error's first line on stderr is a complete summary;
indented detail lines may follow.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from tokenlearner_torch.cli_common import (
    EXIT_FAIL, EXIT_OK, EXIT_USAGE, Parser, UsageError, config_warnings, help_exit_status, print_error,
    write_text_atomic,
)  # fmt: skip

PROG = "tokenlearner-convert"


def _parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Convert a Scenic/Flax TokenLearner checkpoint into a PyTorch folder (model.safetensors + "
        "config.json), or (--to-flax) a converted folder back into a Flax msgpack checkpoint.",
        epilog="Exit status: 0 ok; 1 the conversion failed (the checkpoint does not fit the model, NaN/Inf, the output "
        "could not be written); 2 usage or input error (bad arguments, missing or unreadable source or config).",
    )
    p.add_argument("src", metavar="SRC", help="checkpoint file or directory (Flax msgpack, Orbax, .npz); with --to-flax: a converted folder")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder (with --to-flax: the Flax checkpoint file, or a folder for checkpoint_<step>: an existing one, or a path ending in '/')")
    p.add_argument("--config", metavar="FILE", help="golden-style config.json, or a Scenic experiment config (.py with get_config() or .json)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="set a constructor field, dotted for nested ones (e.g. tokenizer.tokenlearner_loc=9, classifier=gap); repeatable")
    p.add_argument("--num-classes", type=int, metavar="N", help="number of classes (with a Scenic experiment config; else checked against the tree)")
    p.add_argument("--scenic-class", metavar="NAME", help="the Scenic class to build (default: from the config or the tree)")
    p.add_argument("--subtree", metavar="PATH", help="convert one module's params out of a larger model, e.g. 'TokenLearnerModuleV11_0' or 'a/b'")
    p.add_argument("--step", type=int, metavar="N", help="the step to read from a checkpoint directory (default: latest); with --to-flax: the step to record")
    p.add_argument("--dtype", choices=("keep", "float32", "bfloat16"), default="keep", help="keep the source dtype (default) or cast floating-point weights")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert even if weights contain NaN/Inf (they are reported)")
    p.add_argument("--report", metavar="FILE", help="write the coverage report as JSON")
    p.add_argument("--verify", action="store_true", help="load the written folder strictly and check it against the source, bit for bit")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")
    p.add_argument("--to-flax", action="store_true", help="SRC is a converted folder: write its weights as a Flax msgpack checkpoint")
    p.add_argument("--wrap", choices=("optax-trainstate", "variables", "bare"), default="optax-trainstate", help="with --to-flax: Scenic TrainState (default), {'params': ...} or the bare tree")
    return p


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _error_text(exc: BaseException) -> str:
    """The error for stderr: its first line as one complete line, then its indented detail lines as they are."""
    first, *details = str(exc).strip().splitlines() or [type(exc).__name__]
    return "\n".join([" ".join(first.split()), *(line.rstrip() for line in details)])


def exit_status(exc: BaseException) -> int:
    """2 for a usage or input error, 1 for a conversion that failed (the convention of both commands)."""
    from tokenlearner_torch.errors import CheckpointError, ConfigError

    from .readers import OutputError

    if isinstance(exc, OutputError):
        return EXIT_FAIL  # the output could not be written: the conversion failed
    if isinstance(exc, (UsageError, ConfigError, CheckpointError)):
        return EXIT_USAGE  # arguments, config or source: the input is wrong or unreadable
    return EXIT_FAIL


def _write_json(path: str, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


def _verify(out: str, src: str, step: int | None, subtree: str | None, dtype: str) -> str:
    """Load the written folder strictly and compare every parameter with the source, bit for bit.

    Leaf by leaf, in torch layout, each source leaf's pages released once compared: the check holds the
    loaded model and about one leaf of the source (not a second and third copy of the parameters).
    """
    import numpy as np

    from tokenlearner_torch.errors import ConversionError

    from .mapping import _to_numpy, flatten_tree, leaf_table
    from .pretrained import load_pretrained
    from .readers import read_checkpoint_deferred

    model = load_pretrained(out)
    leaves = leaf_table(model)
    if dtype != "keep":
        return f"verify: loaded strictly ({len(leaves)} leaves; values cast to {dtype}, bitwise check skipped)"
    params, _, digest, release = read_checkpoint_deferred(src, step=step, subtree=subtree)
    digest.close()
    ref = flatten_tree(params)
    bad = sorted(set(ref) - {leaf.flax_path for leaf in leaves})
    for leaf in leaves:
        source = ref.get(leaf.flax_path)
        if source is None:
            bad.append(leaf.flax_path)
            continue
        want = leaf.rule.to_torch(source, leaf.module)
        got = _to_numpy(leaf.param.detach())
        as_bits = np.dtype(f"u{want.dtype.itemsize}")
        if got.shape != want.shape or got.dtype != want.dtype or not np.array_equal(got.view(as_bits), want.view(as_bits)):
            bad.append(leaf.flax_path)
        release(source)
    if bad:
        raise ConversionError(f"verify: {len(bad)} leaves differ from the source after loading {out}: {', '.join(bad[:5])}")
    return f"verify: loaded strictly; all {len(ref)} leaves equal the source bit for bit"


def _run(args: argparse.Namespace) -> int:
    from tokenlearner_torch.errors import ConfigError

    if args.to_flax:
        conflicting = [n for n, v in (("--config", args.config), ("--set", args.sets), ("--subtree", args.subtree), ("--num-classes", args.num_classes)) if v]
        if conflicting:
            raise UsageError(f"--to-flax takes a converted folder; {', '.join(conflicting)} do(es) not apply")
        from .export import to_flax_checkpoint

        target = Path(args.output)
        as_dir = target.is_dir() or args.output.endswith(("/", os.sep))  # as to_flax_checkpoint decides
        final = target / f"checkpoint_{args.step}" if as_dir and args.step is not None else target
        if final.exists() and not final.is_dir() and not args.force:
            raise ConfigError(f"{final}: already exists (pass --force to replace it)")
        info = to_flax_checkpoint(args.src, args.output, step=args.step, wrap=args.wrap)
        if args.report:
            _write_json(args.report, {"ok": True, **info})
        if not args.quiet:
            print(f"wrote {info['path']} (Flax msgpack, {info['wrap']}, {info['leaves']} leaves, step {info['step']}, sha256 {info['sha256'][:16]}...)")
        return EXIT_OK

    from .config import parse_set
    from .convert import ConversionReport, convert

    for item in args.sets:
        try:
            parse_set(item)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes must be >= 1, got {args.num_classes}")
    # The folder as Path spells it: 'out/' and 'out' are the same folder (no 'wrote: out//' in the summary).
    args.output = str(Path(args.output))
    rep = ConversionReport()
    try:
        if Path(args.output).exists() and not args.force:  # the command line's wording (the Python API's: force=True)
            raise ConfigError(f"{args.output}: already exists (pass --force to replace it)")
        convert(
            args.src, args.output, config=args.config, sets=args.sets, num_classes=args.num_classes,
            scenic_class=args.scenic_class, subtree=args.subtree, step=args.step, dtype=args.dtype,
            force=args.force, allow_nonfinite=args.allow_nonfinite, report=rep,
        )  # fmt: skip
    except BaseException as exc:
        if args.report and isinstance(exc, Exception):
            rep.error = str(exc)
            try:
                _write_json(args.report, rep.to_dict())
            except OSError:
                pass
        raise
    if args.report:
        _write_json(args.report, rep.to_dict())
    if not args.quiet:
        print(rep.summary())
    if args.verify:
        msg = _verify(args.output, args.src, args.step, args.subtree, args.dtype)
        if not args.quiet:
            print(msg)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 conversion failed, 2 usage or input error)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print_error(PROG, _one_line(exc), kind="usage error")
        return EXIT_USAGE
    except SystemExit as exc:  # --help
        return help_exit_status(exc)
    try:
        with config_warnings(PROG):  # a config key no code reads: one warning line on stderr
            return _run(args)
    except UsageError as exc:
        print_error(PROG, _one_line(exc), kind="usage error")
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return EXIT_FAIL
    except MemoryError:
        print_error(PROG, "out of memory")
        return EXIT_FAIL
    except Exception as exc:  # TokenLearnerError, OSError and anything unexpected: a summary line, no traceback
        from tokenlearner_torch.errors import TokenLearnerError

        from .mismatch import ParamsMismatchError

        if isinstance(exc, (TokenLearnerError, OSError)):
            text = _error_text(exc)
        else:
            text = f"unexpected {type(exc).__name__}: {_one_line(exc)[:2000]}"
        if isinstance(exc, ParamsMismatchError) and exc.truncated:
            text += f"\n  (every entry: in {args.report}, under 'mismatch')" if args.report else "\n  (every entry: pass --report FILE)"
        print_error(PROG, text)
        return exit_status(exc)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
