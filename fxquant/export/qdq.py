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
- the opset is the lowest the containers need (18, the exporter's floor, for 8-bit; 21 for 4/16-bit
  and blocked scales; 25 for 2-bit activations with `narrow_activations`). With a lower `opset` given, narrow containers widen and a quantizer
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
import secrets
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import fx, nn

from fxquant.errors import ExportError, PrepareError, StateError
from fxquant.export.lowering import export_copy
from fxquant.export.ops import PROVENANCE_DOMAIN, translation_table
from fxquant.export.plan import TYPE_BITS, QuantizerPlan, plan_quantizers
from fxquant.graph import module_state
from fxquant.tracing import (
    SHAPES_ATTR,
    DynamicDim,
    InputShapes,
    candidate_dims,
    export_with_dynamic_dims,
    input_tensors,
    normalize_inputs,
    silenced,
)

T = onnx.TensorProto
MIN_EXPORTER_OPSET = 18
"""torch.onnx's dynamo exporter emits opset 18 or later (8-bit QDQ alone would need 13)."""
TWO_GB = 2**31
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


def _onnx_input_dims(args: Tuple[Any, ...], kwargs: Dict[str, Any], model: onnx.ModelProto, d: DynamicDim) -> Any:
    """The ONNX graph input dimension that `d` became (None when the inputs cannot be paired): the exporter
    makes one graph input per tensor input, in the order torch.export flattens them."""
    tensors = [keys for keys, leaf in input_tensors(args, kwargs) if isinstance(leaf, torch.Tensor)]
    if len(tensors) != len(model.graph.input) or d.keys not in tensors:
        return None
    dims = model.graph.input[tensors.index(d.keys)].type.tensor_type.shape.dim
    return dims[d.axis] if d.axis < len(dims) else None


def _kept_dynamic(
    program: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: Sequence[DynamicDim]
) -> Dict[DynamicDim, Optional[int]]:
    """Which of `dims` the exported ONNX model kept symbolic (a `dim_param`, no bound known)."""
    out: Dict[DynamicDim, Optional[int]] = {}
    for d in dims:
        dim = _onnx_input_dims(args, kwargs, program.model_proto, d)
        if dim is None or dim.HasField("dim_param"):
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


def _check_writable(path: Path) -> None:
    """Refuse, before exporting, a path that cannot be written: a directory, a missing parent directory, or
    a location where no file can be created (permissions, read-only file system).

    Raises:
        ExportError: names the path and what to do.
    """
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"cannot write the ONNX model to {str(path)!r}: it is a directory; give a file path such as model.onnx.")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ExportError(
            f"cannot write the ONNX model to {str(path)!r}: directory {str(parent)!r} {what}; create it first."
        )
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(
            f"cannot write the ONNX model to {str(path)!r}: permission denied; choose a writable location."
        )
    try:  # os.access says yes on a read-only file system and for root: create a file to be sure
        fd, probe = _create_temporary(path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ExportError(
            f"cannot write the ONNX model to {str(path)!r}: {e.strerror or e}; choose a writable location."
        ) from e


def _create_temporary(path: Path) -> Tuple[int, str]:
    """A new hidden file `.<name>.<random>.tmp` next to `path`, opened for writing, with the permissions a
    plain `open` gives (0666 less the umask, not `tempfile.mkstemp`'s 0600)."""
    parent = path.parent if str(path.parent) else Path(".")
    for _ in range(100):
        name = str(parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {str(path)!r}")


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


def _fold_casts(model: onnx.ModelProto) -> None:
    """Fold `Cast(initializer)` into a packed integer initializer of the Cast's type.

    The exporter's optimizer folds small Casts but leaves large ones (size limits); without this an int4
    weight would be stored as int8 plus a Cast, and the file would not reflect the bits.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    graph_inputs = {i.name for i in graph.input}
    keep: List[onnx.NodeProto] = []
    folded = False
    for node in graph.node:
        src = node.input[0] if node.op_type == "Cast" and node.input else ""
        if src in inits and src not in graph_inputs and not node.domain:
            to = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "to")
            values = numpy_helper.to_array(inits[src])
            target = onnx.helper.tensor_dtype_to_np_dtype(to)
            graph.initializer.append(numpy_helper.from_array(values.astype(np.int64).astype(target), node.output[0]))
            folded = True
            continue
        keep.append(node)
    if not folded:
        return
    del graph.node[:]
    graph.node.extend(keep)
    used = {name for n in graph.node for name in n.input} | {o.name for o in graph.output}
    alive = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(alive)


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
    model.metadata_props.add(key=METADATA_PREFIX + "version", value=_version())
    model.metadata_props.add(
        key=METADATA_PREFIX + "quantizers",
        value=json.dumps({n: {k: v for k, v in asdict(p).items() if k != "name"} for n, p in plans.items()}),
    )
    floats = [n for n, p in plans.items() if p.lowering == "float"]
    model.metadata_props.add(key=METADATA_PREFIX + "float_quantizers", value=",".join(floats))
    model.producer_name = "fxquant"


def _version() -> str:
    from fxquant import __version__

    return __version__


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` atomically (a temporary file renamed into place): no partial file is left on
    an error or an interrupt (Ctrl-C), and the file gets the usual permissions (0666 less the umask)."""
    fd, tmp = _create_temporary(path)
    os.close(fd)
    data_path = path.parent / (path.name + ".data")
    data_existed = data_path.exists()
    done = False
    try:
        if model.ByteSize() >= TWO_GB:
            onnx.save_model(
                model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data_path.name,
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
        done = True
    except (OSError, ValueError) as e:
        raise ExportError(f"could not write the ONNX model to {str(path)!r}: {e}; choose a writable location with free space.") from e
    finally:
        if not done:  # also on KeyboardInterrupt
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if not data_existed:
                with contextlib.suppress(OSError):
                    os.remove(data_path)


def _has_onnx_function(e: BaseException) -> Optional[str]:
    """The name of the torch op the exporter had no ONNX function for, if that is what failed."""
    text = str(e)
    cause: Optional[BaseException] = e
    while cause is not None:
        text += "\n" + str(cause)
        cause = cause.__cause__ or cause.__context__
    marker = "No ONNX function found for"
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        return rest.split()[0].strip("<>'\".,")
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
        opset: ONNX opset (default: the lowest the integer types need: 18, 21 or 25). A lower one widens
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
        _check_writable(out_path)
    args, kwargs = _as_args(example_inputs)
    plans = plan_quantizers(frozen, opset, narrow_activations, int8_weights)
    chosen = opset if opset is not None else max([MIN_EXPORTER_OPSET] + [p.opset_needed for p in plans.values() if p.lowering == "qdq"])
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
    model = program.model_proto
    _name_dynamic_dims(model, shapes, args, kwargs)
    _take_provenance(model)
    _fold_casts(model)
    _annotate(model, plans, keep_torch_metadata)
    if out_path is not None:
        _save(model, out_path)
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
