"""Distributed fine-tuning: DDP-wrapped or FSDP2-sharded prepared modules, quantizers replicated.

A prepared module is sharded as one FSDP2 group with its quantizer parameters replicated (`FSDP_RECIPE`):
quantizers write their clamps in place during training and fine-tuning reads their bits between steps.
`check_fsdp` refuses shardings fine-tuning cannot follow; every rank starts from rank 0's quantizers
(`broadcast_quantizers`); the replicated parameters' gradients are averaged over ranks
(`average_replicated_grads`); the gradient norm is clipped over sharded and replicated parameters together
(`clip_grad_norm`); and a step is taken or skipped by all ranks together (`on_every_rank`).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, fx, nn

from fxquant.errors import ConfigError, StateError
from fxquant.graph import QUANTIZERS_ATTR, is_quantizer_path, quantizers_of
from fxquant.quantizer import mean_over_ranks


def unwrap(qm: nn.Module) -> fx.GraphModule:
    """The prepared GraphModule inside a DistributedDataParallel / DataParallel wrapper (or `qm`)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    inner = qm.module if isinstance(qm, wrappers) else qm
    if not isinstance(inner, fx.GraphModule):
        raise StateError(
            f"fine-tuning expects a module returned by fxq.prepare (a GraphModule, optionally inside DistributedDataParallel), "
            f"got {type(inner).__name__}; call fxq.prepare(model, example_inputs, config) first."
        )
    return inner


FSDP_RECIPE = f"fully_shard(qm, ignored_params=set(qm.{QUANTIZERS_ATTR}.parameters()))"
"""How to shard a prepared module with FSDP2: one group for the weights, quantizer parameters replicated."""


@functools.lru_cache(maxsize=None)
def _dtensor_type() -> Optional[type]:
    """torch's `DTensor` class (imported once: `is_dtensor` runs for every parameter on every step), or None
    without torch.distributed."""
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t: Tensor) -> bool:
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(t, dtensor)


def fsdp_modules(inner: nn.Module) -> List[Tuple[str, Any]]:
    """`(name, module)` of every module of `inner` that FSDP2's `fully_shard` was applied to (root: `""`; each an
    `FSDPModule`, which the type checker does not know as an `nn.Module`)."""
    if not dist.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule

    return [(name, m) for name, m in inner.named_modules() if isinstance(m, FSDPModule)]


def reshard(inner: nn.Module) -> None:
    """Register FSDP2's sharded parameters again: after a forward pass without backward (eval, calibration)
    the root keeps the gathered ones, which an optimizer must not hold."""
    for _, m in fsdp_modules(inner):
        m.reshard()


def check_fsdp(inner: fx.GraphModule) -> bool:
    """Whether FSDP2 shards `inner`; raise when it does so in a way fine-tuning cannot follow."""
    sharded = fsdp_modules(inner)
    if not sharded:
        return False
    names = [name for name, _ in sharded]
    if names[0] != "":
        raise ConfigError(
            f"fully_shard was applied to {names} inside the prepared module but not to the module itself, whose "
            "graph reads most weights directly (get_attr): their gradients would not be averaged over ranks. "
            f"Shard the prepared module itself: {FSDP_RECIPE}."
        )
    called = {str(n.target) for n in inner.graph.nodes if n.op == "call_module"}
    never = [name for name in names[1:] if name not in called]
    if never:
        raise ConfigError(
            f"fully_shard was applied to {never}, whose forward the prepared graph never runs (it reads their "
            "weights with get_attr nodes), so FSDP would never gather those weights. Shard the prepared module "
            f"as one group instead: {FSDP_RECIPE} (without fully_shard on its submodules)."
        )
    reshard(inner)
    sharded_quantizers = [
        name for name, p in inner.named_parameters() if is_quantizer_path(name) and is_dtensor(p)
    ]
    if sharded_quantizers:
        raise ConfigError(
            f"fully_shard sharded the quantizer parameters {_first(sharded_quantizers)}; quantizers write their "
            "clamps in place during training and fine-tuning reads their bits between steps, so they must stay "
            f"replicated: {FSDP_RECIPE}."
        )
    return True


def _first(names: List[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


@torch.no_grad()
def broadcast_quantizers(inner: nn.Module) -> None:
    """Give every rank rank 0's quantizer parameters and buffers (one broadcast).

    FSDP2 leaves the replicated (ignored) quantizer parameters as each rank calibrated them, and DDP only
    synchronised them when it wrapped the module (not after a calibration inside `finetune`)."""
    quantizers = quantizers_of(inner)
    if quantizers is None:
        return
    tensors = list(itertools.chain(quantizers.parameters(), quantizers.buffers()))
    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])  # exact for f32, ints, bools
    dist.broadcast(flat, src=0)
    for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(value.view(t.shape).to(t.dtype))


def _total_norm(grads: List[Tensor]) -> Tensor:
    """The 2-norm of `grads` taken together: `torch.nn.utils.get_total_norm` (torch 2.6 and later), else the norm
    of the per-tensor norms."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:
        norm: Tensor = get_total_norm(grads)
        return norm
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


SMALL_GRADIENT = 4096
"""Gradients with fewer elements (a quantizer's clamps and bits) are normed together as one tensor when only the
norm's finiteness is wanted: torch's CPU foreach norm loops over the tensors one by one (~1.5 us each)."""


def _unclipped_norm(grads: List[Tensor]) -> Tensor:
    """A 2-norm of `grads` for `clip_grad_norm` without clipping, where only its finiteness is read: the small
    gradients concatenated into one tensor and normed with one op, the others one op each (torch's grouping of the
    tensors by device and dtype costs more than that on a few dozen gradients); the value may differ from
    `_total_norm(grads)` in the last bits (the squares are summed in another order)."""
    small = [g for g in grads if g.numel() < SMALL_GRADIENT]
    if len(small) < 2 or len({(g.device, g.dtype) for g in grads}) != 1:
        return _total_norm(grads)
    parts = [torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in small]))]
    parts.extend(torch.linalg.vector_norm(g) for g in grads if g.numel() >= SMALL_GRADIENT)
    return torch.linalg.vector_norm(torch.stack(parts))


def clip_grad_norm(params: List[nn.Parameter], max_norm: float) -> float:
    """The global norm of the gradients of `params`, after scaling them to `max_norm` when it is exceeded (as
    `clip_grad_norm_`; with `max_norm=inf` only the norm, which fine-tuning reads to skip non-finite steps, and no
    pass over the gradients to multiply them by 1; the small gradients then normed in one op, `_unclipped_norm`).
    Under FSDP2 the sharded (DTensor) and the replicated parameters are normed apart (torch refuses a list mixing
    them) and the norms combined."""
    sharded: List[Tensor] = []
    plain: List[Tensor] = []
    for p in params:
        if p.grad is not None:
            (sharded if is_dtensor(p) else plain).append(p.grad)

    def value(norm: Tensor) -> float:
        return float(norm.full_tensor() if is_dtensor(norm) else norm)  # type: ignore[attr-defined]

    clips = math.isfinite(max_norm)
    total = math.sqrt(sum(
        value(_total_norm(part) if clips or part is sharded else _unclipped_norm(part)) ** 2
        for part in (sharded, plain) if part
    ))
    if math.isfinite(total) and total > max_norm:
        with torch.no_grad():
            for grad in sharded + plain:
                grad.mul_(max_norm / (total + 1e-6))
    return total


@torch.no_grad()
def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank of the default process group (one all-reduce of one number).

    A distributed step is taken or skipped by all ranks together: a rank that skipped its backward alone
    (a non-finite loss on its own batch) left the others waiting in the gradient all-reduce forever."""
    t = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def average_replicated_grads(params: List[nn.Parameter]) -> None:
    """Average over ranks the gradients FSDP2 does not reduce: those of its ignored (replicated) parameters."""
    grads = [p.grad for p in params if p.grad is not None and not is_dtensor(p)]
    if not grads:
        return
    flat = mean_over_ranks(torch.cat([g.reshape(-1).to(torch.float64) for g in grads]))
    for g, value in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(value.view(g.shape))
