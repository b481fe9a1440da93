"""The `fxquant` command line: help without a command, quiet end on a closed pipe, option help, errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import fxquant as fxq
from fxquant.cli import USAGE_ERROR, build_parser, main


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory) -> str:  # noqa: ANN001
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval(), torch.randn(2, 4)
    qm = fxq.prepare(model, x)
    fxq.calibrate(qm, [x])
    path = str(tmp_path_factory.mktemp("cli") / "m.onnx")
    fxq.export_onnx(fxq.freeze(qm), x, path)
    return path


def test_no_command_prints_the_help(capsys) -> None:  # noqa: ANN001
    assert main([]) == USAGE_ERROR == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: fxquant")
    assert "demo" in err and "inspect" in err and "fxquant <command> --help" in err
    assert "the following arguments are required" not in err


def test_every_option_has_a_help_string() -> None:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices  # noqa: SLF001
    for name, sub in subparsers.items():
        for action in sub._actions:  # noqa: SLF001
            assert action.help, f"fxquant {name} {action.option_strings or action.dest} has no help"
    assert "seed" in subparsers["demo"].format_help() and "random seed" in subparsers["demo"].format_help()


def test_inspect_of_a_file_that_is_not_onnx_is_one_line_on_stderr(tmp_path, capsys) -> None:  # noqa: ANN001
    path = tmp_path / "notes.onnx"
    path.write_text("not a model\n")
    assert main(["inspect", str(path)]) == USAGE_ERROR
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fxquant inspect: ") and "is not a readable ONNX model" in captured.err


def test_inspect_into_a_closed_pipe_ends_without_a_traceback(onnx_file: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "fxquant", "inspect", onnx_file], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before anything is written, as `| head` after its lines
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_inspect_prints_the_report(onnx_file: str, capsys) -> None:  # noqa: ANN001
    assert main(["inspect", onnx_file]) == 0
    assert "Q/DQ pairs" in capsys.readouterr().out
