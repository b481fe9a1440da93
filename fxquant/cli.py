"""The `fxquant` command line: `demo` (end to end on built-in data) and `inspect` (quant nodes of an ONNX file)."""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional


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
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `fxquant` command."""
    parser = argparse.ArgumentParser(prog="fxquant", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a float CNN on digits, quantize, fine-tune, export, verify, report")
    demo.add_argument("--out", default="fxquant-demo", help="output folder (ONNX, JSON summary, bit-width plot)")
    demo.add_argument("--steps", type=int, default=300, help="fine-tuning steps")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)
    inspect = sub.add_parser("inspect", help="list the quant nodes and integer initializers of an exported model")
    inspect.add_argument("model", help="path to an .onnx file exported by fxquant")
    inspect.set_defaults(func=_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `fxquant` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
