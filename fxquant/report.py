"""Reports: one row per quantizer (where, kind, bits, step, clamps, size) and model-size totals.

Works on prepared modules (learnable quantizers) and frozen modules (integer quantizers); ONNX files are
read by `fxquant.export` and summarised there. `QuantReport` prints as a table and converts to dicts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Set, Union, overload

from torch import fx, nn

from fxquant.analyze import FloatOp, kept_float
from fxquant.errors import StateError
from fxquant.export.onnx_report import OnnxQuantReport, onnx_report
from fxquant.graph import is_quantizer_path, quantizer_calls, quantizers_of
from fxquant.quantizer import KIND_BIAS, KIND_WEIGHT, FrozenBias, Quantizer
from fxquant.tracing import NOTES_ATTR

if TYPE_CHECKING:
    import onnx

FLOAT_BITS = 32


@dataclass
class QuantizerRow:
    """One quantizer in a report."""

    name: str
    serves: str
    kind: str
    granularity: str
    bits: float
    bits_continuous: float
    bits_range: str
    step_min: float
    step_max: float
    lo: float
    hi: float
    signed: bool
    numel: int
    bytes_at_bits: float


@dataclass
class QuantReport:
    """A table of quantizers plus model-size totals, the ops that stayed float (`kept_float`, each with why) and
    what the capture changed or fixed (`capture_notes`: a cache switched off, sizes kept static)."""

    rows: List[QuantizerRow] = field(default_factory=list)
    avg_weight_bits: float = 0.0
    avg_activation_bits: float = 0.0
    quantized_weight_numel: int = 0
    float_param_numel: int = 0
    size_bytes: float = 0.0
    float_size_bytes: float = 0.0
    kept_float: List[FloatOp] = field(default_factory=list)
    capture_notes: List[str] = field(default_factory=list)

    @property
    def compression(self) -> float:
        """Float32 model size divided by the size at the learned bits."""
        return self.float_size_bytes / self.size_bytes if self.size_bytes else 1.0

    def to_dict(self) -> Dict[str, Any]:
        """Plain data (for JSON)."""
        d = asdict(self)
        d["compression"] = self.compression
        return d

    def __str__(self) -> str:
        headers = ["quantizer", "serves", "kind", "gran", "bits", "b(cont)", "step", "clamp", "signed", "numel", "bytes"]
        table = [headers]
        for r in self.rows:
            table.append([
                r.name,
                _shorten(r.serves, 28),
                r.kind[:3],
                r.granularity.replace("per_", ""),
                r.bits_range,
                f"{r.bits_continuous:.2f}",
                _range(r.step_min, r.step_max),
                f"[{r.lo:.3g}, {r.hi:.3g}]",
                "yes" if r.signed else "no",
                str(r.numel),
                f"{r.bytes_at_bits:.0f}" if r.kind == KIND_WEIGHT else "-",
            ])
        widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append("")
        lines.append(
            f"weights: {self.quantized_weight_numel} quantized at {self.avg_weight_bits:.2f} bits on average; "
            f"{self.float_param_numel} other parameters kept float32"
        )
        if self.avg_activation_bits:
            lines.append(f"activations: {self.avg_activation_bits:.2f} bits on average (per quantizer)")
        lines.append(
            f"size: {self.size_bytes / 1024:.1f} KiB at the learned bits vs {self.float_size_bytes / 1024:.1f} KiB "
            f"float32 ({self.compression:.2f}x smaller)"
        )
        for row in self.kept_float:
            lines.append(f"kept float: {row.name} ({row.op}): {row.reason}")
        for note in self.capture_notes:
            lines.append(f"capture: {note}")
        return "\n".join(lines)


def _shorten(s: str, n: int) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."


def _range(a: float, b: float) -> str:
    return f"{a:.3g}" if a == b else f"{a:.3g}..{b:.3g}"


def _quantized_param_targets(gm: fx.GraphModule) -> Set[str]:
    """Parameters read by weight quantizers (biases read by bias quantizers stay 32-bit entries)."""
    targets = set()
    for node, _ in quantizer_calls(gm.graph):
        src = node.args[0] if node.args else None
        q = gm.get_submodule(str(node.target))
        if isinstance(src, fx.Node) and src.op == "get_attr" and getattr(q, "kind", None) == KIND_WEIGHT:
            targets.add(str(src.target))
    return targets


@overload
def report(module: nn.Module) -> QuantReport: ...


@overload
def report(module: Union[str, bytes, "os.PathLike[str]", "onnx.ModelProto"]) -> "OnnxQuantReport": ...


def report(module: Any) -> Union[QuantReport, "OnnxQuantReport"]:
    """A report of every quantizer in a prepared or frozen module (or an exported `.onnx` file).

    Raises:
        StateError: the module has no fxquant quantizers.
    """
    if isinstance(module, (str, bytes)) or hasattr(module, "__fspath__") or type(module).__name__ == "ModelProto":
        return onnx_report(module)  # the export floor reads ONNX files
    container = quantizers_of(module) if isinstance(module, fx.GraphModule) else None
    if container is None:
        raise StateError(
            f"report expects a module from fxq.prepare or fxq.freeze (or an .onnx path), got {type(module).__name__}."
        )
    rows: List[QuantizerRow] = []
    weight_bits_sum = 0.0
    weight_numel = 0
    act_bits: List[float] = []
    for name, q in container.items():
        if not isinstance(q, Quantizer) or q.kind == KIND_BIAS:  # the int32 bias is derived, not chosen
            continue
        s = q.summary()
        numel = s.numel
        bytes_at_bits = 0.0
        if q.kind == KIND_WEIGHT:
            bits = q.integer_grid().bits
            per_group = numel / bits.numel()
            bytes_at_bits = float(bits.float().sum()) * per_group / 8.0
            weight_bits_sum += bytes_at_bits * 8.0
            weight_numel += numel
        else:
            act_bits.append(s.bits)
        bmin, bmax = s.bits_min, s.bits_max
        bits_range = f"{bmin:.0f}" if bmin == bmax else f"{bmin:.0f}-{bmax:.0f}"
        rows.append(
            QuantizerRow(
                name=name,
                serves=", ".join(q.served),
                kind=q.kind,
                granularity=s.granularity,
                bits=s.bits,
                bits_continuous=s.bits_continuous,
                bits_range=bits_range,
                step_min=s.step_min,
                step_max=s.step_max,
                lo=s.lo_min,
                hi=s.hi_max,
                signed=s.signed,
                numel=numel,
                bytes_at_bits=bytes_at_bits,
            )
        )
    quantized = _quantized_param_targets(module)
    other = sum(
        p.numel() for n, p in module.named_parameters()
        if not is_quantizer_path(n) and n not in quantized
    )
    # a frozen module stores biases as int32 codes (32 bits, like the float biases they replace)
    other += sum(m.codes.numel() for m in container.values() if isinstance(m, FrozenBias))
    size = weight_bits_sum / 8.0 + other * FLOAT_BITS / 8.0
    float_size = (weight_numel + other) * FLOAT_BITS / 8.0
    return QuantReport(
        rows=rows,
        avg_weight_bits=weight_bits_sum / weight_numel if weight_numel else 0.0,
        avg_activation_bits=sum(act_bits) / len(act_bits) if act_bits else 0.0,
        quantized_weight_numel=weight_numel,
        float_param_numel=other,
        size_bytes=size,
        float_size_bytes=float_size,
        kept_float=kept_float(module),
        capture_notes=[str(n) for n in getattr(module, NOTES_ATTR, ()) or ()],
    )
