"""Configuration: `QuantSpec` (one quantizer) and `QuantConfig` (the whole model), frozen and validated.

`QuantConfig` is one flat object for users; its concerns are typed parts, each read by the step it is for:
`NumberFormat` (analysis), `Placement` (analysis, insertion) and `EstimatorChoice` (the quantizers' default
training estimator; fine-tuning may choose another).

One spelling per option. Per-layer overrides are an ordered list of `(glob, QuantSpec | None)` pairs where
the first match wins and `None` keeps the layer float. Validation happens in `__post_init__` so a bad value
fails where it is written, not deep inside a pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union

from fxquant.errors import ConfigError
from fxquant.quantizer import ESTIMATORS

Granularity = Literal["per_tensor", "per_channel", "per_group"]
Mode = Literal["dither", "noise", "ste"]
NoiseDistribution = Literal["uniform", "gaussian"]

GRANULARITIES: Tuple[str, ...] = ("per_tensor", "per_channel", "per_group")
MODES: Tuple[str, ...] = tuple(ESTIMATORS)  # one list: an estimator added there is a mode here
NOISE_DISTRIBUTIONS: Tuple[str, ...] = ("uniform", "gaussian")
MIN_SUPPORTED_BITS = 1
MAX_SUPPORTED_BITS = 16


def _check_bits(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"QuantSpec.{name}={value!r} is not a number; expected an integer in 1..16.")
    if not (MIN_SUPPORTED_BITS <= value <= MAX_SUPPORTED_BITS):
        raise ConfigError(
            f"QuantSpec.{name}={value!r} is outside 1..16; integer runtimes hold 1 to 16 bits. "
            f"Use a value between {MIN_SUPPORTED_BITS} and {MAX_SUPPORTED_BITS}."
        )


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        bits: initial bit-width (after calibration training starts here and descends to a target).
        min_bits: lower bound of the learned bit-width.
        max_bits: upper bound of the learned bit-width.
        granularity: clamps and step per tensor, per output channel, or per group of `group_size`
            input channels. `None` picks the kind's default: per channel for weights, per tensor for
            activations (activations support only per tensor).
        group_size: block size along the input axis for `"per_group"`.
        learn_bits: whether fine-tuning may change the bit-width.
        learn_clamps: whether fine-tuning may change the clamp bounds (and so the step).
        per_group_bits: one bit-width per channel/group instead of one per tensor (mixed precision
            inside a tensor, as in DiffQ).
        narrow_range: signed (weight) codes `-(2^(b-1) - 1)..2^(b-1) - 1`, symmetric about zero, for runtimes
            that require it (TensorRT's int8 weights); the default is the full range `-2^(b-1)..2^(b-1) - 1`
            of the integer type, one more code below zero (as LSQ, PyTorch and onnxruntime's quantizer use).
            Activations have an integer zero point and always use all `2^b` codes.

    Example:
        >>> QuantSpec(bits=4, min_bits=2, max_bits=8, granularity="per_channel")
    """

    bits: int = 8
    min_bits: int = 2
    max_bits: int = 8
    granularity: Optional[Granularity] = None
    group_size: Optional[int] = None
    learn_bits: bool = True
    learn_clamps: bool = True
    per_group_bits: bool = False
    narrow_range: bool = False

    def __post_init__(self) -> None:
        for name in ("bits", "min_bits", "max_bits"):
            _check_bits(name, getattr(self, name))
        if self.min_bits > self.max_bits:
            raise ConfigError(
                f"QuantSpec.min_bits={self.min_bits} is greater than max_bits={self.max_bits}; "
                "the learned bit-width lives in [min_bits, max_bits]. Swap them or lower min_bits."
            )
        if not (self.min_bits <= self.bits <= self.max_bits):
            raise ConfigError(
                f"QuantSpec.bits={self.bits} is outside [min_bits, max_bits]=[{self.min_bits}, "
                f"{self.max_bits}]; the initial bit-width must be reachable. Widen the bounds or change bits."
            )
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"QuantSpec.granularity={self.granularity!r} is unknown; expected one of {GRANULARITIES}."
            )
        if self.granularity == "per_group":
            if self.group_size is None or isinstance(self.group_size, bool) or self.group_size < 1:
                raise ConfigError(
                    f"QuantSpec.group_size={self.group_size!r} is invalid for granularity='per_group'; "
                    "give a positive integer such as group_size=32."
                )
        elif self.group_size is not None:
            raise ConfigError(
                f"QuantSpec.group_size={self.group_size} is only used with granularity='per_group' "
                f"(got granularity={self.granularity!r}). Remove group_size or set granularity='per_group'."
            )

    def replace(self, **changes: Any) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


OverrideSpec = Optional[QuantSpec]
Override = Tuple[str, OverrideSpec]


def _default_weight_spec() -> QuantSpec:
    return QuantSpec(granularity="per_channel")


def _default_activation_spec() -> QuantSpec:
    return QuantSpec(granularity="per_tensor")


def _check_number_format(where: str, weight: object, activation: object) -> None:
    for kind, spec in (("weight", weight), ("activation", activation)):
        if spec is not None and not isinstance(spec, QuantSpec):
            raise ConfigError(f"{where}.{kind}={spec!r} is not a QuantSpec; pass fxq.QuantSpec(...) or None.")
    if isinstance(activation, QuantSpec):
        _check_activation_spec(f"{where}.activation", activation)
    if isinstance(weight, QuantSpec):
        _check_weight_spec(f"{where}.weight", weight)


def _check_placement(where: str, first_last_bits: object, join_bits: object, overrides: object) -> Tuple[Override, ...]:
    """Validate the placement fields; return the overrides as a tuple."""
    if first_last_bits is not None:
        if isinstance(first_last_bits, bool) or not isinstance(first_last_bits, int):
            raise ConfigError(f"{where}.first_last_bits={first_last_bits!r} must be an integer in 2..16 or None.")
        if not (2 <= first_last_bits <= MAX_SUPPORTED_BITS):
            raise ConfigError(
                f"{where}.first_last_bits={first_last_bits} is outside 2..16; "
                "use 8 (the usual deployment choice) or None to learn them like the rest."
            )
    if join_bits is not None and (
        isinstance(join_bits, bool) or not isinstance(join_bits, int) or not (2 <= join_bits <= MAX_SUPPORTED_BITS)
    ):
        raise ConfigError(
            f"{where}.join_bits={join_bits!r} must be an integer in 2..16 or None; use 8 (the width "
            "of onnxruntime's integer add/concat kernels) or None to learn them like other activations."
        )
    if isinstance(overrides, (str, bytes)) or not isinstance(overrides, Sequence):
        raise ConfigError(f"{where}.overrides={overrides!r} must be a list of (glob, QuantSpec | None) pairs.")
    normalized = []
    for item in overrides:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(
                f"{where}.overrides entry {item!r} must be a (glob, QuantSpec | None) pair, "
                'e.g. ("features.0*", fxq.QuantSpec(bits=8)).'
            )
        pattern, spec = item
        if spec is not None and not isinstance(spec, QuantSpec):
            raise ConfigError(f"{where}.overrides entry for {pattern!r} has spec {spec!r}; expected a QuantSpec or None.")
        normalized.append((pattern, spec))
    return tuple(normalized)


def _check_estimator(where: str, mode: object, noise: object) -> None:
    if mode not in MODES:
        raise ConfigError(
            f"{where}.mode={mode!r} is unknown; expected one of {MODES} "
            "('dither' = GDNSQ, 'noise' = DiffQ, 'ste' = LSQ-style)."
        )
    if noise not in NOISE_DISTRIBUTIONS:
        raise ConfigError(f"{where}.noise={noise!r} is unknown; expected one of {NOISE_DISTRIBUTIONS}.")


@dataclass(frozen=True)
class NumberFormat:
    """The number format: how weights and how activations are quantized (`QuantConfig`'s `weight` and
    `activation`). Analysis resolves it per op (with `Placement`'s overrides and first/last bits).

    Args:
        weight: spec of weight quantizers (`None`: weights stay float).
        activation: spec of activation quantizers (`None`: weight-only quantization).
    """

    weight: Optional[QuantSpec] = field(default_factory=_default_weight_spec)
    activation: Optional[QuantSpec] = field(default_factory=_default_activation_spec)

    def __post_init__(self) -> None:
        _check_number_format("NumberFormat", self.weight, self.activation)


@dataclass(frozen=True)
class Placement:
    """Where quantizers go, beyond the number format: per-layer overrides, fixed first/last layers, the
    quantizers integer kernels need (joins, conv outputs) and the int32 bias. The fields mean what the
    `QuantConfig` fields of the same names mean."""

    overrides: Sequence[Override] = ()
    first_last_bits: Optional[int] = 8
    quantize_joins: bool = True
    share_join_scales: bool = False
    quantize_outputs: bool = True
    join_bits: Optional[int] = 8
    integer_bias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "overrides", _check_placement("Placement", self.first_last_bits, self.join_bits, self.overrides)
        )


@dataclass(frozen=True)
class EstimatorChoice:
    """The training estimator a prepared module's quantizers start with (`QuantConfig`'s `mode` and `noise`);
    `fxq.finetune(..., mode=...)` chooses another per run. Not part of what a checkpoint must match."""

    mode: Mode = "dither"
    noise: NoiseDistribution = "uniform"

    def __post_init__(self) -> None:
        _check_estimator("EstimatorChoice", self.mode, self.noise)


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize in a model and how to train the quantizers.

    One flat object for users; its three concerns are typed parts, each read by the step it is for:
    `number_format` (`weight`, `activation`: analysis), `placement` (`overrides` to `integer_bias`:
    analysis and insertion) and `estimator` (`mode`, `noise`: the quantizers' default training estimator,
    which `finetune(mode=...)` overrides; a checkpoint does not depend on it). `QuantConfig.from_parts` builds
    one from the parts.

    Args:
        weight: spec of weight quantizers (`None`: weights stay float).
        activation: spec of activation quantizers (`None`: weight-only quantization).
        mode: default training estimator of every quantizer: `"dither"` (GDNSQ: hard rounding forward,
            dithered straight-through backward), `"noise"` (DiffQ: additive pseudo-quantization noise) or
            `"ste"` (LSQ-style straight-through estimator); `fxq.finetune(..., mode=...)` picks another per run.
        noise: distribution of DiffQ's noise in `"noise"` mode: `"uniform"` (U[-1/2, 1/2], the paper) or
            `"gaussian"` (N(0, 1/4), the reference code).
        overrides: ordered `(glob, spec)` pairs matched against module paths and node names of quantized
            ops; the first match wins; `spec=None` keeps the op float (no weight nor input quantizer).
        first_last_bits: bits fixed for the first and last quantized layers (weights and inputs);
            `None` treats them like every other layer.
        quantize_joins: quantize the tensor inputs of add and concat joins (residuals) whose result an
            integer kernel reads (through ReLU-like and shape-only ops), which integer runtimes need to run
            the join and the ops before it as integer kernels. A join read only by float ops (a residual add
            before a LayerNorm) stays float; an override naming the join quantizes it anyway.
        share_join_scales: one quantizer (same scale and zero point) for all tensors meeting at a join.
        quantize_outputs: quantize the output of every conv with quantized input (after the ReLU that
            directly follows it) also when no quantized op reads it (e.g. before a pooling or a sigmoid):
            onnxruntime runs a conv as an integer kernel only when a QuantizeLinear follows it (linear and
            matmul run as MatMulIntegerToFloat without one). The graph's own outputs stay float.
        join_bits: bits of the activation quantizers that exist only for integer kernels (`quantize_joins`
            and `quantize_outputs`: inputs of add/concat, conv outputs read by pooling or float ops), fixed at
            this width (or at the activation spec's initial bits if those are more). 8 (default): what
            onnxruntime's QLinearAdd/QLinearConcat/QLinearConv outputs compute in, so narrower codes there
            would cost accuracy and save nothing (docs/decisions.md, "Join bits"). `None`: they follow
            `activation` (learned, same target).
        integer_bias: in eval mode (and so in `freeze` and the exported ONNX), round the bias of each
            conv/linear with quantized input and weight to the int32 grid `s_x * s_w`, as
            integer kernels add it, in training too (straight-through), so training sees the bias it deploys.

    Example:
        >>> QuantConfig(weight=QuantSpec(bits=4), overrides=[("fc", None)], first_last_bits=None)
    """

    weight: Optional[QuantSpec] = field(default_factory=_default_weight_spec)
    activation: Optional[QuantSpec] = field(default_factory=_default_activation_spec)
    mode: Mode = "dither"
    noise: NoiseDistribution = "uniform"
    overrides: Sequence[Override] = ()
    first_last_bits: Optional[int] = 8
    quantize_joins: bool = True
    share_join_scales: bool = False
    quantize_outputs: bool = True
    join_bits: Optional[int] = 8
    integer_bias: bool = True

    def __post_init__(self) -> None:
        _check_estimator("QuantConfig", self.mode, self.noise)
        _check_number_format("QuantConfig", self.weight, self.activation)
        overrides = _check_placement("QuantConfig", self.first_last_bits, self.join_bits, self.overrides)
        object.__setattr__(self, "overrides", overrides)

    @property
    def number_format(self) -> NumberFormat:
        """How weights and activations are quantized."""
        return NumberFormat(weight=self.weight, activation=self.activation)

    @property
    def placement(self) -> Placement:
        """Where quantizers go (overrides, first/last bits, joins, outputs, int32 bias)."""
        return Placement(
            overrides=self.overrides, first_last_bits=self.first_last_bits, quantize_joins=self.quantize_joins,
            share_join_scales=self.share_join_scales, quantize_outputs=self.quantize_outputs,
            join_bits=self.join_bits, integer_bias=self.integer_bias,
        )

    @property
    def estimator(self) -> EstimatorChoice:
        """The quantizers' default training estimator."""
        return EstimatorChoice(mode=self.mode, noise=self.noise)

    @classmethod
    def from_parts(
        cls, number_format: Optional[NumberFormat] = None, placement: Optional[Placement] = None,
        estimator: Optional[EstimatorChoice] = None,
    ) -> "QuantConfig":
        """The configuration made of its parts (each part's defaults where one is not given).

        Example:
            >>> QuantConfig.from_parts(NumberFormat(weight=QuantSpec(bits=4)), Placement(first_last_bits=None))
        """
        parts = (
            (number_format if number_format is not None else NumberFormat(), NumberFormat),
            (placement if placement is not None else Placement(), Placement),
            (estimator if estimator is not None else EstimatorChoice(), EstimatorChoice),
        )
        values: Dict[str, Any] = {}
        for part, kind in parts:
            if not isinstance(part, kind):
                raise ConfigError(f"QuantConfig.from_parts got {part!r} where a {kind.__name__} goes.")
            values.update({f.name: getattr(part, f.name) for f in dataclasses.fields(part)})
        return cls(**values)

    def replace(self, **changes: Any) -> "QuantConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _check_activation_spec(where: str, spec: QuantSpec) -> None:
    if spec.granularity not in (None, "per_tensor"):
        raise ConfigError(
            f"{where}.granularity={spec.granularity!r}: activations are quantized per tensor "
            "(integer kernels take one activation scale). Use granularity='per_tensor' or leave it None."
        )


def _check_weight_spec(where: str, spec: QuantSpec) -> None:
    if spec.min_bits < 2:
        raise ConfigError(
            f"{where}.min_bits={spec.min_bits}: weights are signed with zero point 0, which needs "
            "at least 2 bits (codes -2..1, or -1, 0, 1 with narrow_range). Use min_bits >= 2 for weights."
        )


SpecOrNone = Union[QuantSpec, None]
