"""Bad input in a user's first hour (issue 12): each mistake gets one clear error, raised before long work.

Models with nothing to quantize, non-float32 models, batches of the wrong shape or a bare tensor given as
`batches`, unwritable export paths, interrupted writes, and files that are not ONNX.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO, Tuple

import onnx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant as fxq
from fxquant.export import onnx_file, read_onnx_file


class TinyMLP(nn.Module):
    """Linear -> ReLU -> Linear on 4 features."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TinyConv(nn.Module):
    """Conv -> ReLU -> global pool -> Linear: runs in torch at any spatial size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


class AddOnly(nn.Module):
    """A join and an activation: quantizers could be placed, but no op would run quantized."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + y)


def _mlp() -> Tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TinyMLP().eval(), torch.randn(2, 4)


@pytest.fixture(scope="module")
def frozen_mlp() -> Tuple[torch.fx.GraphModule, torch.Tensor]:
    model, x = _mlp()
    qm = fxq.prepare(model, x)
    fxq.calibrate(qm, [x])
    return fxq.freeze(qm), x


@pytest.fixture(scope="module")
def exported_mlp(frozen_mlp, tmp_path_factory) -> str:  # noqa: ANN001
    frozen, x = frozen_mlp
    path = str(tmp_path_factory.mktemp("onnx") / "mlp.onnx")
    fxq.export_onnx(frozen, x, path)
    return path


# -- prepare: nothing to quantize --------------------------------------------------------------------------


def test_prepare_refuses_a_model_without_quantizable_ops() -> None:
    with pytest.raises(
        fxq.PrepareError,
        match=r"no op of Sequential could be quantized: it has ReLU, and fxquant "
        r"quantizes conv, conv_transpose, linear, embedding, matmul ops",
    ):
        fxq.prepare(nn.Sequential(nn.ReLU()), torch.randn(2, 4))
    with pytest.raises(fxq.PrepareError, match=r"no op of AddOnly could be quantized: it has add, relu"):
        fxq.prepare(AddOnly(), (torch.randn(2, 4), torch.randn(2, 4)))


@pytest.mark.parametrize(
    "config",
    [fxq.QuantConfig(overrides=[("*", None)]), fxq.QuantConfig(overrides=[("fc1", None), ("fc2", None)])],
    ids=["glob-none", "each-none"],
)
def test_prepare_refuses_overrides_that_keep_every_op_float(config: fxq.QuantConfig) -> None:
    model, x = _mlp()
    with pytest.raises(
        fxq.PrepareError,
        match=r"no op of TinyMLP could be quantized: all 2 quantizable ops are kept float \(fc1 \(kept float by "
        r"override '.*'\); fc2 .*\)\. Remove the \(glob, None\) overrides that match every layer",
    ):
        fxq.prepare(model, x, config)


def test_prepare_refuses_a_config_without_specs() -> None:
    model, x = _mlp()
    with pytest.raises(
        fxq.PrepareError,
        match=r"no op of TinyMLP could be quantized: QuantConfig\(weight=None, activation=None\) keeps all 2 "
        r"quantizable ops float\. Give QuantConfig a weight and/or activation QuantSpec",
    ):
        fxq.prepare(model, x, fxq.QuantConfig(weight=None, activation=None))


def test_prepare_accepts_a_model_with_one_quantized_op() -> None:
    model, x = _mlp()
    qm = fxq.prepare(model, x, fxq.QuantConfig(overrides=[("fc2", None)]))
    assert any(n.startswith("fc1") for n in qm.fxq_quantizers.keys())


# -- prepare: float32 only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_prepare_refuses_models_that_are_not_float32(dtype: torch.dtype) -> None:
    model, x = _mlp()
    name = str(dtype).replace("torch.", "")
    with pytest.raises(
        fxq.PrepareError,
        match=rf"the model's parameter 'fc1.weight' is {name}; fxquant quantizes "
        r"float32 models; call model.float\(\) first \(and cast inputs",
    ):
        fxq.prepare(_mlp()[0].to(dtype), x.to(dtype))
    with pytest.raises(fxq.PrepareError, match=rf"example_inputs is {name}; fxquant quantizes float32 models"):
        fxq.prepare(model, x.to(dtype))
    with pytest.raises(fxq.PrepareError, match=rf"example_inputs\[1\] is {name}; fxquant quantizes float32"):
        fxq.prepare(AddOnly(), (x, x.to(dtype)))


def test_prepare_refuses_a_model_on_the_meta_device_and_says_how_to_load_it() -> None:
    model, x = _mlp()
    with torch.device("meta"):
        empty = type(model)()
    with pytest.raises(fxq.PrepareError, match=r"the model's parameter 'fc1.weight' is on the meta device \(\d+ of "
                                               r"\d+ tensors hold no data\); .*model.load_state_dict\(state_dict, "
                                               r"assign=True\)"):
        fxq.prepare(empty, x)
    with pytest.raises(fxq.PrepareError, match=r"example_inputs is on the meta device \(1 of \d+ tensors"):
        fxq.prepare(model, x.to("meta"))
    empty.load_state_dict(model.state_dict(), assign=True)
    loaded, reference = (fxq.calibrate(fxq.prepare(m, x), [x], progress=False).eval() for m in (empty, model))
    assert torch.equal(loaded(x), reference(x))  # the fix works


def test_a_meta_model_loaded_lazily_holds_its_weights_once(tmp_path) -> None:  # noqa: ANN001
    """The path the meta-device error gives: a model built on the meta device, its state dict loaded from a file
    with `mmap=True` and assigned (`assign=True`): prepare, calibrate and freeze read the file's pages, and no
    float weight is ever copied (the prepared module's weights are the mapped tensors; the model is not modified)."""
    model, x = _mlp()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with torch.device("meta"):
        lazy = type(model)()
    state = torch.load(path, mmap=True, weights_only=True)
    lazy.load_state_dict(state, assign=True)
    mapped = {name: t.untyped_storage().data_ptr() for name, t in state.items()}
    assert {name: p.untyped_storage().data_ptr() for name, p in lazy.named_parameters()} == mapped
    qm = fxq.prepare(lazy, x)
    weights = {name: p for name, p in qm.named_parameters() if not name.startswith("fxq_quantizers.")}
    assert weights and all(p.untyped_storage().data_ptr() == mapped[name] for name, p in weights.items())
    fxq.calibrate(qm, [x], progress=False)
    frozen = fxq.freeze(qm)
    reference = fxq.freeze(fxq.calibrate(fxq.prepare(model, x), [x], progress=False))
    with torch.no_grad():
        assert torch.equal(frozen(x), reference(x))
    assert all(torch.equal(p, model.state_dict()[n]) for n, p in lazy.state_dict().items())


def test_prepare_accepts_integer_inputs_and_buffers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)).eval()
    qm = fxq.prepare(model, torch.tensor([[1, 2, 3]]))
    assert len(qm.fxq_quantizers) > 0


# -- calibrate and verify: batches -------------------------------------------------------------------------


def test_calibrate_refuses_a_bare_tensor_or_dict_as_batches() -> None:
    model, x = _mlp()
    qm = fxq.prepare(model, x)
    with pytest.raises(
        fxq.PrepareError,
        match=r"calibrate's batches must be an iterable of batches \(a list or a "
        r"DataLoader\), got a single Tensor of shape \(8, 4\); iterating a tensor would run each "
        r"of its rows as a batch\. To use it as one batch, wrap it in a list: \[X\]",
    ):
        fxq.calibrate(qm, torch.randn(8, 4))
    with pytest.raises(fxq.PrepareError, match=r"calibrate's batches .* got a single dict; wrap it in a list"):
        fxq.calibrate(qm, {"x": x})
    with pytest.raises(fxq.StateError, match="was never calibrated"):  # refused before any batch ran
        fxq.freeze(qm)


def test_calibrate_names_the_batch_shape_and_the_example_shape() -> None:
    model, x = _mlp()
    qm = fxq.prepare(model, x)
    with pytest.raises(
        fxq.PrepareError,
        match=r"a batch of shape \(2, 5\) does not fit the module returned by "
        r"fxq.prepare: it was prepared with example inputs of shape \(2, 4\)\. Give batches "
        r"shaped like the example inputs .* RuntimeError: mat1 and mat2",
    ):
        fxq.calibrate(qm, [torch.randn(2, 5)])
    model2 = nn.Sequential(nn.Linear(4, 4))
    qm2 = fxq.prepare(model2, x)
    with pytest.raises(fxq.PrepareError, match=r"a batch of shape \(\(2, 4\), \(2, 4\), \(2, 4\)\) does not fit"):
        fxq.calibrate(qm2, [(x, x, x)])
    fxq.calibrate(qm, [torch.randn(7, 4)])  # another batch size is fine


def test_verify_refuses_a_bare_tensor_and_a_batch_of_the_wrong_shape(frozen_mlp, exported_mlp) -> None:  # noqa: ANN001
    frozen, x = frozen_mlp
    with pytest.raises(
        fxq.PrepareError,
        match=r"verify's batches must be an iterable of batches .* single Tensor "
        r"of shape \(2, 4\).* wrap it in a list: \[X\]",
    ):
        fxq.verify(frozen, exported_mlp, x)
    with pytest.raises(
        fxq.PrepareError,
        match=r"a batch of shape \(2, 5\) does not fit the frozen module: it was "
        r"prepared with example inputs of shape \(2, 4\)",
    ):
        fxq.verify(frozen, exported_mlp, [torch.randn(2, 5)])


def test_verify_names_the_onnx_input_shape_when_onnxruntime_refuses_a_batch(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    x = torch.randn(2, 1, 6, 6)
    qm = fxq.prepare(TinyConv().eval(), x)
    fxq.calibrate(qm, [x])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "conv.onnx")
    fxq.export_onnx(frozen, x, path)
    with pytest.raises(
        fxq.PrepareError,
        match=r"onnxruntime \(CPUExecutionProvider, ORT_ENABLE_ALL\) could not run "
        r"a batch of shape \(2, 1, 8, 8\): the ONNX model's inputs are .*\(.*, 1, 6, 6\)",
    ):
        fxq.verify(frozen, path, [torch.randn(2, 1, 8, 8)], levels=("all",))


# -- verify and inspect: files that are not ONNX ----------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"no ONNX file at '.*missing\.onnx' \(no file there\); give the path written by fxq.export_onnx"),
        (b"", r"'.*bad\.onnx' is not a readable ONNX model: the file is empty; give the path written by"),
        (
            b"hello, I am a text file\n",
            r"'.*bad\.onnx' is not a readable ONNX model \(DecodeError: .*\); give the path",
        ),
        (b"\x12\x03abc", r"'.*bad\.onnx' is not a readable ONNX model: it parses but has no IR version or opset"),
    ],
    ids=["missing", "empty", "text", "other-protobuf"],
)
def test_verify_refuses_a_file_that_is_not_onnx(content, message, frozen_mlp, tmp_path) -> None:  # noqa: ANN001
    frozen, x = frozen_mlp
    path = tmp_path / ("missing.onnx" if content is None else "bad.onnx")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(fxq.InputError, match=message):
        fxq.verify(frozen, str(path), [x])
    with pytest.raises(fxq.InputError, match=message):
        fxq.report(str(path))


def test_verify_refuses_an_unknown_level_and_an_empty_batch_list(frozen_mlp, tmp_path) -> None:  # noqa: ANN001
    frozen, x = frozen_mlp
    path = str(tmp_path / "mlp.onnx")
    fxq.export_onnx(frozen, x, path)
    with pytest.raises(fxq.ConfigError, match=r"verify levels \['basic'\] are unknown; use 'all' and/or 'disabled'"):
        fxq.verify(frozen, path, [x], levels=("basic",))
    with pytest.raises(fxq.PrepareError, match=r"verify got no batches; give at least one batch of model inputs"):
        fxq.verify(frozen, path, [])


def test_read_onnx_file_refuses_a_directory(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(fxq.InputError, match=r"no ONNX file at '.*' \(a directory there\)"):
        read_onnx_file(tmp_path)


# -- export: paths, interrupts, permissions ----------------------------------------------------------------


def _export_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.onnx.export ran although the path was known to be unwritable")

    monkeypatch.setattr(torch.onnx, "export", fail)


def test_export_checks_the_path_before_exporting(frozen_mlp, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    frozen, x = frozen_mlp
    _export_must_not_run(monkeypatch)
    missing = tmp_path / "no" / "such" / "dir" / "m.onnx"
    with pytest.raises(
        fxq.ExportError,
        match=r"cannot write the ONNX model to '.*m\.onnx': directory '.*dir' does "
        r"not exist; create it first",
    ):
        fxq.export_onnx(frozen, x, str(missing))
    (tmp_path / "file").write_text("x")
    with pytest.raises(fxq.ExportError, match=r"directory '.*file' is not a directory; create it first"):
        fxq.export_onnx(frozen, x, str(tmp_path / "file" / "m.onnx"))


def test_export_refuses_a_location_it_cannot_write(frozen_mlp, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    frozen, x = frozen_mlp
    _export_must_not_run(monkeypatch)
    path = str(tmp_path / "m.onnx")

    def denied(path: Path) -> None:  # what a read-only file system answers, also to root
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(onnx_file, "_create_temporary", denied)
    with pytest.raises(
        fxq.ExportError,
        match=r"cannot write the ONNX model to '.*m\.onnx': Permission denied; "
        r"choose a writable location",
    ):
        fxq.export_onnx(frozen, x, path)
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    with pytest.raises(fxq.ExportError, match=r"'.*m\.onnx': permission denied; choose a writable location"):
        fxq.export_onnx(frozen, x, path)
    assert os.listdir(tmp_path) == []


def test_interrupted_write_leaves_no_temporary_file(frozen_mlp, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    frozen, x = frozen_mlp

    def interrupted(model: onnx.ModelProto, f: BinaryIO) -> None:
        f.write(b"partial")
        f.flush()
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_file, "write_model", interrupted)  # export writes the file itself
    with pytest.raises(KeyboardInterrupt):
        fxq.export_onnx(frozen, x, str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


def test_exported_file_has_the_usual_permissions(exported_mlp) -> None:  # noqa: ANN001
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(exported_mlp).st_mode) == 0o666 & ~umask
    assert os.listdir(os.path.dirname(exported_mlp)) == [os.path.basename(exported_mlp)]
