"""Each ONNX translation in `fxquant/export/ops.py`, checked alone against `onnx.reference`.

For every case export uses (see `fxquant/export/qdq.py`: `_ExportActivation`, `_ExportDequantize` and
`plan_quantizers`), a tiny torch module calls the custom op (`fxquant::quantize_dequantize` or
`fxquant::dequantize`) on graph inputs and is exported the way `export_onnx` does it:
`torch.onnx.export(..., dynamo=True, custom_translation_table=translation_table(opset))` at the opset export
picks for the container (18 for 8-bit and int32, 21 for 4/16-bit and blocked scales, 25 for uint2). Every
tensor is a graph input, and the exporter's optimizer is off, so the ONNX nodes are exactly what the
translation emitted. To keep the file fast, the cases of one opset are exported together as one module with
one output per case; each test then extracts its case's own model (`onnx.utils.Extractor`) and checks

- its numbers: `onnx.reference.ReferenceEvaluator` equals the torch op's own output exactly (float32, no
  tolerance: both sides compute `x / scale`, round half to even, add the zero point, clamp, subtract it and
  multiply by the scale in float32, so a tolerance would only hide a wrong lowering);
- its nodes: `[Cast ->] QuantizeLinear [-> Clip] -> DequantizeLinear` wired input to output, the codes in
  the container type, a Clip exactly when `clip=True` (and without it the numbers would differ);
  `[Cast ->] DequantizeLinear` with the axis / block_size of the scale layout;
- its validity: `onnx.checker.check_model(full_check=True)` at the exported opset.

Two facts of the installed onnx shape the tests (both probed at run time, not assumed):

- `onnx.reference` has no QuantizeLinear/DequantizeLinear implementation before opset 19 (onnx 1.23: only
  19, 21, 23, 25), and opset 18 is what export uses for 8-bit containers. Those models are checked (nodes,
  validity) at opset 18 and, where the reference lacks that version, evaluated with their default-domain
  opset raised to 19: versions 13 -> 19 of
  QuantizeLinear, DequantizeLinear, Clip and Cast differ only for float8 types and the `saturate` attribute
  of float8, never for integer codes.
- A container type `onnx.reference` cannot run at the installed onnx version is skipped with the reason.

Cases export never produces are not tested: per-axis activations (`plan_quantizers` lowers them as float
arithmetic, not through `quantize_dequantize`) and INT2 weights (2-bit weights ride in INT4).
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import warnings
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import onnx.utils
import pytest
import torch
from onnx import helper
from onnx.reference import ReferenceEvaluator
from torch import Tensor, nn

from fxquant.export.ops import TORCH_STORABLE, clipped_type, translation_table

T = onnx.TensorProto
TYPE_NAMES = {v: k for k, v in T.DataType.items()}
CONTAINER_RANGE = {
    T.UINT2: (0, 3), T.UINT4: (0, 15), T.UINT8: (0, 255), T.UINT16: (0, 2**16 - 1),
    T.INT2: (-2, 1), T.INT4: (-8, 7), T.INT8: (-128, 127), T.INT16: (-(2**15), 2**15 - 1), T.INT32: (-(2**31), 2**31 - 1),
}
"""Code range of each ONNX integer container (what QuantizeLinear saturates to)."""
REFERENCE_MIN_OPSET = 19
"""The lowest opset at which onnx.reference implements QuantizeLinear/DequantizeLinear (onnx 1.23)."""
TIES = (-2.5, -1.5, -0.5, 0.5, 1.5, 2.5)
"""`x / scale` values that are exact ties: round half to even gives -2, -2, -0, 0, 2, 2."""


@dataclass(frozen=True)
class QDQCase:
    """One `fxquant::quantize_dequantize` call as `_ExportActivation` makes it (per-tensor scale)."""

    name: str
    onnx_type: int
    opset: int
    qmin: int
    qmax: int
    zero_point: int
    scale: float
    dequantize_factor: float = 1.0  # != 1: dequantized with `scale * factor` (a hard-sigmoid gate's 1/6)

    @property
    def clip(self) -> bool:
        """What `_ExportActivation` passes: a code range narrower than the container's."""
        return (self.qmin, self.qmax) != CONTAINER_RANGE[self.onnx_type]

    @property
    def graph_type(self) -> int:
        """The type of the codes in the graph: the container's, or the 8-bit type a clipped 4-/2-bit one runs
        in (ONNX Clip takes no 4- or 2-bit type)."""
        return clipped_type(self.onnx_type, self.clip)

    @property
    def index_dtype(self) -> torch.dtype:
        """The torch dtype of the zero point and code range (as `_ExportActivation` stores them): the graph
        type's, else int64 (then Cast)."""
        return TORCH_STORABLE.get(self.graph_type, torch.int64)

    def inputs(self) -> Tuple[Tensor, ...]:
        """x (ties, both clamps, beyond the container, random), scale, zero_point, code_min, code_max."""
        gen = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        s = np.float32(self.scale)
        lo, hi = CONTAINER_RANGE[self.onnx_type]
        steps = [
            self.qmin - self.zero_point - 1, self.qmax - self.zero_point + 1,  # just past each end of the range
            self.qmin - self.zero_point - 3, self.qmax - self.zero_point + 3,
            lo - self.zero_point - 40, hi - self.zero_point + 40,  # past the container's own range
            0,
        ]
        special = [_exact_quotient(t, s) for t in TIES] + [_exact_quotient(float(k), s) for k in steps]
        span = (self.qmax - self.qmin + 6) * float(s)
        start = (self.qmin - self.zero_point - 3) * float(s)
        rand = torch.rand(60 - len(special), generator=gen) * span + start
        x = torch.cat([torch.tensor(special, dtype=torch.float32), rand]).reshape(2, 3, -1)
        dt = self.index_dtype
        return (
            x,
            torch.tensor(self.scale, dtype=torch.float32),
            torch.tensor(self.zero_point, dtype=dt),
            torch.tensor(self.qmin, dtype=dt),
            torch.tensor(self.qmax, dtype=dt),
        )

    def dequantize_scale(self, scale: Tensor) -> Optional[Tensor]:
        return None if self.dequantize_factor == 1.0 else scale * self.dequantize_factor

    def call(self, x: Tensor, scale: Tensor, zero_point: Tensor, code_min: Tensor, code_max: Tensor) -> Tensor:
        return torch.ops.fxquant.quantize_dequantize(
            x, scale, zero_point, code_min, code_max, self.qmin, self.qmax, self.onnx_type, self.clip,
            self.dequantize_scale(scale),
        )


@dataclass(frozen=True)
class DQCase:
    """One `fxquant::dequantize` call as `_ExportDequantize` makes it.

    `block_size`: `> 0` blocked along `axis`, `0` one scale per index of `axis`, `< 0` per tensor. Weights
    carry explicit zero points of the stored codes' dtype; int32 biases none."""

    name: str
    onnx_type: int
    opset: int
    shape: Tuple[int, ...]
    axis: int
    block_size: int
    codes_dtype: torch.dtype  # FrozenWeight's codes: int8 up to 8 bits, int16 up to 16; biases int32
    code_range: Tuple[int, int]
    has_zero_point: bool = True

    @property
    def stored_dtype(self) -> torch.dtype:
        """What `_ExportDequantize` stores: the container's dtype, else the codes' own (then Cast)."""
        return TORCH_STORABLE.get(self.onnx_type, self.codes_dtype)

    def scale_shape(self) -> Tuple[int, ...]:
        if self.block_size < 0:
            return ()
        if self.block_size == 0:
            return (self.shape[self.axis],)
        blocked = list(self.shape)
        blocked[self.axis] //= self.block_size
        return tuple(blocked)

    def inputs(self) -> Tuple[Tensor, ...]:
        """codes (both ends of the range included), scale [, zero_point]."""
        gen = torch.Generator().manual_seed(zlib.crc32(self.name.encode()))
        lo, hi = self.code_range
        codes = torch.randint(lo, hi + 1, self.shape, generator=gen, dtype=torch.int64).reshape(-1)
        ends = torch.tensor([lo, hi])[: codes.numel()]
        codes[: len(ends)] = ends
        codes = codes.reshape(self.shape).to(self.stored_dtype)
        scale = (torch.rand(self.scale_shape(), generator=gen) * 0.05 + 0.003).to(torch.float32)
        if not self.has_zero_point:
            return codes, scale
        return codes, scale, torch.zeros(self.scale_shape(), dtype=self.stored_dtype)

    def call(self, codes: Tensor, scale: Tensor, zero_point: Optional[Tensor] = None) -> Tensor:
        return torch.ops.fxquant.dequantize(codes, scale, zero_point, self.axis, self.block_size, self.onnx_type)


Case = Union[QDQCase, DQCase]

QDQ_CASES = [
    QDQCase("uint8_8bit", T.UINT8, 18, 0, 255, 128, 3 / 64),
    QDQCase("uint8_8bit_after_relu", T.UINT8, 18, 0, 255, 0, 0.25),
    QDQCase("uint8_hard_sigmoid_gate", T.UINT8, 18, 0, 255, 0, 6 / 255, dequantize_factor=1 / 6),
    QDQCase("uint8_3bit_clip", T.UINT8, 18, 0, 7, 3, 5 / 128),
    QDQCase("uint16_16bit", T.UINT16, 21, 0, 2**16 - 1, 2**15, 3 / 2**14),
    QDQCase("uint16_12bit_clip", T.UINT16, 21, 0, 4095, 2000, 7 / 2**12),
    QDQCase("uint4_4bit_narrow", T.UINT4, 21, 0, 15, 8, 15 / 128),
    QDQCase("uint4_3bit_narrow_clip", T.UINT4, 21, 0, 7, 3, 0.5),
    QDQCase("uint2_2bit_narrow", T.UINT2, 25, 0, 3, 1, 5 / 16),
]
"""Activations: UINT8 up to 8 bits, UINT16 above (opset 21), narrower widths clipped in their container;
`narrow_activations=True` gives UINT4 (opset 21) / UINT2 (opset 25)."""

DQ_CASES = [
    DQCase("int8_per_tensor", T.INT8, 18, (5, 7), 0, -1, torch.int8, (-128, 127)),
    DQCase("int8_per_axis_conv", T.INT8, 18, (4, 3, 2, 2), 0, 0, torch.int8, (-128, 127)),
    DQCase("int8_per_axis_transposed_linear", T.INT8, 18, (6, 4), 1, 0, torch.int8, (-128, 127)),
    DQCase("int8_blocked", T.INT8, 21, (4, 8), 1, 4, torch.int8, (-128, 127)),
    DQCase("int4_per_tensor", T.INT4, 21, (5, 7), 0, -1, torch.int8, (-8, 7)),
    DQCase("int4_per_axis_conv", T.INT4, 21, (4, 3, 2, 2), 0, 0, torch.int8, (-8, 7)),
    DQCase("int4_blocked_axis1", T.INT4, 21, (4, 8), 1, 4, torch.int8, (-8, 7)),
    DQCase("int4_blocked_axis0_transposed_linear", T.INT4, 21, (8, 3), 0, 2, torch.int8, (-8, 7)),
    DQCase("int4_3bit_codes_per_axis", T.INT4, 21, (6, 5), 0, 0, torch.int8, (-3, 3)),
    DQCase("int16_per_axis", T.INT16, 21, (4, 6), 0, 0, torch.int16, (-(2**15), 2**15 - 1)),
    DQCase("int32_12bit_weight_below_opset21", T.INT32, 18, (4, 6), 0, 0, torch.int16, (-2047, 2047)),
    DQCase("int32_bias_per_axis", T.INT32, 18, (16,), 0, 0, torch.int32, (-(2**31), 2**31 - 1), has_zero_point=False),
    DQCase("int32_bias_per_tensor", T.INT32, 18, (1,), 0, -1, torch.int32, (-(2**20), 2**20), has_zero_point=False),
]
"""Weights: signed INT4/INT8/INT16 codes with zero zero points (INT32 for 9-16 bits below opset 21), per
tensor, per channel or blocked (opset 21); biases: INT32 without zero point, one scale per channel."""

ALL_CASES: List[Case] = [*QDQ_CASES, *DQ_CASES]


def _exact_quotient(t: float, scale: np.float32) -> float:
    """A float32 `x` with `float32(x / scale) == t` exactly (a tie stays a tie whatever the scale)."""
    x = np.float32(t * float(scale))
    for _ in range(16):
        q = x / scale
        if q == np.float32(t):
            return float(x)
        x = np.nextafter(x, np.float32(np.inf) if q < t else np.float32(-np.inf), dtype=np.float32)
    raise AssertionError(f"no float32 x with x / {scale} == {t}")


def _case_id(case: Case) -> str:
    return case.name


class _Calls(nn.Module):
    """Calls each case's custom op on its own slice of the inputs; one output per case."""

    def __init__(self, cases: Sequence[Case]) -> None:
        super().__init__()
        self.cases = list(cases)
        self.arity = [len(c.inputs()) for c in self.cases]

    def forward(self, *tensors: Tensor) -> Tuple[Tensor, ...]:
        outputs = []
        start = 0
        for case, n in zip(self.cases, self.arity):
            outputs.append(case.call(*tensors[start : start + n]))
            start += n
        return tuple(outputs)


@dataclass
class _Exported:
    model: onnx.ModelProto
    inputs: Dict[str, List[str]]  # case name -> its graph input names
    output: Dict[str, str]  # case name -> its graph output name


@functools.lru_cache(maxsize=None)
def _exported(opset: int) -> _Exported:
    """All cases of `opset` exported as one module, the way `export_onnx` calls the exporter."""
    cases = [c for c in ALL_CASES if c.opset == opset]
    module = _Calls(cases).eval()
    args = tuple(t for c in cases for t in c.inputs())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=opset, custom_translation_table=translation_table(opset),
                optimize=False, verbose=False, external_data=False,
            )
        finally:
            logging.disable(previous)
    model = program.model_proto
    assert [o.version for o in model.opset_import if o.domain == ""] == [opset]
    assert len(model.graph.input) == len(args) and len(model.graph.output) == len(cases)
    names = [i.name for i in model.graph.input]
    inputs: Dict[str, List[str]] = {}
    start = 0
    for case, n in zip(cases, module.arity):
        inputs[case.name] = names[start : start + n]
        start += n
    output = {c.name: o.name for c, o in zip(cases, model.graph.output)}
    return _Exported(model, inputs, output)


def _case_model(case: Case) -> Tuple[onnx.ModelProto, Dict[str, np.ndarray]]:
    """The case's own model (extracted from its opset's export) and its feeds."""
    exported = _exported(case.opset)
    names = exported.inputs[case.name]
    model = onnx.utils.Extractor(exported.model).extract_model(names, [exported.output[case.name]])
    kept = {i.name for i in model.graph.input}
    feeds = {n: t.numpy() for n, t in zip(names, case.inputs()) if n in kept}
    return model, feeds


@functools.lru_cache(maxsize=None)
def _reference_implements(version: int) -> bool:
    """Whether onnx.reference implements QuantizeLinear and DequantizeLinear at opset `version`."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s"], ["q"]), helper.make_node("DequantizeLinear", ["q", "s"], ["y"])],
        "probe", [helper.make_tensor_value_info("x", T.FLOAT, [1]), helper.make_tensor_value_info("s", T.FLOAT, [])],
        [helper.make_tensor_value_info("y", T.FLOAT, [1])],
    )
    try:
        ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)]))
    except RuntimeError:  # "No implementation for operator 'DequantizeLinear' ... version 18"
        return False
    return True


def _evaluable(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model`, or where onnx.reference lacks its Q/DQ version, a copy with the default-domain opset raised to
    `REFERENCE_MIN_OPSET` (same integer semantics, see the module docstring)."""
    (version,) = [o.version for o in model.opset_import if o.domain == ""]
    if _reference_implements(version):
        return model
    assert version < REFERENCE_MIN_OPSET and _reference_implements(REFERENCE_MIN_OPSET)
    out = copy.deepcopy(model)
    for o in out.opset_import:
        if o.domain == "":
            o.version = REFERENCE_MIN_OPSET
    return out


@functools.lru_cache(maxsize=None)
def _reference_lacks(onnx_type: int, opset: int, quantize: bool) -> Optional[str]:
    """Why onnx.reference cannot run `Cast` to `onnx_type` then `QuantizeLinear -> DequantizeLinear` (`quantize`)
    or `DequantizeLinear` of `onnx_type` at `opset` (None: it can), probed on a hand-built model that does not
    involve fxquant."""
    version = max(opset, REFERENCE_MIN_OPSET)
    where = f"onnx {onnx.__version__} (max opset {onnx.defs.onnx_opset_version()})"
    if onnx.defs.onnx_opset_version() < opset:
        return f"{where} has no opset {opset}"
    what = f"{TYPE_NAMES[onnx_type]} {'QuantizeLinear/' if quantize else ''}DequantizeLinear at opset {version}"
    lo, _ = CONTAINER_RANGE[onnx_type]
    values = np.array([1.0, lo], np.float32)
    nodes = [helper.make_node("Cast", ["zp64"], ["zp"], to=onnx_type)]
    if quantize:
        nodes.append(helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]))
        x, feed = helper.make_tensor_value_info("x", T.FLOAT, [2]), values
    else:
        nodes.append(helper.make_node("Cast", ["x"], ["q"], to=onnx_type))
        x, feed = helper.make_tensor_value_info("x", T.INT64, [2]), values.astype(np.int64)
    nodes.append(helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"]))
    graph = helper.make_graph(
        nodes, "probe",
        [x, helper.make_tensor_value_info("s", T.FLOAT, []), helper.make_tensor_value_info("zp64", T.INT64, [])],
        [helper.make_tensor_value_info("y", T.FLOAT, [2])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", version)])
    try:
        (y,) = ReferenceEvaluator(probe).run(None, {"x": feed, "s": np.float32(1.0), "zp64": np.int64(0)})
    except Exception as e:  # noqa: BLE001 - any failure of the reference itself is the reason to skip
        return f"onnx.reference of {where} cannot run {what}: {type(e).__name__}: {e}"
    if not np.array_equal(y, values):
        return f"onnx.reference of {where} computes {what} wrongly ({y} != {values})"
    return None


def _skip_unsupported(case: Case) -> None:
    reason = _reference_lacks(case.onnx_type, case.opset, isinstance(case, QDQCase))
    if reason is not None:
        pytest.skip(reason)


def _run(model: onnx.ModelProto, feeds: Dict[str, np.ndarray], outputs: Optional[List[str]] = None) -> List[np.ndarray]:
    return ReferenceEvaluator(_evaluable(model)).run(outputs, feeds)


def _torch_output(case: Case) -> np.ndarray:
    with torch.no_grad():
        out = case.call(*case.inputs())
    assert out.dtype == torch.float32
    return out.numpy()


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(helper.get_attribute_value(a))
    return default


def _producer(model: onnx.ModelProto, value: str) -> Optional[onnx.NodeProto]:
    return next((n for n in model.graph.node if value in n.output), None)


def _assert_is_input_or_cast(model: onnx.ModelProto, value: str, graph_input: str, onnx_type: int, cast: bool) -> None:
    """`value` is `graph_input` itself, or (`cast`) a Cast of it to `onnx_type`."""
    if not cast:
        assert value == graph_input
        return
    node = _producer(model, value)
    assert node is not None and node.op_type == "Cast", f"{value} is not a Cast"
    assert list(node.input) == [graph_input] and _attr(node, "to", -1) == onnx_type


# ---------------------------------------------------------------------------------------------- quantize_dequantize


@pytest.mark.parametrize("case", QDQ_CASES, ids=_case_id)
def test_quantize_dequantize_translation_equals_the_torch_op_exactly(case: QDQCase) -> None:
    _skip_unsupported(case)
    model, feeds = _case_model(case)
    (got,) = _run(model, feeds)
    want = _torch_output(case)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want), f"max diff {np.abs(got - want).max()} at {np.argwhere(got != want)[:5].tolist()}"


@pytest.mark.parametrize("case", QDQ_CASES, ids=_case_id)
def test_quantize_dequantize_inputs_hit_ties_and_both_clamps(case: QDQCase) -> None:
    """The torch op (the oracle above) rounds the ties half to even and reaches both ends of the code range,
    so the equality above covers them."""
    _, scale, *_ = case.inputs()
    out = _torch_output(case).reshape(-1)
    dequantize_scale = case.dequantize_scale(scale)
    s = float(scale if dequantize_scale is None else dequantize_scale)
    expected_ties = [(min(max(round(t) + case.zero_point, case.qmin), case.qmax) - case.zero_point) * s for t in TIES]
    assert np.array_equal(out[: len(TIES)], np.array(expected_ties, np.float32))  # Python's round: half to even
    assert out.min() == np.float32((case.qmin - case.zero_point) * s)
    assert out.max() == np.float32((case.qmax - case.zero_point) * s)


@pytest.mark.parametrize("case", QDQ_CASES, ids=_case_id)
def test_quantize_dequantize_emits_quantize_clip_only_when_asked_dequantize(case: QDQCase) -> None:
    _skip_unsupported(case)
    model, feeds = _case_model(case)
    x, scale, zero_point, code_min, code_max = _exported(case.opset).inputs[case.name]
    cast = case.graph_type not in TORCH_STORABLE
    counts = collections.Counter(n.op_type for n in model.graph.node)
    rescaled = case.dequantize_factor != 1.0  # this test's module computes `scale * factor` in its graph
    want = {"QuantizeLinear": 1, "DequantizeLinear": 1, "Clip": int(case.clip), "Cast": (3 if case.clip else 1) * cast,
            "Mul": int(rescaled), "Constant": int(rescaled)}
    assert counts == +collections.Counter(want), counts  # unary +: drop the zero counts
    dequantize_scale = [n for n in model.graph.node if n.op_type == "Mul"][0].output[0] if rescaled else scale
    (q,) = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert list(q.input[:2]) == [x, scale] and len(q.input) == 3
    _assert_is_input_or_cast(model, q.input[2], zero_point, case.graph_type, cast)
    codes = q.output[0]
    if case.clip:
        (clip,) = [n for n in model.graph.node if n.op_type == "Clip"]
        assert clip.input[0] == q.output[0]
        _assert_is_input_or_cast(model, clip.input[1], code_min, case.graph_type, cast)
        _assert_is_input_or_cast(model, clip.input[2], code_max, case.graph_type, cast)
        codes = clip.output[0]
    assert list(dq.input) == [codes, dequantize_scale, q.input[2]]
    assert list(dq.output) == [model.graph.output[0].name]
    q_codes, dq_codes = _run(model, feeds, [q.output[0], codes])
    assert q_codes.dtype == helper.tensor_dtype_to_np_dtype(case.graph_type)  # codes in the graph type
    assert dq_codes.astype(np.int64).min() == case.qmin and dq_codes.astype(np.int64).max() == case.qmax
    if case.clip:  # the Clip matters: the inputs have codes past the range, inside the container
        assert q_codes.astype(np.int64).min() < case.qmin or q_codes.astype(np.int64).max() > case.qmax
        unclipped = copy.deepcopy(model)
        (dq_node,) = [n for n in unclipped.graph.node if n.op_type == "DequantizeLinear"]
        dq_node.input[0] = q.output[0]
        assert not np.array_equal(_run(unclipped, feeds)[0], _torch_output(case))


# ------------------------------------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("case", DQ_CASES, ids=_case_id)
def test_dequantize_translation_equals_the_torch_op_exactly(case: DQCase) -> None:
    _skip_unsupported(case)
    model, feeds = _case_model(case)
    (got,) = _run(model, feeds)
    want = _torch_output(case)
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want), f"max diff {np.abs(got - want).max()} at {np.argwhere(got != want)[:5].tolist()}"


@pytest.mark.parametrize("case", DQ_CASES, ids=_case_id)
def test_dequantize_emits_one_dequantize_linear_with_the_scale_layout(case: DQCase) -> None:
    _skip_unsupported(case)
    model, feeds = _case_model(case)
    names = _exported(case.opset).inputs[case.name]
    cast = case.onnx_type not in TORCH_STORABLE
    counts = collections.Counter(n.op_type for n in model.graph.node)
    want = {"DequantizeLinear": 1, "Cast": (1 + int(case.has_zero_point)) * cast}
    assert counts == +collections.Counter(want), counts  # unary +: drop the zero counts
    (dq,) = model.graph.node[-1:]
    assert dq.op_type == "DequantizeLinear" and list(dq.output) == [model.graph.output[0].name]
    _assert_is_input_or_cast(model, dq.input[0], names[0], case.onnx_type, cast)
    assert dq.input[1] == names[1]
    if case.has_zero_point:
        assert len(dq.input) == 3
        _assert_is_input_or_cast(model, dq.input[2], names[2], case.onnx_type, cast)
    else:
        assert len(dq.input) == 2 or dq.input[2] == ""
    if case.block_size > 0:
        assert (_attr(dq, "axis", 1), _attr(dq, "block_size", 0)) == (case.axis, case.block_size)
    elif case.block_size == 0:
        assert (_attr(dq, "axis", 1), _attr(dq, "block_size", 0)) == (case.axis, 0)
    else:
        assert _attr(dq, "block_size", 0) == 0
    scale_input = next(i for i in model.graph.input if i.name == names[1])
    assert len(scale_input.type.tensor_type.shape.dim) == len(case.scale_shape())
    (codes,) = _run(model, feeds, [dq.input[0]])
    assert codes.dtype == helper.tensor_dtype_to_np_dtype(case.onnx_type)  # codes in the container type
    assert np.array_equal(codes.astype(np.int64), case.inputs()[0].to(torch.int64).numpy())


# ------------------------------------------------------------------------------------------------------- validity

@pytest.mark.parametrize("case", ALL_CASES, ids=_case_id)
def test_translation_is_valid_onnx_at_the_exported_opset(case: Case) -> None:
    model, _ = _case_model(case)
    assert [o.version for o in model.opset_import if o.domain == ""] == [case.opset]
    onnx.checker.check_model(model, full_check=True)
