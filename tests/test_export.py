"""Export step: integer QDQ ONNX (types, opsets, golden op types, file size, names, errors)."""

from __future__ import annotations

import collections
import io
import json
import operator
import os
from typing import List

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from small_models import make
from torch import nn

import fxquant as fxq
from fxquant.export import integer_initializer_bytes, onnx_report
from fxquant.graph import quantizers_of

T = onnx.TensorProto


def _frozen(name, weight, activation, first_last_bits=None, overrides=(), batch=8):  # noqa: ANN001, ANN202
    model, x = make(name, batch)
    cfg = fxq.QuantConfig(weight=weight, activation=activation, first_last_bits=first_last_bits, overrides=list(overrides))
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x, torch.randn_like(x) * 1.5])
    return fxq.freeze(qm), x


def _spec(bits: int) -> fxq.QuantSpec:
    return fxq.QuantSpec(bits=bits, min_bits=2, max_bits=max(bits, 8))


def _optimized_ops(path: str, tmp_path) -> collections.Counter:  # noqa: ANN001
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


def _code_types(model: onnx.ModelProto) -> collections.Counter:
    """Data types of the integer codes (initializers read as DequantizeLinear's first input)."""
    inits = {i.name: i for i in model.graph.initializer}
    return collections.Counter(
        inits[n.input[0]].data_type for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
    )


@pytest.mark.parametrize("uint8_weights", [False, True])
def test_weight_dequantize_has_a_zero_point_of_the_codes_type(tmp_path, uint8_weights: bool) -> None:  # noqa: ANN001
    """onnxruntime builds QGemm only from a weight DequantizeLinear with an explicit zero point: zeros for
    INT8 codes, 128 for 8-bit weights stored as UINT8."""
    frozen, x = _frozen("cnn", _spec(8), _spec(8))
    model = fxq.export_onnx(frozen, x, str(tmp_path / "cnn.onnx"), uint8_weights=uint8_weights)
    inits = {i.name: i for i in model.graph.initializer}
    weight_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.name.endswith("_weight/DequantizeLinear")]
    assert len(weight_dqs) == 6
    for n in weight_dqs:
        codes_type = onnx.TensorProto.UINT8 if uint8_weights else onnx.TensorProto.INT8
        assert len(n.input) == 3 and inits[n.input[2]].data_type == inits[n.input[0]].data_type == codes_type
        zero_point = onnx.numpy_helper.to_array(inits[n.input[2]]).astype(int)
        assert (zero_point == (128 if uint8_weights else 0)).all()
    bias_dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "_bias/" in n.name]
    assert bias_dqs and all(len(n.input) == 2 for n in bias_dqs)
    assert _optimized_ops(str(tmp_path / "cnn.onnx"), tmp_path)["QGemm"] == 1  # the linear head


class _Saturating(nn.Module):
    """A depthwise conv, a conv and a linear whose 8-bit weight codes are all +-127, with large uint8 inputs:
    pairs of products sum past int16 (2 x 255 x 127 > 32767), where u8s8 GEMM kernels without VNNI saturate
    (the depthwise conv runs in a kernel that does not)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.conv = nn.Conv2d(32, 8, 3)
        self.fc = nn.Linear(8 * 6 * 6, 16)
        self.out = nn.Linear(16, 4)
        with torch.no_grad():
            for layer in (self.dw, self.conv, self.fc):
                layer.weight.copy_(torch.sign(layer.weight) * 0.05)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(torch.relu(self.dw(torch.relu(x)))))
        return self.out(torch.relu(self.fc(y.flatten(1))))


@pytest.mark.parametrize("uint8_weights", [False, True, None])
def test_8bit_weights_stored_as_uint8_run_exactly_in_the_fused_kernels(tmp_path, uint8_weights) -> None:  # noqa: ANN001
    """`uint8_weights=True`: 8-bit weights that can saturate as UINT8 codes + 128 with zero point 128, which
    onnxruntime runs in its u8u8 QLinearConv/QGemm kernels exactly on every CPU (the depthwise conv keeps
    INT8: its kernel does not saturate); INT8 codes (`False`) are exact only where the u8s8 kernels do not
    saturate (CPUs with VNNI); the default (`None`) stores UINT8 where they do."""
    from fxquant.export.plan import u8s8_kernels_saturate

    torch.manual_seed(0)
    x = torch.rand(4, 32, 8, 8) * 4
    qm = fxq.prepare(_Saturating().eval(), x[:1], fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "m.onnx")
    model = fxq.export_onnx(frozen, x[:1], path, uint8_weights=uint8_weights)
    stored_unsigned = u8s8_kernels_saturate() if uint8_weights is None else uint8_weights
    types = _code_types(model)
    assert not any(n.op_type == "BitwiseXor" for n in model.graph.node)  # the sign flip is in the stored codes
    expected = {T.UINT8: 3, T.INT8: 1} if stored_unsigned else {T.INT8: 4}
    assert types == collections.Counter({**expected, T.INT32: 4})
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 2 and ops["QGemm"] == 2  # integer kernels either way
    rows = {r.quantizer: r for r in onnx_report(path).rows}
    for r in rows.values():
        if r.kind == "weight":
            unsigned = stored_unsigned and r.quantizer != "dw_weight"
            assert r.bits_used == 8 and r.zero_point == ("128" if unsigned else "0"), r
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])  # ORT_ENABLE_ALL
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = frozen(x).numpy()
    error = float(np.abs(out - ref).max() / np.abs(ref).max())
    if stored_unsigned or not u8s8_kernels_saturate():
        assert error < 1e-5
    else:  # what the option is for: the saturating kernels' result is far off
        assert error > 1e-2


def test_w8a8_cnn_golden_ops_and_integer_kernels(tmp_path) -> None:
    frozen, x = _frozen("cnn", _spec(8), _spec(8))
    path = str(tmp_path / "cnn.onnx")
    model = fxq.export_onnx(frozen, x, path, uint8_weights=False)  # signed weight codes (VNNI/ARM targets)
    onnx.checker.check_model(path, full_check=True)
    assert model.opset_import[0].version == 20  # DEFAULT_MIN_OPSET: ONNX's Gelu
    assert [n.op_type for n in model.graph.node] == (
        # a ReLU read only by a quantizer is that QuantizeLinear's saturation at zero point 0 (passes.absorb_relu)
        ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv"]
        # the stem's output: the add's fixed 8-bit quantizer, then conv1's own input quantizer reading it
        + ["QuantizeLinear", "DequantizeLinear", "QuantizeLinear", "DequantizeLinear"]
        + ["DequantizeLinear", "DequantizeLinear", "Conv"]
        + ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv"]
        + ["QuantizeLinear", "DequantizeLinear", "Add"]
        + ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv"]
        + ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv"]
        # the concat's output quantized for the head pool, which then pools the codes (QLinearGlobalAveragePool)
        + ["QuantizeLinear", "DequantizeLinear", "Concat", "QuantizeLinear", "DequantizeLinear", "GlobalAveragePool", "Reshape"]
        + ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Add"]
    )
    types = collections.Counter(i.data_type for i in model.graph.initializer if i.data_type != T.FLOAT and i.data_type != T.INT64)
    assert _code_types(model) == {T.INT8: 6, T.INT32: 6} and types[T.UINT8] >= 1  # weights, biases; zero points
    zps = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == T.UINT8}
    # the zero point of every quantizer that absorbed a ReLU is the type minimum (0): it saturates negatives to 0
    relu_q = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and "act_relu" in n.name]
    assert relu_q and all(int(zps[n.input[2]]) == 0 for n in relu_q)
    ops = _optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 5
    assert ops["QLinearAdd"] == 1
    assert ops["QLinearGlobalAveragePool"] == 1
    assert "Conv" not in ops


@pytest.mark.parametrize("quantize_outputs", [True, False])
def test_conv_read_only_by_a_pooling_runs_as_integer_kernel(quantize_outputs: bool, tmp_path) -> None:  # noqa: ANN001
    """The depthwise model's last conv feeds a mean: only a quantizer on its output lets ORT fuse it."""
    model, x = make("depthwise", 8)
    cfg = fxq.QuantConfig(weight=_spec(8), activation=_spec(8), first_last_bits=None, quantize_outputs=quantize_outputs)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x])
    path = str(tmp_path / "dw.onnx")
    fxq.export_onnx(fxq.freeze(qm), x, path)
    ops = _optimized_ops(path, tmp_path)
    float_convs = ops["Conv"] + ops["FusedConv"]
    assert (ops["QLinearConv"], float_convs) == ((3, 0) if quantize_outputs else (2, 1)), ops


def test_w4a4_runs_as_integer_kernels_with_int8_weights(tmp_path) -> None:  # noqa: ANN001
    """4-bit activations ride in uint8 with an integer Clip; with int8_weights every conv is a QLinearConv."""
    frozen, x = _frozen("cnn", _spec(4), _spec(4))
    small, fast = str(tmp_path / "w4.onnx"), str(tmp_path / "w4_int8.onnx")
    small_model = fxq.export_onnx(frozen, x, small)
    fast_model = fxq.export_onnx(frozen, x, fast, int8_weights=True)
    assert _code_types(small_model)[T.INT4] == 6 and _code_types(small_model)[T.INT8] == 0
    assert _code_types(fast_model)[T.INT4] == 0 and _code_types(fast_model)[T.INT8] == 6
    assert os.path.getsize(small) < os.path.getsize(fast)
    small_ops, fast_ops = _optimized_ops(small, tmp_path), _optimized_ops(fast, tmp_path)
    # onnxruntime 1.32: no int4-weight conv kernel (a conv whose output is not re-quantized fuses its ReLU)
    assert small_ops["QLinearConv"] == 0 and small_ops["Conv"] + small_ops["FusedConv"] == 5, small_ops
    assert fast_ops["QLinearConv"] == 5 and fast_ops["Conv"] + fast_ops["FusedConv"] == 0, fast_ops
    assert fast_ops["Clip"] >= 1  # the codes' clip to 4 bits stays an integer op between the kernels
    for path in (small, fast):
        result = fxq.verify(frozen, path, [x], raise_on_failure=False)
        assert all(r.ok for r in result.results), str(result)


def test_two_bit_conv_weights_load_and_match_in_onnxruntime(tmp_path) -> None:  # noqa: ANN001
    """onnxruntime 1.32 turns DQ(int2) -> Conv/Gemm with a quantized input into a QLinearConv/QGemm it rejects,
    and DQ(int2) -> MatMul of a weight-only layer into a wrong MatMulNBits: 2-bit weights ride in int4."""
    frozen, x = _frozen("cnn", _spec(2), _spec(8))
    path = str(tmp_path / "w2a8.onnx")
    model = fxq.export_onnx(frozen, x, path)
    assert _code_types(model) == {T.INT4: 6, T.INT32: 6}
    result = fxq.verify(frozen, path, [x], raise_on_failure=False)
    assert all(r.ok for r in result.results), str(result)
    weight_only, x = _frozen("mlp", _spec(2), None)
    path = str(tmp_path / "w2.onnx")
    model = fxq.export_onnx(weight_only, x, path)
    assert _code_types(model) == {T.INT4: 3}
    result = fxq.verify(weight_only, path, [x], raise_on_failure=False)
    assert all(r.ok for r in result.results), str(result)


def test_weight_only_int4_blocked_linear_becomes_matmulnbits(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    x = torch.randn(4, 64)
    cfg = fxq.QuantConfig(activation=None, weight=fxq.QuantSpec(bits=4, granularity="per_group", group_size=16), first_last_bits=None)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "wo4.onnx")
    proto = fxq.export_onnx(frozen, x, path)
    assert proto.opset_import[0].version == 21
    assert [n.op_type for n in proto.graph.node] == ["DequantizeLinear", "MatMul", "Add"]
    dq = proto.graph.node[0]
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 16}
    codes = next(i for i in proto.graph.initializer if i.name == dq.input[0])
    assert codes.data_type == T.INT4 and list(codes.dims) == [64, 32]
    assert _optimized_ops(path, tmp_path) == collections.Counter({"MatMulNBits": 1})
    report = fxq.verify(frozen, path, [torch.randn(5, 64)])
    assert report.max_error < 1e-5


@pytest.mark.parametrize(
    "wbits, abits, narrow, opset, wtype, atype",
    [
        (4, 4, False, 21, T.INT4, T.UINT8),
        (4, 4, True, 21, T.INT4, T.UINT4),
        (2, 4, False, 21, T.INT4, T.UINT8),  # 2-bit weights next to a quantized input ride in INT4
        (2, 2, True, 25, T.INT4, T.UINT2),  # the uint2 activations need opset 25
        (4, 3, True, 21, T.INT4, T.UINT8),  # 3 bits in UINT4 are clipped in UINT8 (Clip takes no 4-bit type)
        (3, 6, False, 21, T.INT4, T.UINT8),
        (8, 16, False, 21, T.INT8, T.UINT16),
    ],
)
def test_containers_and_opset_follow_the_bits(wbits, abits, narrow, opset, wtype, atype) -> None:  # noqa: ANN001
    frozen, x = _frozen("mlp", _spec(wbits), fxq.QuantSpec(bits=abits, min_bits=2, max_bits=max(abits, 8)))
    model = fxq.export_onnx(frozen, x, narrow_activations=narrow, uint8_weights=False)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and "_weight/" in n.name and "_bias" not in n.name]
    inits = {i.name: i for i in model.graph.initializer}
    assert len(dqs) == 3 and all(inits[n.input[0]].data_type == wtype for n in dqs)
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert all(inits[n.input[2]].data_type == atype for n in qs)
    codes = onnx.numpy_helper.to_array(inits[dqs[0].input[0]])
    # full-range codes (3-bit codes ride in int4, already in range)
    assert -(2 ** (wbits - 1)) <= codes.min() and codes.max() <= 2 ** (wbits - 1) - 1
    clips = [n for n in model.graph.node if n.op_type == "Clip"]
    narrower = abits < onnx.helper.tensor_dtype_to_np_dtype(atype).itemsize * 8 if atype not in (T.UINT4, T.UINT2) else False
    assert len(clips) == (len(qs) if narrower else 0)  # narrower activations are clamped in float first


def test_w4_file_is_at_most_55_percent_of_w8(tmp_path) -> None:
    sizes = {}
    for bits in (8, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).eval()
        x = torch.randn(4, 256)
        cfg = fxq.QuantConfig(weight=_spec(bits), activation=_spec(8), first_last_bits=None)
        qm = fxq.prepare(model, x, cfg)
        fxq.calibrate(qm, [x])
        path = tmp_path / f"w{bits}.onnx"
        proto = fxq.export_onnx(fxq.freeze(qm), x, str(path))
        sizes[bits] = (os.path.getsize(path), integer_initializer_bytes(proto))
    assert sizes[4][0] <= 0.55 * sizes[8][0]
    assert sizes[4][1] <= 0.55 * sizes[8][1]


def test_nodes_and_metadata_map_back_to_quantizers(tmp_path) -> None:
    frozen, x = _frozen("cnn", _spec(8), _spec(8))
    path = str(tmp_path / "cnn.onnx")
    model = fxq.export_onnx(frozen, x, path, uint8_weights=False)
    names = set(frozen.fxq_quantizers.keys())
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            meta = {p.key: p.value for p in node.metadata_props}
            assert meta["fxquant.quantizer"] in names
            assert node.name.startswith(f"fxq/{meta['fxquant.quantizer']}/")
            assert meta["fxquant.fx_node"] == "fxq_quantizers_" + meta["fxquant.quantizer"]
    plans = json.loads({p.key: p.value for p in model.metadata_props}["fxquant.quantizers"])
    assert plans["conv1_weight"]["serves"] == ["conv1"]
    # provenance comes from fxquant's own marks, which never reach the file, nor does the exporter's metadata
    from fxquant.export.ops import PROVENANCE_DOMAIN

    assert all(n.domain != PROVENANCE_DOMAIN for n in model.graph.node)
    assert all(o.domain != PROVENANCE_DOMAIN for o in model.opset_import)
    assert not any(p.key.startswith("pkg.torch") for n in model.graph.node for p in n.metadata_props)
    report = onnx_report(path)
    rows = {r.quantizer: r for r in report.rows}
    assert rows["conv1_weight"].dtype == "INT8" and rows["conv1_weight"].bits_used <= 8
    assert rows["conv1_weight"].layout == "per_axis(0)"
    assert rows["conv1_weight"].bytes == 8 * 8 * 3 * 3
    assert rows["act_relu_1"].kind == "activation" and rows["act_relu_1"].zero_point == "0"
    assert report.integer_bytes == integer_initializer_bytes(model)
    text = str(fxq.report(path))
    # act_relu (conv1's input) reads act_relu_to_add (the join's, fixed at 8 bits): one more pair
    assert all(name in text for name in names) and "10 Q/DQ pairs" in text


def test_dynamic_batch_runs_any_batch(tmp_path) -> None:
    frozen, x = _frozen("transformer", _spec(8), _spec(8))
    path = str(tmp_path / "t.onnx")
    fxq.export_onnx(frozen, x, path)
    # ORT_DISABLE_ALL: the Q/DQ arithmetic itself (fused 8-bit-weight kernels saturate on CPUs without VNNI)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    for b in (1, 3):
        xb = torch.randn(b, *x.shape[1:])
        out = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
        np.testing.assert_allclose(out, frozen(xb).numpy(), atol=1e-5)


def test_export_requires_a_frozen_module() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x, fxq.QuantConfig())
    with pytest.raises(fxq.StateError, match=r"call fxq.freeze\(qm\) first"):
        fxq.export_onnx(qm, x)
    with pytest.raises(fxq.StateError, match="expects a frozen module"):
        fxq.export_onnx(model, x)


def test_opset_below_exporter_floor_is_an_error() -> None:
    frozen, x = _frozen("mlp", _spec(8), _spec(8))
    with pytest.raises(fxq.ExportError, match="opset=13 is below 18"):
        fxq.export_onnx(frozen, x, opset=13)


def test_quantizer_without_a_type_at_the_opset_is_kept_float_and_reported(tmp_path) -> None:
    frozen, x = _frozen("mlp", _spec(4), fxq.QuantSpec(bits=16, min_bits=2, max_bits=16))
    path = str(tmp_path / "a16.onnx")
    with pytest.warns(UserWarning, match=r"kept these quantizers as float arithmetic.*opset=21"):
        model = fxq.export_onnx(frozen, x, path, opset=18)
    assert model.opset_import[0].version == 18
    assert "QuantizeLinear" not in {n.op_type for n in model.graph.node}
    inits = {i.name: i for i in model.graph.initializer}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and {inits[n.input[0]].data_type for n in dqs} <= {T.INT8, T.INT32}  # int4 codes widened
    report = onnx_report(path)
    assert set(report.float_quantizers) == {"act_x", "act_relu", "act_relu_1"}
    assert "kept float" in str(report)
    fxq.verify(frozen, path, [torch.randn(8, 16)])  # same numbers: never silently wrong


@torch.library.custom_op("fxq_tests::no_onnx", mutates_args=())
def _no_onnx(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_no_onnx.register_fake
def _(x):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


class _Weird(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.ops.fxq_tests.no_onnx(x))


def test_op_without_onnx_lowering_is_a_clear_error(tmp_path) -> None:
    x = torch.randn(4, 16)
    qm = fxq.prepare(_Weird().eval(), x, fxq.QuantConfig())
    fxq.calibrate(qm, [x])
    path = tmp_path / "weird.onnx"
    with pytest.raises(fxq.ExportError, match=r"fxq_tests.no_onnx.* has no ONNX lowering"):
        fxq.export_onnx(fxq.freeze(qm), x, str(path))
    assert not path.exists() and os.listdir(tmp_path) == []


def test_unwritable_path_is_a_clear_error_and_leaves_no_file(tmp_path) -> None:
    frozen, x = _frozen("mlp", _spec(8), _spec(8))
    with pytest.raises(fxq.ExportError, match="directory .* does not exist; create it first"):
        fxq.export_onnx(frozen, x, str(tmp_path / "missing" / "m.onnx"))
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(fxq.ExportError, match="permission denied; choose a writable location"):
            fxq.export_onnx(frozen, x, str(locked / "m.onnx"))
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o700)
    with pytest.raises(fxq.ExportError, match="it is a directory"):
        fxq.export_onnx(frozen, x, str(tmp_path))


def test_write_failure_leaves_no_partial_file(tmp_path, monkeypatch) -> None:
    import fxquant.export.onnx_file as onnx_file

    frozen, x = _frozen("mlp", _spec(8), _spec(8))

    def fail(model, f):  # noqa: ANN001, ANN202
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(onnx_file, "write_model", fail)
    with pytest.raises(fxq.ExportError, match="could not write the ONNX model .*No space left"):
        fxq.export_onnx(frozen, x, str(tmp_path / "m.onnx"))
    assert os.listdir(tmp_path) == []


def test_the_file_is_the_returned_model_serialized(tmp_path) -> None:  # noqa: ANN001
    """The file is written one initializer at a time (no second copy of the weights in memory), and its bytes are
    exactly `SerializeToString()` of the model export returns."""
    from fxquant.export import onnx_file

    frozen, x = _frozen("mlp", _spec(4), _spec(8))
    path = tmp_path / "m.onnx"
    model = fxq.export_onnx(frozen, x, path)
    assert len(model.graph.initializer) > 3
    assert path.read_bytes() == model.SerializeToString()
    assert onnx_file.serialized_size(model) == model.ByteSize()


def _tensor(name: str, data_type: int, dims: List[int], raw: bytes) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=data_type, dims=dims, raw_data=raw, doc_string="after raw_data")
    t.metadata_props.add(key="k", value="v")
    return t


def test_written_tensors_are_protobufs_bytes_for_every_type() -> None:
    """Each initializer's raw data is written as one copy, its length computed from type and shape (packed sub-byte
    types, odd counts), the fields after it too; tensors without raw data and types it cannot size go through
    protobuf. The bytes and the size equal protobuf's own."""
    from fxquant.export import onnx_file

    T = onnx.TensorProto
    inits = [
        _tensor("f32", T.FLOAT, [2, 3], np.arange(6, dtype=np.float32).tobytes()),
        _tensor("i4_odd", T.INT4, [5], bytes([0x12, 0x34, 0x05])),
        _tensor("u2", T.UINT2, [3, 3], bytes([0xFF, 0x1B, 0x03])),
        _tensor("bool", T.BOOL, [3], bytes([1, 0, 1])),
        _tensor("f16", T.FLOAT16, [1, 2], np.ones(2, np.float16).tobytes()),
        _tensor("scalar_i64", T.INT64, [], np.int64(7).tobytes()),
        onnx.helper.make_tensor("not_raw", T.FLOAT, [2], [1.0, 2.0]),
        onnx.helper.make_tensor("strings", T.STRING, [2], [b"a", b"bc"]),
    ]
    graph = onnx.helper.make_graph([], "g", [], [onnx.helper.make_tensor_value_info("f32", T.FLOAT, [2, 3])], inits)
    model = onnx.helper.make_model(graph, doc_string="model")
    model.metadata_props.add(key="after", value="graph")
    buf = io.BytesIO()
    onnx_file.write_model(model, buf)
    assert buf.getvalue() == model.SerializeToString()
    assert onnx_file.serialized_size(model) == model.ByteSize()
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    broken.graph.initializer[0].raw_data = b"\x00" * 5  # a float32 [2, 3] needs 24 bytes
    with pytest.raises(fxq.ExportError, match="'f32' holds 5 bytes of raw data where its type and shape \\[2, 3\\] need 24: the model is malformed"):
        onnx_file.write_model(broken, io.BytesIO())


def test_cli_inspect_prints_every_quantizer(tmp_path, capsys) -> None:
    from fxquant.cli import main

    frozen, x = _frozen("mlp", _spec(4), _spec(8))
    path = str(tmp_path / "m.onnx")
    fxq.export_onnx(frozen, x, path)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    for name in frozen.fxq_quantizers.keys():
        assert name in out
    assert "INT4" in out and "UINT8" in out and "KiB integer" in out
    assert main(["inspect", str(tmp_path / "nope.onnx")]) == 2
    assert "no ONNX file at" in capsys.readouterr().err


def test_export_rejects_inputs_it_cannot_read() -> None:
    model, x = make("mlp", 4)
    qm = fxq.prepare(model, x)
    fxq.calibrate(qm, [x])
    with pytest.raises(fxq.ExportError, match=r"example_inputs of type str is not understood"):
        fxq.export_onnx(fxq.freeze(qm), "x")


def test_a_model_past_the_protobuf_limit_is_written_with_external_data(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Models of 2 GB or more go to `<path>.data` (the limit is lowered here to exercise that path)."""
    import fxquant.export.onnx_file as onnx_file

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)), torch.randn(4, 64)
    qm = fxq.prepare(model, x, fxq.QuantConfig())
    fxq.calibrate(qm, [x])
    frozen = fxq.freeze(qm)
    monkeypatch.setattr(onnx_file, "TWO_GB", 1024)
    path = tmp_path / "big.onnx"
    fxq.export_onnx(frozen, x, path)
    data = tmp_path / "big.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in onnx.load(str(path), load_external_data=False).graph.initializer)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, frozen(x).numpy(), atol=1e-4)
    assert fxq.verify(frozen, path, [x]).ok


class _Lookup(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.head = nn.Linear(16, 50, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.emb(ids)))


@pytest.mark.parametrize("uint8_weights", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_an_embedding_table_is_gathered_as_integer_codes_then_scaled(tmp_path, tied: bool, uint8_weights: bool) -> None:  # noqa: ANN001
    """A table only gathered keeps INT8 codes even with `uint8_weights` (no integer kernel reads it); a table
    tied with the head is stored once, as UINT8 codes + 128 with `uint8_weights` for the head's u8u8 kernel,
    and its lookups gather those codes and subtract 128."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 7))
    qm = fxq.prepare(_Lookup(tied), ids, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [ids])
    frozen = fxq.freeze(qm)
    path = tmp_path / "lookup.onnx"
    model = fxq.export_onnx(frozen, ids, path, uint8_weights=uint8_weights)
    assert not any(n.op_type == "BitwiseXor" for n in model.graph.node)
    inits = {i.name: i for i in model.graph.initializer}
    head_types = {i.data_type for i in model.graph.initializer if i.dims == [16, 50]}  # stored (in, out) for MatMul
    assert head_types == (set() if tied else {T.UINT8 if uint8_weights else T.INT8})
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    table = [n for n in gathers if inits[n.input[0]].dims == [50, 16]]
    table_type = T.UINT8 if tied and uint8_weights else T.INT8
    assert len(table) == 1 and inits[table[0].input[0]].data_type == table_type
    dequantized = {n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    tables = [i for i in model.graph.initializer if sorted(i.dims) == [16, 50]]
    if tied:  # one integer table, gathered by the lookup and dequantized for the head
        assert len(tables) == 1 and table[0].input[0] in dequantized
    else:
        assert len(tables) == 2 and table[0].input[0] not in dequantized  # no DequantizeLinear of the table
    dq_outputs = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert not any(n.op_type == "Gather" and n.input[0] in dq_outputs for n in model.graph.node)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other = torch.randint(0, 50, (5, 4))  # another batch and length
    out = session.run(None, {session.get_inputs()[0].name: other.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, frozen(other).numpy(), rtol=1e-6, atol=1e-6)


def test_code_folds_compute_each_initializer_once_while_it_is_serialized() -> None:
    """`fold_code_constants` on a hand-built graph: two `BitwiseXor(codes, 128)` of one initializer (a tied
    table's lookup and head) become one UINT8 initializer of the flipped codes, and a `Cast` to INT4 a packed
    initializer; the folds are lazy (computed when serialized) and the source initializer is dropped."""
    import onnx_ir as ir
    from onnx import helper

    from fxquant.export.code_folding import fold_code_constants

    rng = np.random.default_rng(0)
    codes = rng.integers(-128, 128, size=(300, 200), dtype=np.int64).astype(np.int8)
    small = rng.integers(-8, 8, size=(4, 4), dtype=np.int64).astype(np.int8)
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["mask"], value=helper.make_tensor("m", T.UINT8, [], [128])),
            helper.make_node("BitwiseXor", ["codes", "mask"], ["flipped_a"]),
            helper.make_node("BitwiseXor", ["codes", "mask"], ["flipped_b"]),
            helper.make_node("Constant", [], ["one"], value=helper.make_tensor("s", T.FLOAT, [], [1.0])),
            helper.make_node("Constant", [], ["zp"], value=helper.make_tensor("z", T.UINT8, [], [128])),
            helper.make_node("DequantizeLinear", ["flipped_a", "one", "zp"], ["a"]),
            helper.make_node("DequantizeLinear", ["flipped_b", "one", "zp"], ["b"]),
            helper.make_node("Cast", ["small"], ["small_int4"], to=T.INT4),
            helper.make_node("DequantizeLinear", ["small_int4", "one"], ["c"]),
        ],
        "g",
        [],
        [helper.make_tensor_value_info(n, T.FLOAT, None) for n in ("a", "b", "c")],
        [onnx.numpy_helper.from_array(codes.view(np.uint8), "codes"), onnx.numpy_helper.from_array(small, "small")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    fold_code_constants(model)
    initializers = model.graph.initializers
    assert "codes" not in initializers and "small" not in initializers
    flipped = [v for v in initializers.values() if v.dtype == ir.DataType.UINT8]
    assert len(flipped) == 1 and isinstance(flipped[0].const_value, ir.LazyTensor)
    assert not any(n.op_type == "BitwiseXor" for n in model.graph)
    proto = ir.to_proto(model)
    by_name = {i.name: i for i in proto.graph.initializer}
    stored = onnx.numpy_helper.to_array(by_name[flipped[0].name])
    np.testing.assert_array_equal(stored.astype(np.int64) - 128, codes.astype(np.int64))
    (int4,) = [i for i in proto.graph.initializer if i.data_type == T.INT4]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(int4), small)
    from onnx.reference import ReferenceEvaluator

    a, b, c = ReferenceEvaluator(proto).run(None, {})
    np.testing.assert_array_equal(a, codes.astype(np.float32))
    np.testing.assert_array_equal(b, a)
    np.testing.assert_array_equal(c, small.astype(np.float32))


class _StemPool(nn.Module):
    """conv -> BN -> ReLU -> max pool -> conv, as ResNet stems are."""

    def __init__(self, module_pool: bool) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(3, 2, 1) if module_pool else None
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv1(x)))
        y = self.pool(y) if self.pool is not None else torch.nn.functional.max_pool2d(y, 3, 2, 1)
        return self.conv2(y)


@pytest.mark.parametrize("module_pool", [True, False])
def test_max_pooling_runs_on_integers_with_the_conv_output_quantized_after_it(tmp_path, module_pool: bool) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    qm = fxq.prepare(_StemPool(module_pool).eval(), x, fxq.QuantConfig(first_last_bits=None))
    relu = next(n for n in qm.graph.nodes if n.target is torch.relu)
    # no quantizer of its own between the ReLU and the pool: the one after the pool serves both
    assert len(relu.users) == 1 and not str(next(iter(relu.users)).target).startswith("fxq_quantizers.")
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "stem.onnx")
    fxq.export_onnx(frozen, x, path)
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath).graph
    produced_by = {o: n.op_type for n in graph.node for o in n.output}
    pools = [n for n in graph.node if "MaxPool" in n.op_type]
    assert pools and all(produced_by.get(n.input[0]) != "DequantizeLinear" for n in pools)  # an integer max pool
    # the first conv (ReLU fused) is an integer kernel; the last one, whose output is the model's, runs in float
    assert [n.op_type for n in graph.node].count("QLinearConv") == 1
    assert fxq.verify(frozen, path, [x]).ok


def test_outputs_next_to_provenance_marks_keep_their_names_and_the_file_runs(tmp_path) -> None:
    """A graph output that is also read by a quantized layer (so a quantizer's mark sits on it) stays an output
    of the file under its exporter name after the marks are removed, and onnxruntime computes the frozen
    module's numbers."""

    class TwoOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor):  # noqa: ANN201
            h = torch.relu(self.fc1(x))
            return h, self.fc2(h)

    model, x = TwoOutputs().eval(), torch.randn(3, 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x], progress=False)
    frozen = fxq.freeze(qm)
    proto = fxq.export_onnx(frozen, x, str(tmp_path / "m.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    produced = {o for n in proto.graph.node for o in n.output}
    assert len(proto.graph.output) == 2 and all(o.name in produced for o in proto.graph.output)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = frozen(x)
    for g, e in zip(got, expected):
        assert np.abs(g - e.numpy()).max() < 1e-5


class _SqueezeExcite(nn.Module):
    """A MobileNetV3 block's tail (hardswish module, squeeze-excite with a hard-sigmoid gate) or an
    EfficientNet one's (SiLU module, sigmoid gate)."""

    def __init__(self, family: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Hardswish() if family == "mobilenet_v3" else nn.SiLU()
        self.gate = torch.nn.functional.hardsigmoid if family == "mobilenet_v3" else torch.sigmoid
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        gate = self.gate(self.fc2(torch.relu(self.fc1(torch.nn.functional.adaptive_avg_pool2d(y, 1)))))
        return self.project(y * gate)


@pytest.mark.parametrize("family", ["mobilenet_v3", "efficientnet"])
@pytest.mark.parametrize("quantize_outputs", [True, False])
def test_hardswish_silu_and_squeeze_excite_run_as_integer_kernels(tmp_path, quantize_outputs: bool, family: str) -> None:  # noqa: ANN001
    """Hardswish (x * hardsigmoid(x)), SiLU (x * sigmoid(x)) and squeeze-excite's gated product run as integer
    kernels: a hard-sigmoid gate as QLinearAdd (x + 3 at 6 times the gate's scale), a sigmoid one as
    QLinearSigmoid, the products as QLinearMul, the pooling as QLinearGlobalAveragePool: no float island between
    the integer convs; the file computes what the frozen module does. Without output quantizers (the option
    that asks for none beyond the quantized ops' inputs) the activation stays float."""
    torch.manual_seed(0)
    model, x = _SqueezeExcite(family).eval(), torch.randn(2, 3, 12, 12)
    cfg = fxq.QuantConfig(weight=_spec(8), activation=_spec(8), first_last_bits=None, quantize_outputs=quantize_outputs)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "se.onnx")
    exported = fxq.export_onnx(frozen, x, path)
    ops = _optimized_ops(path, tmp_path)
    gate_kernel = "QLinearAdd" if family == "mobilenet_v3" else "QLinearSigmoid"
    if quantize_outputs:
        assert "HardSwish" not in {n.op_type for n in exported.graph.node}
        # the last conv writes the model's output, which stays float: a float conv reading DequantizeLinear
        assert (ops[gate_kernel], ops["QLinearMul"], ops["QLinearGlobalAveragePool"], ops["QLinearConv"]) == (2, 2, 1, 3), ops
        assert not {"HardSigmoid", "HardSwish", "Sigmoid", "Mul", "Add", "ReduceMean", "GlobalAveragePool"} & set(ops), ops
    else:
        float_activations = ops["HardSwish"] + ops["HardSigmoid"] + ops["Sigmoid"] + ops["QuickGelu"]  # x * sigmoid(x) fused
        assert float_activations >= 1 and ops["QLinearMul"] == 0, ops
    result = fxq.verify(frozen, path, [x], raise_on_failure=False)
    assert all(r.ok for r in result.results), str(result)
    assert max(r.relative_error for r in result.results) < 1e-5, str(result)
    # the ONNX report finds the frozen module's quantizers, no more (the gate's shift is inside its own marks)
    assert {row.quantizer for row in fxq.report(path).rows} == set(dict(frozen.fxq_quantizers.named_children()))


def test_a_hard_sigmoid_gate_whose_range_grew_past_one_stays_a_float_hard_sigmoid(tmp_path) -> None:  # noqa: ANN001
    """`quantize(x + 3, 6 s)` equals `quantize(hardsigmoid(x), s)` only when the codes saturate by the gate's top
    (`round(1 / s) >= qmax`); a gate quantizer whose range grew past 1 (fine-tuning can move it) is exported as a
    float HardSigmoid between its Q/DQ, and the file still computes what the frozen module does."""
    torch.manual_seed(0)
    model, x = _SqueezeExcite("mobilenet_v3").eval(), torch.randn(2, 3, 12, 12)
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=_spec(8), activation=_spec(8), first_last_bits=None))
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    gates = [q for name, q in qm.fxq_quantizers.items() if name.startswith("act_hardsigmoid")]
    assert len(gates) == 2
    with torch.no_grad():
        gates[0].hi.mul_(3.0)  # one gate's range: [0, ~3]
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "se.onnx")
    fxq.export_onnx(frozen, x, path)
    ops = _optimized_ops(path, tmp_path)
    assert ops["HardSigmoid"] == 1 and ops["QLinearAdd"] == 1, ops
    result = fxq.verify(frozen, path, [x], raise_on_failure=False)
    assert max(r.relative_error for r in result.results) < 1e-5, str(result)


class _ResidualHead(nn.Module):
    """A residual block's last add and ReLU, then the global average pool and linear head of a CNN: functions, or
    modules (`nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(...))`, as many model definitions
    write it)."""

    def __init__(self, module_head: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), self.fc) if module_head else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x))
        y = torch.relu(y + self.conv2(y))
        if self.head is not None:
            return self.head(y)
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


@pytest.mark.parametrize("module_head", [False, True], ids=["functions", "modules"])
def test_a_cnn_head_pools_the_codes_and_its_last_residual_add_is_integer(tmp_path, module_head: bool) -> None:  # noqa: ANN001
    """The head's average pool reads a quantized input when its output is quantized (the linear's input, also
    through an `nn.Flatten` module), so onnxruntime runs it as QLinearGlobalAveragePool and the residual add before
    it as QLinearAdd (with the ReLU): no float op between the integer kernels; the file computes what the frozen
    module does."""
    torch.manual_seed(0)
    model, x = _ResidualHead(module_head).eval(), torch.randn(2, 3, 12, 12)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "head.onnx")
    fxq.export_onnx(frozen, x, path)
    ops = _optimized_ops(path, tmp_path)
    assert (ops["QLinearAdd"], ops["QLinearGlobalAveragePool"], ops["QLinearConv"], ops["QGemm"]) == (1, 1, 2, 1), ops
    assert not {"Add", "Relu", "GlobalAveragePool", "ReduceMean", "Conv"} & set(ops), ops
    result = fxq.verify(frozen, path, [x], raise_on_failure=False)
    assert max(r.relative_error for r in result.results) < 1e-5, str(result)


class _BucketBias(nn.Module):
    """A relative-position-style bias: a small table (8 buckets x 4 heads) looked up for every pair of positions."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Embedding(8, 4)
        self.emb = nn.Embedding(50, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)
        buckets = (positions[None, :] - positions[:, None]).abs().clamp(max=7)
        return self.emb(ids).sum(-1, keepdim=True) + self.bias(buckets).sum(-1)


def test_a_small_table_looked_up_per_pair_is_dequantized_then_gathered(tmp_path) -> None:  # noqa: ANN001
    """A small table the example looks up at least once per row (8 rows, 12 x 12 lookups) is exported as
    DequantizeLinear then a float Gather (no Gather of codes, Cast and Mul per call); the vocabulary table (50 rows,
    24 lookups) still gathers its codes; the output is the frozen module's, at another length too."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 12))
    qm = fxq.prepare(_BucketBias(), ids, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [ids])
    frozen = fxq.freeze(qm)
    path = tmp_path / "bias.onnx"
    model = fxq.export_onnx(frozen, ids, path)
    inits = {i.name: i for i in model.graph.initializer}
    dq_outputs = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    gathers = [n for n in model.graph.node if n.op_type == "Gather"]
    small = [n for n in gathers if n.input[0] in dq_outputs and inits.get(dq_outputs[n.input[0]]) is not None
             and list(inits[dq_outputs[n.input[0]]].dims) == [8, 4]]
    codes = [n for n in gathers if n.input[0] in inits and list(inits[n.input[0]].dims) == [50, 4]]
    assert len(small) == 1 and len(codes) == 1
    assert not any(n.input[0] in inits and list(inits[n.input[0]].dims) == [8, 4] for n in gathers)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for x in (ids, torch.randint(0, 50, (3, 5))):
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            np.testing.assert_allclose(out, frozen(x).numpy(), rtol=1e-6, atol=1e-6)


class _PreActivation(nn.Module):
    """DenseNet's pattern: a concat, then BatchNorm -> ReLU -> conv (no conv feeds the BatchNorm, so it cannot be
    folded), a pooled linear head; and, with `input_norm`, a BatchNorm on the input image before the first conv."""

    def __init__(self, input_norm: bool = False) -> None:
        super().__init__()
        self.norm_in = nn.BatchNorm2d(3) if input_norm else None
        self.conv1, self.bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.fc = nn.Conv2d(8, 6, 3, padding=1), nn.Linear(6, 4)
        for bn in (self.bn, self.norm_in):
            if bn is not None:  # statistics of a trained network, not the identity
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_in is not None:
            x = self.norm_in(x)
        y = torch.cat([x, torch.relu(self.conv1(x))], dim=1)
        y = self.conv2(torch.relu(self.bn(y)))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(torch.relu(y), 1), 1))


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_a_batchnorm_no_conv_feeds_runs_as_an_integer_depthwise_conv(tmp_path, capture: str) -> None:  # noqa: ANN001
    """An unfoldable BatchNorm (after a concat) becomes the depthwise 1x1 conv of its affine, quantized for the
    integer kernel alone (8-bit input and weight, one exact weight per channel), so onnxruntime runs the block
    without a float BatchNormalization, DequantizeLinear or concat between the integer kernels; the file computes
    what the frozen module does, which is the float model up to the activations' rounding; the user's BatchNorm
    is left as it was. Both front ends (a module call; torch.export's aten BatchNorm)."""
    torch.manual_seed(0)
    model, x = _PreActivation().eval(), torch.randn(2, 3, 10, 10)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None), capture=capture)
    assert qm.fxquant_capture == capture
    assert not hasattr(model.bn, "fxquant_affine_weight")
    affine = [q for name, q in quantizers_of(qm).items() if "fxquant_affine_weight" in name and q.kind == "weight"]
    assert len(affine) == 1 and affine[0].bits_param.requires_grad is False
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "preact.onnx")
    fxq.export_onnx(frozen, x, path)
    ops = _optimized_ops(path, tmp_path)
    assert not {"BatchNormalization", "DequantizeLinear", "Concat", "Conv", "Relu"} & set(ops), ops
    assert ops["QLinearConv"] == 3 and ops["QLinearConcat"] == 1, ops
    result = fxq.verify(frozen, path, [x], raise_on_failure=False)
    assert max(r.relative_error for r in result.results) < 1e-5, str(result)
    with torch.no_grad():
        assert torch.allclose(frozen(x), model(x), rtol=0, atol=0.05 * float(model(x).abs().max()))


def test_a_batchnorm_on_the_input_leaves_the_first_conv_the_first_layer() -> None:
    """The depthwise conv of a BatchNorm on the input image is not the model's first layer: `first_last_bits` still
    keeps the first conv at 8 bits; weights-only quantization keeps the BatchNorm float (no integer kernel to feed)."""
    torch.manual_seed(0)
    model, x = _PreActivation(input_norm=True).eval(), torch.randn(2, 3, 10, 10)
    spec = fxq.QuantSpec(bits=4, learn_bits=False)
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=spec, activation=spec, first_last_bits=8))
    weights = {name: q for name, q in quantizers_of(qm).items() if q.kind == "weight"}
    assert int(weights["conv1_weight"].integer_bits().max()) == 8 and int(weights["conv2_weight"].integer_bits().max()) == 4
    assert sum("fxquant_affine_weight" in name for name in weights) == 2
    weights_only = fxq.prepare(model, x, fxq.QuantConfig(activation=None))
    assert not any("fxquant_affine" in name for name in quantizers_of(weights_only))


class _Permute(nn.Module):
    """torchvision's `ops.misc.Permute`."""

    def __init__(self, dims: List[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.permute(x, self.dims)


class _LayerScale(nn.Module):
    """ConvNeXt's layer scale: a linear's output times a learned per-channel `gamma` (channels last), the same
    permuted back to channels first times a `(C, 1, 1)` scale (torchvision's CNBlock), and a conv's output times
    `(C, 1, 1)` scales; `spatial` is a scale per position, which is not a layer's per-channel scale."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc1, self.fc2 = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6, 8), nn.Linear(8, 6)
        self.fc3, self.back = nn.Linear(6, 6), _Permute([0, 3, 1, 2])
        self.gamma = nn.Parameter(torch.linspace(0.2, 1.5, 6))
        self.layer_scale = nn.Parameter(torch.linspace(0.3, 0.9, 6).reshape(6, 1, 1))
        self.conv_scale = nn.Parameter(torch.linspace(-1.0, 1.0, 6).reshape(6, 1, 1))
        self.spatial = nn.Parameter(torch.rand(8, 8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x) * self.conv_scale) * self.spatial
        z = y.permute(0, 2, 3, 1)
        z = z + self.gamma * self.fc2(torch.relu(self.fc1(z)))
        return (y + self.layer_scale * self.back(self.fc3(z))).mean(dim=(2, 3))


def test_a_per_channel_scale_after_a_layer_folds_into_its_weights(tmp_path) -> None:  # noqa: ANN001
    """`gamma * linear(y)`, `scale * permute(linear(y))` and `conv(x) * scale` (one stored value per output channel)
    fold into the layer's weight and bias, so no float Mul follows the integer kernel; a per-position scale stays a
    multiply; the prepared module computes the float model's function before quantization, and the user's
    parameters are unchanged."""
    torch.manual_seed(0)
    model, x = _LayerScale().eval(), torch.randn(2, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    muls = [n for n in qm.graph.nodes if n.op == "call_function" and n.target in (operator.mul, torch.mul)]
    assert len(muls) == 1 and "spatial" in str(muls[0].args), [str(n.args) for n in muls]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with fxq.quantizers_enabled(qm, False), torch.no_grad():
        assert torch.allclose(qm(x), model(x), atol=1e-5)
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "scale.onnx")
    fxq.export_onnx(frozen, x, path)
    result = fxq.verify(frozen, path, [x], raise_on_failure=False)
    assert max(r.relative_error for r in result.results) < 1e-5, str(result)
