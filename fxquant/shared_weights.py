"""Weights a prepared module shares with the user's float model until something would write into them.

`fxq.prepare` (not in place) builds the prepared module around the float model's own parameter tensors
instead of copies: calibration, freeze and export only read float weights, so post-training quantization
of a large model holds its weights once, not twice (`benchmarks/bench_scale.py`). The float model is still
never modified: a parameter of the prepared module that shares its storage with the float model carries
that storage's address (`SHARED_STORAGE_ATTR`), and `own_weights` gives it its own copy before any write:

- `fxq.finetune` and `fxq.param_groups` call it before an optimizer exists;
- loading a state dict into the prepared module calls it first (a load pre-hook);
- the first backward that reaches a shared parameter calls it for that parameter (a post-accumulate-grad
  hook, which runs before any optimizer step), so a training loop of the user's own with
  `torch.optim.X(qm.parameters())` never writes into the float model either.

Writes by other means (an in-place `p.copy_()` under `torch.no_grad()`) should call `fxq.own_weights(qm)`
first, and so should a change of the float model's own weights in place while the prepared module is still
used (it reads the same tensors). Under `torch.distributed` prepare copies the weights as before: DistributedDataParallel's constructor
broadcasts rank 0's parameters into every rank's tensors in place.

A parameter that was copied since (`copy.deepcopy`, `qm.to(other_device)`, FSDP2 sharding, a load from a
file) no longer shares the storage it names, and `own_weights` leaves it alone.
"""

from __future__ import annotations

from typing import Any, Dict, Set

import torch
import torch.distributed as dist
from torch import nn

SHARED_STORAGE_ATTR = "_fxquant_shared_storage"
"""Attribute of a prepared module's parameter: the address of the float model's storage it still shares."""


def should_share(model: nn.Module) -> bool:
    """Whether `prepare` may share `model`'s parameters (see the module docstring): not under
    `torch.distributed`, and not for tensors without storage (meta)."""
    if dist.is_available() and dist.is_initialized():
        return False
    return all(p.device.type != "meta" for p in model.parameters())


def sharing_memo(model: nn.Module) -> Dict[int, Any]:
    """A `copy.deepcopy` memo that maps each parameter of `model` to a new parameter over the same storage:
    the copy gets its own modules and parameter objects (its own `requires_grad`, hooks and `.data`), not its
    own weights."""
    return {id(p): nn.Parameter(p.detach(), requires_grad=p.requires_grad) for p in model.parameters()}


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


def _own_on_first_gradient(p: torch.Tensor) -> None:
    _own(p)


def _own(p: torch.Tensor) -> bool:
    shared = getattr(p, SHARED_STORAGE_ATTR, None)
    if shared is None:
        return False
    delattr(p, SHARED_STORAGE_ATTR)
    if _storage(p) != shared:  # copied since (deepcopy, another device, a shard): nothing shared any more
        return False
    p.data = p.data.clone()
    return True


def own_weights(module: nn.Module) -> int:
    """Give every parameter of `module` that still shares the float model's storage its own copy; returns
    how many were copied (0 for a module prepared in place, frozen, or already owning its weights).

    `fxq.finetune`, `fxq.param_groups`, a state-dict load and the first backward call it; call it yourself
    before writing into a prepared module's weights by other means."""
    return sum(_own(p) for p in module.parameters())


def _own_before_load(module: nn.Module, *args: Any, **kwargs: Any) -> None:
    own_weights(module)


def mark_shared(gm: nn.Module, model: nn.Module) -> int:
    """Mark each parameter of `gm` whose storage is one of `model`'s (views included), hook its first
    gradient, and make a state-dict load into `gm` own its weights first; returns how many are shared."""
    float_storages: Set[int] = {_storage(p) for p in model.parameters()}
    marked = 0
    for p in gm.parameters():
        if _storage(p) in float_storages and getattr(p, SHARED_STORAGE_ATTR, None) is None:
            setattr(p, SHARED_STORAGE_ATTR, _storage(p))
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(_own_on_first_gradient)
            marked += 1
    if marked:
        gm.register_load_state_dict_pre_hook(_own_before_load)
    return marked
