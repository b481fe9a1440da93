"""The optimizer side of fine-tuning, public for a training loop of one's own (as DiffQ's `setup_optimizer`):
`param_groups` (weights, quantizer clamps, quantizer bits, with their learning rates), `default_optimizer`
(Adam, fused where it applies) and `project_quantizers` (after each optimizer step).

`fxquant.finetune` builds its optimizer from these; the learning rates come from `fxquant.objectives.Schedule`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from fxquant.distributed import reshard, unwrap
from fxquant.graph import is_quantizer_path
from fxquant.objectives import Schedule
from fxquant.quantizer import iter_learnable, project_parameters
from fxquant.shared_weights import own_weights

OptimizerFactory = Callable[[List[Dict[str, Any]]], torch.optim.Optimizer]
"""What `finetune(optimizer=...)` takes: the groups of `param_groups` -> an optimizer."""


def param_groups(
    qm: nn.Module, schedule: Optional[Schedule] = None, steps: int = 300, *, learn_bits: bool = True
) -> List[Dict[str, Any]]:
    """The optimizer parameter groups `finetune` uses, for a training loop of one's own (as DiffQ's
    `setup_optimizer`): model weights, quantizer clamps, quantizer bits.

    Each group is a dict with `name` (`"weights"`, `"quantizer_clamps"`, `"quantizer_bits"`), `params`,
    `lr`, `weight_decay` (never on quantizer parameters) and `betas` (`beta1 = Schedule.bits_beta1` for the
    bits); empty groups are left out. After each `optimizer.step()`, call `fxq.project_quantizers(qm)`.
    Under FSDP2 the module is resharded first, so the groups hold the sharded (DTensor) weights. Weights the
    prepared module still shares with the float model get their own copies first (`fxq.own_weights`).

    Args:
        qm: a prepared module (or one wrapped by DistributedDataParallel, or sharded by FSDP2 `fully_shard`).
        schedule: learning rates (default `Schedule()`); `bits_lr` defaults to `3 / steps`.
        steps: the step budget (sets the default bits learning rate).
        learn_bits: include the bits group (False: bits stay fixed, as in fine-tuning without a target).

    Example:
        >>> opt = torch.optim.Adam(fxq.param_groups(qm))
    """
    schedule = schedule if schedule is not None else Schedule()
    weights: List[nn.Parameter] = []
    clamps: List[nn.Parameter] = []
    bits: List[nn.Parameter] = []
    inner = unwrap(qm)
    reshard(inner)
    own_weights(inner)  # the optimizer writes them: not into the float model's tensors (`fxquant.shared_weights`)
    for name, p in inner.named_parameters():
        if not p.requires_grad:
            continue
        if is_quantizer_path(name):
            (bits if name.endswith(".bits_param") else clamps).append(p)
        else:
            weights.append(p)
    bits_lr = schedule.bits_lr if schedule.bits_lr is not None else 3.0 / steps
    groups = [
        {"name": "weights", "params": weights, "lr": schedule.lr, "weight_decay": schedule.weight_decay,
         "betas": schedule.betas},
        {"name": "quantizer_clamps", "params": clamps, "lr": schedule.clamp_lr or schedule.lr, "weight_decay": 0.0,
         "betas": schedule.betas},
    ]
    if learn_bits:
        groups.append({"name": "quantizer_bits", "params": bits, "lr": bits_lr, "weight_decay": 0.0,
                       "betas": (schedule.bits_beta1, schedule.betas[1])})
    return [g for g in groups if g["params"]]


def default_optimizer(groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer `finetune` builds without `optimizer=`: Adam over `groups` (from `param_groups`), with
    torch's fused kernel (one call for every parameter) where it applies: every parameter a plain float tensor
    on the CPU or a CUDA device (not an FSDP2 `DTensor` shard). Otherwise torch's default Adam.

    A prepared module holds two or three small quantizer parameters per quantized tensor besides the weights;
    the per-parameter loop of torch's default CPU Adam cost ~5 ms of each step of the Fashion-MNIST ResNet
    of `benchmarks/bench_finetune.py`, the fused kernel ~1 ms (docs/decisions.md, "Fused Adam").
    """
    params = [p for g in groups for p in g["params"]]
    fusable = bool(params) and all(
        type(p) is nn.Parameter and p.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
        and p.device.type in ("cpu", "cuda") for p in params
    )
    return torch.optim.Adam(groups, fused=True) if fusable else torch.optim.Adam(groups)


@torch.no_grad()
def project_quantizers(qm: nn.Module) -> None:
    """Project every quantizer's parameters back into their domain (bits in bounds, `lo <= 0 <= hi`);
    call after each optimizer step of a training loop of one's own."""
    project_parameters([q for _, q in iter_learnable(unwrap(qm))])
