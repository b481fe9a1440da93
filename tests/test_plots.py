"""Pictures: bits per quantizer (module and .onnx reports) and the fine-tune history; `inspect --plot`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from small_models import make

import fxquant as fxq
from fxquant.cli import main
from fxquant.plots import plot_bits, plot_history, targets_of

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


@pytest.fixture(scope="module")
def tuned() -> tuple:
    torch.manual_seed(0)
    model, x = make("cnn")
    cfg = fxq.QuantConfig(weight=fxq.QuantSpec(bits=8, min_bits=2, max_bits=8), first_last_bits=8)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x])
    result = fxq.finetune(qm, [x], teacher=model, steps=6, target_bits=4.0, progress=False)
    return qm, result, x


def test_bits_and_history_pictures_of_a_fine_tune(tuned: tuple, tmp_path: Path) -> None:
    qm, result, _ = tuned
    assert targets_of(result) == {"weight": 4.0, "activation": 4.0}  # a number targets weights and activations
    plot_bits(fxq.report(qm).rows, str(tmp_path / "bits.png"), targets=targets_of(result), title="t")
    plot_history(result, str(tmp_path / "history.png"), title="t")
    assert _is_png(tmp_path / "bits.png") and _is_png(tmp_path / "history.png")


def test_inspect_plot_draws_the_bits_of_an_onnx_file(tuned: tuple, tmp_path: Path, capsys) -> None:  # noqa: ANN001
    qm, _, x = tuned
    path = tmp_path / "m.onnx"
    fxq.export_onnx(fxq.freeze(qm), x, path)
    picture = tmp_path / "inspect.png"
    assert main(["inspect", str(path), "--plot", str(picture)]) == 0
    assert f"wrote {picture}" in capsys.readouterr().out
    assert _is_png(picture)


def test_a_summary_s_rows_can_be_drawn(tmp_path: Path) -> None:
    rows = [{"name": "conv1_weight", "kind": "weight", "bits": 4}, {"name": "act_x", "kind": "activation", "bits": 8},
            {"name": "conv1_weight_bias", "kind": "bias", "bits": 32}]
    plot_bits(rows, str(tmp_path / "rows.png"))
    assert _is_png(tmp_path / "rows.png")
