"""A plain LSQ (Esser et al. 2020), written independently of fxquant: the baseline fxquant must beat.

What a user writes in an afternoon: every `nn.Conv2d` / `nn.Linear` gets a weight quantizer (signed,
per output channel) and an input quantizer (unsigned when the input is provably non-negative, here every
conv/linear input of a ReLU network and the [0, 1] image; signed otherwise), each a learnable step with
LSQ's initialisation `2 mean|x| / sqrt(Qp)` and gradient scale `1 / sqrt(numel * Qp)`, straight-through
rounding. BatchNorm stays as it is (trained with batch statistics). Trained with Adam on cross-entropy
against the labels (LSQ's own recipe) or on any loss the caller computes.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    return (x - x * scale).detach() + x * scale


def _round_pass(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


class LsqQuantizer(nn.Module):
    """`round(clamp(x / s, -Qn, Qp)) * s` with a learnable step `s` (per channel when `channels` is given)."""

    def __init__(self, bits: int, signed: bool, channels: Optional[int] = None, narrow: bool = False) -> None:
        super().__init__()
        self.qn = (2 ** (bits - 1) - (1 if narrow else 0)) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.step = nn.Parameter(torch.ones(channels if channels else 1))
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not bool(self.ready):
            with torch.no_grad():
                if self.step.numel() > 1:
                    mean_abs = x.abs().flatten(1).mean(1)
                else:
                    mean_abs = x.abs().mean().reshape(1)
                self.step.copy_((2 * mean_abs / math.sqrt(self.qp)).clamp(min=1e-8))
                self.ready.fill_(True)
        g = 1.0 / math.sqrt(x.numel() / self.step.numel() * self.qp)
        s = _grad_scale(self.step, g)
        if s.numel() > 1:  # per output channel: broadcast over the other axes
            s = s.reshape(-1, *([1] * (x.dim() - 1)))
        return _round_pass(torch.clamp(x / s, -self.qn, self.qp)) * s


class LsqLayer(nn.Module):
    """A conv/linear whose input and weight pass through LSQ quantizers."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: Optional[int], signed_input: bool, narrow: bool) -> None:
        super().__init__()
        self.layer = layer
        self.wq = LsqQuantizer(w_bits, True, layer.weight.shape[0], narrow)
        self.aq = LsqQuantizer(a_bits, signed_input) if a_bits is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.wq(self.layer.weight)
        if self.aq is not None:
            x = self.aq(x)
        if isinstance(self.layer, nn.Conv2d):
            c = self.layer
            return F.conv2d(x, w, c.bias, c.stride, c.padding, c.dilation, c.groups)
        return F.linear(x, w, self.layer.bias)


def lsq_model(model: nn.Module, w_bits: int, a_bits: Optional[int], first_last_bits: Optional[int] = None,
              narrow: bool = False, signed_inputs: Optional[Dict[str, bool]] = None) -> nn.Module:
    """A copy of `model` with every Conv2d/Linear wrapped in `LsqLayer`.

    `a_bits=None`: weights only. `first_last_bits`: bits of the first and last such layer (None: like the rest). `signed_inputs`: names
    of layers whose input may be negative (default: none, as in a ReLU network fed images in [0, 1]).
    """
    model = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wb, ab = w_bits, a_bits
        if first_last_bits is not None and name in (names[0], names[-1]):
            wb = first_last_bits
            ab = first_last_bits if a_bits is not None else None
        signed = bool(signed_inputs and signed_inputs.get(name, False))
        setattr(parent, attr, LsqLayer(getattr(parent, attr), wb, ab, signed, narrow))
    return model


def train_lsq(qmodel: nn.Module, batches: list, steps: int, lr: float = 1e-3,
              loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = None,
              calib: Optional[torch.Tensor] = None) -> nn.Module:
    """Adam on every parameter, cosine LR, `steps` steps; `loss_fn(logits, x, y)` (default: CE on labels).

    `calib`: images for LSQ's step initialisation (one forward pass) before training.
    """
    if calib is not None:
        qmodel.train()
        with torch.no_grad():
            qmodel(calib)
    opt = torch.optim.Adam(qmodel.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    qmodel.train()
    for step in range(steps):
        x, y = batches[step % len(batches)]
        out = qmodel(x)
        loss = F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    qmodel.eval()
    return qmodel
