"""Capture: turn an unmodified `nn.Module` into a `torch.fx.GraphModule`, and propagate shapes.

Three front ends (`prepare(..., capture=...)`):

- `"symbolic_trace"`: `torch.fx.symbolic_trace` with user leaf modules. Graphs of `F.*`/module calls.
- `"export"`: `torch.export.export(model, args, kwargs, strict=False).module()`, re-wrapped as a plain
  `fx.GraphModule` (so `train()`/`eval()` work). Graphs of aten ops (`aten.linear`, `aten.conv2d`, ...)
  with parameters as `get_attr` nodes at their original paths and `node.meta["nn_module_stack"]`
  naming the user's modules. The model is exported in eval mode (dropout off, BatchNorm on running
  statistics, so BN folds). Hugging Face `transformers` models need this front end; a causal LM whose
  forward would return a key/value cache (`config.use_cache=True`, their default) is captured with
  `use_cache=False` (on fxquant's copy; `gm.fxquant_capture_notes` says so).
- `"symbolic_trace_leaves"`: symbolic trace that keeps every submodule it cannot trace as an opaque
  float call (a leaf) and quantizes the rest; `gm.fxquant_float_modules` says which stayed float and why.

`"auto"` (the default) tries symbolic trace, then torch.export, then the leaf fallback, and keeps the
first that works. This order quantizes the most: export sees through code that symbolic tracing
rejects (most of `transformers`), while the leaf fallback leaves whole submodules float, so it comes last
(for data-dependent control flow, which neither of the others can capture). With user `leaf_modules`,
`"auto"` skips torch.export (it has no leaves) so the user's leaves stay float. When every front end
fails, one `CaptureError` lists what each said and what to do.

Shapes: the captured module, and the ONNX exported from it, accept any batch size (dimension 0 of every
tensor input) and, for token inputs (integer tensors of rank 2: ids, attention masks, position ids), any
sequence length (dimension 1), also when the example has a batch of 1: torch.export specializes sizes 0
and 1, so such dims are exported from the example repeated to size 2 with `Dim.AUTO`. Dims the model's
code fixes (a branch on the batch size, a fixed-length position table) stay at the example's size: the
export is retried with them static (after an error, first the sequence dims, then all), with a warning.
`gm.fxquant_dynamic_shapes` (`InputShapes`) lists what is dynamic (with bounds such as
`max_position_embeddings`) and what stayed static and why; `prepare(..., dynamic=False)` fixes every size.
Symbolic trace fixes no size (the model's own code decides). Other dimensions (image sizes, feature
widths) are always the example's.

This module does not analyze or change the graph; it only captures it and records shapes in
`node.meta["tensor_meta"]`.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import traceback
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx._pytree as fx_pytree
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from fxquant.dynamic_shapes import (
    InputShapes,
    candidate_dims,
    export_with_dynamic_dims,
    first_line,
    program_dims,
)
from fxquant.errors import CaptureError, PrepareError
from fxquant.passes import SHAPES, graph_pass

Inputs = Any
CAPTURES: Tuple[str, ...] = ("auto", "symbolic_trace", "export", "symbolic_trace_leaves")
FLOAT_MODULES_ATTR = "fxquant_float_modules"
"""Attribute on a captured GraphModule: `{module path: why it stayed a float leaf}` (leaf fallback and
user leaves)."""
MAX_AUTO_LEAVES = 64
SHAPES_ATTR = "fxquant_dynamic_shapes"
"""Attribute on a captured GraphModule: the `InputShapes` it accepts (which input dims may take any size)."""
NOTES_ATTR = "fxquant_capture_notes"
"""Attribute on a captured GraphModule: sentences on what the capture changed or could not keep (tuple of str)."""


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
        # on failure the path stays on the stack: its top names the module that failed
        result = super().call_module(m, forward, args, kwargs)
        self.fxq_module_path.pop()
        return result


def set_preserved_attr(gm: fx.GraphModule, name: str, value: Any) -> None:
    """Set a plain attribute on `gm` that survives `copy.deepcopy` (which rebuilds a GraphModule from its
    modules, parameters and buffers and drops other attributes, except those listed in `gm.meta`)."""
    from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY

    setattr(gm, name, value)
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})[name] = value


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
        if where[0]:
            fixes.append("let fxquant keep untraceable submodules float: prepare(..., capture='symbolic_trace_leaves')")
        error = CaptureError(
            f"torch.fx.symbolic_trace failed in {module_desc} at {line}\n"
            f"  error: {type(e).__name__}: {e}\n"
            "  fix: " + "; or ".join(fixes) + "."
        )
        error.fxq_module_path = where[0]
        raise error from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line for line in str(text).splitlines())


def symbolic_trace_with_leaves(
    model: nn.Module, leaf_modules: Sequence[str] = (), max_leaves: int = MAX_AUTO_LEAVES
) -> fx.GraphModule:
    """Symbolic trace that turns each submodule it cannot trace into a float leaf, then retries.

    The innermost module whose `forward` raised becomes a leaf (its whole call stays float; the rest of
    the model is quantized). `gm.fxquant_float_modules` maps each such module path, and each user leaf,
    to the reason.

    Raises:
        CaptureError: the failure is in the top-level `forward` (no submodule to keep float), or more
            than `max_leaves` submodules fail.
    """
    leaves = list(leaf_modules)
    reasons: Dict[str, str] = {name: "leaf_modules (user)" for name in leaf_modules}
    while True:
        try:
            gm = symbolic_trace_model(model, leaves)
            break
        except CaptureError as e:
            path = getattr(e, "fxq_module_path", "")
            if not path or path in leaves or len(leaves) >= max_leaves + len(leaf_modules):
                raise
            cause = e.__cause__
            reasons[path] = f"symbolic_trace failed: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
            leaves.append(path)
    set_preserved_attr(gm, FLOAT_MODULES_ATTR, reasons)
    return gm


@contextlib.contextmanager
def silenced(logger_names: Sequence[str], level: int, stream: str) -> Iterator[None]:
    """Within the block: the named loggers at `level` or above only, warnings ignored, and `stream`
    (`"stdout"` or `"stderr"`) swallowed; logger levels are restored afterwards. Errors still raise."""
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    redirect = contextlib.redirect_stdout if stream == "stdout" else contextlib.redirect_stderr
    try:
        with warnings.catch_warnings(), redirect(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _quiet_torch_logs() -> contextlib.AbstractContextManager[None]:
    """Silence torch.export's warnings, log lines and failure graph dumps (printed to stderr).

    The failure itself is reported in the `CaptureError`; the dumps would bury it.
    """
    names = ["torch"] + [n for n in logging.root.manager.loggerDict if n.startswith("torch.")]
    return silenced(names, logging.CRITICAL, "stderr")


def _without_cache(model: nn.Module, kwargs: Dict[str, Any]) -> Optional[str]:
    """Switch off a Hugging Face model's key/value cache for the capture when its forward would return one.

    Causal LMs default to `config.use_cache=True` and then return a `DynamicCache`, which torch.export
    rejects. Returns the note to record (None: nothing changed); the caller restores `config.use_cache`.
    """
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", None) is not True or "use_cache" in kwargs:
        return None
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    if "use_cache" not in params:
        return None
    config.use_cache = False  # type: ignore[union-attr]
    return (
        f"{type(model).__name__} was captured with use_cache=False (torch.export cannot return its key/value "
        "cache): the prepared module and its ONNX compute the outputs without past_key_values; the model "
        "itself keeps use_cache=True."
    )


def export_model(model: nn.Module, example_inputs: Inputs, dynamic: bool = True) -> fx.GraphModule:
    """Capture with `torch.export.export(model, args, kwargs, strict=False).module()` (aten ops).

    The model is exported in eval mode. With `dynamic`, the batch dimension of every tensor input and the
    sequence dimension of every rank-2 integer input may take any size (`candidate_dims`; size-1 example
    dims are widened to 2 so that torch.export does not specialize them); the dims the model's code fixes
    stay static, and `gm.fxquant_dynamic_shapes` (`InputShapes`) says which are which. A Hugging Face
    model whose forward would return a key/value cache is captured with `use_cache=False` (it is restored
    afterwards); `gm.fxquant_capture_notes` says so. The result is a plain `fx.GraphModule` named after the
    model's class, called like the model (same positional and keyword arguments).

    Raises:
        CaptureError: torch.export failed; the message holds its error and the fixes.
    """
    args, kwargs = normalize_inputs(example_inputs)
    wanted = candidate_dims(model.forward, args, kwargs)
    was_training = model.training
    model.eval()
    config = getattr(model, "config", None)
    cache_note = _without_cache(model, kwargs)

    def export(a: Tuple[Any, ...], kw: Dict[str, Any], spec: Any) -> Any:
        return torch.export.export(model, a, kw, dynamic_shapes=spec, strict=False)

    try:
        with _quiet_torch_logs():
            ep, shapes = export_with_dynamic_dims(
                export, model.forward, args, kwargs, wanted if dynamic else (), program_dims
            )
            exported = ep.module()
    except Exception as e:  # noqa: BLE001
        frame = _user_frame(e)
        line = f" at {frame.filename}:{frame.lineno}: {frame.line}" if frame else ""
        raise CaptureError(
            f"torch.export.export(strict=False) failed{line}\n"
            f"  error: {first_line(e)}\n"
            "  fix: make the failing code export-friendly (no data-dependent Python control flow: use "
            "torch.where/torch.cond), or keep the submodule float: prepare(..., capture='symbolic_trace_leaves')."
        ) from e
    finally:
        model.train(was_training)
        if cache_note is not None:
            config.use_cache = True  # type: ignore[union-attr]
    if not dynamic:
        shapes = InputShapes((), tuple((d, "dynamic=False") for d in wanted))
    # `.module()` gives a _StatefulGraphModule whose train()/eval() raise; a plain GraphModule over the same
    # graph and submodules keeps the calling convention (pytree codegen) and trains normally.
    gm = fx.GraphModule(exported, exported.graph, type(model).__name__)
    gm.train(was_training)
    record_shapes(gm, shapes, [cache_note] if cache_note else [], args, kwargs, warn=dynamic)
    return gm


def record_shapes(
    gm: fx.GraphModule,
    shapes: InputShapes,
    notes: Sequence[str],
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    warn: bool = True,
) -> None:
    """Record on `gm` the `InputShapes` it accepts and the capture notes (both survive `copy.deepcopy`);
    with `warn`, dims that were meant to be dynamic and stayed fixed are also a warning."""
    static = shapes.static_note(args, kwargs) if warn else None
    set_preserved_attr(gm, SHAPES_ATTR, shapes)
    set_preserved_attr(gm, NOTES_ATTR, tuple(notes) + ((static,) if static else ()))
    if static:
        warnings.warn(f"fxquant capture: {static}", stacklevel=5)


def _record_traced(gm: fx.GraphModule, model: nn.Module, example_inputs: Inputs, dynamic: bool) -> fx.GraphModule:
    """Record the `InputShapes` of a symbolic-trace capture: its graph fixes no size, so the candidate dims
    are dynamic (none with `dynamic=False`); nothing without example inputs."""
    if example_inputs is not None:
        args, kwargs = normalize_inputs(example_inputs)
        wanted = candidate_dims(model.forward, args, kwargs)
        shapes = InputShapes(wanted) if dynamic else InputShapes((), tuple((d, "dynamic=False") for d in wanted))
        record_shapes(gm, shapes, (), args, kwargs, warn=False)
    return gm


def capture_model(
    model: nn.Module,
    capture: str = "auto",
    leaf_modules: Sequence[str] = (),
    example_inputs: Inputs = None,
    dynamic: bool = True,
) -> Tuple[fx.GraphModule, str]:
    """Capture `model` with the requested front end; returns the graph module and the front end used.

    Args:
        model: the module to capture (fxquant's own copy; the export front end switches it to eval
            mode while exporting and restores the mode).
        capture: `"auto"`, `"symbolic_trace"`, `"export"` or `"symbolic_trace_leaves"` (module docstring).
        leaf_modules: module paths kept as opaque float calls (symbolic trace front ends only).
        example_inputs: the model's inputs (needed by `"export"` and `"auto"`).
        dynamic: keep the batch and sequence dims dynamic (`candidate_dims`); False fixes every size to
            the example's (the torch.export graph and the ONNX export; a symbolic-trace graph fixes no size).

    Returns:
        `(gm, front_end)` where `front_end` is the name of the front end that succeeded. `gm` records the
        `InputShapes` it accepts (`gm.fxquant_dynamic_shapes`) and notes on the capture
        (`gm.fxquant_capture_notes`).

    Raises:
        PrepareError: unknown `capture`, or `leaf_modules` with `capture="export"`.
        CaptureError: the front end (all of them, for `"auto"`) failed; lists what each said.
    """
    if capture not in CAPTURES:
        raise PrepareError(f"capture={capture!r} is unknown; expected one of {CAPTURES}.")
    if capture == "export" and leaf_modules:
        raise PrepareError(
            f"leaf_modules={list(leaf_modules)} cannot be used with capture='export' (torch.export has no leaf "
            "modules); keep those layers float with overrides instead: QuantConfig(overrides=[('path*', None)])."
        )

    def traced() -> fx.GraphModule:
        gm = symbolic_trace_model(model, leaf_modules)
        if leaf_modules:
            set_preserved_attr(gm, FLOAT_MODULES_ATTR, {name: "leaf_modules (user)" for name in leaf_modules})
        return _record_traced(gm, model, example_inputs, dynamic)

    def with_leaves() -> fx.GraphModule:
        return _record_traced(symbolic_trace_with_leaves(model, leaf_modules), model, example_inputs, dynamic)

    if capture == "symbolic_trace":
        return traced(), "symbolic_trace"
    if capture == "symbolic_trace_leaves":
        return with_leaves(), "symbolic_trace_leaves"
    if capture == "export":
        return export_model(model, example_inputs, dynamic), "export"
    failures: List[Tuple[str, CaptureError]] = []
    try:
        return traced(), "symbolic_trace"
    except CaptureError as e:
        failures.append(("symbolic_trace", e))
    if not leaf_modules:
        try:
            return export_model(model, example_inputs, dynamic), "export"
        except CaptureError as e:
            failures.append(("export", e))
    try:
        return with_leaves(), "symbolic_trace_leaves"
    except CaptureError as e:
        failures.append(("symbolic_trace_leaves", e))
    said = "\n".join(f"- {name}:\n{_indent(str(e))}" for name, e in failures)
    raise CaptureError(
        f"no front end could capture {type(model).__name__} (tried {', '.join(n for n, _ in failures)}):\n{said}\n"
        "What to do: make the failing code traceable (no Python control flow on tensor values; torch.where or "
        "torch.cond instead of `if`), or move it into a submodule so that it can stay float as a leaf, or "
        "quantize the traceable parts separately."
    ) from failures[-1][1]


def placeholder_args(gm: fx.GraphModule, example_inputs: Inputs) -> Tuple[Any, ...]:
    """Positional arguments for every placeholder of `gm`, from a tensor, tuple or dict of inputs.

    For a torch.export graph (pytree calling convention) these are the flattened inputs in the order the
    graph's input spec gives.
    """
    args, kwargs = normalize_inputs(example_inputs)
    in_spec = getattr(gm, "_in_spec", None)
    if in_spec is not None:
        try:
            return tuple(fx_pytree.tree_flatten_spec((args, kwargs), in_spec))
        except Exception as e:  # noqa: BLE001
            raise PrepareError(
                f"example_inputs do not match the inputs the model was exported with ({in_spec}): "
                f"{type(e).__name__}: {e}. Pass the same positional and keyword arguments."
            ) from e
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


@graph_pass(ensures=(SHAPES,), analysis=True)
def propagate_shapes(gm: fx.GraphModule, example_inputs: Inputs) -> fx.GraphModule:
    """Run `example_inputs` through `gm`, recording `node.meta["tensor_meta"]` (fx ShapeProp); returns `gm`."""
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
    return gm
