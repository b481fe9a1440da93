"""The learnable quantizer: bits, clamps and zero point trained (the int32 bias derived from two of them is
`fxquant.quantizer.bias`).

Parametrisation (docs/algorithms.md, "The quantizer grid", "Learnable bit-widths"), per group of elements:

- continuous bit-width `b = min_bits + (max_bits - min_bits) * p`, with `p` a learnable parameter kept in
  [0, 1] by a straight-through clamp (the value is clamped, the gradient always passes) and projected back
  into [0, 1] after every optimizer step by `project_bits_`. A sigmoid was rejected: training starts at
  `max_bits`, where a sigmoid is saturated and its gradient vanishes, so bits would never move.
- asymmetric (activations): learnable clamps `lo <= 0 <= hi` (lo pinned at 0 for provably non-negative
  tensors), step `s = (hi - lo) / (2^b - 1)`, integer zero point `zp = round(-lo / s)` snapped in training
  too (straight-through), codes `[0, 2^B - 1]`.
- symmetric (weights): learnable clamp `hi` (= max |w| at init), `s = hi / (2^(b-1) - 1)`, zero point 0,
  full-range codes `[-2^(B-1), 2^(B-1) - 1]` (the grid reaches `-hi - s` below zero, as LSQ's and the integer
  types' ranges do), or narrow-range codes `[-(2^(B-1) - 1), 2^(B-1) - 1]` with `narrow_range=True` (`lo = -hi`).
- the identity GDNSQ uses, `b = log2((hi - lo) / s + 1)`, holds by construction.

The rounding estimators (dither, ste) compute the step from `B = round(b)` with a straight-through gradient
to `b`, so the grid they train on is the one eval and freeze use, through one fused autograd node
(`numerics.round_clamp`). LSQ's gradient scale applies to all of a clamp's gradient (its step part and its
clip part alike). The noise estimator (DiffQ) keeps the continuous `b` in its noise scale.

Initialisation for the grid trained on (docs/algorithms.md, "Calibration" and "Following the bits"):
`fit_clamps_mse` shrinks min/max clamps to the least-squared-error clip at the current integer bits, and
`follow_bits_` rescales the clamps when `round(b)` changes during training.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fxquant.errors import ConfigError, StateError
from fxquant.quantizer import fused_cpu
from fxquant.quantizer.base import IntegerGrid, Quantizer
from fxquant.quantizer.estimators import Estimator, make_estimator
from fxquant.quantizer.fused_cpu import GridScratch
from fxquant.quantizer.numerics import (
    FOLLOW_COLUMNS,
    FOLLOW_RATIOS,
    FOLLOW_SAMPLE,
    KIND_WEIGHT,
    MIN_STEP,
    MSE_SLICE,
    GridConstants,
    GridValues,
    applies_grid_values,
    clamp_ste,
    expand_groups,
    fake_quantize,
    fits_fused_rounding,
    fused_rounding,
    grid_values,
    group_param_shape,
    integer_bits_number,
    mean_over_ranks,
    reduce_to_groups,
    round_ste,
    training_grid,
)

GridCheck = Tuple[Tuple[Tensor, Tensor, Optional[Tensor]], Tuple[Any, ...], GridConstants, GridScratch]
"""What `LearnableQuantizer.grid_values` found applicable: the parameter objects, their storage addresses and the bit
range, the grid's constants, and the buffers of `fused_cpu.grid_rows`."""


class LearnableQuantizer(Quantizer):
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
        narrow_range: symmetric codes `-(2^(B-1) - 1)..2^(B-1) - 1` instead of the full `-2^(B-1)..2^(B-1) - 1`.
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
        narrow_range: bool = False,
        nonnegative: bool = False,
        served: Tuple[str, ...] = (),
    ) -> None:
        if symmetric and min_bits < 2:
            raise ConfigError(f"symmetric quantizer needs min_bits >= 2, got {min_bits}")
        super().__init__(kind=kind, served=served, granularity=granularity, tensor_shape=tensor_shape,
                         channel_axis=channel_axis, block_axis=block_axis, group_size=group_size)
        self.min_bits = int(min_bits)
        self.max_bits = int(max_bits)
        self.per_group_bits = per_group_bits
        self.learn_bits = learn_bits
        self.learn_clamps = learn_clamps
        self.noise = noise
        self.estimator: Estimator = make_estimator(mode, noise)
        self.symmetric = symmetric
        self.narrow_range = narrow_range
        self.nonnegative = nonnegative and not symmetric
        self.enabled = True
        self.observing = False
        # `passes.absorb_relu`: the graph's ReLU in front of this (non-negative) quantizer is gone and it reads the
        # ReLU's input; the lower clamp at 0 does the ReLU's work, and every path that does not clamp applies it
        self.absorbed_relu = False

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
        # the same as a number when there is one bit-width on the CPU (`_one_integer_bits`), else None
        self.trained_bits_number: Optional[float] = None
        self.follow_bits = True
        # the training grid of the current parameters, computed once per update (`grid_values`), and what
        # `grid_values` checked of the parameters (their objects and storage, the grid's constants, the buffers its
        # computation writes into)
        self._grid_values: Optional[GridValues] = None
        self._grid_checked: Optional[GridCheck] = None
        self._constants_of: Optional[Tuple[Tuple[Any, ...], GridConstants]] = None  # `_grid_constants`' last
        self._initialized_seen = False  # `is_initialized`

    def is_initialized(self) -> bool:
        """`bool(self.initialized)`, read from the tensor until it is True (it is set only by `init_from_tensor`, and
        unset only by loading a state dict, which resets this)."""
        if self._initialized_seen:
            return True
        seen = bool(self.initialized)
        self.__dict__["_initialized_seen"] = seen
        return seen

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_initialized_seen"] = False  # the loaded `initialized` may be False
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> Dict[str, Any]:
        # a copy or a pickle computes its grid afresh (no arrays pickled for nothing)
        state: Dict[str, Any] = super().__getstate__()
        state["_grid_values"] = None
        state["_grid_checked"] = None
        state["_constants_of"] = None
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        # a quantizer pickled by an older fxquant has no cached grid
        state.setdefault("_grid_values", None)
        state.setdefault("_grid_checked", None)
        state.setdefault("_constants_of", None)
        state.setdefault("_initialized_seen", False)
        state.setdefault("absorbed_relu", False)
        state.setdefault("narrow_range", True)  # symmetric grids were narrow before full-range codes
        super().__setstate__(state)

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
        if torch.is_grad_enabled() and self.bits_param.requires_grad:
            return self.min_bits + span * clamp_ste(self.bits_param, 0.0, 1.0)
        # no gradient recorded: the plain clamp (same value; bits() is read several times per training step)
        return self.min_bits + span * torch.clamp(self.bits_param, 0.0, 1.0)

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
        """Project the bits parameter back into its bounds and the clamps to `lo <= 0 <= hi` (call after an
        optimizer step; `project_parameters` does it for many quantizers at once)."""
        project_parameters([self])

    # ---- clamps and step --------------------------------------------------------------------------

    def clamp_bounds(self) -> Tuple[Tensor, Tensor]:
        """`(lo, hi)` with `lo <= 0 <= hi` (zero is always exactly representable)."""
        hi = torch.clamp(self.hi, min=0.0)
        if self.symmetric:
            return -hi, hi
        assert self.lo is not None
        return torch.clamp(self.lo, max=0.0), hi

    @property
    def full_range(self) -> bool:
        """Whether the grid is symmetric with full-range codes: one more code below zero than above."""
        return self.symmetric and not self.narrow_range

    @property
    def extra_negative(self) -> float:
        """The codes a symmetric grid has below `-L`: 1 with full-range codes, else 0 (`GridConstants.extra_negative`)."""
        return 1.0 if self.full_range else 0.0

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

    def _grid(self, lo: Tensor, hi: Tensor, bits: Tensor) -> IntegerGrid:
        """Integer scale, zero point and code range of the clamps `lo <= 0 <= hi` at integer `bits`."""
        levels = self._levels(bits)
        scale = self._step_of(lo, hi, levels)
        if self.symmetric:
            qmin, zero_point = -levels - self.extra_negative, torch.zeros_like(scale)
        else:
            qmin = torch.zeros_like(levels)
            zero_point = torch.minimum(torch.clamp(torch.round(-lo / scale), 0.0, None), levels.expand_as(scale))
        shape = scale.shape
        return IntegerGrid(
            bits=bits.expand(shape).clone(),
            scale=scale,
            zero_point=zero_point.expand(shape).clone(),
            qmin=qmin.expand(shape).clone(),
            qmax=levels.expand(shape).clone(),
        )

    @torch.no_grad()
    def integer_grid(self) -> IntegerGrid:
        """Eval/freeze grid at the integer bits `round(b)`, shaped like the group parameters (before block
        expansion)."""
        lo, hi = self.clamp_bounds()
        return self._grid(lo, hi, self.integer_bits())

    @torch.no_grad()
    def integer_scale(self) -> Tensor:
        """The scale of `integer_grid()` alone (what the int32 bias reads every training step)."""
        lo, hi = self.clamp_bounds()
        return self._step_of(lo, hi, self._levels(self.integer_bits()))

    def grid_values(self) -> Optional[GridValues]:
        """The training (and eval) grid of the current parameters as float32 arrays where `applies_grid_values` (one
        bit-width, float32 parameters on the CPU), else None; computed again only when a parameter's value changed
        (`numerics.grid_values` compares them in C), so a step computes it once for the quantizer and the int32 bias
        that reads it."""
        lo = None if self.symmetric else self.lo
        bits_param, hi = self.bits_param, self.hi
        # `applies_grid_values` and the grid's constants hold for as long as the same parameter objects keep the same
        # storage (a device or dtype change, FSDP2's swaps and `.data` assignments all change one or the other)
        parameters = (bits_param, hi, lo)
        addresses = (bits_param.data_ptr(), hi.data_ptr(), None if lo is None else lo.data_ptr(), self.min_bits,
                     self.max_bits, self.full_range)
        checked = self._grid_checked
        if fused_cpu.library() is None:  # turned off since (FXQ_FUSED_KERNELS=0)
            return None
        if checked is None or checked[1] != addresses or any(a is not b for a, b in zip(checked[0], parameters)):
            if not applies_grid_values(bits_param, lo, hi):
                self.__dict__["_grid_checked"] = None
                return None
            constants = GridConstants(float(self.min_bits), float(self.max_bits - self.min_bits), self.symmetric, 1.0,
                                      self.full_range)
            checked = (parameters, addresses, constants, GridScratch(hi.numel()))
            self.__dict__["_grid_checked"] = checked
        previous = self._grid_values
        found = grid_values(bits_param, lo, hi, checked[2], previous, checked[3])
        if found is not previous:
            self.__dict__["_grid_values"] = found  # a plain attribute (nn.Module's __setattr__ costs microseconds)
        return found

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
        # the candidates' grids, as the in-place loop below indexes them, holding only what it reads: one code range
        # for all groups (the bits are not per group) clamps with numbers (docs/decisions.md,
        # "One code range in the clip search") and a symmetric grid has zero point 0, so a per-row table keeps one
        # tensor per candidate, not four
        grids: List[Dict[str, Tensor]] = []
        scalar_range: List[Optional[Tuple[float, float]]] = []
        for r in candidates.tolist():
            candidate = self._grid(lo0 * r, hi0 * r, bits)
            qmin, qmax = candidate.qmin.flatten(), candidate.qmax.flatten()
            one_range = bool((qmin == qmin[0]).all() and (qmax == qmax[0]).all())
            scalar_range.append((float(qmin[0]), float(qmax[0])) if one_range else None)
            kept = ("scale",) + (() if self.symmetric else ("zero_point",)) + (() if one_range else ("qmin", "qmax"))
            grids.append({k: getattr(candidate, k).reshape(view) for k in kept})
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

    def _one_integer_bits(self) -> Optional[float]:
        """`integer_bits()` as a number when there is one bit-width on the CPU (the same float32 arithmetic), else
        None."""
        if self.bits_param.numel() != 1 or self.bits_param.device.type != "cpu":
            return None
        grid = self.grid_values()
        if grid is not None:
            return grid.bits
        return float(integer_bits_number(self.bits_param, self.min_bits, self.max_bits - self.min_bits))

    @torch.no_grad()
    def forget_trained_bits(self) -> None:
        """Forget the bits of the last training step, so `follow_bits_` starts again from the current ones (after the
        clamps were restored from a state saved at other bits)."""
        self.trained_bits.fill_(-1.0)
        self.trained_bits_number = None

    @torch.no_grad()
    def follow_bits_(self, x: Tensor) -> None:
        """When the integer bits changed since the last training step, move the clamps with them.

        The clamps are scaled by `c(new) / c(old)`, with `c(B)` the least-squared-error clip ratio of the
        current `x` at `B` bits: a descent from 8 to 2 bits then lands on a grid fit for 2 bits while keeping
        what the clamps learned. Under torch.distributed the ratio (of an activation seen on each rank's own
        batch, or of a weight on randomly drawn columns) is averaged over the ranks, so every rank keeps the
        same clamps.
        """
        one = self._one_integer_bits()
        if one is not None and one == self.trained_bits_number:
            return  # the usual case: one bit-width, on the CPU, unchanged (one read instead of ~10 small ops)
        bits = self.integer_bits().expand(self.param_shape) if self.param_shape else self.integer_bits()
        self.trained_bits_number = one
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
        sample = self._as_read(sample)
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

    def _as_read(self, x: Tensor) -> Tensor:
        """`x` as the quantizer's paths that do not clamp must see it: through the ReLU the graph no longer computes
        when this quantizer absorbed one (`passes.absorb_relu`), else `x` itself."""
        return torch.relu(x) if self.absorbed_relu else x

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return self._as_read(x)
        if self.observing:
            x = self._as_read(x)
            self.observe(x)
            return x
        if not self.is_initialized():
            if self.kind == KIND_WEIGHT or self.training:
                self.init_from_tensor(self._as_read(x))
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
        grid = self.grid_values() if estimator.rounds and self.block_axis is None else None
        if estimator.rounds and self.follow_bits and self.learn_bits and (
            grid is None or grid.bits != self.trained_bits_number
        ):
            self.follow_bits_(x)
            grid = self.grid_values() if grid is not None else None  # the clamps may have moved with the bits
        if estimator.rounds:
            lo_param = None if self.symmetric else self.lo
            if grid is not None and fits_fused_rounding(x, self.hi):
                # on the CPU, per tensor or per row: grid and round-clamp in one node with the fused kernel
                return fused_rounding(x, self.bits_param, lo_param, self.hi, self._grid_constants(x),
                                      estimator.dither, grid)
            # the integer-bit grid and its straight-through gradients in one autograd node
            step, lo_grid, hi_grid = training_grid(self.bits_param, lo_param, self.hi, self._grid_constants(x))
        else:
            levels = self._levels(self.bits())
            lo, hi = self.clamp_bounds()
            step = self._step_of(lo, hi, levels)
            if self.symmetric:
                lo_grid, hi_grid = -step * (levels + self.extra_negative), step * levels
            else:
                # the zero point lives on the integer grid in training too (straight-through rounding)
                zero_point = round_ste(-lo / step)
                lo_grid = -zero_point * step
                hi_grid = lo_grid + step * levels
        expand = lambda t: expand_groups(t, self.block_axis, self.group_size)  # noqa: E731
        return estimator.quantize(x, expand(step), expand(lo_grid), expand(hi_grid))

    def _grid_constants(self, x: Tensor) -> GridConstants:
        """The constants of the training grid for a tensor like `x`: LSQ's gradient scale
        `1 / sqrt(elements per group * Qp)` at the top of the bit range, on every clamp parameter alike (the
        step's and the clip's gradients keep their ratio; scaling only the step's part turned the clamps'
        gradient direction by 70-80 degrees and stalled W2A2 training). Kept for the last tensor size."""
        key = (x.numel(), self.min_bits, self.max_bits, self.symmetric, self.full_range, self.param_shape)
        cached = self._constants_of
        if cached is not None and cached[0] == key:
            return cached[1]
        numel = max(x.numel() // max(math.prod(self.param_shape), 1), 1)
        scale = 1.0 / math.sqrt(numel * float(2 ** (self.max_bits - (1 if self.symmetric else 0))))
        constants = GridConstants(float(self.min_bits), float(self.max_bits - self.min_bits), self.symmetric, scale,
                                  self.full_range)
        self.__dict__["_constants_of"] = (key, constants)
        return constants

    def _eval_forward(self, x: Tensor) -> Tensor:
        g = self.integer_grid()
        expand = lambda t: expand_groups(t, self.block_axis, self.group_size)  # noqa: E731
        return fake_quantize(x, expand(g.scale), expand(g.zero_point), expand(g.qmin), expand(g.qmax))

    # ---- accounting -------------------------------------------------------------------------------

    def group_numel(self) -> int:
        """Elements per group (per bit-width entry)."""
        return self.numel() // max(self.bits_param.numel(), 1)

    def size_bits(self) -> Tensor:
        """Differentiable storage of the quantized tensor in bits: `sum(group_numel * b)`."""
        return (self.bits() * self.group_numel()).sum()

    def continuous_bits(self) -> Tensor:
        """The learned, continuous bit-width (per tensor, or per group with `per_group_bits`)."""
        return self.bits()

    @property
    def learns_bits(self) -> bool:
        return self.learn_bits

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, shape={self.tensor_shape}, granularity={self.granularity}, "
            f"bits=[{self.min_bits},{self.max_bits}], mode={self.mode}, symmetric={self.symmetric}, "
            + (f"narrow_range={self.narrow_range}, " if self.symmetric else "")
            + f"nonnegative={self.nonnegative}" + (", absorbed_relu=True" if self.absorbed_relu else "")
        )


@torch.no_grad()
def project_parameters(quantizers: Sequence[LearnableQuantizer]) -> None:
    """Project the quantizers' parameters back into their domain after an optimizer step: bits parameters into
    [0, 1], `hi >= 0`, learnable `lo <= 0`; one foreach call per bound for all of them (four calls per step instead
    of up to three small ops per quantizer)."""
    bits: List[Tensor] = [q.bits_param for q in quantizers]
    his: List[Tensor] = [q.hi for q in quantizers]
    los: List[Tensor] = [q.lo for q in quantizers if isinstance(q.lo, nn.Parameter)]
    if bits:
        torch._foreach_clamp_min_(bits, 0.0)
        torch._foreach_clamp_max_(bits, 1.0)
        torch._foreach_clamp_min_(his, 0.0)
    if los:
        torch._foreach_clamp_max_(los, 0.0)


def iter_learnable(module: nn.Module) -> List[Tuple[str, LearnableQuantizer]]:
    """All learnable quantizers in `module`, with their qualified names."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LearnableQuantizer)]
