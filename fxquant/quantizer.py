"""Quantizer numerics first (pure functions), then the learnable and the frozen quantizer modules.

Parametrisation (docs/algorithms.md, "The quantizer grid", "Learnable bit-widths"), per group of elements:

- continuous bit-width `b = min_bits + (max_bits - min_bits) * p`, with `p` a learnable parameter kept in
  [0, 1] by a straight-through clamp (the value is clamped, the gradient always passes) and projected back
  into [0, 1] after every optimizer step by `project_bits_`. A sigmoid was rejected: training starts at
  `max_bits`, where a sigmoid is saturated and its gradient vanishes, so bits would never move.
- asymmetric (activations): learnable clamps `lo <= 0 <= hi` (lo pinned at 0 for provably non-negative
  tensors), step `s = (hi - lo) / (2^b - 1)`, integer zero point `zp = round(-lo / s)` snapped in training
  too (straight-through), codes `[0, 2^B - 1]`.
- symmetric (weights): learnable clamp `hi` (= max |w| at init, `lo = -hi`), `s = hi / (2^(b-1) - 1)`,
  zero point 0, narrow-range codes `[-(2^(B-1) - 1), 2^(B-1) - 1]`.
- the identity GDNSQ uses, `b = log2((hi - lo) / s + 1)`, holds by construction.

Training goes through an `Estimator` (`SteEstimator`, `DitherEstimator`, `NoiseEstimator`; chosen by name
with `QuantConfig(mode=...)` or per run with `fxq.finetune(..., mode=...)`, never saved in a checkpoint).
The rounding estimators (dither, ste) compute the step from `B = round(b)` with a straight-through gradient
to `b`, so the grid they train on is the one eval and freeze use, and run as one fused autograd node
(`round_clamp`): forward `step * round(clamp(x, lo, hi) / step)`, backward the straight-through gradients
of x, step and clamps reduced to the parameters' shapes (GDNSQ's dither drawn per group, `dither_of_groups`).
LSQ's gradient scale applies to all of a clamp's gradient (its step part and its clip part alike). The
noise estimator (DiffQ) keeps the continuous `b` in its noise scale.

Initialisation for the grid trained on (docs/algorithms.md, "Calibration" and "Following the bits"):
`fit_clamps_mse` shrinks min/max clamps to the least-squared-error clip at the current integer bits, and
`follow_bits_` rescales the clamps when `round(b)` changes during training.

Eval and frozen: integer bits `B = round(b)` and exactly ONNX QuantizeLinear/DequantizeLinear:
`q = clamp(round_half_even(x / s) + zp, qmin, qmax)`, `x_hat = (q - zp) * s` (`fake_quantize`).

This module knows nothing of graphs; passes decide where quantizers go.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from fxquant.errors import ConfigError, StateError
from fxquant.qparams import QParams, blocked_scale, container_for, per_tensor_or_axis, zeros_like_scale

MIN_STEP = 1e-9
"""Smallest step: a dead group (hi == lo == 0) gets this step and one level instead of a division by 0."""

KIND_WEIGHT = "weight"
KIND_ACTIVATION = "activation"


# --------------------------------------------------------------------------------------------------
# Numerics: short pure functions.
# --------------------------------------------------------------------------------------------------


def round_ste(x: Tensor) -> Tensor:
    """Round half to even forward, identity gradient backward."""
    return x + (torch.round(x) - x).detach()


def clamp_ste(x: Tensor, low: float, high: float) -> Tensor:
    """Clamp forward, identity gradient backward (so a parameter at its bound can come back)."""
    return x + (x.clamp(low, high) - x).detach()


def grad_scale(x: Tensor, scale: float) -> Tensor:
    """Identity forward, gradient multiplied by `scale` backward (LSQ gradient scaling)."""
    return (x - x * scale).detach() + x * scale


def _in_place(x: Tensor, scale: Tensor) -> bool:
    """Whether quantization may run in place on one temporary (no gradient is being recorded)."""
    return not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad))


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    """Exactly ONNX QuantizeLinear followed by DequantizeLinear, in float.

    `q = clamp(round_half_even(x / scale) + zero_point, qmin, qmax)`, returns `(q - zero_point) * scale`.
    All arguments broadcast against `x`; `zero_point`, `qmin`, `qmax` hold integers (as floats). Without
    autograd it computes in place on one temporary (a large layer otherwise held several of its size).
    """
    q = quantize_codes(x, scale, zero_point, qmin, qmax)
    if _in_place(x, scale):
        return q.sub_(zero_point).mul_(scale)
    return (q - zero_point) * scale


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor) -> Tensor:
    """The integer codes `q` of `fake_quantize` (as floats holding integers)."""
    if _in_place(x, scale):
        q = torch.div(x, scale)
        return q.round_().add_(zero_point).clamp_(min=qmin, max=qmax)
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize_codes(q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
    """`(q - zero_point) * scale`: ONNX DequantizeLinear."""
    return (q.to(scale.dtype) - zero_point) * scale


FOLLOW_SAMPLE = 65536
"""Activation values `follow_bits_` searches the clip of, per change of integer bits."""
FOLLOW_COLUMNS = 256
"""Elements per output channel of a weight that `follow_bits_` searches the clip of."""
FOLLOW_RATIOS = 16
"""Candidate clip ratios of `follow_bits_` (calibration uses 24)."""
MSE_SLICE = 1 << 18
"""Elements per slice of `mse_clip_ratio`'s search (1 MB of float32: fits in a core's L2 cache)."""
DITHER_EXACT_BELOW = 64
"""Groups with fewer elements draw the dither's random signs one by one; larger groups draw their sum."""


def reduce_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum `t` over the axes where `shape` (broadcastable to `t`) has size 1: the gradient of a broadcast."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    dims = list(range(lead)) + [lead + i for i, n in enumerate(shape) if n == 1 and t.shape[lead + i] != 1]
    out = t.sum(dim=dims, keepdim=True) if dims else t
    return out.reshape(shape)


def _sum_of_products(a: Tensor, b: Tensor, shape: torch.Size) -> Tensor:
    """`reduce_to_shape(a * b, shape)`; one pass without a temporary when `shape` is a single group."""
    if math.prod(shape) == 1 and a.shape == b.shape:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    return reduce_to_shape(a * b, shape)


def dither_of_groups(grad_in: Tensor, shape: torch.Size) -> Tensor:
    """GDNSQ's dither term of the step gradient, `sum_i g_i r_i / sqrt(3)` per group, `r_i` i.i.d. in {-1/2, 1/2}.

    `grad_in` is the upstream gradient inside the clamps (zero outside). For groups of at least
    `DITHER_EXACT_BELOW` elements the sum of independent signs is drawn from its Gaussian limit with the exact
    variance `sum_i g_i^2 / 12` (one random number per group instead of one per element: the per-element draw
    was 12% of a fine-tuning step); smaller groups draw every sign.
    """
    numel_per_group = grad_in.numel() // max(math.prod(shape), 1)
    if numel_per_group < DITHER_EXACT_BELOW:
        r = torch.randint(0, 2, grad_in.shape, device=grad_in.device).to(grad_in.dtype) - 0.5
        return reduce_to_shape(grad_in * r, shape) / math.sqrt(3.0)
    variance = _sum_of_products(grad_in, grad_in, shape) / 12.0
    return torch.randn(shape, device=grad_in.device, dtype=grad_in.dtype) * variance.sqrt()


class _RoundClamp(torch.autograd.Function):
    """`y = step * round(clamp(x, lo, hi) / step)` with straight-through gradients, in one autograd node.

    `lo` and `hi` lie on the grid of `step`. Gradients (docs/algorithms.md, "Training estimators"):
    `dy/dx = 1` inside `[lo, hi]`, 0 outside; `dy/dstep = round(u) - u` inside (`u = x / step`), plus GDNSQ's
    dither when `dither` is set; `dy/dlo = 1` below `lo`, `dy/dhi = 1` above `hi`. Each is reduced to its
    parameter's (broadcast) shape here, so the graph holds one node per quantizer instead of a dozen
    element-wise ops.

    Cost: the forward makes two temporaries of `x`'s size (in place from then on) and keeps a one-byte mask
    of the clipped elements; the backward makes one (`dL/dx`). With one clamp pair for the whole tensor
    (per-tensor activations) the clamps' gradients are sums over the clipped elements only (few) and the
    step's a dot product, so the backward reads the gradient about three times instead of a dozen.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, dither: bool) -> Tensor:  # noqa: ANN001
        clamped = torch.clamp(x, lo, hi)
        outside = clamped != x
        u = clamped.div_(step)
        q = torch.round(u)
        # saved as u - q (in place on u); the step's gradient is q - u
        ctx.save_for_backward(x, u.sub_(q), outside, lo, hi)
        ctx.step_shape, ctx.dither = step.shape, dither
        return q.mul_(step)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        x, minus_residual, outside, lo, hi = ctx.saved_tensors
        grad_in = torch.where(outside, 0.0, grad)
        need_lo, need_hi = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_lo = grad_hi = grad_step = None
        if lo.numel() == 1 and hi.numel() == 1 and (need_lo or need_hi):
            x_out, grad_out = x[outside], grad[outside]
            if need_hi:
                grad_hi = torch.where(x_out > hi.reshape(()), grad_out, 0.0).sum().reshape(hi.shape)
            if need_lo:
                grad_lo = torch.where(x_out < lo.reshape(()), grad_out, 0.0).sum().reshape(lo.shape)
        else:
            if need_hi:
                grad_hi = reduce_to_shape(torch.where(x > hi, grad, 0.0), hi.shape)
            if need_lo:
                grad_lo = reduce_to_shape(torch.where(x < lo, grad, 0.0), lo.shape)
        if ctx.needs_input_grad[1]:
            grad_step = -_sum_of_products(grad_in, minus_residual, ctx.step_shape)
            if ctx.dither:
                grad_step = grad_step + dither_of_groups(grad_in, ctx.step_shape)
        return grad_in, grad_step, grad_lo, grad_hi, None


def round_clamp(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, dither: bool = False) -> Tensor:
    """Hard rounding to the grid of `step` inside `[lo, hi]` with STE (optionally dithered) gradients.

    `lo`, `hi` and `step` broadcast against `x`; `lo` and `hi` must lie on the grid. See `_RoundClamp`.
    """
    return _RoundClamp.apply(x, step, lo, hi, dither)


def pseudo_quantization_noise(x: Tensor, step: Tensor, distribution: str) -> Tensor:
    """DiffQ's additive noise `step * eps` with `eps ~ U[-1/2, 1/2]` or `N(0, 1/4)`."""
    if distribution == "uniform":
        eps = torch.rand_like(x) - 0.5
    else:
        eps = torch.randn_like(x) * 0.5
    return step * eps


def mean_over_ranks(t: Tensor) -> Tensor:
    """`t` averaged over the ranks of a running torch.distributed job (itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


class Estimator:
    """How a learnable quantizer computes values and gradients in training mode (eval is always exact).

    An estimator holds no state that a checkpoint needs: the same trained quantizer can be fine-tuned
    further with another one (`fxq.finetune(..., mode=...)`).
    """

    name: str = ""
    rounds: bool = True
    """Whether it trains on hard rounding at integer bits `round(b)` (else on the continuous `b`)."""

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """Training-mode value of `x` on the grid `step` between the on-grid clamps `lo <= hi`."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SteEstimator(Estimator):
    """LSQ-style: hard rounding forward, straight-through backward (`d/dstep = round(u) - u`)."""

    name = "ste"

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return round_clamp(x, step, lo, hi, dither=False)


class DitherEstimator(Estimator):
    """GDNSQ: hard rounding forward; the step's straight-through gradient carries a random dither."""

    name = "dither"

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        return round_clamp(x, step, lo, hi, dither=True)


class NoiseEstimator(Estimator):
    """DiffQ: no rounding; `clamp(x) + step * eps` so gradients reach `x`, the clamps and the bits exactly."""

    name = "noise"
    rounds = False

    def __init__(self, distribution: str = "uniform") -> None:
        self.distribution = distribution

    def quantize(self, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        x_c = torch.minimum(torch.maximum(x, lo), hi)
        return x_c + pseudo_quantization_noise(x_c, step, self.distribution)

    def __repr__(self) -> str:
        return f"NoiseEstimator({self.distribution!r})"


ESTIMATORS = {"dither": DitherEstimator, "ste": SteEstimator, "noise": NoiseEstimator}
"""The training estimators by the name `QuantConfig(mode=...)` and `finetune(mode=...)` use."""


def make_estimator(mode: str, noise: str = "uniform") -> Estimator:
    """The estimator called `mode` (`"dither"`, `"ste"` or `"noise"` with DiffQ's `noise` distribution)."""
    if mode not in ESTIMATORS:
        raise ConfigError(f"mode={mode!r} is unknown; expected one of {tuple(ESTIMATORS)} "
                          "('dither' = GDNSQ, 'noise' = DiffQ, 'ste' = LSQ-style).")
    return NoiseEstimator(noise) if mode == "noise" else ESTIMATORS[mode]()


def bits_storage_bytes(numel: int, bits: float) -> float:
    """Bytes needed to store `numel` codes at `bits` bits each (packed)."""
    return numel * bits / 8.0


# --------------------------------------------------------------------------------------------------
# Group layout: which elements share clamps/step (and bits).
# --------------------------------------------------------------------------------------------------


def group_param_shape(
    tensor_shape: Tuple[int, ...],
    granularity: str,
    channel_axis: Optional[int],
    block_axis: Optional[int],
    group_size: Optional[int],
) -> Tuple[int, ...]:
    """Shape of a per-group parameter that broadcasts (after block expansion) against the tensor."""
    rank = len(tensor_shape)
    if granularity == "per_tensor" or rank == 0:
        return ()
    shape = [1] * rank
    if channel_axis is not None:
        shape[channel_axis] = tensor_shape[channel_axis]
    if granularity == "per_group":
        assert block_axis is not None and group_size is not None  # guaranteed by resolve_layout
        shape[block_axis] = tensor_shape[block_axis] // group_size
    return tuple(shape)


def expand_groups(param: Tensor, block_axis: Optional[int], group_size: Optional[int]) -> Tensor:
    """Repeat a per-block parameter along the block axis so that it broadcasts against the tensor."""
    if block_axis is None or group_size is None or param.dim() == 0 or group_size == 1:
        return param
    return param.repeat_interleave(group_size, dim=block_axis)


def reduce_to_groups(
    x: Tensor, param_shape: Tuple[int, ...], block_axis: Optional[int], group_size: Optional[int], op: str
) -> Tensor:
    """Reduce `x` (same shape as the quantized tensor) to the group shape with `op` in {"amax", "amin", "sum"}."""
    reducers: Dict[str, Callable[..., Tensor]] = {"amax": torch.amax, "amin": torch.amin, "sum": torch.sum}
    reduce = reducers[op]
    if len(param_shape) == 0:
        return reduce(x)
    if block_axis is not None and group_size is not None and group_size > 1:
        split = list(x.shape)
        split[block_axis : block_axis + 1] = [split[block_axis] // group_size, group_size]
        x = reduce(x.reshape(split), dim=block_axis + 1)
    dims = [d for d, n in enumerate(param_shape) if n == 1 and x.shape[d] != 1]
    if dims:
        x = reduce(x, dim=dims, keepdim=True)
    return x


# --------------------------------------------------------------------------------------------------
# Modules.
# --------------------------------------------------------------------------------------------------


class LearnableQuantizer(nn.Module):
    """A quantizer with learnable bit-width, clamps (hence step) and integer zero point.

    Weight quantizers are symmetric (`symmetric=True`), activation quantizers asymmetric with `lo`
    pinned at 0 when the tensor is provably non-negative (`nonnegative=True`).

    States: `enabled=False` makes it the identity (exactly float); `observing=True` makes it record
    running min/max (calibration) and pass values through; otherwise training mode uses `mode`'s
    estimator and eval mode hard integer rounding.

    Args:
        kind: `"weight"` or `"activation"`.
        tensor_shape: shape of the quantized tensor (weights) or of one example activation.
        bits, min_bits, max_bits: initial bits and bounds.
        granularity: `"per_tensor"`, `"per_channel"` or `"per_group"`.
        channel_axis: output-channel axis (weights).
        block_axis, group_size: axis and size of blocks for `"per_group"`.
        per_group_bits: one bit-width per group instead of one per tensor.
        learn_bits, learn_clamps: which parameters train.
        mode: `"dither"`, `"noise"` or `"ste"`.
        noise: `"uniform"` or `"gaussian"` (noise mode).
        symmetric: signed symmetric codes with zero point 0 (weights).
        nonnegative: pin `lo` at 0 (activations after ReLU, sigmoid, softmax, ...).
        served: names of the graph nodes this quantizer serves (for reports).
    """

    bits_param: nn.Parameter
    hi: nn.Parameter
    lo: Optional[Tensor]
    initialized: Tensor
    observed_min: Tensor
    observed_max: Tensor
    trained_bits: Tensor

    def __init__(
        self,
        *,
        kind: str,
        tensor_shape: Tuple[int, ...],
        bits: int,
        min_bits: int,
        max_bits: int,
        granularity: str = "per_tensor",
        channel_axis: Optional[int] = None,
        block_axis: Optional[int] = None,
        group_size: Optional[int] = None,
        per_group_bits: bool = False,
        learn_bits: bool = True,
        learn_clamps: bool = True,
        mode: str = "dither",
        noise: str = "uniform",
        symmetric: bool = False,
        nonnegative: bool = False,
        served: Tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if symmetric and min_bits < 2:
            raise ConfigError(f"symmetric quantizer needs min_bits >= 2, got {min_bits}")
        self.kind = kind
        self.tensor_shape = tuple(int(d) for d in tensor_shape)
        self.min_bits = int(min_bits)
        self.max_bits = int(max_bits)
        self.granularity = granularity
        self.channel_axis = channel_axis
        self.block_axis = block_axis if granularity == "per_group" else None
        self.group_size = group_size if granularity == "per_group" else None
        self.per_group_bits = per_group_bits
        self.learn_bits = learn_bits
        self.learn_clamps = learn_clamps
        self.noise = noise
        self.estimator: Estimator = make_estimator(mode, noise)
        self.symmetric = symmetric
        self.nonnegative = nonnegative and not symmetric
        self.served = tuple(served)
        self.enabled = True
        self.observing = False

        self.param_shape = group_param_shape(
            self.tensor_shape, granularity, channel_axis, self.block_axis, self.group_size
        )
        bits_shape = self.param_shape if per_group_bits else ()
        span = self.max_bits - self.min_bits
        p0 = 1.0 if span == 0 else (bits - self.min_bits) / span
        self.bits_param = nn.Parameter(torch.full(bits_shape, float(p0)), requires_grad=learn_bits)
        self.hi = nn.Parameter(torch.ones(self.param_shape), requires_grad=learn_clamps)
        if symmetric:
            self.lo = None
        elif self.nonnegative:
            self.register_buffer("lo", torch.zeros(self.param_shape))
        else:
            self.lo = nn.Parameter(-torch.ones(self.param_shape), requires_grad=learn_clamps)
        # Whether the clamps hold data-derived values (set by calibration or the first forward pass).
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("observed_min", torch.full(self.param_shape, math.inf))
        self.register_buffer("observed_max", torch.full(self.param_shape, -math.inf))
        # integer bits of the last training step (-1: none yet), for `follow_bits_`; not saved
        self.register_buffer("trained_bits", torch.full((), -1.0), persistent=False)
        self.follow_bits = True

    @property
    def mode(self) -> str:
        """The training estimator's name (`"dither"`, `"ste"`, `"noise"`); assigning it swaps the estimator."""
        return self.estimator.name

    @mode.setter
    def mode(self, value: str) -> None:
        self.estimator = make_estimator(value, self.noise)

    # ---- bits -------------------------------------------------------------------------------------

    def bits(self) -> Tensor:
        """Continuous bit-width in `[min_bits, max_bits]` (differentiable)."""
        span = float(self.max_bits - self.min_bits)
        return self.min_bits + span * clamp_ste(self.bits_param, 0.0, 1.0)

    def integer_bits(self) -> Tensor:
        """Integer bit-width used in eval and freeze: `round(b)` (half to even), within the bounds."""
        with torch.no_grad():
            return torch.round(self.bits()).clamp(self.min_bits, self.max_bits)

    @torch.no_grad()
    def set_bits(self, bits: float) -> None:
        """Set the current bit-width (e.g. to restart from high precision)."""
        span = self.max_bits - self.min_bits
        p = 1.0 if span == 0 else (float(bits) - self.min_bits) / span
        self.bits_param.fill_(min(max(p, 0.0), 1.0))

    @torch.no_grad()
    def project_bits_(self) -> None:
        """Project the bits parameter back into its bounds (call after an optimizer step)."""
        self.bits_param.clamp_(0.0, 1.0)
        if self.hi is not None:
            self.hi.clamp_(min=0.0)
        if isinstance(self.lo, nn.Parameter):
            self.lo.clamp_(max=0.0)

    # ---- clamps and step --------------------------------------------------------------------------

    def clamp_bounds(self) -> Tuple[Tensor, Tensor]:
        """`(lo, hi)` with `lo <= 0 <= hi` (zero is always exactly representable)."""
        hi = torch.clamp(self.hi, min=0.0)
        if self.symmetric:
            return -hi, hi
        assert self.lo is not None
        return torch.clamp(self.lo, max=0.0), hi

    def _levels(self, bits: Tensor) -> Tensor:
        """Number of steps between the clamps: `2^b - 1`, or `2^(b-1) - 1` on each side if symmetric."""
        if self.symmetric:
            return torch.pow(2.0, bits - 1.0) - 1.0
        return torch.pow(2.0, bits) - 1.0

    def _step_of(self, lo: Tensor, hi: Tensor, levels: Tensor) -> Tensor:
        """The step of clamps `lo <= 0 <= hi` with `levels` steps between them (per side if symmetric)."""
        span = hi if self.symmetric else hi - lo
        return torch.clamp(span / levels, min=MIN_STEP)

    def step(self) -> Tensor:
        """Continuous step (differentiable), one per group."""
        lo, hi = self.clamp_bounds()
        return self._step_of(lo, hi, self._levels(self.bits()))

    def _grid(self, lo: Tensor, hi: Tensor, bits: Tensor) -> Dict[str, Tensor]:
        """Integer scale, zero point and code range of the clamps `lo <= 0 <= hi` at integer `bits`."""
        levels = self._levels(bits)
        scale = self._step_of(lo, hi, levels)
        if self.symmetric:
            qmin, zero_point = -levels, torch.zeros_like(scale)
        else:
            qmin = torch.zeros_like(levels)
            zero_point = torch.minimum(torch.clamp(torch.round(-lo / scale), 0.0, None), levels.expand_as(scale))
        shape = scale.shape
        return {
            "bits": bits.expand(shape).clone(),
            "scale": scale,
            "zero_point": zero_point.expand(shape).clone(),
            "qmin": qmin.expand(shape).clone(),
            "qmax": levels.expand(shape).clone(),
        }

    @torch.no_grad()
    def integer_params(self) -> Dict[str, Tensor]:
        """Eval/freeze parameters: integer bits, step, zero point and code range, per group.

        Returns a dict with `bits`, `scale`, `zero_point`, `qmin`, `qmax` (float tensors holding integers
        except `scale`), shaped like the group parameters (before block expansion).
        """
        lo, hi = self.clamp_bounds()
        return self._grid(lo, hi, self.integer_bits())

    def _split_blocks(self, x: Tensor) -> Tuple[Tensor, Tuple[int, ...]]:
        """`x` with its block axis split into `(blocks, group_size)`, and the group shape in that view (a 1
        after the blocks), so that per-block parameters broadcast without being repeated."""
        shape = tuple(self.param_shape)
        if self.block_axis is None or self.group_size is None or self.group_size == 1 or not shape:
            return x, shape
        axis = self.block_axis
        split = list(x.shape)
        split[axis : axis + 1] = [split[axis] // self.group_size, self.group_size]
        view = list(shape)
        view.insert(axis + 1, 1)
        return x.reshape(split), tuple(view)

    @torch.no_grad()
    def mse_clip_ratio(self, x: Tensor, bits: Tensor, ratios: int = 24) -> Tensor:
        """Per group, the `r` in `[0.2, 1]` whose clamps `r * (lo, hi)` quantize `x` at integer `bits` with
        the least squared error (`x`: the weight itself, or a sample of a per-tensor activation).

        The error of each candidate is `fake_quantize`'s, computed in place on slices of `MSE_SLICE`
        elements along the first axis (a slice stays in cache for all candidates, and no tensor of the
        size of `x` is allocated per candidate; on large models this search dominates calibrate).
        Ties keep the larger clip.
        """
        lo0, hi0 = self.clamp_bounds()
        xv, view = self._split_blocks(x.detach().to(hi0.dtype))
        if xv.dim() == 0:
            xv = xv.reshape(1)
        candidates = torch.linspace(1.0, 0.2, ratios, dtype=hi0.dtype, device=hi0.device)
        grids = []
        for r in candidates.tolist():
            grid = self._grid(lo0 * r, hi0 * r, bits)
            grids.append({k: grid[k].reshape(view) for k in ("scale", "zero_point", "qmin", "qmax")})
        # one code range for all groups (the bits are not per group) clamps with numbers: 3x faster
        scalar_range: List[Optional[Tuple[float, float]]] = [
            (float(g["qmin"].flatten()[0]), float(g["qmax"].flatten()[0]))
            if bool((g["qmin"] == g["qmin"].flatten()[0]).all() and (g["qmax"] == g["qmax"].flatten()[0]).all())
            else None
            for g in grids
        ]
        rows = xv.shape[0]
        sliced = bool(view) and view[0] == rows and rows > 1  # groups along the first axis: slice them too
        errors = torch.zeros((ratios, *view), dtype=hi0.dtype, device=hi0.device)
        per_slice = max(1, MSE_SLICE // max(xv[0].numel(), 1))
        for a in range(0, rows, per_slice):
            xs = xv[a : a + per_slice]
            t = torch.empty_like(xs)
            for k, grid in enumerate(grids):
                p = {n: v[a : a + per_slice] for n, v in grid.items()} if sliced else grid
                torch.div(xs, p["scale"], out=t)
                t.round_()
                if not self.symmetric:  # symmetric grids have zero point 0
                    t.add_(p["zero_point"])
                numbers = scalar_range[k]
                if numbers is not None:
                    t.clamp_(numbers[0], numbers[1])
                else:
                    t.clamp_(min=p["qmin"], max=p["qmax"])
                if not self.symmetric:
                    t.sub_(p["zero_point"])
                t.mul_(p["scale"]).sub_(xs).square_()
                if not view:
                    errors[k] += t.sum()
                    continue
                dims = [d for d, n in enumerate(p["scale"].shape) if n == 1 and t.shape[d] != 1]
                err = t.sum(dim=dims, keepdim=True) if dims else t
                if sliced:
                    errors[k, a : a + per_slice] = err
                else:
                    errors[k] += err
        best = torch.argmin(errors, dim=0)  # the first of equal errors: the larger clip
        return candidates[best].reshape(self.param_shape)

    @torch.no_grad()
    def scale_clamps_(self, ratio: Tensor) -> None:
        """Multiply the clamps by `ratio` (per group)."""
        self.hi.mul_(ratio)
        if isinstance(self.lo, nn.Parameter):
            self.lo.mul_(ratio)

    @torch.no_grad()
    def fit_clamps_mse(self, x: Tensor, ratios: int = 24) -> None:
        """Shrink the clamps per group to the clip of least squared error on `x` at the current integer bits
        (initialisation for the grid trained on, docs/algorithms.md, "Calibration": min/max is near-optimal at 8 bits
        and poor at 2-4)."""
        self.scale_clamps_(self.mse_clip_ratio(x, self.integer_bits(), ratios))

    @torch.no_grad()
    def follow_bits_(self, x: Tensor) -> None:
        """When the integer bits changed since the last training step, move the clamps with them.

        The clamps are scaled by `c(new) / c(old)`, with `c(B)` the least-squared-error clip ratio of the
        current `x` at `B` bits: a descent from 8 to 2 bits then lands on a grid fit for 2 bits while keeping
        what the clamps learned. Under torch.distributed the ratio (of an activation seen on each rank's own
        batch, or of a weight on randomly drawn columns) is averaged over the ranks, so every rank keeps the
        same clamps.
        """
        bits = self.integer_bits().expand(self.param_shape) if self.param_shape else self.integer_bits()
        last = self.trained_bits
        if last.shape != bits.shape or bool((last < 0).any()):
            self.trained_bits = bits.clone()
            return
        if torch.equal(last, bits):
            return
        sample = x.detach().flatten() if self.kind != KIND_WEIGHT else x.detach()
        if sample.dim() == 1 and sample.numel() > FOLLOW_SAMPLE:
            sample = sample[torch.randint(0, sample.numel(), (FOLLOW_SAMPLE,), device=sample.device)]
        elif self.channel_axis == 0 and self.block_axis is None and sample.dim() > 1:
            # per-channel weights: the ratio is estimated on a few columns of each channel (a large layer's
            # full search at every bit change dominated the steps of a descent)
            cols = sample.flatten(1)
            if cols.shape[1] > FOLLOW_COLUMNS:
                cols = cols[:, torch.randint(0, cols.shape[1], (FOLLOW_COLUMNS,), device=cols.device)]
            sample = cols.reshape(cols.shape[0], cols.shape[1], *([1] * (sample.dim() - 2)))
        ratio = self.mse_clip_ratio(sample, bits, FOLLOW_RATIOS) / self.mse_clip_ratio(sample, last, FOLLOW_RATIOS)
        ratio = mean_over_ranks(ratio)  # each rank samples its own batch and columns: replicas stay equal
        self.scale_clamps_(ratio)
        self.trained_bits = bits.clone()

    # ---- initialisation from data -----------------------------------------------------------------

    @torch.no_grad()
    def init_from_tensor(self, x: Tensor) -> None:
        """Set the clamps to the min/max of `x` per group (weights at insertion, activations on demand)."""
        self.observed_min.fill_(math.inf)
        self.observed_max.fill_(-math.inf)
        self.observe(x)
        self.load_observed()

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Accumulate running min/max of `x` per group."""
        x = x.detach().to(self.observed_min.dtype)
        if len(self.param_shape) > 0 and x.shape != self.tensor_shape and self.kind == KIND_WEIGHT:
            raise StateError(f"weight quantizer for {self.served} expected shape {self.tensor_shape}, got {tuple(x.shape)}")
        mx = reduce_to_groups(x, self.param_shape, self.block_axis, self.group_size, "amax")
        mn = reduce_to_groups(x, self.param_shape, self.block_axis, self.group_size, "amin")
        self.observed_max.copy_(torch.maximum(self.observed_max, mx.reshape(self.param_shape)))
        self.observed_min.copy_(torch.minimum(self.observed_min, mn.reshape(self.param_shape)))

    @torch.no_grad()
    def load_observed(self, lo: Optional[Tensor] = None, hi: Optional[Tensor] = None) -> None:
        """Copy observed (or given) bounds into the clamps and mark the quantizer initialized."""
        lo = self.observed_min if lo is None else lo
        hi = self.observed_max if hi is None else hi
        if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
            raise StateError(
                f"quantizer for {', '.join(self.served) or 'a tensor'} saw no finite values during calibration; "
                "check that the calibration batches reach this part of the model and contain no NaN/inf."
            )
        lo = torch.clamp(lo, max=0.0).to(self.hi.dtype)
        hi = torch.clamp(hi, min=0.0).to(self.hi.dtype)
        if self.symmetric:
            self.hi.copy_(torch.maximum(hi, -lo))
        else:
            self.hi.copy_(hi)
            if isinstance(self.lo, nn.Parameter):
                self.lo.copy_(lo)
        self.initialized.fill_(True)

    # ---- forward ----------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x
        if self.observing:
            self.observe(x)
            return x
        if not bool(self.initialized):
            if self.kind == KIND_WEIGHT or self.training:
                self.init_from_tensor(x)
            else:
                raise StateError(
                    f"activation quantizer for {', '.join(self.served)} has no clamps yet: "
                    "run fxq.calibrate(qm, batches) (or one training-mode forward pass) before evaluating."
                )
        if self.training:
            return self._train_forward(x)
        return self._eval_forward(x)

    def _train_forward(self, x: Tensor) -> Tensor:
        # Rounding estimators train on the integer-bit grid that eval and freeze use (`round(b)` forward,
        # straight-through to `b`): continuous bits would train weights for a grid the frozen model never
        # has. The noise estimator is DiffQ's relaxation: its noise scale follows the continuous `b`.
        estimator = self.estimator
        if estimator.rounds and self.follow_bits and self.learn_bits:
            self.follow_bits_(x)
        bits = round_ste(self.bits()) if estimator.rounds else self.bits()
        levels = self._levels(bits)
        lo, hi = self.clamp_bounds()
        if estimator.rounds:
            # LSQ's gradient scale on every clamp parameter alike (the step's and the clip's gradients keep
            # their ratio; scaling only the step's part turned the clamps' gradient direction by 70-80
            # degrees and stalled W2A2 training)
            numel = max(x.numel() // max(math.prod(self.param_shape), 1), 1)
            scale = 1.0 / math.sqrt(numel * float(2 ** (self.max_bits - (1 if self.symmetric else 0))))
            hi = grad_scale(hi, scale)
            lo = grad_scale(lo, scale)
        step = self._step_of(lo, hi, levels)
        if self.symmetric:
            lo_grid, hi_grid = -step * levels, step * levels
        else:
            # the zero point lives on the integer grid in training too (straight-through rounding)
            zero_point = round_ste(-lo / step)
            lo_grid = -zero_point * step
            hi_grid = lo_grid + step * levels
        expand = lambda t: expand_groups(t, self.block_axis, self.group_size)  # noqa: E731
        return estimator.quantize(x, expand(step), expand(lo_grid), expand(hi_grid))

    def _eval_forward(self, x: Tensor) -> Tensor:
        p = self.integer_params()
        return fake_quantize(
            x,
            expand_groups(p["scale"], self.block_axis, self.group_size),
            expand_groups(p["zero_point"], self.block_axis, self.group_size),
            expand_groups(p["qmin"], self.block_axis, self.group_size),
            expand_groups(p["qmax"], self.block_axis, self.group_size),
        )

    # ---- accounting -------------------------------------------------------------------------------

    def group_numel(self) -> int:
        """Elements per group (per bit-width entry)."""
        total = math.prod(self.tensor_shape) if self.tensor_shape else 1
        return total // max(self.bits_param.numel(), 1)

    def size_bits(self) -> Tensor:
        """Differentiable storage of the quantized tensor in bits: `sum(group_numel * b)`."""
        return (self.bits() * self.group_numel()).sum()

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, shape={self.tensor_shape}, granularity={self.granularity}, "
            f"bits=[{self.min_bits},{self.max_bits}], mode={self.mode}, symmetric={self.symmetric}, "
            f"nonnegative={self.nonnegative}"
        )


class FrozenActivationQuantizer(nn.Module):
    """Eval-only activation quantizer with integer bits and zero point: ONNX Q -> DQ exactly."""

    bits: Tensor
    scale: Tensor
    zero_point: Tensor
    qmin: Tensor
    qmax: Tensor

    def __init__(self, source: LearnableQuantizer) -> None:
        super().__init__()
        p = source.integer_params()
        self.kind = source.kind
        self.served = source.served
        self.granularity = source.granularity
        self.tensor_shape = source.tensor_shape
        self.nonnegative = source.nonnegative
        self.symmetric = source.symmetric
        self.register_buffer("bits", p["bits"].to(torch.int64))
        self.register_buffer("scale", p["scale"].detach().clone())
        self.register_buffer("zero_point", p["zero_point"].to(torch.int64))
        self.register_buffer("qmin", p["qmin"].to(torch.int64))
        self.register_buffer("qmax", p["qmax"].to(torch.int64))

    def forward(self, x: Tensor) -> Tensor:
        return fake_quantize(
            x, self.scale, self.zero_point.to(self.scale.dtype), self.qmin.to(self.scale.dtype),
            self.qmax.to(self.scale.dtype),
        )

    def qparams(self) -> QParams:
        """The typed parameters export and verify read (per tensor; a per-channel activation is per axis)."""
        bits = int(self.bits.max())
        axis = None if self.scale.numel() == 1 else next((d for d, n in enumerate(self.scale.shape) if n > 1), None)
        scale, layout, axis = per_tensor_or_axis(self.scale, axis)
        zero_point = self.zero_point.detach().reshape(scale.shape).clone()
        return QParams(
            self.kind, bits, scale, zero_point, int(self.qmin.min()), int(self.qmax.max()), layout, axis, None,
            container_for(self.kind, bits),
        )


class FrozenWeight(nn.Module):
    """A frozen quantized weight: integer codes, per-group scales; forward returns `codes * scale`.

    Replaces both the float parameter and its quantizer in a frozen graph; it takes no input. The codes
    are stored as int8 (bits <= 8) or int16 (bits <= 16) so a frozen state dict is small.
    """

    codes: Tensor
    bits: Tensor
    scale: Tensor
    qmax: Tensor

    def __init__(self, source: LearnableQuantizer, weight: Tensor) -> None:
        super().__init__()
        p = source.integer_params()
        self.kind = source.kind
        self.served = source.served
        self.granularity = source.granularity
        self.tensor_shape = source.tensor_shape
        self.channel_axis = source.channel_axis
        self.block_axis = source.block_axis
        self.group_size = source.group_size
        self.symmetric = True
        max_bits = int(p["bits"].max().item())
        code_dtype = torch.int8 if max_bits <= 8 else torch.int16
        codes = quantize_codes(
            weight.detach().to(p["scale"].dtype),
            expand_groups(p["scale"], self.block_axis, self.group_size),
            expand_groups(p["zero_point"], self.block_axis, self.group_size),
            expand_groups(p["qmin"], self.block_axis, self.group_size),
            expand_groups(p["qmax"], self.block_axis, self.group_size),
        )
        self.register_buffer("codes", codes.to(code_dtype))
        self.register_buffer("bits", p["bits"].to(torch.int64))
        self.register_buffer("scale", p["scale"].detach().clone())
        self.register_buffer("qmax", p["qmax"].to(torch.int64))

    def forward(self) -> Tensor:
        scale = expand_groups(self.scale, self.block_axis, self.group_size)
        return self.codes.to(scale.dtype) * scale

    def qparams(self) -> QParams:
        """The typed parameters export and verify read: symmetric, per tensor / per axis / blocked."""
        bits = int(self.bits.max())
        qmax = int(self.qmax.max())
        container = container_for(self.kind, bits)
        if self.granularity == "per_group":
            assert self.block_axis is not None and self.group_size is not None
            scale = blocked_scale(self.scale, tuple(self.codes.shape), self.block_axis, self.group_size)
            return QParams(self.kind, bits, scale, zeros_like_scale(scale), -qmax, qmax, "blocked", self.block_axis,
                           int(self.group_size), container)
        axis = None if self.granularity == "per_tensor" else self.channel_axis
        scale, layout, axis = per_tensor_or_axis(self.scale, axis)
        return QParams(self.kind, bits, scale, zeros_like_scale(scale), -qmax, qmax, layout, axis, None, container)


INT32_MAX = 2**31 - 1
KIND_BIAS = "bias"


def bias_scale(input_scale: Tensor, weight_scale: Tensor, channels: int) -> Tensor:
    """The int32 bias step integer kernels use: `s_x * s_w`, one per output channel (shape `(channels,)`).

    `input_scale` is the (per-tensor) scale of the op's quantized input, `weight_scale` the per-tensor or
    per-channel scale of its weight (any shape holding 1 or `channels` values).
    """
    s_w = weight_scale.detach().reshape(-1)
    s = input_scale.detach().reshape(()) * s_w
    return s.expand(channels).clone() if s.numel() == 1 else s.clone()


def quantize_bias(bias: Tensor, scale: Tensor) -> Optional[Tensor]:
    """int32 codes `round(bias / scale)` of a bias on the grid `scale` (ONNX's QLinearConv/QGemm bias).

    Returns None when a code would not fit in int32 (a dead channel with a vanishing step): such a bias
    stays float.
    """
    codes = torch.round(bias.detach().to(scale.dtype) / scale)
    if not bool(torch.isfinite(codes).all()) or float(codes.abs().max()) > INT32_MAX:
        return None
    return codes.to(torch.int32)


class FrozenBias(nn.Module):
    """A conv/linear bias on the int32 grid `s_x * s_w` of the op's input and weight scales.

    Integer kernels (onnxruntime's QLinearConv, QGemm) add the bias as int32 codes on that grid, so the
    frozen module adds it the same way, as the eval-mode prepared module's `BiasQuantizer` does.
    Forward returns `codes * scale` (ONNX DequantizeLinear of an int32 tensor).
    """

    codes: Tensor
    scale: Tensor

    def __init__(self, codes: Tensor, scale: Tensor, served: Tuple[str, ...]) -> None:
        super().__init__()
        self.kind = KIND_BIAS
        self.served = tuple(served)
        self.granularity = "per_channel"
        self.tensor_shape = tuple(codes.shape)
        self.channel_axis = 0
        self.register_buffer("codes", codes.to(torch.int32))
        self.register_buffer("scale", scale.detach().clone())

    def forward(self) -> Tensor:
        return self.codes.to(self.scale.dtype) * self.scale

    def qparams(self) -> QParams:
        """The typed parameters export reads: int32 codes, one scale per output channel."""
        scale, layout, axis = per_tensor_or_axis(self.scale, 0)
        return QParams(self.kind, 32, scale, zeros_like_scale(scale), -(2**31), INT32_MAX, layout, axis, None, "int32")


class BiasQuantizer(nn.Module):
    """The int32 bias of a conv/linear: `round(b / (s_x * s_w)) * s_x * s_w`, in training and eval alike.

    It reads the current integer scales of the op's input and weight quantizers (held as plain
    references, not submodules, so they are neither registered nor saved twice), so the eval-mode
    prepared module computes exactly what `freeze` stores as a `FrozenBias` and what integer kernels add.
    In training the rounding is straight-through (the bias learns on the grid it is deployed on): at low
    bits `s_x * s_w` is coarse (W2A2: up to ~0.1 per channel) and a float bias in training left eval with
    a systematic per-channel offset the weights never learned to absorb (measured: 87% top-1 in training
    mode, 82% in eval on a Fashion-MNIST ResNet).
    """

    input_quantizer: LearnableQuantizer
    weight_quantizer: LearnableQuantizer

    def __init__(self, input_quantizer: LearnableQuantizer, weight_quantizer: LearnableQuantizer) -> None:
        super().__init__()
        self.kind = KIND_BIAS
        self.served = weight_quantizer.served
        self.granularity = "per_channel"
        self.nonnegative = False
        object.__setattr__(self, "input_quantizer", input_quantizer)
        object.__setattr__(self, "weight_quantizer", weight_quantizer)

    def active(self) -> bool:
        """Whether the bias is rounded now (both quantizers on, not observing, and calibrated)."""
        sources = (self.input_quantizer, self.weight_quantizer)
        return all(q.enabled and not q.observing and bool(q.initialized) for q in sources)

    @torch.no_grad()
    def integer_bias(self, bias: Tensor) -> Optional[Tuple[Tensor, Tensor]]:
        """`(codes, scale)` shaped like `bias`, or None when the codes would not fit in int32."""
        scale = bias_scale(
            self.input_quantizer.integer_params()["scale"], self.weight_quantizer.integer_params()["scale"],
            bias.numel(),
        )
        codes = quantize_bias(bias, scale)
        if codes is None:
            return None
        return codes.reshape(bias.shape), scale.reshape(bias.shape)

    def forward(self, bias: Tensor) -> Tensor:
        if not self.active():
            return bias
        found = self.integer_bias(bias)
        if found is None:
            return bias
        codes, scale = found
        rounded = codes.to(scale.dtype) * scale
        return bias + (rounded - bias).detach() if self.training else rounded


AnyQuantizer = Union[LearnableQuantizer, FrozenActivationQuantizer, FrozenWeight]
"""The quantizers reports describe (the int32 bias is derived from two of them)."""


@dataclasses.dataclass(frozen=True)
class QuantizerSummary:
    """What reports show of one learnable or frozen quantizer, at the integer bits eval and freeze use."""

    kind: str
    served: Tuple[str, ...]
    granularity: str
    bits: float
    """Mean integer bits over groups."""
    bits_min: float
    bits_max: float
    bits_continuous: float
    """Mean continuous (learned) bits; equal to `bits` for a frozen quantizer."""
    learn_bits: bool
    step_min: float
    step_max: float
    lo_min: float
    """Lowest clamp as the integer grid realises it."""
    hi_max: float
    zero_point_max: float
    signed: bool
    numel: int


def quantizer_summary(q: AnyQuantizer) -> QuantizerSummary:
    """The summary of a learnable or frozen quantizer (used by reports)."""
    if isinstance(q, LearnableQuantizer):
        p = q.integer_params()
        bits_cont = q.bits().detach()
        bits = p["bits"]
        scale = p["scale"]
        zero_point = p["zero_point"]
        # the clamps as the integer grid realises them (what eval and freeze compute)
        lo = (p["qmin"] - zero_point) * scale
        hi = (p["qmax"] - zero_point) * scale
        learn = q.learn_bits
    else:
        bits = q.bits.to(torch.float32)
        bits_cont = bits
        scale = q.scale
        if isinstance(q, FrozenWeight):
            zero_point = torch.zeros_like(scale)
            hi = q.qmax.to(scale.dtype) * scale
            lo = -hi
        else:
            zero_point = q.zero_point.to(scale.dtype)
            lo = (q.qmin.to(scale.dtype) - zero_point) * scale
            hi = (q.qmax.to(scale.dtype) - zero_point) * scale
        learn = False
    return QuantizerSummary(
        kind=q.kind,
        served=tuple(q.served),
        granularity=q.granularity,
        bits=float(bits.float().mean()),
        bits_min=float(bits.min()),
        bits_max=float(bits.max()),
        bits_continuous=float(bits_cont.float().mean()),
        learn_bits=learn,
        step_min=float(scale.min()),
        step_max=float(scale.max()),
        lo_min=float(lo.min()),
        hi_max=float(hi.max()),
        zero_point_max=float(zero_point.max()),
        signed=bool(float(lo.min()) < 0.0),
        numel=math.prod(q.tensor_shape) if q.tensor_shape else 1,
    )


def iter_learnable(module: nn.Module) -> List[Tuple[str, LearnableQuantizer]]:
    """All learnable quantizers in `module`, with their qualified names."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LearnableQuantizer)]
