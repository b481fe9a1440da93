"""Capture: turn an unmodified `nn.Module` into a `torch.fx.GraphModule`, and propagate shapes.

Front ends: `torch.fx.symbolic_trace` (with user leaf modules). The `torch.export` front end plugs in
here as a second capture (`capture="export"`); `capture_model` tries them in order and, when all fail,
raises one `CaptureError` that says what each said and what to do.

This module does not analyze or change the graph; it only captures it and records shapes in
`node.meta["tensor_meta"]`.
"""

from __future__ import annotations

import os
import traceback
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.errors import CaptureError, PrepareError

Inputs = Any
CAPTURES: Tuple[str, ...] = ("auto", "symbolic_trace")


def normalize_inputs(example_inputs: Inputs) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """Split model inputs into positional and keyword arguments.

    A tensor is one positional argument, a tuple or list is the positional arguments, a dict is the
    keyword arguments.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise PrepareError(
        f"example_inputs of type {type(example_inputs).__name__} is not supported; pass a tensor, a tuple "
        "of positional arguments, or a dict of keyword arguments."
    )


class _PathTracer(fx.Tracer):
    """A tracer that keeps leaf modules chosen by the user and remembers which module it is inside."""

    def __init__(self, leaf_modules: Sequence[str] = ()) -> None:
        super().__init__()
        self.user_leaves = set(leaf_modules)
        self.fxq_module_path: List[Tuple[str, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.user_leaves:
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        name = self.path_of_module(m)
        self.fxq_module_path.append((name, type(m).__name__))
        try:
            result = super().call_module(m, forward, args, kwargs)
        except Exception:
            raise
        self.fxq_module_path.pop()
        return result


def _user_frame(exc: BaseException) -> Optional[traceback.FrameSummary]:
    """The innermost traceback frame outside torch and fxquant: where the user's code failed."""
    torch_dir = os.path.dirname(torch.__file__)
    own_dir = os.path.dirname(__file__)
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not frame.filename.startswith(torch_dir) and not frame.filename.startswith(own_dir):
            return frame
    return None


def symbolic_trace_model(model: nn.Module, leaf_modules: Sequence[str] = ()) -> fx.GraphModule:
    """`torch.fx.symbolic_trace` with user leaf modules; on failure, a `CaptureError` naming where.

    Raises:
        CaptureError: with the module path and type, the source file and line that failed, the
            original error, and the fixes (leaf_modules, or the torch.export front end).
    """
    for name in leaf_modules:
        try:
            model.get_submodule(name)
        except AttributeError:
            raise PrepareError(
                f"leaf_modules entry {name!r} is not a submodule of {type(model).__name__}; "
                "give module paths as in model.named_modules()."
            ) from None
    tracer = _PathTracer(leaf_modules)
    try:
        graph = tracer.trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes one actionable error
        where = tracer.fxq_module_path[-1] if tracer.fxq_module_path else ("", type(model).__name__)
        frame = _user_frame(e)
        line = f"{frame.filename}:{frame.lineno}: {frame.line}" if frame else "unknown line"
        module_desc = f"module '{where[0]}' ({where[1]})" if where[0] else f"the top-level {where[1]}"
        fixes = []
        if where[0]:
            fixes.append(f"keep it float as a leaf: prepare(..., leaf_modules=['{where[0]}'])")
        fixes.append("capture with torch.export instead: prepare(..., capture='export')")
        raise CaptureError(
            f"torch.fx.symbolic_trace failed in {module_desc} at {line}\n"
            f"  error: {type(e).__name__}: {e}\n"
            "  fix: " + "; or ".join(fixes) + "."
        ) from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def capture_model(
    model: nn.Module, capture: str = "auto", leaf_modules: Sequence[str] = ()
) -> Tuple[fx.GraphModule, str]:
    """Capture `model` with the requested front end; returns the graph module and the front end used."""
    if capture not in CAPTURES:
        raise PrepareError(f"capture={capture!r} is unknown; expected one of {CAPTURES}.")
    return symbolic_trace_model(model, leaf_modules), "symbolic_trace"


def placeholder_args(gm: fx.GraphModule, example_inputs: Inputs) -> Tuple[Any, ...]:
    """Positional arguments for every placeholder of `gm`, from a tensor, tuple or dict of inputs."""
    args, kwargs = normalize_inputs(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(args) > len(placeholders):
        raise PrepareError(
            f"example_inputs has {len(args)} positional values but the model takes {len(placeholders)} "
            f"({', '.join(str(p.target) for p in placeholders)})."
        )
    values: List[Any] = list(args)
    for ph in placeholders[len(args) :]:
        name = str(ph.target).lstrip("*")
        if name in kwargs:
            values.append(kwargs.pop(name))
        elif ph.args:
            values.append(ph.args[0])
        else:
            raise PrepareError(
                f"example_inputs gives no value for the model's argument {name!r}; "
                "pass it positionally or in a dict of keyword arguments."
            )
    if kwargs:
        raise PrepareError(
            f"example_inputs has keyword(s) {sorted(kwargs)} that the model's forward does not take; "
            f"it takes {[str(p.target) for p in placeholders]}."
        )
    return tuple(values)


def propagate_shapes(gm: fx.GraphModule, example_inputs: Inputs) -> None:
    """Run `example_inputs` through `gm`, recording `node.meta["tensor_meta"]` (fx ShapeProp)."""
    args = placeholder_args(gm, example_inputs)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as e:  # noqa: BLE001
        raise PrepareError(
            f"running example_inputs through the captured {type(gm).__name__} failed: {type(e).__name__}: {e}. "
            "Check that example_inputs are what the model's forward expects."
        ) from e
    finally:
        gm.train(was_training)
