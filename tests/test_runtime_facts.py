"""Runtime behaviour fxquant works around (docs/decisions.md), checked so that a new onnxruntime says when a
workaround can go: each test is a strict xfail that asserts what a fixed onnxruntime would do, through
fxquant's own export with the workaround switched off. An XPASS fails the suite and names the workaround."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from small_models import make

import fxquant as fxq
import fxquant.quantizer.frozen as frozen_module
from fxquant.export.plan import u8s8_kernels_saturate
from fxquant.qparams import container_for, smallest_container


def _run_all_optimizations(path: str, x: torch.Tensor) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.xfail(strict=True, raises=(AssertionError, Exception),
                   reason="onnxruntime 1.32 miscompiles INT2 weights (docs/decisions.md, '2-bit weights ride in "
                          "INT4'); when this passes, let qparams.container_for give 2-bit weights INT2")
def test_onnxruntime_runs_int2_weights_as_fxquant_computes_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def int2_for_weights(kind: str, bits: int) -> str:
        return smallest_container(bits, signed=True, floor=2) if kind == "weight" else container_for(kind, bits)

    monkeypatch.setattr(frozen_module, "container_for", int2_for_weights)
    model, x = make("mlp")
    spec = fxq.QuantSpec(bits=2, learn_bits=False)
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=spec, first_last_bits=None))
    fxq.calibrate(qm, [x], progress=False)
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "int2.onnx")
    fxq.export_onnx(frozen, x, path)
    with torch.no_grad():
        expected = frozen(x).numpy()
    got = _run_all_optimizations(path, x)
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def _narrow_export(tmp_path: Path, bits: int) -> tuple:
    model, x = make("cnn")
    spec = fxq.QuantSpec(bits=bits, learn_bits=False)
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=spec, activation=spec, join_bits=None, first_last_bits=None))
    fxq.calibrate(qm, [x], progress=False)
    frozen = fxq.freeze(qm)
    path = str(tmp_path / f"narrow{bits}.onnx")
    fxq.export_onnx(frozen, x, path, narrow_activations=True)
    with torch.no_grad():
        expected = frozen(x).numpy()
    return path, x, expected


@pytest.mark.xfail(strict=True, raises=(AssertionError, Exception),
                   reason="onnxruntime 1.32 builds an invalid QLinearAdd from UINT2 activations (docs/decisions.md, "
                          "'Narrow activations stay in UINT8')")
def test_onnxruntime_runs_uint2_activations(tmp_path: Path) -> None:
    path, x, expected = _narrow_export(tmp_path, 2)
    got = _run_all_optimizations(path, x)
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


@pytest.mark.xfail(strict=True, raises=AssertionError, reason="onnxruntime 1.32 has no integer kernels for UINT4 activations: convs run as "
                                       "float Conv (docs/decisions.md, 'Narrow activations stay in UINT8')")
def test_onnxruntime_runs_uint4_activations_as_integer_convs(tmp_path: Path) -> None:
    path, x, expected = _narrow_export(tmp_path, 4)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()  # it computes the right numbers ...
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "QLinearConv" in ops  # ... but as float convs


@pytest.mark.skipif(not u8s8_kernels_saturate(), reason="the option only acts on x86 CPUs without VNNI")
@pytest.mark.xfail(strict=True, raises=(AssertionError, Exception),
                   reason="onnxruntime 1.32 fails to load fxquant's INT8-weight files with session.x64quantprecision=1 "
                          "(docs/decisions.md, '8-bit weights on CPUs without VNNI'); when this passes, that session "
                          "option is an alternative to export_onnx(uint8_weights=True) worth documenting")
def test_x64quantprecision_runs_int8_weight_files_exactly(tmp_path: Path) -> None:
    model, x = make("cnn", 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x], progress=False)
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "int8.onnx")
    fxq.export_onnx(frozen, x, path, uint8_weights=False)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = frozen(x).numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()
