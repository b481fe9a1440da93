"""The `fxquant` command line: `demo` (end to end on built-in data) and `inspect` (quant nodes of an ONNX file).

Bare `fxquant` prints the help (exit status 2). Output piped into a reader that stops early (`fxquant
inspect m.onnx | head`) ends quietly instead of with a BrokenPipeError traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

USAGE_ERROR = 2
"""Exit status of a usage error (as argparse's), and of `fxquant` with no command."""


def _demo(args: argparse.Namespace) -> int:
    from fxquant.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, quiet=args.quiet, seed=args.seed)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import fxquant

    try:
        print(fxquant.report(args.model))
    except fxquant.FxQuantError as e:
        print(f"fxquant inspect: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `fxquant` command."""
    parser = argparse.ArgumentParser(
        prog="fxquant",
        description=__doc__.split("\n", 1)[0] if __doc__ else None,
        epilog="Run 'fxquant <command> --help' for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    demo = sub.add_parser("demo", help="train a float CNN on digits, quantize, fine-tune, export, verify, report")
    demo.add_argument("--out", default="fxquant-demo", help="output folder (ONNX, JSON summary, bit-width plot)")
    demo.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        help="random seed of the data split, float training and fine-tuning (default 0; same seed, same numbers)",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    inspect = sub.add_parser("inspect", help="list the quant nodes and integer initializers of an exported model")
    inspect.add_argument("model", help="path to an .onnx file exported by fxquant")
    inspect.set_defaults(func=_inspect)
    return parser


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a file descriptor (captured in tests)
        pass


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `fxquant` command; returns the exit status.

    With no command it prints the help on stderr and returns 2. When the reader of stdout goes away
    (`| head`), it stops quietly with status 1 (the Python documentation's advice for SIGPIPE).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except BrokenPipeError:
        _silence_stdout()
        return 1
    return status


if __name__ == "__main__":
    sys.exit(main())
