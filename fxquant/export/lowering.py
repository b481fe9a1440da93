"""The export copy: a frozen module rewritten, by declared passes, into what `torch.onnx.export` traces.

`export_copy(frozen, plans)` copies the frozen module (sharing its tensors) and runs, through
`fxquant.passes.run_passes`:

- `gather_embeddings`: `embedding(dequantize(table), ids)` -> `gather_dequantize(ids)` for 8/16-bit tables (but
  small tables looked up once per row or more per call, which stay a DequantizeLinear and a float Gather);
- `linears_to_matmul`: `linear(x, W, b)` -> `matmul(x, W^T) + b` with the codes stored transposed (the
  pattern onnxruntime turns into MatMulNBits / QLinearMatMul / MatMulIntegerToFloat);
- `hard_sigmoid_gates`: `quantize(hardsigmoid(x), s)` -> `quantize(x + 3, 6 s)` read back with `s` (QLinearAdd);
- `use_export_stand_ins`: every planned frozen quantizer becomes a stand-in module that calls one custom op
  of `fxquant.export.ops` (`_ExportActivation`, `_ExportDequantize`, `_ExportGatherDequantize`), and every
  quantizer call (stand-in or float arithmetic) is put between provenance marks naming it.

The stand-ins compute exactly what the frozen quantizers compute; `tests/test_export_ops.py` checks each
custom op's ONNX translation against `onnx.reference`.
"""

from __future__ import annotations

import copy
import functools
import math
from typing import Dict

import onnx
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.export.ops import TORCH_STORABLE, clipped_type
from fxquant.export.plan import ONNX_CONTAINERS, QuantizerPlan
from fxquant.graph import (
    quantizer_calls,
    quantizer_calls_by_name,
    quantizer_container,
    quantizer_name,
    quantizer_readers,
    quantizer_target,
)
from fxquant.op_registry import facts_of
from fxquant.passes import EXPORT_LOWERED, FROZEN, graph_pass, run_passes
from fxquant.qparams import QParams
from fxquant.quantizer import FrozenActivationQuantizer, FrozenBias, FrozenWeight


class _ExportActivation(nn.Module):
    """Export-time stand-in of a `FrozenActivationQuantizer`: one `fxquant::quantize_dequantize` call."""

    def __init__(self, qp: QParams, onnx_type: int, quantize_scale_factor: float = 1.0, input_shift: float = 0.0) -> None:
        super().__init__()
        _, tmin, tmax, _ = next(v for v in ONNX_CONTAINERS.values() if v[0] == onnx_type)
        self.qmin, self.qmax = qp.qmin, qp.qmax
        self.clip = (self.qmin, self.qmax) != (tmin, tmax)
        self.onnx_type = clipped_type(onnx_type, self.clip)  # a clipped 3-bit UINT4 runs in UINT8
        zp_dtype = TORCH_STORABLE.get(self.onnx_type, torch.int64)
        # a hard-sigmoid gate (`hard_sigmoid_gates`): quantized with `factor * scale`, dequantized with `scale`
        rescaled = quantize_scale_factor != 1.0
        self.register_buffer("scale", qp.scale * quantize_scale_factor if rescaled else qp.scale.clone())
        self.register_buffer("dequantize_scale", qp.scale.clone() if rescaled else None)
        self.register_buffer("zero_point", qp.zero_point.to(zp_dtype))
        self.register_buffer("code_min", torch.tensor(self.qmin, dtype=zp_dtype))
        self.register_buffer("code_max", torch.tensor(self.qmax, dtype=zp_dtype))
        # ... whose input is `x + shift`, the shift an exact DequantizeLinear of one UINT8 code (the form
        # onnxruntime's QLinearAdd fusion needs), inside this quantizer's provenance marks
        self.input_shift = input_shift
        if input_shift:
            self.register_buffer("shift_code", torch.tensor(1, dtype=torch.uint8))
            self.register_buffer("shift_scale", torch.tensor(input_shift, dtype=torch.float32))
            self.register_buffer("shift_zero_point", torch.tensor(0, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shift:
            x = x + torch.ops.fxquant.dequantize(
                self.shift_code, self.shift_scale, self.shift_zero_point, 0, -1, onnx.TensorProto.UINT8
            )
        return torch.ops.fxquant.quantize_dequantize(
            x, self.scale, self.zero_point, self.code_min, self.code_max, self.qmin, self.qmax, self.onnx_type,
            self.clip, self.dequantize_scale,
        )


def _stored_codes(codes: torch.Tensor, stored: torch.dtype, zero_point_offset: int) -> torch.Tensor:
    """The codes in their ONNX container's torch type. With `zero_point_offset` 128 (int8 codes stored as
    uint8 codes + 128, which is the int8 bit pattern with its sign bit flipped) the int8 codes' bytes viewed
    as uint8, no copy: the stand-in flips the sign bit in its graph (`_offset_codes`), and export folds that
    into the initializer while serializing it (`fxquant.export.qdq`), so the flipped table is never held."""
    if not zero_point_offset:
        return codes.to(stored)
    assert zero_point_offset == 128 and codes.dtype == torch.int8 and stored == torch.uint8
    return codes.view(torch.uint8)


def _offset_codes(stored_codes: torch.Tensor, zero_point_offset: int) -> torch.Tensor:
    """`_stored_codes`' uint8 view of int8 codes + `zero_point_offset` (a sign-bit flip), or the codes."""
    if not zero_point_offset:
        return stored_codes
    return torch.bitwise_xor(stored_codes, zero_point_offset)


class _ExportDequantize(nn.Module):
    """Export-time stand-in of a `FrozenWeight`/`FrozenBias`: one `fxquant::dequantize` of its codes."""

    codes: torch.Tensor

    def __init__(self, codes: torch.Tensor, qp: QParams, onnx_type: int, zero_point_offset: int = 0) -> None:
        super().__init__()
        block = {"per_tensor": -1, "per_axis": 0}.get(qp.layout, qp.block_size or 0)
        stored = TORCH_STORABLE.get(onnx_type, codes.dtype)
        # `codes` may be a transposed view of the frozen codes: kept a view (the exporter makes each initializer
        # contiguous only while it serializes it), not a second copy of every linear weight held through export
        self.register_buffer("codes", _stored_codes(codes, stored, zero_point_offset))
        self.register_buffer("scale", qp.scale.contiguous())
        # weights carry explicit zeros (onnxruntime's QGemm needs them); int32 biases do not
        zero_point = (qp.zero_point + zero_point_offset).to(stored).contiguous() if qp.kind == "weight" else None
        self.register_buffer("zero_point", zero_point)
        self.axis, self.block, self.onnx_type = int(qp.axis or 0), int(block), int(onnx_type)
        self.zero_point_offset = zero_point_offset

    def forward(self) -> torch.Tensor:
        return torch.ops.fxquant.dequantize(
            _offset_codes(self.codes, self.zero_point_offset), self.scale, self.zero_point, self.axis, self.block, self.onnx_type
        )


class _ExportGatherDequantize(nn.Module):
    """Export-time stand-in of an embedding table's `FrozenWeight`, called with the indices: Gather of the
    integer codes, Cast, Mul by the (gathered, when per row) scale. The same numbers as DequantizeLinear of
    the whole table followed by Gather, at the cost of the looked-up rows instead of the whole table's on
    every call (a large share of a transformer's latency; see benchmarks/bench_ort_latency.py)."""

    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(self, stored_codes: torch.Tensor, qp: QParams, zero_point_offset: int = 0) -> None:
        super().__init__()
        # already in the container's type (`_stored_codes`): a tied table's lookup shares its head's tensor
        self.register_buffer("codes", stored_codes.contiguous())
        self.zero_point_offset = zero_point_offset  # a tied table's UINT8 codes (its head's u8u8 kernel reads them)
        self.per_row = qp.layout == "per_axis" and qp.axis == 0
        scale = qp.scale.reshape(-1, 1) if self.per_row else qp.scale
        self.register_buffer("scale", scale.contiguous())

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, _offset_codes(self.codes, self.zero_point_offset)).to(self.scale.dtype)
        if self.zero_point_offset:
            rows = rows - self.zero_point_offset
        return rows * (F.embedding(indices, self.scale) if self.per_row else self.scale)


_GATHERED_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT8)
"""Containers an embedding's codes are gathered in (onnxruntime's Gather has no 2- or 4-bit types)."""

SMALL_TABLE = 65536
"""A table of at most this many values that the example looks up at least once per row is dequantized whole and
gathered in float (`dequantizes_first`)."""


def dequantizes_first(codes: torch.Tensor, ids: object) -> bool:
    """Whether the lookups of a 2-D table (`codes`) gather the dequantized table rather than its codes: a small
    table (at most `SMALL_TABLE` values) that the example's call looks up at least as many times as it has rows (a
    relative position bias: 32 rows read 16384 times per call), judged from the ids' shape in the example
    (`tensor_meta`; without it, no). There onnxruntime's Gather of the codes, Gather of the row scales, Cast and broadcast Mul cost
    more than one DequantizeLinear of the table and a float Gather (T5-style model, hidden 256, 128 tokens: 0.25 ms of
    3.4 ms; docs/decisions.md, "Small tables are dequantized, then gathered"); the values are the same."""
    meta = ids.meta.get("tensor_meta") if isinstance(ids, fx.Node) else None
    shape = getattr(meta, "shape", None)
    if shape is None:
        return False
    return codes.numel() <= SMALL_TABLE and math.prod(shape) >= codes.shape[0]


@graph_pass(requires=(FROZEN,))
def gather_embeddings(gm: fx.GraphModule, *, plans: Dict[str, QuantizerPlan]) -> fx.GraphModule:
    """`embedding(dequantize(table), ids)` -> `gather_dequantize(ids)` for 8/16-bit tables but small ones looked up
    once per row or more per call (`dequantizes_first`).

    A table also read by other ops (tied with a linear head) keeps its DequantizeLinear for them, and its
    lookups call a second name of the quantizer (`plan.lookup_alias`) whose stand-in gathers the same codes:
    the ONNX holds the codes once, read by a Gather and by the head's DequantizeLinear (dequantizing a
    32000-row table on every call was 0.4-0.5 of a T5's latency; docs/decisions.md, "Tied tables")."""
    container = quantizer_container(gm)
    graph = gm.graph
    readers = quantizer_readers(graph)
    for node in list(graph.nodes):
        facts = facts_of(node)
        if node.op != "call_function" or facts is None or facts.kind != "embedding":
            continue
        w, ids = facts.argument(node, "weight"), facts.argument(node, "input")
        name = quantizer_name(w)
        if name is None:
            continue
        assert isinstance(w, fx.Node)
        q, plan = container[name], plans.get(name)
        if not isinstance(q, FrozenWeight) or plan is None or plan.lowering != "qdq":
            continue
        if plan.onnx_type not in _GATHERED_TYPES:
            continue
        qp = q.qparams()
        if q.codes.dim() != 2 or not (qp.layout == "per_tensor" or (qp.layout == "per_axis" and qp.axis in (0, 1))):
            continue
        if facts.argument(node, "max_norm") is not None or dequantizes_first(q.codes, ids):
            continue
        target = str(w.target)
        if any(facts_of(u) is not facts for u in readers[target]):
            if plan.lookup_alias is None:
                plan.lookup_alias = f"{name}_lookup"
                container[plan.lookup_alias] = q
            target = quantizer_target(plan.lookup_alias)
        else:
            plan.gathered = True
            if plan.zero_point_offset:  # unsigned codes are for u8u8 kernels; only a Gather reads this table
                plan.onnx_type, plan.zero_point_offset = onnx.TensorProto.INT8, 0
        with graph.inserting_before(node):
            out = graph.call_module(target, (ids,))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        if not w.users:
            graph.erase_node(w)
    return gm


@graph_pass(requires=(FROZEN,))
def hard_sigmoid_gates(gm: fx.GraphModule, *, plans: Dict[str, QuantizerPlan]) -> fx.GraphModule:
    """`quantize(hardsigmoid(x), s)` -> `quantize(x + 3, 6 s)` read back with scale `s` (ops with the registry's
    `OpFacts.clipped_shift`), for an unsigned per-tensor quantizer with zero point 0 that reads only this gate and
    whose codes saturate by the gate's top, 1 (`round(1 / s) >= qmax`).

    `hardsigmoid(x) = clip(x + 3, 0, 6) / 6`: codes `clip(round(hardsigmoid(x) / s), 0, qmax)` equal
    `clip(round((x + 3) / (6 s)), 0, qmax)` (the same numbers up to float rounding at a tie), QuantizeLinear's
    saturation being the clip; with `round(1 / s) < qmax` (a gate quantizer whose range grew past 1) they would
    not, and the gate stays a float HardSigmoid. onnxruntime has no integer hard sigmoid; `DequantizeLinear ->
    Add(3) -> QuantizeLinear` it runs as one QLinearAdd on the codes (docs/decisions.md, "Hardswish and SiLU as
    integer kernels"). The plan records the rewrite (`quantize_scale_factor`, `input_shift`) for the quantizer's
    stand-in (`use_export_stand_ins`, which must run after this pass), which adds the shift itself."""
    container = quantizer_container(gm)
    graph = gm.graph
    calls = quantizer_calls_by_name(graph)
    for node in list(graph.nodes):
        facts = facts_of(node)
        if facts is None or facts.clipped_shift is None or len(node.users) != 1 or not node.args:
            continue
        shift, span = facts.clipped_shift
        reader = next(iter(node.users))
        name = quantizer_name(reader)
        if name is None:
            continue
        plan, q = plans.get(name), container[name]
        if plan is None or plan.lowering != "qdq" or not isinstance(q, FrozenActivationQuantizer) or len(calls[name]) != 1:
            continue
        qp = q.qparams()
        if qp.qmin != 0 or bool((qp.zero_point != 0).any()) or qp.scale.numel() != 1:
            continue
        if round(1.0 / float(qp.scale)) < qp.qmax:
            continue
        reader.replace_input_with(node, node.args[0])
        graph.erase_node(node)
        plan.quantize_scale_factor, plan.input_shift = span, shift
    return gm


def _is_linear(node: fx.Node) -> bool:
    """A linear layer (any spelling) with its weight as the second positional argument."""
    facts = facts_of(node)
    return node.op == "call_function" and facts is not None and facts.kind == "linear" and len(node.args) >= 2


@graph_pass(requires=(FROZEN,))
def linears_to_matmul(gm: fx.GraphModule, *, plans: Dict[str, QuantizerPlan]) -> fx.GraphModule:
    """`linear(x, W, b)` -> `matmul(x, W^T) + b` for integer weights read only by linears (the plan records
    `transposed`, and the stand-in stores the codes transposed)."""
    container = quantizer_container(gm)
    graph = gm.graph
    readers = quantizer_readers(graph)
    calls_of = quantizer_calls_by_name(graph)
    for node in list(graph.nodes):
        if not _is_linear(node):
            continue
        w = node.args[1]
        name = quantizer_name(w)
        if name is None:
            continue
        assert isinstance(w, fx.Node)
        q = container[name]
        plan = plans.get(name)
        if not isinstance(q, FrozenWeight) or plan is None or plan.lowering != "qdq" or plan.lookup_alias is not None:
            continue  # a tied table's codes stay as they are, read by its lookups too (not a transposed copy)
        calls = calls_of[name]
        if q.codes.dim() != 2 or any(not _is_linear(u) or u.args[1] not in calls for u in readers[str(w.target)]):
            continue
        plan.transposed = True
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with graph.inserting_before(node):
            out = graph.call_function(torch.matmul, (node.args[0], w))
            if bias is not None:
                out = graph.call_function(torch.add, (out, bias))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
    return gm


@graph_pass(requires=(FROZEN,), ensures=(EXPORT_LOWERED,))
def use_export_stand_ins(gm: fx.GraphModule, *, plans: Dict[str, QuantizerPlan]) -> fx.GraphModule:
    """Replace each frozen quantizer planned as `"qdq"` by the stand-in module that calls its custom op
    (after the rewrites above: they decide `gathered` and `transposed`), and put every planned quantizer
    between provenance marks."""
    container = quantizer_container(gm)
    for name, plan in plans.items():
        q = container[name]
        assert isinstance(q, (FrozenWeight, FrozenActivationQuantizer, FrozenBias))
        stand_in: nn.Module = q
        if plan.lowering == "qdq":
            assert plan.onnx_type is not None
            qp = q.qparams()
            if isinstance(q, FrozenActivationQuantizer):
                stand_in = _ExportActivation(qp, plan.onnx_type, plan.quantize_scale_factor, plan.input_shift)
            elif plan.gathered:
                stand_in = _ExportGatherDequantize(_stored_codes(q.codes, TORCH_STORABLE[plan.onnx_type], 0), qp)
            elif plan.transposed:  # linear weight (out, in) stored (in, out) for MatMul
                stand_in = _ExportDequantize(q.codes.t(), qp.transposed(), plan.onnx_type, plan.zero_point_offset)
            else:
                stand_in = _ExportDequantize(q.codes, qp, plan.onnx_type, plan.zero_point_offset)
            if plan.lookup_alias is not None:
                assert isinstance(q, FrozenWeight)
                assert isinstance(stand_in, _ExportDequantize)  # the head's: the lookup gathers the same codes
                container[plan.lookup_alias] = _ExportGatherDequantize(stand_in.codes, qp, plan.zero_point_offset)
        container[name] = stand_in
    _mark_provenance(gm, {**{n: n for n in plans}, **{p.lookup_alias: n for n, p in plans.items() if p.lookup_alias}})
    return gm


def _mark_provenance(gm: fx.GraphModule, names: Dict[str, str]) -> None:
    """`fxquant::provenance(..., end=False)` on each tensor a planned quantizer call reads, `end=True` on what it
    returns, so export finds the ONNX nodes each quantizer emitted (`fxquant.export.qdq`). `names`: the
    container name a call uses -> the planned quantizer's name (different for a table's lookup alias)."""
    graph = gm.graph
    for node, called in list(quantizer_calls(graph)):
        name = names.get(called)
        if name is None:
            continue
        with graph.inserting_before(node):
            for arg in node.all_input_nodes:
                begin = graph.call_function(torch.ops.fxquant.provenance.default, (arg, name, False))
                node.replace_input_with(arg, begin)
        with graph.inserting_after(node):
            end = graph.call_function(torch.ops.fxquant.provenance.default, (node, name, True))
        for user in [u for u in node.users if u is not end]:
            user.replace_input_with(node, end)


def export_copy(frozen: fx.GraphModule, plans: Dict[str, QuantizerPlan]) -> fx.GraphModule:
    """A copy of `frozen` lowered for export (see the module docstring); `frozen` is left as it was.

    `plans` (from `plan_quantizers`) are updated in place with `gathered` and `transposed`."""
    # the copy's graph and quantizer modules change, its tensors do not: they are shared, not copied (a
    # large model's codes and float weights were held twice during export)
    memo = {id(t): t for t in list(frozen.parameters()) + list(frozen.buffers())}
    gm = copy.deepcopy(frozen, memo)
    return run_passes(
        gm,
        (
            functools.partial(gather_embeddings, plans=plans),
            functools.partial(linears_to_matmul, plans=plans),
            functools.partial(hard_sigmoid_gates, plans=plans),
            functools.partial(use_export_stand_ins, plans=plans),
        ),
    )
