"""Read an exported QDQ ONNX model back: every quantizer's Q/DQ nodes and integer initializers.

`onnx_report(path_or_model)` groups QuantizeLinear/DequantizeLinear nodes by the quantizer named in
their `fxquant.*` metadata (nodes of a file fxquant did not write are grouped by node name) and reads
their initializers: ONNX type, bits actually used by the codes, scale and zero point summary, bytes at
the type's width. `fxq.report(path)` and `fxquant inspect model.onnx` print it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import numpy as np
import onnx
from onnx import numpy_helper

from fxquant.errors import InputError
from fxquant.export.onnx_file import serialized_size
from fxquant.export.plan import TYPE_BITS, TYPE_NAMES
from fxquant.export.qdq import METADATA_PREFIX

_SIGNED_TYPES = {onnx.TensorProto.INT2, onnx.TensorProto.INT4, onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32}


@dataclass
class OnnxQuantRow:
    """One quantizer of an ONNX model: where it came from and how it is stored."""

    quantizer: str
    kind: str
    source: str
    serves: str
    dtype: str
    bits: int
    bits_used: int
    layout: str
    scale_min: float
    scale_max: float
    zero_point: str
    numel: int
    bytes: int
    nodes: List[str] = field(default_factory=list)


@dataclass
class OnnxQuantReport:
    """Every Q/DQ group and integer initializer of an ONNX model, with totals (`str()` prints a table)."""

    source: str
    opset: int
    rows: List[OnnxQuantRow]
    float_quantizers: List[str]
    integer_bytes: int
    float_bytes: int
    model_bytes: int

    @property
    def qdq_pairs(self) -> int:
        """Number of QuantizeLinear -> DequantizeLinear pairs (activation quantizers)."""
        return sum(1 for r in self.rows if r.kind == "activation")

    def __str__(self) -> str:
        headers = ["quantizer", "kind", "source", "serves", "dtype", "bits", "used", "layout", "scale", "zero point", "bytes"]
        table = [headers]
        for r in self.rows:
            scale = f"{r.scale_min:.3g}" if r.scale_min == r.scale_max else f"{r.scale_min:.3g}..{r.scale_max:.3g}"
            table.append([
                r.quantizer, r.kind, _short(r.source, 28), _short(r.serves, 28), r.dtype, str(r.bits), str(r.bits_used),
                r.layout, scale, r.zero_point, str(r.bytes) if r.bytes else "-",
            ])
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        lines = [f"{self.source}: opset {self.opset}, {len(self.rows)} quantizers ({self.qdq_pairs} Q/DQ pairs)", ""]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(3, "  ".join("-" * w for w in widths))
        lines.append("")
        if self.float_quantizers:
            lines.append(f"kept float (no integer type at this opset): {', '.join(self.float_quantizers)}")
        lines.append(
            f"initializers: {self.integer_bytes / 1024:.1f} KiB integer, {self.float_bytes / 1024:.1f} KiB float; "
            f"model {self.model_bytes / 1024:.1f} KiB"
        )
        return "\n".join(lines)


def _short(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _meta(node: onnx.NodeProto) -> Dict[str, str]:
    return {p.key[len(METADATA_PREFIX) :]: p.value for p in node.metadata_props if p.key.startswith(METADATA_PREFIX)}


def _bits_used(codes: np.ndarray, signed: bool) -> int:
    """Bits the codes need: signed two's complement, or unsigned."""
    if codes.size == 0:
        return 0
    if signed:
        m = int(max(-int(codes.min()) - 1, int(codes.max()), 0))
        return max(1, m.bit_length() + 1)
    return max(1, int(codes.max()).bit_length())


def _nbytes(init: onnx.TensorProto) -> int:
    bits = TYPE_BITS.get(init.data_type)
    n = math.prod(init.dims)
    if bits is not None:
        return math.ceil(n * bits / 8)
    return n * max(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize, 1)


def read_onnx_file(path: Union[str, os.PathLike], load_external_data: bool = True) -> onnx.ModelProto:
    """Load the ONNX model at `path`, refusing what is not one (missing, empty, not an ONNX protobuf).

    Args:
        path: an `.onnx` file.
        load_external_data: also read the tensors stored next to it (`<path>.data`).

    Raises:
        InputError: no file at `path`, an empty file, or a file that does not parse as an ONNX model with an
            IR version and an opset (the message names the file).
    """
    source = os.fspath(path)
    fix = "give the path written by fxq.export_onnx (a binary .onnx file)."
    if not os.path.isfile(source):
        what = "a directory" if os.path.isdir(source) else "no file"
        raise InputError(f"no ONNX file at {source!r} ({what} there); {fix}")
    if os.path.getsize(source) == 0:
        raise InputError(f"{source!r} is not a readable ONNX model: the file is empty; {fix}")
    try:
        model = onnx.load(source, load_external_data=load_external_data)
    except Exception as e:  # noqa: BLE001 - any parse failure means "not an ONNX model"
        raise InputError(f"{source!r} is not a readable ONNX model ({type(e).__name__}: {e}); {fix}") from e
    if model.ir_version == 0 or not model.opset_import:
        raise InputError(
            f"{source!r} is not a readable ONNX model: it parses but has no IR version or opset (not an ONNX "
            f"file?); {fix}"
        )
    return model


def onnx_report(model: Union[str, os.PathLike, onnx.ModelProto, Any]) -> OnnxQuantReport:
    """Report of the quant nodes of an ONNX model (path or `onnx.ModelProto`).

    Raises:
        InputError: the file does not exist or is not an ONNX model (see `read_onnx_file`).
    """
    source = "<ModelProto>"
    if not isinstance(model, onnx.ModelProto):
        source = os.fspath(model) if not isinstance(model, bytes) else model.decode()
        model = read_onnx_file(source)
        model_bytes = os.path.getsize(source)
    else:
        model_bytes = serialized_size(model)  # ByteSize() would encode every weight to measure it
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes hold tensors too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            t = node.attribute[0].t
            t.name = node.output[0]
            inits.setdefault(node.output[0], t)
    meta = {p.key: p.value for p in model.metadata_props}
    plans: Dict[str, Any] = json.loads(meta.get(METADATA_PREFIX + "quantizers", "{}"))
    float_quantizers = [n for n in meta.get(METADATA_PREFIX + "float_quantizers", "").split(",") if n]
    groups: Dict[str, List[onnx.NodeProto]] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        key = _meta(node).get("quantizer") or node.name or node.output[0]
        groups.setdefault(key, []).append(node)
    rows: List[OnnxQuantRow] = []
    counted = set()
    for qname, nodes in groups.items():
        m = _meta(nodes[0])
        plan = plans.get(qname, {})
        q = next((n for n in nodes if n.op_type == "QuantizeLinear"), None)
        dq = next(n for n in nodes if n.op_type == "DequantizeLinear") if any(n.op_type == "DequantizeLinear" for n in nodes) else nodes[0]
        kind = m.get("kind") or ("activation" if q is not None else "weight")
        scale = _array(inits, dq.input[1] if len(dq.input) > 1 else "")
        zp_name = dq.input[2] if len(dq.input) > 2 else ""
        zp_init = inits.get(zp_name)
        zp = _array(inits, zp_name)
        codes_init = inits.get(dq.input[0]) if q is None else None
        if codes_init is not None:
            dtype_id = codes_init.data_type
        elif zp_init is not None:
            dtype_id = zp_init.data_type
        else:
            dtype_id = onnx.TensorProto.UINT8
        dtype = TYPE_NAMES.get(dtype_id, str(dtype_id))
        bits = int(m.get("bits") or plan.get("bits") or TYPE_BITS.get(dtype_id, 8))
        numel, nbytes = 0, 0
        if codes_init is not None:
            codes = numpy_helper.to_array(codes_init)
            # a zero point shared by every channel (0, or 128 for 8-bit weights stored as UINT8) centres the codes
            centre = int(zp.reshape(-1)[0]) if zp is not None and zp.size and np.all(zp == zp.reshape(-1)[0]) else 0
            bits_used = _bits_used(codes.astype(np.int64) - centre, dtype_id in _SIGNED_TYPES or centre != 0)
            numel = int(codes.size)
            if codes_init.name not in counted:
                nbytes = _nbytes(codes_init)
                counted.add(codes_init.name)
        else:
            bits_used = bits
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}
        if scale is None or scale.size <= 1:
            layout = "per_tensor"
        elif attrs.get("block_size"):
            layout = f"blocked(axis={attrs.get('axis', 1)},{attrs['block_size']})"
        else:
            layout = f"per_axis({attrs.get('axis', 1)})"
        zp_text = "-" if zp is None else (str(int(zp.reshape(-1)[0])) if np.all(zp == zp.reshape(-1)[0]) else f"{int(zp.min())}..{int(zp.max())}")
        rows.append(OnnxQuantRow(
            quantizer=qname, kind=kind, source=m.get("fx_node") or plan.get("fx_node", "") or "?",
            serves=m.get("serves", ""), dtype=dtype, bits=bits, bits_used=bits_used, layout=layout,
            scale_min=float(scale.min()) if scale is not None else float("nan"),
            scale_max=float(scale.max()) if scale is not None else float("nan"),
            zero_point=zp_text, numel=numel, bytes=nbytes, nodes=[n.name for n in nodes],
        ))
    integer_bytes = sum(_nbytes(i) for i in model.graph.initializer if i.data_type in TYPE_BITS)
    float_bytes = sum(_nbytes(i) for i in model.graph.initializer if i.data_type not in TYPE_BITS)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxQuantReport(
        source=source, opset=opset, rows=rows, float_quantizers=float_quantizers, integer_bytes=integer_bytes,
        float_bytes=float_bytes, model_bytes=model_bytes,
    )


def _array(inits: Dict[str, onnx.TensorProto], name: str) -> Optional[np.ndarray]:
    init = inits.get(name) if name else None
    return None if init is None else numpy_helper.to_array(init)
