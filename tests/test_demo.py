"""Smoke test of `fxquant demo` (the README's first command) with a tiny step budget, and of the CLI."""

from __future__ import annotations

import json
import os

import pytest

from fxquant.cli import main

pytestmark = pytest.mark.slow  # minutes: see the marker in pyproject.toml


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demo_runs_end_to_end_and_writes_its_outputs(tmp_path) -> None:  # noqa: ANN001
    out = str(tmp_path / "demo")
    assert main(["demo", "--out", out, "--steps", "30", "--quiet"]) == 0
    for name in ("model.onnx", "model_int8_weights.onnx", "summary.json", "bits.png", "finetune.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["float_accuracy"] > 90.0
    assert abs(summary["onnxruntime_accuracy"] - summary["fake_quant_accuracy"]) < 1.0
    assert summary["onnx_file_bytes"] < summary["float_onnx_file_bytes"]


def test_inspect_prints_the_quant_nodes(tmp_path, capsys) -> None:  # noqa: ANN001
    out = str(tmp_path / "demo")
    main(["demo", "--out", out, "--steps", "5", "--quiet"])
    capsys.readouterr()
    assert main(["inspect", os.path.join(out, "model.onnx")]) == 0
    text = capsys.readouterr().out
    assert "conv1_weight" in text and "INT4" in text.upper()


def test_quiet_demo_is_quiet_and_a_plot_failure_keeps_the_summary(tmp_path, capfd, monkeypatch) -> None:  # noqa: ANN001
    import fxquant.plots

    def broken_plot(rows, path, **kwargs) -> None:  # noqa: ANN001, ANN003
        raise RuntimeError("no display")

    monkeypatch.setattr(fxquant.plots, "plot_bits", broken_plot)
    out = str(tmp_path / "demo")
    capfd.readouterr()
    assert main(["demo", "--out", out, "--steps", "3", "--quiet"]) == 0
    captured = capfd.readouterr()  # file-descriptor level: torch's log handlers write to the original stderr
    assert captured.out == ""
    for noise in ("torchvision", "LeafSpec", "FutureWarning", "it/s", "differs by"):
        assert noise not in captured.err, captured.err
    assert captured.err.strip().splitlines() == [
        f"fxquant: warning: demo: could not draw {os.path.join(out, 'bits.png')} (RuntimeError: no display); "
        f"the results are in {os.path.join(out, 'summary.json')}"
    ]
    with open(os.path.join(out, "summary.json")) as fh:
        assert json.load(fh)["float_accuracy"] > 90.0
    assert not os.path.exists(os.path.join(out, "bits.png"))
