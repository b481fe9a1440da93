"""`fxquant quantize MODULE:FACTORY --data DATA --bits W4A8`: end to end on a tiny model file, and every
bad-input message (one line on stderr, exit status 2), called in-process through `fxquant.cli.main`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest
import torch

from fxquant.cli import USAGE_ERROR, main
from fxquant.quantize_cli import QuantizeInputError, TargetBits, load_inputs, parse_bits, parse_first_last_bits

MODEL_SOURCE = '''
import torch
import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    """conv-BN-ReLU, conv-ReLU, pool, linear on 8x8 images: the middle conv learns its bits."""

    def __init__(self, channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def build():
    torch.manual_seed(0)
    return Tiny()


def build_rgb():
    torch.manual_seed(0)
    return Tiny(channels=3)


def not_a_model():
    return [1, 2, 3]


def needs_arguments(width):
    return Tiny()


NUMBER = 3
'''

SUMMARY_KEYS = {
    "model", "data", "samples", "bits", "target_bits", "first_last_bits", "steps", "steps_run", "best_step",
    "target_met", "avg_weight_bits", "avg_activation_bits", "size_bytes_at_bits", "float_size_bytes",
    "compression", "onnx_file_bytes", "parity_ok", "parity_max_error", "parity", "bits_per_quantizer", "seconds",
}


@pytest.fixture
def model_file(tmp_path: Path) -> str:
    path = tmp_path / "tinymodels.py"
    path.write_text(MODEL_SOURCE)
    return str(path)


@pytest.fixture
def data_file(tmp_path: Path) -> str:
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "calib.pt"
    torch.save((torch.rand(24, 1, 8, 8, generator=g), torch.randint(0, 3, (24,), generator=g)), path)
    return str(path)


def _write_images(folder: Path, sizes: List[Tuple[int, int]], mode: str = "L") -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        sub = folder / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        shape = (h, w) if mode == "L" else (h, w, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(sub / f"img{i}.png")


def _error(capsys: pytest.CaptureFixture[str], argv: List[str]) -> str:
    assert main(argv) == USAGE_ERROR
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fxquant quantize: ")
    return lines[0]


def _summary(out: Path) -> dict:
    for name in ("model.onnx", "summary.json", "report.txt", "bits.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "finetune.png").exists() == (summary["steps_run"] > 0)  # the history picture after a fine-tune
    return summary


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantize_a_model_file_on_a_pt_file_quietly(
    model_file: str, data_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["quantize", f"{model_file}:build", "--data", data_file, "--bits", "W4A8", "--steps", "3",
            "--out", str(out), "--batch-size", "8", "--quiet"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    for noise in ("torchvision", "LeafSpec", "it/s", "finetune:"):
        assert noise not in captured.err
    summary = _summary(out)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["bits"] == "W4A8" and summary["target_bits"] == {"weight": 4, "activation": 8}
    assert summary["steps"] == 3 and summary["steps_run"] == 3 and summary["samples"] == 24
    assert summary["first_last_bits"] == 8 and summary["parity_ok"] is True
    assert summary["onnx_file_bytes"] == os.path.getsize(out / "model.onnx")
    conv2 = next(r for r in summary["bits_per_quantizer"] if r["name"] == "conv2_weight")
    assert conv2["bits"] < 8  # the middle conv learned its bits; first and last stay at 8
    assert "conv2_weight" in (out / "report.txt").read_text()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_quantize_an_image_folder_prints_a_summary(
    model_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    _write_images(images, [(8, 8)] * 12, mode="RGB")
    out = tmp_path / "out"
    argv = ["quantize", f"{model_file}:build_rgb", "--data", str(images), "--bits", "W4", "--steps", "3",
            "--out", str(out), "--first-last-bits", "none"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "target W4" in text and "parity" in text and "summary.json" in text
    summary = _summary(out)
    assert summary["input_shape"] == [3, 8, 8] and summary["samples"] == 12
    assert summary["target_bits"] == {"weight": 4, "activation": None} and summary["first_last_bits"] is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_steps_0_is_post_training_quantization_with_weights(
    model_file: str, data_file: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_for_weights", model_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    weights = tmp_path / "ckpt.pt"
    torch.save({"state_dict": module.build().state_dict()}, weights)
    out = tmp_path / "out"
    argv = ["quantize", f"{model_file}:build", "--weights", str(weights), "--data", data_file, "--bits", "W4A8",
            "--steps", "0", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    summary = _summary(out)
    assert summary["steps_run"] == 0 and summary["target_met"] is None
    assert summary["avg_weight_bits"] == 8.0 and summary["weights"] == str(weights)


# -- parsing ---------------------------------------------------------------------------------------


def test_bits_parse() -> None:
    assert parse_bits("W4A8") == TargetBits(4, 8)
    assert parse_bits("w8a8") == TargetBits(8, 8)
    assert parse_bits("W4") == TargetBits(4, None)
    assert parse_bits("W4").text == "W4"
    assert parse_first_last_bits("none") is None and parse_first_last_bits("8") == 8
    with pytest.raises(QuantizeInputError, match=r"--bits '4bit' is not understood; expected W<bits>A<bits>"):
        parse_bits("4bit")
    with pytest.raises(QuantizeInputError, match=r"weight bits 1 are outside 2..16"):
        parse_bits("W1A8")


def test_npy_and_dict_data(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((5, 3), dtype=np.float64))
    x = load_inputs(str(tmp_path / "x.npy"))
    assert x.shape == (5, 3) and x.dtype == torch.float32
    torch.save({"labels": [0, 1], "inputs": torch.zeros(4, 2)}, tmp_path / "d.pt")
    assert load_inputs(str(tmp_path / "d.pt")).shape == (4, 2)


def test_grayscale_images_are_one_channel_in_0_1(tmp_path: Path) -> None:
    _write_images(tmp_path / "g", [(6, 5)] * 3)
    x = load_inputs(str(tmp_path / "g"))
    assert x.shape == (3, 1, 5, 6) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


# -- one error per bad input -----------------------------------------------------------------------


@pytest.fixture
def ok_args(data_file: str, tmp_path: Path) -> List[str]:
    return ["--data", data_file, "--bits", "W4A8", "--steps", "3", "--out", str(tmp_path / "out"), "--quiet"]


def test_error_bad_bits(model_file: str, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", f"{model_file}:build"] + ok_args
    argv[argv.index("W4A8")] = "int4"
    line = _error(capsys, argv)
    assert "--bits 'int4' is not understood; expected W<bits>A<bits> such as W4A8" in line


def test_error_bad_first_last_bits(model_file: str, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, ["quantize", f"{model_file}:build", "--first-last-bits", "eight"] + ok_args)
    assert "--first-last-bits 'eight' is not understood" in line and "'none'" in line


def test_error_negative_steps(model_file: str, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", f"{model_file}:build"] + ok_args
    argv[argv.index("--steps") + 1] = "-1"
    assert "--steps -1 must be a non-negative integer" in _error(capsys, argv)


def test_error_no_colon(ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert "model 'tinymodels' is not MODULE:FACTORY" in _error(capsys, ["quantize", "tinymodels"] + ok_args)


def test_error_unknown_module(ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, ["quantize", "no_such_fxquant_module:build"] + ok_args)
    assert "cannot import module 'no_such_fxquant_module' (No module named 'no_such_fxquant_module')" in line


def test_error_missing_model_file(tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, ["quantize", f"{tmp_path / 'gone.py'}:build"] + ok_args)
    assert "gone.py' does not exist" in line


def test_error_model_file_that_fails_to_import(
    tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.py"
    path.write_text("import no_such_dependency_of_the_model\n")
    line = _error(capsys, ["quantize", f"{path}:build"] + ok_args)
    assert "broken.py' failed: ModuleNotFoundError: No module named 'no_such_dependency_of_the_model'" in line


def test_error_missing_factory(model_file: str, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, ["quantize", f"{model_file}:biuld"] + ok_args)
    assert "has no attribute 'biuld'. Did you mean 'build'?" in line


def test_error_factory_not_returning_a_module(
    model_file: str, ok_args: List[str], capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(capsys, ["quantize", f"{model_file}:not_a_model"] + ok_args)
    assert "not_a_model() returned a list, not a torch.nn.Module" in line


def test_error_factory_not_callable(model_file: str, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, ["quantize", f"{model_file}:NUMBER"] + ok_args)
    assert ":NUMBER is a int, not a callable returning a torch.nn.Module" in line


def test_error_factory_with_arguments(model_file: str, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    line = _error(capsys, ["quantize", f"{model_file}:needs_arguments"] + ok_args)
    assert "needs_arguments() failed: TypeError:" in line and "with no arguments" in line


def test_error_missing_weights(
    model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]
) -> None:
    line = _error(capsys, ["quantize", f"{model_file}:build", "--weights", str(tmp_path / "no.pt")] + ok_args)
    assert "--weights" in line and "no.pt' does not exist" in line


def test_error_weights_of_another_model(
    model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "other.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    line = _error(capsys, ["quantize", f"{model_file}:build", "--weights", str(path)] + ok_args)
    assert "do not fit the model built by" in line and "missing keys" in line and "shape mismatches" in line


def test_error_weights_not_a_state_dict(
    model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    line = _error(capsys, ["quantize", f"{model_file}:build", "--weights", str(path)] + ok_args)
    assert "holds a list, not a state dict" in line


def _with_data(model_file: str, ok_args: List[str], data: str) -> List[str]:
    argv = ["quantize", f"{model_file}:build"] + ok_args
    argv[argv.index("--data") + 1] = data
    return argv


DATA_FILE_ERRORS = [
    ("none.pt", None, "none.pt' does not exist; give a .pt file, a .npy file or a folder of images"),
    ("junk.pt", lambda p: p.write_text("not a torch file"), "junk.pt' cannot be read by torch.load(weights_only=True)"),
    ("junk.npy", lambda p: p.write_text("not numpy"), "junk.npy' cannot be read by numpy.load"),
    ("labels.pt", lambda p: torch.save({"labels": [0, 1]}, p), "holds a dict without a tensor"),
    ("empty.pt", lambda p: torch.save(torch.zeros(0, 1, 8, 8), p),
     "holds a tensor of shape (0, 1, 8, 8); expected inputs (N, ...) with N >= 1"),
    ("x.csv", lambda p: p.write_text("1,2\n"), "has an unsupported type '.csv'"),
]


@pytest.mark.parametrize("name, write, message", DATA_FILE_ERRORS, ids=[e[0] for e in DATA_FILE_ERRORS])
def test_error_data_file(
    name: str, write: Optional[Callable[[Path], None]], message: str, model_file: str, tmp_path: Path,
    ok_args: List[str], capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name
    if write is not None:
        write(path)
    assert message in _error(capsys, _with_data(model_file, ok_args, str(path)))


def test_error_empty_image_folder(model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "empty"
    (folder / "class0").mkdir(parents=True)
    (folder / "class0" / "notes.txt").write_text("no images here")
    line = _error(capsys, _with_data(model_file, ok_args, str(folder)))
    assert "holds no PNG or JPEG images (in it or its subfolders)" in line


def test_error_images_of_different_sizes(model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "mixed"
    _write_images(folder, [(8, 8), (8, 8), (16, 12)])
    line = _error(capsys, _with_data(model_file, ok_args, str(folder)))
    assert "images have 2 different sizes (width x height): 8x8 (2 images, e.g. class0/img0.png), 16x12 (1 image" in line


def test_error_unreadable_image(model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not a png")
    assert "cannot read image" in _error(capsys, _with_data(model_file, ok_args, str(folder)))


def test_error_data_that_does_not_fit_the_model(
    model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "wrong.pt"
    torch.save(torch.rand(4, 3, 8, 8), path)
    line = _error(capsys, _with_data(model_file, ok_args, str(path)))
    assert "fails on a data batch of shape (4, 3, 8, 8) (torch.float32): RuntimeError:" in line


def test_error_out_is_a_file(model_file: str, tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["quantize", f"{model_file}:build"] + ok_args
    path = tmp_path / "file"
    path.write_text("")
    argv[argv.index("--out") + 1] = str(path)
    assert "is a file; give a folder" in _error(capsys, argv)


def test_error_no_layer_learns_bits(tmp_path: Path, ok_args: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "twolayers.py"
    path.write_text("from torch import nn\n\ndef build():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3))\n")
    line = _error(capsys, ["quantize", f"{path}:build"] + ok_args)
    assert "no weight of the model built by" in line and "give --first-last-bits none" in line


def test_module_names_import_from_the_current_folder(
    model_file: str, ok_args: List[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(os.path.dirname(model_file))
    monkeypatch.delitem(__import__("sys").modules, "tinymodels", raising=False)
    line = _error(capsys, ["quantize", "tinymodels:Tiny.nope"] + ok_args)
    assert "'tinymodels:Tiny' has no attribute 'nope'" in line  # imported by name: the cwd is importable


# -- the command line around it ---------------------------------------------------------------------


def test_ctrl_c_is_one_line_and_status_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import fxquant.quantize_cli

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fxquant.quantize_cli, "run_quantize", interrupted)
    assert main(["quantize", "m:f", "--data", "d.pt", "--bits", "W4"]) == 130
    assert capsys.readouterr().err == "fxquant quantize: interrupted\n"


def test_warnings_are_one_line_and_torch_pytree_notices_are_dropped(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import warnings

    import fxquant.quantize_cli

    def warns(*args: object, **kwargs: object) -> None:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1)
        warnings.warn("first line\n  second line", UserWarning, stacklevel=1)

    monkeypatch.setattr(fxquant.quantize_cli, "run_quantize", warns)
    assert main(["quantize", "m:f", "--data", "d.pt", "--bits", "W4"]) == 0
    assert capsys.readouterr().err == "fxquant: warning: first line second line\n"
