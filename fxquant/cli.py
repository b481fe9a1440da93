"""The `fxquant` command line: `demo` (end to end on built-in data), `inspect` (quant nodes of an ONNX file)
and `quantize` (a user's own model, `fxquant.quantize_cli`).

Bare `fxquant` prints the help (exit status 2). Bad input to a command is one line on stderr and exit status
2. Warnings print as one line each (`fxquant: warning: ...`), without the source line that raised them;
torch's own deprecation notices about its pytree internals, which no user can act on, are dropped.
Output piped into a reader that stops early (`fxquant inspect m.onnx | head`) ends quietly instead of with a
BrokenPipeError traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import List, Optional, TextIO, Type, Union

USAGE_ERROR = 2
"""Exit status of a usage error (as argparse's), and of `fxquant` with no command."""
INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as shells report it)."""


def _demo(args: argparse.Namespace) -> int:
    from fxquant.demo import run_demo

    run_demo(out_dir=args.out, steps=args.steps, quiet=args.quiet, seed=args.seed)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    import fxquant

    try:
        rep = fxquant.report(args.model)
    except fxquant.FxQuantError as e:
        print(f"fxquant inspect: {e}", file=sys.stderr)
        return USAGE_ERROR
    print(rep)
    if args.plot:
        from fxquant.plots import plot_bits

        plot_bits(rep.rows, args.plot, title=f"bits per quantizer of {os.path.basename(args.model)}")
        print(f"wrote {args.plot}")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from fxquant.errors import FxQuantError
    from fxquant.quantize_cli import parse_first_last_bits, run_quantize

    try:
        run_quantize(
            args.model, args.data, args.bits, weights=args.weights, steps=args.steps, out_dir=args.out,
            first_last_bits=parse_first_last_bits(args.first_last_bits), seed=args.seed,
            batch_size=args.batch_size, quiet=args.quiet,
        )
    except FxQuantError as e:
        print(f"fxquant quantize: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0


TORCH_NOISE = r".*isinstance\(treespec, LeafSpec\)` is deprecated"
"""torch's exporter calls its own deprecated pytree API (a FutureWarning raised inside torch)."""


def _warning_line(
    message: Union[Warning, str], category: Type[Warning], filename: str, lineno: int,
    file: Optional[TextIO] = None, line: Optional[str] = None,
) -> None:
    """`warnings.showwarning` for the command line: one line, no source excerpt."""
    stream = file if file is not None else sys.stderr
    text = " ".join(str(message).split())
    try:
        stream.write(f"fxquant: warning: {text}\n")
    except OSError:  # stderr closed
        pass


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
    inspect.add_argument("--plot", metavar="PNG", help="also draw the bits of every quantizer to this image file")
    inspect.set_defaults(func=_inspect)
    quantize = sub.add_parser(
        "quantize",
        help="quantize your own model: MODULE:FACTORY on your data -> integer ONNX, summary.json, report.txt",
        description="Prepare, calibrate, fine-tune (distillation from the float model towards --bits), freeze, "
        "export integer QDQ ONNX and verify it in onnxruntime. Writes OUT/model.onnx, OUT/summary.json, "
        "OUT/report.txt.",
    )
    quantize.add_argument(
        "model",
        metavar="MODULE:FACTORY",
        help="an importable module (or a path to a .py file) and a callable in it that returns the nn.Module, "
        "e.g. mypkg.models:build or models.py:Net",
    )
    quantize.add_argument("--weights", metavar="CKPT", help="a state dict for the model, read with torch.load(weights_only=True)")
    quantize.add_argument(
        "--data",
        metavar="DATA",
        required=True,
        help="model inputs: a .pt file (a tensor (N, ...), or a dict/tuple whose first tensor is the inputs), a "
        ".npy file, or a folder of PNG/JPEG images (optionally in class subfolders; one size; read as C,H,W in [0, 1])",
    )
    quantize.add_argument(
        "--bits",
        metavar="W4A8",
        required=True,
        help="target bits: W4A8 (4-bit weights, 8-bit activations), W8A8, or W4 (weights only)",
    )
    quantize.add_argument(
        "--steps", type=int, default=300, metavar="N",
        help="fine-tuning steps (default 300); 0: no fine-tuning, post-training quantization at 8 bits (or at a "
        "--bits width above 8)",
    )
    quantize.add_argument("--out", default="fxquant-out", metavar="DIR", help="output folder (default fxquant-out)")
    quantize.add_argument(
        "--first-last-bits", default="8", metavar="8|none",
        help="bits of the first and last quantized layers (default 8), or 'none' to learn them like the rest",
    )
    quantize.add_argument("--batch-size", type=int, default=32, metavar="N", help="samples per batch (default 32)")
    quantize.add_argument(
        "--seed", type=int, default=0, metavar="S", help="random seed of the model factory, the data shuffle and fine-tuning (default 0)"
    )
    quantize.add_argument("--quiet", action="store_true", help="no progress bars and no printed summary")
    quantize.set_defaults(func=_quantize)
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
    (`| head`), it stops quietly with status 1 (the Python documentation's advice for SIGPIPE); Ctrl-C
    ends with one line and status 130 instead of a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return USAGE_ERROR
    try:
        with warnings.catch_warnings():  # restores the caller's filters and showwarning (main runs in tests)
            warnings.showwarning = _warning_line
            warnings.filterwarnings("ignore", message=TORCH_NOISE, category=FutureWarning)
            status = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at interpreter exit
    except BrokenPipeError:
        _silence_stdout()
        return 1
    except KeyboardInterrupt:  # Ctrl-C outside fine-tuning (which stops with its best state itself)
        print(f"fxquant {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED
    return status


if __name__ == "__main__":
    sys.exit(main())
