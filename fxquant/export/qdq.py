"""`export_onnx`: lower a frozen module to integer QDQ ONNX.

Export is a thin lowering of what freeze decided: each frozen quantizer's `QParams` (`fxquant.qparams`:
scale, zero point, code range, layout, container). `plan_quantizers` keeps its container unless the target
opset lacks it or an option below asks for another:

- weights (`FrozenWeight`): integer codes in the smallest signed container holding the learned bits
  (INT4, INT8, INT16; 3, 5, 6, 7 bits ride in the next container, their codes already in range;
  `int8_weights=True` puts every width below 8 in INT8, which onnxruntime's QLinearConv/QGemm need; 2-bit
  weights ride in INT4, see `fxquant.qparams`), with an explicit zero point (onnxruntime builds QGemm only
  from a weight DequantizeLinear that has one),
  then `DequantizeLinear` per tensor, per channel (`axis`) or blocked (`axis`, `block_size`). Linear
  layers are exported as `MatMul(x, DQ(W^T)) [+ bias]` with the codes stored transposed: the pattern
  onnxruntime turns into `MatMulNBits` (blocked weights, float input), `QLinearMatMul` or
  `MatMulIntegerToFloat` (8-bit input), with no Transpose between the weight and the MatMul. An 8- or
  16-bit embedding table read only by lookups is exported as `Gather(codes) -> Cast -> Mul(scale)`, so
  that only the looked-up rows are dequantized.
- biases (`FrozenBias`): INT32 codes, scale `s_x * s_w`, `DequantizeLinear(axis=0)`.
- activations (`FrozenActivationQuantizer`): `QuantizeLinear -> DequantizeLinear` with the frozen scale
  and zero point, in UINT8 (UINT16 above 8 bits); narrower widths get an integer `Clip` of the codes
  to their range after the QuantizeLinear (integer kernels still fuse around it). `narrow_activations=True` uses the smallest container (UINT2, UINT4) instead: valid ONNX, but
  onnxruntime runs it without integer kernels or not at all (docs/decisions.md, "Narrow activations stay in
  UINT8"; activations take no space in the file, so nothing is lost by default). 8-bit activations are uint8 with the zero point at 0 after ReLU, and weights are
  symmetric int8: the types onnxruntime fuses into QLinearConv/QLinearAdd/QGemm.
- the opset is the lowest the containers need, but at least 20 (`DEFAULT_MIN_OPSET`: ONNX's `Gelu`, which
  onnxruntime runs as one kernel; below it the exporter decomposes GELU into five ops onnxruntime does not
  fuse back): 20 for 8-bit; 21 for 4/16-bit and blocked scales; 25 for 2-bit activations with
  `narrow_activations`. With a lower `opset` given, narrow containers widen and a quantizer
  with no container at that opset (16-bit activations below 21) is exported as float arithmetic that
  computes the same numbers; it is reported (warning, `metadata_props`, `fxquant inspect`).

Each Q/DQ node is named `fxq/<quantizer>/<op>` and carries `metadata_props` `fxquant.quantizer`,
`fxquant.kind`, `fxquant.fx_node` (the FX call node) and `fxquant.serves` (the ops it feeds); the model's
`fxquant.quantizers` metadata holds the plan as JSON. Export only sees frozen modules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import onnx
import torch
from torch import fx, nn

from fxquant.dynamic_shapes import DynamicDim, InputShapes, candidate_dims, export_with_dynamic_dims, input_tensors
from fxquant.errors import ExportError, PrepareError, StateError
from fxquant.export.code_folding import fold_code_constants
from fxquant.export.lowering import export_copy
from fxquant.export.onnx_file import check_writable, save_model
from fxquant.export.ops import PROVENANCE_DOMAIN, translation_table
from fxquant.export.plan import TYPE_BITS, QuantizerPlan, plan_quantizers, u8s8_kernels_saturate
from fxquant.export.runtime_patterns import apply_runtime_patterns
from fxquant.graph import module_state
from fxquant.tracing import SHAPES_ATTR, normalize_inputs, silenced
from fxquant.version import __version__

T = onnx.TensorProto
MIN_EXPORTER_OPSET = 18
"""torch.onnx's dynamo exporter emits opset 18 or later (8-bit QDQ alone would need 13)."""
DEFAULT_MIN_OPSET = 20
"""The least opset export picks by itself: ONNX's `Gelu` (opset 20) runs as one onnxruntime kernel, while at 18 the
exporter's five-op GELU is not fused back (ConvNeXt-style model 0.94x -> 1.06-1.12x of `quantize_static`;
docs/decisions.md, "Opset 20 by default"). `opset=18` still exports for runtimes that lack 20."""
METADATA_PREFIX = "fxquant."


def _dynamic_shapes(frozen: fx.GraphModule, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[DynamicDim, ...]:
    """The input dims to export as dynamic: the batch dim of every tensor input and the sequence dim of every
    rank-2 integer input (`candidate_dims`), less those the capture fixed (`fxquant_dynamic_shapes`)."""
    wanted = candidate_dims(frozen.forward, args, kwargs)
    recorded = getattr(frozen, SHAPES_ATTR, None)
    if not isinstance(recorded, InputShapes):
        return wanted
    kept = {(d.keys, d.axis) for d in recorded.dynamic}
    return tuple(d for d in wanted if (d.keys, d.axis) in kept)


def _input_index(args: Tuple[Any, ...], kwargs: Dict[str, Any], num_inputs: int, d: DynamicDim) -> Optional[int]:
    """The index of the ONNX graph input that `d`'s tensor became (None when the inputs cannot be paired): the
    exporter makes one graph input per tensor input, in the order torch.export flattens them."""
    tensors = [keys for keys, leaf in input_tensors(args, kwargs) if isinstance(leaf, torch.Tensor)]
    if len(tensors) != num_inputs or d.keys not in tensors:
        return None
    return tensors.index(d.keys)


def _onnx_input_dims(args: Tuple[Any, ...], kwargs: Dict[str, Any], model: onnx.ModelProto, d: DynamicDim) -> Any:
    """The ONNX graph input dimension that `d` became (None when the inputs cannot be paired)."""
    k = _input_index(args, kwargs, len(model.graph.input), d)
    if k is None:
        return None
    dims = model.graph.input[k].type.tensor_type.shape.dim
    return dims[d.axis] if d.axis < len(dims) else None


def _kept_dynamic(
    program: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: Sequence[DynamicDim]
) -> Dict[DynamicDim, Optional[int]]:
    """Which of `dims` the exported ONNX model kept symbolic (a named symbolic dim, no bound known).

    Read from the program's ONNX IR (`program.model`), not from `program.model_proto`: that property
    serializes the whole model, every weight included, on each read."""
    inputs = program.model.graph.inputs
    out: Dict[DynamicDim, Optional[int]] = {}
    for d in dims:
        k = _input_index(args, kwargs, len(inputs), d)
        shape = inputs[k].shape if k is not None else None
        dim = shape[d.axis] if shape is not None and d.axis < len(shape) else None
        # an `ir.SymbolicDim` with a name is what serializes to a `dim_param`
        if dim is None or (not isinstance(dim, int) and getattr(dim, "value", None) is not None):
            out[d] = None
    return out


def _name_dynamic_dims(model: onnx.ModelProto, shapes: InputShapes, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
    """Rename the exporter's symbols (`s72`) to `batch` and `sequence` (`batch_2`, ... when the model keeps
    several independent ones) in the graph's inputs, outputs and value infos."""
    names: Dict[str, str] = {}
    for d in shapes.dynamic:
        dim = _onnx_input_dims(args, kwargs, model, d)
        if dim is None or not dim.HasField("dim_param") or dim.dim_param in names:
            continue
        taken = sum(1 for n in names.values() if n.split("_")[0] == d.role)
        names[dim.dim_param] = d.role if taken == 0 else f"{d.role}_{taken + 1}"
    if not names:
        return
    pattern = re.compile(r"\b(" + "|".join(re.escape(s) for s in names) + r")\b")
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.dim_param = pattern.sub(lambda m: names[m.group(0)], dim.dim_param)


def _as_args(example_inputs: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    try:
        return normalize_inputs(example_inputs)
    except PrepareError:
        raise ExportError(
            f"example_inputs of type {type(example_inputs).__name__} is not understood; give a tensor, a tuple of "
            "positional inputs or a dict of keyword inputs (as for fxq.prepare)."
        ) from None


_OWNER_KEY = "fxquant.export.owner"
"""Temporary node metadata: the quantizer whose provenance marks enclose the node (replaced by `_annotate`)."""


def _take_provenance(model: onnx.ModelProto) -> None:
    """Tag every node between a quantizer's provenance marks with the quantizer's name, then remove the marks.

    Walking back from each `End` mark, the nodes reached before a `Begin` mark, an initializer or a graph input
    are the quantizer's (its Q/DQ, Clip, Casts of its constants, a gather's lookups). The marks become plain
    edges (a graph output that was a mark's output keeps its name through an Identity)."""
    graph = model.graph
    nodes = list(graph.node)
    producer = {out: k for k, node in enumerate(nodes) for out in node.output}
    owner: Dict[int, str] = {}
    for node in nodes:
        if node.domain != PROVENANCE_DOMAIN or node.op_type != "End":
            continue
        name = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "quantizer")
        stack = [node.input[0]]
        while stack:
            k = producer.get(stack.pop(), -1)
            if k < 0 or k in owner or nodes[k].domain == PROVENANCE_DOMAIN:
                continue
            owner[k] = name.decode() if isinstance(name, bytes) else str(name)
            stack.extend(i for i in nodes[k].input if i)
    for k, name in owner.items():
        nodes[k].metadata_props.add(key=_OWNER_KEY, value=name)
    through = {n.output[0]: n.input[0] for n in nodes if n.domain == PROVENANCE_DOMAIN}

    def source(tensor: str) -> str:
        while tensor in through:
            tensor = through[tensor]
        return tensor

    kept = [n for n in nodes if n.domain != PROVENANCE_DOMAIN]
    for node in kept:
        for k, name in enumerate(node.input):
            if name in through:
                node.input[k] = source(name)
    # fxquant keeps graph outputs float, so a mark's output is not one; should it be, an Identity keeps its name
    kept += [onnx.helper.make_node("Identity", [source(o.name)], [o.name]) for o in graph.output if o.name in through]
    del graph.node[:]
    graph.node.extend(kept)
    stale = set(through)
    alive_info = [v for v in graph.value_info if v.name not in stale]
    del graph.value_info[:]
    graph.value_info.extend(alive_info)
    opsets = [o for o in model.opset_import if o.domain != PROVENANCE_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(opsets)


def _annotate(model: onnx.ModelProto, plans: Dict[str, QuantizerPlan], keep_torch_metadata: bool) -> None:
    """Name and tag the Q/DQ nodes by quantizer; strip exporter debug data a deployed file does not need."""
    counters: Dict[Tuple[str, str], int] = {}
    for node in model.graph.node:
        qname = next((p.value for p in node.metadata_props if p.key == _OWNER_KEY), None)
        kept = [p for p in node.metadata_props if keep_torch_metadata and p.key != _OWNER_KEY]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
        if qname is None or qname not in plans:
            continue
        plan = plans[qname]
        key = (qname, node.op_type)
        counters[key] = counters.get(key, 0) + 1
        suffix = "" if counters[key] == 1 else f"_{counters[key]}"
        node.name = f"fxq/{qname}/{node.op_type}{suffix}"
        for k, v in (
            ("quantizer", qname),
            ("kind", plan.kind),
            ("fx_node", plan.fx_node),
            ("serves", ",".join(plan.serves)),
            ("bits", str(plan.bits)),
        ):
            node.metadata_props.add(key=METADATA_PREFIX + k, value=v)
    if not keep_torch_metadata:
        del model.graph.value_info[:]
        for v in list(model.graph.input) + list(model.graph.output):
            del v.metadata_props[:]
        for init in model.graph.initializer:
            del init.metadata_props[:]
    del model.metadata_props[:]
    model.metadata_props.add(key=METADATA_PREFIX + "version", value=__version__)
    model.metadata_props.add(
        key=METADATA_PREFIX + "quantizers",
        value=json.dumps({n: {k: v for k, v in asdict(p).items() if k != "name"} for n, p in plans.items()}),
    )
    floats = [n for n, p in plans.items() if p.lowering == "float"]
    model.metadata_props.add(key=METADATA_PREFIX + "float_quantizers", value=",".join(floats))
    model.producer_name = "fxquant"


def _has_onnx_function(e: BaseException) -> Optional[str]:
    """The op the exporter had no ONNX function for, if that is what failed: a `DispatchError` of torch.onnx's
    exporter anywhere in the exception's causes (its type decides; the op's name is read from its message,
    which names the op's target first)."""
    cause: Optional[BaseException] = e
    seen = 0
    while cause is not None and seen < 32:
        if type(cause).__name__ == "DispatchError" and isinstance(cause, torch.onnx.OnnxExporterError):
            text = str(cause)
            target = re.search(r"op='([^']+)'", text) or re.search(r"found for (\S+)", text)
            return target.group(1).strip("<>'\".,") if target else text.splitlines()[0]
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return None


def export_onnx(
    frozen: fx.GraphModule,
    example_inputs: Any,
    path: Union[str, os.PathLike, None] = None,
    opset: Optional[int] = None,
    *,
    keep_torch_metadata: bool = False,
    narrow_activations: bool = False,
    int8_weights: bool = False,
    uint8_weights: Optional[bool] = None,
) -> onnx.ModelProto:
    """Export a frozen module to integer QDQ ONNX (see the module docstring for the lowering).

    Args:
        frozen: a module returned by `fxq.freeze`.
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs. The batch dim of
            every tensor input (ONNX dim `batch`) and the sequence dim of every rank-2 integer input
            (`sequence`) are exported dynamic, unless the capture fixed them (`prepare(..., dynamic=False)`,
            or the model's code; a warning then names the dims fixed at the example's size).
        path: where to write the model (`None`: do not write). Models of 2 GB or more get their tensors in
            `<path>.data` next to it; smaller ones are one self-contained file.
        opset: ONNX opset (default: the lowest the integer types need, at least 20: 20, 21 or 25). A lower one widens
            narrow containers; a quantizer with no container at that opset is exported as float
            arithmetic with the same numbers and reported in a warning and in `metadata_props`.
        keep_torch_metadata: keep the exporter's per-node debug metadata and `value_info` (larger file).
        narrow_activations: store activations below 8 bits in UINT4/UINT2 (valid ONNX; onnxruntime runs
            them without integer kernels or not at all, docs/decisions.md). Default: UINT8 with an
            integer Clip of the codes to the learned range, which computes the same numbers, runs everywhere
            and keeps integer kernels (QLinearConv, QLinearAdd) around it.
        int8_weights: store weights below 8 bits in INT8 (same codes, a larger file): onnxruntime's CPU
            integer kernels for conv (QLinearConv) take only 8-bit weights, so sub-8-bit conv weights
            otherwise run as float Conv after a DequantizeLinear. Linear layers with 4-bit blocked weights
            run as MatMulNBits either way.
        uint8_weights: store 8-bit weights as UINT8 with zero point 128 (the same numbers): onnxruntime then
            runs its u8u8 integer kernels, exact on every CPU, where its default u8s8 kernels compute wrongly
            on x86 CPUs with AVX2 but without VNNI (they sum pairs of uint8 x int8 products in saturating
            int16, which 8-bit weights overflow); u8u8 kernels are slower than u8s8 ones (docs/decisions.md,
            "8-bit weights on CPUs without VNNI"). `None` (default):
            UINT8 when this machine's u8s8 kernels saturate (`fxquant.export.plan.u8s8_kernels_saturate`),
            so that the file is exact here and everywhere; pass `False` for the fastest file for a
            VNNI (or ARM) deployment target. Embedding tables whose rows are gathered keep INT8.

    Returns:
        The `onnx.ModelProto` that was written.

    Raises:
        StateError: `frozen` is not a frozen fxquant module (call `fxq.freeze` first).
        ExportError: the opset is below what the exporter supports, an op in the model has no ONNX
            lowering, or the path cannot be written (no partial file is left).

    Example:
        >>> fxq.export_onnx(fxq.freeze(qm), torch.randn(1, 3, 32, 32), "model.onnx")
    """
    state = module_state(frozen) if isinstance(frozen, nn.Module) else None
    if state != "frozen":
        raise StateError(
            f"export_onnx expects a frozen module (got {'a module in state ' + repr(state) if isinstance(frozen, nn.Module) else type(frozen).__name__}); "
            "call fxq.freeze(qm) first and export what it returns."
        )
    if opset is not None and opset < MIN_EXPORTER_OPSET:
        raise ExportError(
            f"opset={opset} is below {MIN_EXPORTER_OPSET}, the lowest opset torch.onnx's exporter emits; "
            f"use opset={MIN_EXPORTER_OPSET} or more (or None for the lowest the integer types need)."
        )
    out_path = Path(os.fspath(path)) if path is not None else None
    if out_path is not None:
        check_writable(out_path)
    args, kwargs = _as_args(example_inputs)
    if uint8_weights is None:
        uint8_weights = u8s8_kernels_saturate()
    plans = plan_quantizers(frozen, opset, narrow_activations, int8_weights, uint8_weights)
    chosen = opset if opset is not None else max([DEFAULT_MIN_OPSET] + [p.opset_needed for p in plans.values() if p.lowering == "qdq"])
    floats = [p for p in plans.values() if p.lowering == "float"]
    if floats:
        warnings.warn(
            "fxquant export kept these quantizers as float arithmetic (same numbers, no integer type): "
            + "; ".join(f"{p.name} ({p.reason})" for p in floats)
            + f". Export with opset={max(p.opset_needed for p in floats)} for integer Q/DQ.",
            stacklevel=2,
        )
    gm = export_copy(frozen, plans)
    gm.eval()

    def export(a: Tuple[Any, ...], kw: Dict[str, Any], dynamic: Any) -> Any:
        return torch.onnx.export(
            gm, a, kwargs=kw or None, dynamo=True, external_data=False, opset_version=chosen,
            custom_translation_table=translation_table(chosen), dynamic_shapes=dynamic, optimize=True,
            verbose=False,
        )

    try:
        with _quiet():
            program, shapes = export_with_dynamic_dims(
                export, gm.forward, args, kwargs, _dynamic_shapes(frozen, args, kwargs), _kept_dynamic,
                give_up=lambda e: _has_onnx_function(e) is not None,
            )
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        op = _has_onnx_function(e)
        if op is not None:
            raise ExportError(
                f"the op {op} has no ONNX lowering in torch.onnx, so the model cannot be exported; keep the "
                "module that calls it out of the exported model, or register a translation for it with "
                "torch.onnx (custom_translation_table)."
            ) from e
        raise ExportError(f"torch.onnx could not export the frozen module: {type(e).__name__}: {str(e)[:2000]}") from e
    static = shapes.static_note(args, kwargs)
    if static:
        warnings.warn(f"fxquant export: {static}", stacklevel=2)
    fold_code_constants(program.model)
    apply_runtime_patterns(program.model)
    model = program.model_proto  # the one serialization of the model, its weights copied into the proto
    del program  # the exporter's graphs and IR; the weights they share with `frozen` stay
    _name_dynamic_dims(model, shapes, args, kwargs)
    _take_provenance(model)
    _annotate(model, plans, keep_torch_metadata)
    if out_path is not None:
        save_model(model, out_path)
    return model


def _quiet() -> contextlib.AbstractContextManager[None]:
    """Silence the exporter's progress prints (stdout), warnings and logs below ERROR (errors still raise)."""
    return silenced(("torch.onnx", "torch.export", "onnxscript", "torch._export"), logging.ERROR, "stdout")


def integer_initializer_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's integer initializers at their ONNX type's width (int4 = half a byte)."""
    total = 0
    for init in model.graph.initializer:
        bits = TYPE_BITS.get(init.data_type)
        if bits is None:
            continue
        total += math.ceil(math.prod(init.dims) * bits / 8)
    return total
