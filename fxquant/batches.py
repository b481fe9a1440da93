"""Batches: how fxquant reads the iterables users pass to `calibrate`, `finetune` and `verify`.

A batch is recognised as follows (`split_batch`):

- a tensor: the model's single positional input; no target;
- a dict: keyword arguments; no target;
- a tuple or list `(inputs, target)` when its first element is itself a tuple, list or dict, or when it
  has two elements and the model takes one required input (a DataLoader's `(x, y)`);
- any other tuple or list: the model's positional inputs; no target.

Batches are moved to the model's device; a finite iterable is cycled when more steps are asked.
`check_batches` refuses a single tensor or dict given where an iterable of batches is expected (a tensor
would iterate over its rows), and `call_batch` runs one batch, turning a failure into a `PrepareError`
that names the batch's shapes and the example input shapes the module was prepared with.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, Iterator, Optional, Tuple

import torch
from torch import fx, nn

from fxquant.errors import FxQuantError, PrepareError

Batch = Any


def required_inputs(model: nn.Module) -> int:
    """Number of positional inputs without a default (for a GraphModule: placeholders without default)."""
    if isinstance(model, fx.GraphModule):
        return sum(1 for n in model.graph.nodes if n.op == "placeholder" and not n.args)
    return 1


def split_batch(batch: Batch, n_required: int) -> Tuple[Tuple[Any, ...], Dict[str, Any], Optional[Any]]:
    """`(args, kwargs, target)` of one batch (see the module docstring for the rules)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}, None
    if isinstance(batch, dict):
        return (), dict(batch), None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2 and isinstance(batch[0], (tuple, list, dict)):
            inputs, target = batch
            if isinstance(inputs, dict):
                return (), dict(inputs), target
            return tuple(inputs), {}, target
        if len(batch) == 2 and n_required <= 1:
            return (batch[0],), {}, batch[1]
        return tuple(batch), {}, None
    raise PrepareError(
        f"a batch of type {type(batch).__name__} is not understood; give a tensor, a tuple of inputs, a dict "
        "of keyword inputs, or an (inputs, target) pair."
    )


def to_device(value: Any, device: torch.device) -> Any:
    """Move tensors in nested tuples/lists/dicts to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def describe_shapes(value: Any) -> str:
    """The shapes of the tensors in a (nested) batch, e.g. `(8, 3, 32, 32)`, `((8, 16), (8,))` or `{x: (2, 4), mask: (2,)}`."""
    if isinstance(value, torch.Tensor):
        return str(tuple(value.shape))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {describe_shapes(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(describe_shapes(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return type(value).__name__


def example_shapes(model: nn.Module) -> Optional[str]:
    """The input shapes a prepared or frozen module was prepared with (from its placeholders' shape
    metadata): `(1, 3, 32, 32)` for one input, `x=(2, 4), mask=(2, 4)` for several; None when the module
    does not record them."""
    if not isinstance(model, fx.GraphModule):
        return None
    parts = []
    for node in model.graph.nodes:
        if node.op != "placeholder":
            continue
        shape = getattr(node.meta.get("tensor_meta"), "shape", None)
        if shape is not None:
            parts.append((str(node.target).lstrip("*"), str(tuple(shape))))
    if len(parts) == 1:
        return parts[0][1]
    return ", ".join(f"{name}={shape}" for name, shape in parts) or None


def check_batches(batches: Any, what: str = "batches") -> None:
    """Refuse a single tensor or dict where an iterable of batches is expected.

    Raises:
        PrepareError: `batches` is a tensor (iterating it would run each of its rows as a batch) or a dict.
    """
    if isinstance(batches, torch.Tensor):
        raise PrepareError(
            f"{what} must be an iterable of batches (a list or a DataLoader), got a single Tensor of shape "
            f"{tuple(batches.shape)}; iterating a tensor would run each of its rows as a batch. To use it as one "
            "batch, wrap it in a list: [X]; for several, pass a list of tensors or a DataLoader."
        )
    if isinstance(batches, dict):
        raise PrepareError(
            f"{what} must be an iterable of batches (a list or a DataLoader), got a single dict; "
            "wrap it in a list: [batch]."
        )


def call_batch(
    model: nn.Module, batch: Batch, n_required: Optional[int] = None, who: str = "module"
) -> Tuple[Any, Optional[Any]]:
    """`run_batch`, with a failure to run the batch re-raised as a `PrepareError` naming its shapes.

    Raises:
        PrepareError: the model raised a TypeError, ValueError, RuntimeError, IndexError, KeyError or
            AttributeError on this batch (wrong shape, dtype, number or form of inputs); the message gives the
            batch's shapes, the example input shapes the module was prepared with, and what a batch may be.
    """
    try:
        return run_batch(model, batch, n_required)
    except (FxQuantError, torch.OutOfMemoryError):
        raise
    except AssertionError as e:
        if "Guard failed" not in str(e):
            raise
        # torch.export's size guards: the capture kept a dimension static (its note says why)
        notes = "; ".join(str(n) for n in getattr(model, "fxquant_capture_notes", ()) or ()) or "see the capture"
        raise PrepareError(
            f"a batch of shape {describe_shapes(batch)} does not fit the {who}: the capture fixed some input "
            f"sizes ({notes}). Give batches of those sizes, or prepare from an example whose sizes the model "
            f"accepts as dynamic. The guard was: {str(e).splitlines()[0]}"
        ) from e
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError) as e:
        example = example_shapes(model)
        prepared = f"it was prepared with example inputs of shape {example}" if example else "check its inputs"
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise PrepareError(
            f"a batch of shape {describe_shapes(batch)} does not fit the {who}: {prepared}. Give batches shaped "
            f"like the example inputs (only the batch dimension may differ): a tensor, a tuple of positional "
            f"inputs, a dict of keyword inputs, or an (inputs, target) pair. The error was "
            f"{type(e).__name__}: {first_line}"
        ) from e


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def run_batch(model: nn.Module, batch: Batch, n_required: Optional[int] = None) -> Tuple[Any, Optional[Any]]:
    """Run `model` on one batch (moved to its device); returns `(outputs, target)`."""
    n = required_inputs(model) if n_required is None else n_required
    args, kwargs, target = split_batch(batch, n)
    device = model_device(model)
    out = model(*to_device(args, device), **to_device(kwargs, device))
    return out, (to_device(target, device) if target is not None else None)


def cycle_batches(batches: Iterable[Batch], what: str = "batches") -> Iterator[Batch]:
    """Iterate `batches` forever, restarting a finite iterable; an empty one is an error. A one-shot iterator
    (a generator) cannot restart: the stream ends when it runs out (the caller says what that means)."""
    check_batches(batches, what)
    while True:
        empty = True
        for b in batches:
            empty = False
            yield b
        if empty:
            raise PrepareError(f"{what} is empty; give at least one batch.")
        if isinstance(batches, Iterator):
            return
