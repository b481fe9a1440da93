"""Quantizer numerics: pure functions on tensors (no modules, no graphs).

Rounding with straight-through gradients, ONNX QuantizeLinear/DequantizeLinear exactly (`fake_quantize`,
`quantize_codes`, `dequantize_codes`: `q = clamp(round_half_even(x / s) + zp, qmin, qmax)`,
`x_hat = (q - zp) * s`), the fused straight-through round-clamp autograd node the rounding estimators train
through (`round_clamp`, GDNSQ's dither drawn per group by `dither_of_groups`), DiffQ's pseudo-quantization
noise (`clamp_with_noise`, one autograd node), the int32 bias grid `s_x * s_w` (`bias_scale`, `quantize_bias`), and the group layout (which elements
share clamps, step and bits: `group_param_shape`, `expand_groups`, `reduce_to_groups`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fxquant.quantizer import fused_cpu

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


CODES_SLICE = 1 << 18
"""Elements per slice of `integer_codes` (1 MB of float32): its only float temporary."""


def _rows_of(param: Tensor, x: Tensor, start: int, stop: int) -> Tensor:
    """The rows `start:stop` (along `x`'s dim 0) of a parameter that broadcasts against `x`."""
    if param.dim() == x.dim() and param.shape[0] != 1:
        return param[start:stop]
    return param


def integer_codes(
    x: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor, dtype: torch.dtype,
    block_axis: Optional[int] = None, group_size: Optional[int] = None, slice_numel: int = CODES_SLICE,
) -> Tensor:
    """`quantize_codes(x, *expanded group parameters)` cast to the integer `dtype`, without a float copy of `x`.

    The parameters have the group shape (before block expansion, as `expand_groups` takes them). The codes are
    computed on slices of `x` along its first axis of at most `slice_numel` elements (one row at least) and
    written into the integer result, so the only float temporary is one slice, and a blocked parameter is read
    through a view that splits the block axis instead of being repeated to `x`'s size. Element-wise the same
    arithmetic as `quantize_codes`, so the codes are bit-identical.
    """
    params = [scale, zero_point, qmin, qmax]
    blocked = block_axis is not None and group_size is not None and group_size > 1
    if blocked and all(p.dim() == x.dim() for p in params):
        assert block_axis is not None and group_size is not None
        axis = block_axis % x.dim()
        split = list(x.shape)
        split[axis : axis + 1] = [split[axis] // group_size, group_size]
        view = x.reshape(split)
        params = [p.unsqueeze(axis + 1) for p in params]
    else:
        view = x
        params = [expand_groups(p, block_axis, group_size) for p in params]
    if torch.broadcast_shapes(view.shape, *(p.shape for p in params)) != view.shape or view.dim() == 0:
        return quantize_codes(view.to(scale.dtype), *params).to(dtype).reshape(x.shape)
    out = torch.empty(view.shape, dtype=dtype, device=x.device)
    rows = max(1, slice_numel // max(1, view.numel() // max(1, view.shape[0])))
    with torch.no_grad():
        for start in range(0, view.shape[0], rows):
            stop = min(start + rows, view.shape[0])
            part = [_rows_of(p, view, start, stop) for p in params]
            out[start:stop].copy_(quantize_codes(view[start:stop].to(scale.dtype), *part))
    return out.reshape(x.shape)


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


def dither_draws_signs(grad_in: Tensor, shape: torch.Size) -> bool:
    """Whether the dither of `grad_in`'s groups (one per element of `shape`) draws every sign (groups under
    `DITHER_EXACT_BELOW` elements) rather than one Gaussian per group: the choice every dither path makes alike, so
    that they draw the same random stream."""
    return grad_in.numel() // max(math.prod(shape), 1) < DITHER_EXACT_BELOW


def dither_of_groups(grad_in: Tensor, shape: torch.Size, x: Tensor) -> Tensor:
    """GDNSQ's dither term of the step gradient, `sum_i g_i r_i / sqrt(3)` per group, `r_i` i.i.d. in {-1/2, 1/2}.

    `grad_in` is the upstream gradient inside the clamps (zero outside), `x` the quantized tensor: an element exactly 0
    has no rounding error on any grid (the zero point is an integer), so it draws no dither (`r_i = 0`; a ReLU's
    zeros, an image's background: docs/decisions.md, "No dither for exact zeros"). For groups of at least
    `DITHER_EXACT_BELOW` elements the sum of independent signs is drawn from its Gaussian limit with the exact
    variance `sum_i g_i^2 / 12` (one random number per group instead of one per element; docs/decisions.md,
    "Dither drawn per group"); smaller groups draw every sign.
    """
    noisy = torch.where(x == 0, 0.0, grad_in)
    if dither_draws_signs(grad_in, shape):
        r = torch.randint(0, 2, grad_in.shape, device=grad_in.device).to(grad_in.dtype) - 0.5
        return reduce_to_shape(noisy * r, shape) / math.sqrt(3.0)
    return dither_from_square_sum(_sum_of_products(noisy, noisy, shape), shape)


def dither_from_square_sum(square_sum: Tensor, shape: torch.Size) -> Tensor:
    """The dither of groups of at least `DITHER_EXACT_BELOW` elements from `sum_i g_i^2` per group: a Gaussian
    draw with variance `square_sum / 12` (see `dither_of_groups`)."""
    return torch.randn(shape, device=square_sum.device, dtype=square_sum.dtype) * (square_sum / 12.0).sqrt()


def dither_with_square_sum(grad_in: Tensor, square_sum: Tensor, shape: torch.Size, x: Tensor) -> Tensor:
    """`dither_of_groups(grad_in, shape, x)` when a fused kernel has already summed `g^2` per group over the nonzero
    elements of `x` (`square_sum`, one value per group): the same draws from the same generator, without a pass over
    `grad_in` for large groups."""
    if dither_draws_signs(grad_in, shape):
        return dither_of_groups(grad_in, shape, x)
    return dither_from_square_sum(square_sum.reshape(shape), shape)


@dataclass(frozen=True)
class GridConstants:
    """What fixes a learnable quantizer's training grid besides its parameters (`LearnableQuantizer`)."""

    min_bits: float
    span: float  # max_bits - min_bits
    symmetric: bool
    clamp_grad_scale: float  # LSQ's gradient scale on the clamp parameters
    full_range: bool = False  # symmetric codes -(L + 1)..L (else narrow, -L..L)

    @property
    def code_range(self) -> int:
        """The code range as round_clamp.c numbers it (`fused_cpu.ASYMMETRIC`, `NARROW`, `FULL_RANGE`)."""
        if not self.symmetric:
            return fused_cpu.ASYMMETRIC
        return fused_cpu.FULL_RANGE if self.full_range else fused_cpu.NARROW

    @property
    def extra_negative(self) -> float:
        """The codes a symmetric grid has below `-L`: 1 with full-range codes, else 0."""
        return 1.0 if self.symmetric and self.full_range else 0.0


class _TrainingGrid(torch.autograd.Function):
    """`(step, lo, hi)` of the grid a rounding estimator trains on, from the bits parameter and the clamps, in
    one autograd node (the same values as the op-by-op chain of recorded ops it replaced, ~30 nodes per quantizer
    per step whose graph bookkeeping cost about as much as their arithmetic; docs/decisions.md, "The training
    grid in one autograd node").

    Forward, with `p` the bits parameter and the clamps `lo <= 0 <= hi` (`lo = -hi` if symmetric):
    `B = round(min_bits + span * clamp(p, 0, 1))`, `L = 2^(B-1) - 1` (symmetric) or `2^B - 1`,
    `step = max((hi - lo) / L, MIN_STEP)` (`hi / L` symmetric); symmetric grid `[-step (L + e), step L]` (`e = 1`
    for full-range codes, 0 for narrow ones), else
    `zp = round(-lo / step)` and `[-zp step, -zp step + step L]`. Backward: straight-through for both
    roundings and the clamp of `p`, LSQ's gradient scale on the clamps' gradients, torch's gradient of
    `clamp` elsewhere (passes at the bound itself).
    """

    @staticmethod
    def forward(ctx, bits_param: Tensor, lo: Optional[Tensor], hi: Tensor, k: GridConstants):  # noqa: ANN001, ANN205
        # no autograd records here: plain values (the straight-through roundings' and LSQ's gradient scale's are
        # the backward's; `grad_scale`'s value `(x - x s) + x s` could differ from x by an ulp, and then the
        # trained grid from the one eval and freeze use, `LearnableQuantizer._grid`)
        bits = torch.round(k.min_bits + k.span * torch.clamp(bits_param, 0.0, 1.0))
        levels = torch.pow(2.0, bits - 1.0) - 1.0 if k.symmetric else torch.pow(2.0, bits) - 1.0
        hi_v = torch.clamp(hi, min=0.0)
        if k.symmetric:
            ratio = hi_v / levels
            step = torch.clamp(ratio, min=MIN_STEP)
            lo_grid, hi_grid = -step * (levels + k.extra_negative), step * levels
            zero_point = lo_v = None
        else:
            assert lo is not None
            lo_v = torch.clamp(lo, max=0.0)
            ratio = (hi_v - lo_v) / levels
            step = torch.clamp(ratio, min=MIN_STEP)
            zero_point = torch.round(-lo_v / step)
            lo_grid = -zero_point * step
            hi_grid = lo_grid + step * levels
        ctx.k = k
        ctx.save_for_backward(bits_param, bits, levels, hi, lo, lo_v, ratio, step, zero_point)
        return step, lo_grid, hi_grid

    @staticmethod
    def backward(ctx, g_step: Tensor, g_lo: Tensor, g_hi: Tensor):  # noqa: ANN001, ANN205
        bits_param, bits, levels, hi, lo, lo_v, ratio, step, zero_point = ctx.saved_tensors
        k: GridConstants = ctx.k
        if k.symmetric:
            d_step = g_step + (levels * (g_hi - g_lo) - k.extra_negative * g_lo)
            d_levels = step * (g_hi - g_lo)
            d_lo_v = None
        else:
            g_lo_total = g_lo + g_hi  # the upper bound is the lower one plus step * L
            d_zero_point = -step * g_lo_total
            d_step = g_step - zero_point * g_lo_total + levels * g_hi
            d_levels = step * g_hi
            # zero_point = round(t) (straight-through), t = -lo_v / step
            d_lo_v = -d_zero_point / step
            d_step = d_step + d_zero_point * lo_v / (step * step)
        d_ratio = torch.where(ratio >= MIN_STEP, d_step, 0.0)
        d_hi_v = d_ratio / levels
        d_levels = d_levels - d_ratio * ratio / levels
        d_hi = torch.where(hi >= 0.0, d_hi_v * k.clamp_grad_scale, 0.0)
        d_lo = None
        if d_lo_v is not None and ctx.needs_input_grad[1]:
            d_lo_v = d_lo_v - d_ratio / levels
            d_lo = reduce_to_shape(torch.where(lo <= 0.0, d_lo_v * k.clamp_grad_scale, 0.0), lo.shape)
        # L = 2^(B-1) - 1 or 2^B - 1 with B = round(b) straight-through, b = min_bits + span * p
        power = levels + 1.0
        d_bits_param = reduce_to_shape(d_levels * power * math.log(2.0) * k.span, bits_param.shape)
        return d_bits_param, d_lo, reduce_to_shape(d_hi, hi.shape), None


def training_grid(bits_param: Tensor, lo: Optional[Tensor], hi: Tensor, constants: GridConstants) -> Tuple[Tensor, Tensor, Tensor]:
    """`(step, lo, hi)` of a rounding estimator's training grid in one autograd node (see `_TrainingGrid`)."""
    step, lo_grid, hi_grid = _TrainingGrid.apply(bits_param, lo, hi, constants)
    return step, lo_grid, hi_grid


def _number(t: Tensor) -> np.float32:
    """A one-element tensor's value as a float32 number (numpy's float32 arithmetic is torch's, rounding alike)."""
    return np.float32(t.item())


def integer_bits_number(bits_param: Tensor, min_bits: float, span: float) -> np.float32:
    """`round(min_bits + span * clamp(p, 0, 1))` of a one-element bits parameter `p` as a float32 number: the
    float32 arithmetic of `LearnableQuantizer.integer_bits` and `_TrainingGrid`, without tensor ops."""
    f32 = np.float32
    p = min(max(_number(bits_param), f32(0.0)), f32(1.0))
    return np.round(f32(min_bits) + f32(span) * p)


@dataclass(frozen=True)
class GridValues:
    """A rounding estimator's training grid at the integer bits, as float32 numpy arrays (one value for the
    tensor, or one per row or group): what the one-node forward rounds to, what its backward chains through and
    what the int32 bias reads (`LearnableQuantizer.grid_values`: computed again only when a parameter's value
    changed)."""

    constants: Tuple[float, float, int]  # min_bits, span, code_range of `GridConstants`
    values: np.ndarray  # the bits parameter's, hi's and lo's values it was computed from (`fused_cpu.grid_rows`)
    bits: float  # the integer bits B
    levels: float  # L = 2^(B-1) - 1 (symmetric) or 2^B - 1
    arrays: np.ndarray  # `fused_cpu.GRID_ARRAYS`, one float32 row each
    address: int  # of `arrays`' data, which the one-node kernels read (`fused_cpu.quantize_forward`)
    values_address: int  # of `values`' data, which the next `grid_values` compares with

    @property
    def rows(self) -> int:
        return int(self.arrays.shape[1])

    @property
    def step_address(self) -> int:
        """The address of `step`'s first value (the row of `arrays` the int32 bias reads)."""
        return self.address + fused_cpu.GRID_ARRAYS.index("step") * self.rows * self.arrays.itemsize

    @property
    def step(self) -> np.ndarray:
        return self.arrays[fused_cpu.GRID_ARRAYS.index("step")]



def grid_values(bits_param: Tensor, lo: Optional[Tensor], hi: Tensor, k: GridConstants,
                previous: Optional[GridValues] = None, scratch: Optional[fused_cpu.GridScratch] = None) -> GridValues:
    """`GridValues` of a one-element bits parameter and clamps where `applies_grid_values` holds (`lo` None:
    symmetric), in the float32 arithmetic of `_TrainingGrid` and `LearnableQuantizer._grid` (the values eval and
    freeze use), by round_clamp.c's `fxq_grid_rows`; `previous` itself when the parameters still hold its values bit
    for bit (a comparison, not a version counter: fused optimizers and collectives write without bumping it);
    `scratch`: the buffers the comparison writes into (`fused_cpu.GridScratch`, kept by the quantizer)."""
    constants = (k.min_bits, k.span, k.code_range)
    if previous is not None and (previous.constants != constants or previous.arrays.shape[1] != hi.numel()):
        previous = None
    found = fused_cpu.grid_rows(hi, lo, bits_param, k.min_bits, k.span, MIN_STEP, k.code_range,
                                None if previous is None else previous.values_address, scratch)
    if found is None:
        assert previous is not None
        return previous
    arrays, values, bits, levels = found
    return GridValues(constants, values, bits, levels, arrays, int(arrays.ctypes.data), int(values.ctypes.data))


class _FusedRounding(torch.autograd.Function):
    """A rounding estimator on the CPU in one autograd node: the fused kernel's round-clamp (`fused_cpu`) on the
    training grid computed in float32 by round_clamp.c (`GridValues`: one value, or one per row of a per-channel
    weight) instead of ~40 small tensor ops and two nodes per quantizer and step (docs/decisions.md, "Per-tensor
    quantizers in one node", "Per-channel weights in one node", "The grid in C, once per parameter update").

    The grid is `LearnableQuantizer._grid`'s, value for value (the values eval and freeze use); the backward
    chains the kernel's sums through it with `_TrainingGrid.backward`'s formulas (straight-through roundings,
    LSQ's gradient scale on the clamps, the dither drawn from torch's generator as `dither_of_groups` does).
    """

    @staticmethod
    def forward(ctx, x: Tensor, bits_param: Tensor, lo: Optional[Tensor], hi: Tensor, k: GridConstants,  # noqa: ANN001
                dither: bool, grid: GridValues) -> Tensor:
        ctx.k, ctx.dither, ctx.grid, ctx.lo_given = k, dither, grid, lo is not None
        ctx.save_for_backward(x, bits_param, lo if lo is not None else bits_param.new_empty(0), hi)
        return fused_cpu.quantize_forward(x, grid.address, grid.rows)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        if torch.is_grad_enabled():
            return _FusedRounding.differentiable_backward(ctx, grad)
        return _FusedRounding.numbers_backward(ctx, grad)

    @staticmethod
    def differentiable_backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:  # noqa: ANN001
        """A backward that records its own graph (a second derivative, `create_graph=True`): the same gradients
        through the torch ops of `training_grid` and `round_clamp` (whose fused per-tensor kernel, on tensors of
        `fused_cpu.MIN_ELEMENTS` or more, says it has no second derivative and how to get one)."""
        x, bits_param, lo, hi = ctx.saved_tensors
        lo_arg = lo if ctx.lo_given else None
        wanted = [(i, t) for i, t in enumerate((x, bits_param, lo_arg, hi)) if t is not None and ctx.needs_input_grad[i]]
        y = round_clamp(x, *training_grid(bits_param, lo_arg, hi, ctx.k), ctx.dither)
        found = torch.autograd.grad(y, [t for _, t in wanted], grad, create_graph=True, allow_unused=True)
        grads: List[Optional[Tensor]] = [None] * 7
        for (i, _), g in zip(wanted, found):
            grads[i] = g
        return tuple(grads)

    @staticmethod
    def numbers_backward(ctx, grad: Tensor) -> Tuple[Optional[Tensor], ...]:  # noqa: ANN001
        """The backward from the kernel's per-row sums, chained through the grid by round_clamp.c's
        `fxq_grid_rows_backward` (no graph recorded)."""
        x, bits_param, lo, hi = ctx.saved_tensors
        k: GridConstants = ctx.k
        g: GridValues = ctx.grid
        dithers = ctx.dither and any(ctx.needs_input_grad[1:4])
        # the step's gradient feeds the bits' and the clamps' (the torch path draws only when it is needed); the same
        # draws as `dither_of_groups`: one Gaussian per group, drawn here, or every sign, drawn once grad_in exists
        draws_signs = dithers and dither_draws_signs(x, hi.shape)
        draws = torch.randn(hi.shape, dtype=x.dtype) if dithers and not draws_signs else None
        # gradients with torch's own storage: autograd may keep them as the parameters' `.grad`, whose storage FSDP2
        # resizes (a numpy-backed one cannot be)
        grad_hi = torch.empty(hi.shape, dtype=hi.dtype)
        grad_lo = torch.empty(lo.shape, dtype=lo.dtype) if ctx.needs_input_grad[2] else None
        grad_bits = torch.empty_like(bits_param) if ctx.needs_input_grad[1] else None
        grad_in, sums = fused_cpu.quantize_backward(
            grad, x, g.address, g.rows, g.levels, MIN_STEP, k.code_range, k.clamp_grad_scale, draws, grad_hi, grad_lo,
            grad_bits, k.span, chain=not draws_signs,
        )
        if sums is not None:
            extra = dither_of_groups(grad_in, hi.shape, x).double().numpy().reshape(-1)
            fused_cpu.grid_rows_backward(sums, None, extra, g.arrays, g.levels, MIN_STEP, k.code_range,
                                         k.clamp_grad_scale, grad_hi, grad_lo, grad_bits, k.span)
        return grad_in, grad_bits, grad_lo, grad_hi if ctx.needs_input_grad[3] else None, None, None, None


def fused_rounding(x: Tensor, bits_param: Tensor, lo: Optional[Tensor], hi: Tensor, constants: GridConstants,
                   dither: bool, grid: Optional[GridValues] = None) -> Tensor:
    """`round_clamp(x, *training_grid(bits_param, lo, hi, constants), dither)` in one node with the fused kernel,
    where `applies_fused_rounding` holds (see `_FusedRounding`); `grid` is these parameters' `grid_values` when
    already computed."""
    if grid is None:
        grid = grid_values(bits_param, lo, hi, constants)
    out: Tensor = _FusedRounding.apply(x, bits_param, lo, hi, constants, dither, grid)
    return out


def applies_grid_values(bits_param: Tensor, lo: Optional[Tensor], hi: Tensor) -> bool:
    """Whether `grid_values` can compute the grid of these parameters: one bits parameter, clamps of one shape,
    all float32 (the grid is computed in float32), contiguous and on the CPU (read in place, without waiting for a
    device), and the fused kernel library available."""
    return (
        bits_param.numel() == 1 and (lo is None or lo.shape == hi.shape)
        and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                for t in (bits_param, hi) + ((lo,) if lo is not None else ()))
        and fused_cpu.library() is not None
    )


def fits_fused_rounding(x: Tensor, hi: Tensor) -> bool:
    """Whether `x` suits the fused kernel with clamps shaped like `hi`: one clamp pair for the tensor or one per row
    of its first axis (a per-channel weight: clamps shaped `(rows, 1, ..., 1)`), and `fused_cpu.applies(x)`."""
    rows = hi.numel()
    # clamps shaped (rows, 1, ..., 1): as many dimensions as x, the first x's, all others 1 (integer comparisons: a
    # torch.Size compared with a tuple goes through symbolic-shape helpers, ~5 us on every quantizer call)
    if rows != 1 and (x.dim() == 0 or hi.dim() != x.dim() or hi.shape[0] != x.shape[0] or rows != x.shape[0]):
        return False
    return fused_cpu.applies(x, smallest=1)


def applies_fused_rounding(x: Tensor, bits_param: Tensor, lo: Optional[Tensor], hi: Tensor) -> bool:
    """Whether `fused_rounding` can quantize `x`: `applies_grid_values` and `fits_fused_rounding`."""
    return applies_grid_values(bits_param, lo, hi) and fits_fused_rounding(x, hi)


def bounds_as_numbers(x: Tensor, lo: Tensor, hi: Tensor) -> Optional[Tuple[float, float]]:
    """One clamp pair for a tensor on the CPU, as Python numbers (else None: several pairs, or a device where
    reading them would wait for it). With numbers the CPU clamp runs its scalar kernel (4-5x faster than with
    broadcast tensor bounds; same values: the bounds are float32 numbers either way) and `_RoundClamp`'s
    backward needs no mask (docs/decisions.md, "Scalar clamp bounds on the CPU")."""
    if lo.numel() == 1 and hi.numel() == 1 and x.device.type == "cpu":
        return float(lo), float(hi)
    return None


class _RoundClamp(torch.autograd.Function):
    """`y = step * round(clamp(x, lo, hi) / step)` with straight-through gradients, in one autograd node.

    `lo` and `hi` lie on the grid of `step`. Gradients (docs/algorithms.md, "Training estimators"):
    `dy/dx = 1` inside `[lo, hi]`, 0 outside; `dy/dstep = round(u) - u` inside (`u = x / step`), plus GDNSQ's
    dither when `dither` is set; `dy/dlo = 1` below `lo`, `dy/dhi = 1` above `hi`. Each is reduced to its
    parameter's (broadcast) shape here, so the graph holds one node per quantizer instead of a dozen
    element-wise ops.

    Cost: the forward makes two temporaries of `x`'s size (in place from then on). With one clamp pair for the
    whole tensor (per-tensor activations) on the CPU the bounds are numbers (`bounds_as_numbers`): the backward
    selects the gradients by comparing `x` with them, the clamps' gradients are two sums and the step's a dot
    product. Otherwise the forward keeps a one-byte mask of the clipped elements, and the clamps' gradients are
    sums over the gathered clipped elements (one pair on another device) or reductions per group.
    """

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, dither: bool) -> Tensor:  # noqa: ANN001
        bounds = bounds_as_numbers(x, lo, hi)
        ctx.step_shape, ctx.dither, ctx.bounds = step.shape, dither, bounds
        ctx.fused = bounds is not None and step.numel() == 1 and fused_cpu.applies(x)
        if ctx.fused:
            assert bounds is not None
            ctx.step_value = float(step)
            ctx.save_for_backward(x, lo, hi)
            return fused_cpu.round_clamp_forward(x, ctx.step_value, *bounds)
        if bounds is not None:
            clamped = torch.clamp(x, *bounds)
            outside = x.new_empty(0)
        else:
            clamped = torch.clamp(x, lo, hi)
            outside = clamped != x
        u = clamped.div_(step)
        q = torch.round(u)
        # saved as u - q (in place on u); the step's gradient is q - u
        ctx.save_for_backward(x, u.sub_(q), outside, lo, hi)
        return q.mul_(step)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN001, ANN205
        if ctx.fused:
            return _fused_backward(ctx, grad)
        x, minus_residual, outside, lo, hi = ctx.saved_tensors
        need_lo, need_hi = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        grad_lo = grad_hi = grad_step = None
        if ctx.bounds is not None:
            # torch's activation backward kernels select by comparing `x` with a number in one vectorised pass:
            # `hardtanh_backward(g, x, a, b)` keeps `g` where `a < x < b`, `threshold_backward(g, x, t)` where
            # `x > t`. They replace a bool mask made in the forward and `where`/`nonzero` on it, which ran
            # single-threaded (docs/decisions.md, "Clipped elements of a per-tensor quantizer").
            lo_value, hi_value = ctx.bounds
            grad_in = _inside_gradient(grad, x, lo_value, hi_value)
            if need_hi:
                grad_hi = torch.ops.aten.threshold_backward(grad, x, hi_value).sum().reshape(hi.shape)
            if need_lo:
                grad_lo = torch.ops.aten.hardtanh_backward(grad, x, -math.inf, lo_value).sum().reshape(lo.shape)
        else:
            grad_in = torch.where(outside, 0.0, grad)
            if lo.numel() == 1 and hi.numel() == 1 and (need_lo or need_hi):
                # one index of the (few) clipped elements, gathered twice: boolean indexing ran `nonzero` once
                # per tensor indexed (docs/decisions.md, "Clipped elements of a per-tensor quantizer")
                clipped = torch.nonzero(outside.reshape(-1)).squeeze(1)
                x_out, grad_out = x.reshape(-1).index_select(0, clipped), grad.reshape(-1).index_select(0, clipped)
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
                grad_step = grad_step + dither_of_groups(grad_in, ctx.step_shape, x)
        return grad_in, grad_step, grad_lo, grad_hi, None


def _fused_backward(ctx, grad: Tensor) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:  # noqa: ANN001
    """`_RoundClamp`'s backward from the fused CPU kernel's one pass (`fused_cpu.round_clamp_backward`)."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "a second derivative through fxquant's fused CPU quantizer kernel is not supported (its backward is "
            "one C pass, not recorded); set FXQ_FUSED_KERNELS=0 in the environment before the process first quantizes "
            "(or call fxquant.quantizer.fused_cpu.reset() after setting it) to train through torch ops for double "
            "backward."
        )
    x, lo, hi = ctx.saved_tensors
    grad_in, sums = fused_cpu.round_clamp_backward(grad, x, ctx.step_value, *ctx.bounds)
    sums = sums.to(grad.dtype)
    grad_lo = sums[0].reshape(lo.shape) if ctx.needs_input_grad[2] else None
    grad_hi = sums[1].reshape(hi.shape) if ctx.needs_input_grad[3] else None
    grad_step = None
    if ctx.needs_input_grad[1]:
        grad_step = (-sums[2]).reshape(ctx.step_shape)
        if ctx.dither:
            grad_step = grad_step + dither_with_square_sum(grad_in, sums[3], ctx.step_shape, x)
    return grad_in, grad_step, grad_lo, grad_hi, None


def _inside_gradient(grad: Tensor, x: Tensor, lo: float, hi: float) -> Tensor:
    """`grad` where `lo <= x <= hi`, 0 elsewhere, in one pass: `hardtanh_backward` keeps the open interval, so
    its bounds are the float32 neighbours just outside `lo` and `hi` (no float32 lies between a bound and its
    neighbour: the selection is exactly the closed interval)."""
    below_lo = float(np.nextafter(np.float32(lo), np.float32(-np.inf)))
    above_hi = float(np.nextafter(np.float32(hi), np.float32(np.inf)))
    return torch.ops.aten.hardtanh_backward(grad, x, below_lo, above_hi)


def round_clamp(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, dither: bool = False) -> Tensor:
    """Hard rounding to the grid of `step` inside `[lo, hi]` with STE (optionally dithered) gradients.

    `lo`, `hi` and `step` broadcast against `x`; `lo` and `hi` must lie on the grid. See `_RoundClamp`.
    """
    return _RoundClamp.apply(x, step, lo, hi, dither)


def noise_draws(x: Tensor, distribution: str) -> Tensor:
    """DiffQ's `eps ~ U[-1/2, 1/2]` (`"uniform"`) or `N(0, 1/4)` (`"gaussian"`), one per element of `x`."""
    if distribution == "uniform":
        return torch.rand_like(x).sub_(0.5)
    return torch.randn_like(x).mul_(0.5)


class _ClampWithNoise(torch.autograd.Function):
    """`clamp(x, lo, hi) + step * eps` in one autograd node: the gradient reaches `x` where `lo <= x <= hi` (a NaN
    nowhere), `lo` from the elements below it, `hi` from those above it, `step` as `sum(grad * eps)`, each summed to
    its own (broadcast) shape. The rounding path's convention at the clamps; torch's `maximum`/`minimum` would split
    the gradient of an element equal to a clamp (a ReLU's zeros at `lo = 0`) between the two, and their backward
    (masks, `where`, `masked_fill`) cost about as much as the convolutions of a small CNN (docs/decisions.md,
    "The noise estimator in one node").

    `eps` is either given (a tensor like `x`, kept for the backward) or, with `seed` (uniform draws on the CPU, see
    `noise_fits_kernel`), drawn by the fused kernel from the seed and each element's index, forward and again
    backward: one pass each way and no tensor of draws."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, eps: Optional[Tensor],  # noqa: ANN401
                seed: Optional[int]) -> Tensor:
        ctx.shapes = (step.shape, lo.shape, hi.shape)
        ctx.seed = seed
        if seed is not None:
            step_rows, lo_rows, hi_rows = (t.detach().reshape(-1).contiguous() for t in (step, lo, hi))
            ctx.save_for_backward(x, lo_rows, hi_rows)
            return fused_cpu.noise_forward(x, step_rows, lo_rows, hi_rows, seed)
        assert eps is not None
        ctx.save_for_backward(x, lo, hi, eps)
        return torch.addcmul(torch.clamp(x, lo, hi), step, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:  # noqa: ANN401
        need_x, need_step, need_lo, need_hi = ctx.needs_input_grad[:4]
        step_shape, lo_shape, hi_shape = ctx.shapes
        if ctx.seed is not None:  # every tensor float32 (`noise_fits_kernel`)
            x, lo_rows, hi_rows = ctx.saved_tensors
            grad_in, sums = fused_cpu.noise_backward(grad, x, lo_rows, hi_rows, ctx.seed)
            sums = sums.to(torch.float32)
            return (
                grad_in if need_x else None,
                sums[:, 2].reshape(step_shape) if need_step else None,
                sums[:, 0].reshape(lo_shape) if need_lo else None,
                sums[:, 1].reshape(hi_shape) if need_hi else None,
                None, None,
            )
        x, lo, hi, eps = ctx.saved_tensors
        zero = grad.new_zeros(())
        grad_x = torch.where((x >= lo) & (x <= hi), grad, zero) if need_x else None
        grad_step = (grad * eps).sum_to_size(step_shape) if need_step else None
        grad_lo = torch.where(x < lo, grad, zero).sum_to_size(lo.shape) if need_lo else None
        grad_hi = torch.where(x > hi, grad, zero).sum_to_size(hi.shape) if need_hi else None
        return grad_x, grad_step, grad_lo, grad_hi, None, None


def noise_fits_kernel(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, distribution: str) -> bool:
    """Whether the fused CPU kernel draws the noise of `clamp_with_noise`: uniform noise, and float32 `step`, `lo` and
    `hi` on the CPU laid out as the rounding kernel takes clamps (`fits_fused_rounding`: one value for the tensor or
    one per row of `x`'s first axis), all three alike."""
    if distribution != "uniform":
        return False
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.numel() == hi.numel()
               and fits_fused_rounding(x, t) for t in (step, lo, hi))


def clamp_with_noise(x: Tensor, step: Tensor, lo: Tensor, hi: Tensor, distribution: str) -> Tensor:
    """DiffQ's training forward on fxquant's clamps: `clamp(x, lo, hi) + step * eps` (`noise_draws`), one node; on
    the CPU, uniform noise per tensor or per row is drawn inside the fused kernel from a seed that torch's generator
    draws (reproducible under `torch.manual_seed`, a different stream from `noise_draws`')."""
    if noise_fits_kernel(x, step, lo, hi, distribution):
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64)) % 2**64
        return _ClampWithNoise.apply(x, step, lo, hi, None, seed)
    return _ClampWithNoise.apply(x, step, lo, hi, noise_draws(x, distribution), None)


def mean_over_ranks(t: Tensor) -> Tensor:
    """`t` averaged over the ranks of a running torch.distributed job (itself otherwise)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()




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


def fits_int32(codes: Tensor) -> Tensor:
    """Whether every one of `codes` (integer-valued floats) is finite and fits in int32, as a 0-d bool tensor
    (no host sync). `2^31` is exact in float32, so the bound holds for float32 codes too."""
    return torch.isfinite(codes).all() & (codes.abs().amax() < 2.0**31)


def quantize_bias(bias: Tensor, scale: Tensor) -> Optional[Tensor]:
    """int32 codes `round(bias / scale)` of a bias on the grid `scale` (ONNX's QLinearConv/QGemm bias).

    Returns None when a code would not fit in int32 (a dead channel with a vanishing step): such a bias
    stays float.
    """
    codes = torch.round(bias.detach().to(scale.dtype) / scale)
    if not bool(fits_int32(codes)):
        return None
    return codes.to(torch.int32)
