"""Dynamic input shapes: which input dimensions a captured graph (and its ONNX export) accepts at any size.

`candidate_dims` names the dims fxquant keeps dynamic (dimension 0 of every tensor input, dimension 1 of
integer token tensors), `export_with_dynamic_dims` runs a torch.export-like function with as many of them
dynamic as the model's code allows (widening size-1 examples, retrying with fewer dims after a failure), and
`InputShapes` records the outcome. `fxquant.tracing` uses it at capture, `fxquant.export.qdq` at export.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Literal, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.utils._pytree as pytree
from torch.fx.experimental.symbolic_shapes import is_concrete_int

Role = Literal["batch", "sequence"]
BATCH: Role = "batch"
SEQUENCE: Role = "sequence"
InputKeys = Tuple[Union[int, str], ...]
"""Where a tensor sits in `(args, kwargs)`: `(0, i, ...)` or `(1, name, ...)`, then nested indices or keys."""


@dataclass(frozen=True)
class DynamicDim:
    """One dimension of one model input that may take any size.

    Args:
        name: the input as a user reads it (`"input_ids"`, `"x"`, `"args[1]"`, `"x[0]"`).
        keys: where the tensor sits in `(args, kwargs)`: `(0, i, ...)` for positional argument `i`,
            `(1, name, ...)` for a keyword argument, then indices or keys into nested tuples and dicts.
        axis: the dimension.
        role: `"batch"` (dimension 0) or `"sequence"` (dimension 1 of a rank-2 integer tensor: token ids,
            attention masks, position ids).
        max_size: the largest size the captured graph accepts (`None`: no bound), e.g. a transformer's
            `max_position_embeddings`; not part of equality.
    """

    name: str
    keys: InputKeys
    axis: int
    role: Role
    max_size: Optional[int] = field(default=None, compare=False)

    def __str__(self) -> str:
        bound = f", at most {self.max_size}" if self.max_size is not None else ""
        return f"{self.name} dim {self.axis} ({self.role}{bound})"


@dataclass(frozen=True)
class InputShapes:
    """Which input dimensions a captured graph (or an exported ONNX model) accepts at any size.

    `dynamic`: the dims that may change between calls; every other dimension is fixed to the example's
    size. `static`: dims that were asked to be dynamic but stayed fixed, each with the reason.
    """

    dynamic: Tuple[DynamicDim, ...] = ()
    static: Tuple[Tuple[DynamicDim, str], ...] = ()

    def static_note(self, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[str]:
        """One sentence naming the dims that stayed fixed at the size they have in `(args, kwargs)`, and why
        (None when none did)."""
        if not self.static:
            return None
        tensors = {keys: leaf for keys, leaf in input_tensors(args, kwargs) if isinstance(leaf, torch.Tensor)}
        parts = []
        for d, why in self.static:
            t = tensors.get(d.keys)
            size = f"{t.shape[d.axis]}" if t is not None and t.dim() > d.axis else "its example size"
            parts.append(f"{d} is fixed at {size} ({why})")
        return "; ".join(parts) + ". Inputs must have these sizes."


def _keys_of(path: Tuple[Any, ...]) -> Optional[InputKeys]:
    """Plain keys of a pytree path into `(args, kwargs)`; None for containers other than tuples, lists, dicts."""
    keys: List[Union[int, str]] = []
    for entry in path:
        if isinstance(entry, pytree.SequenceKey):
            keys.append(entry.idx)
        elif isinstance(entry, pytree.MappingKey) and isinstance(entry.key, (int, str)):
            keys.append(entry.key)
        else:
            return None
    return tuple(keys)


def _input_name(forward: Any, keys: InputKeys) -> str:
    """How a user names the input at `keys`: its parameter name, then `[i]` / `['k']` into nested values."""
    if keys[0] == 1:
        head = str(keys[1])
    else:
        head = f"args[{keys[1]}]"
        try:
            params = list(inspect.signature(forward).parameters.values())
        except (TypeError, ValueError):
            params = []
        index = int(keys[1])
        if index < len(params) and params[index].kind in (params[index].POSITIONAL_ONLY, params[index].POSITIONAL_OR_KEYWORD):
            head = params[index].name
    return head + "".join(f"[{k!r}]" for k in keys[2:])


def input_tensors(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> List[Tuple[Optional[InputKeys], Any]]:
    """Every leaf of `(args, kwargs)` in the order torch.export flattens them, with its keys (None: a leaf
    inside a container fxquant does not look into)."""
    return [(_keys_of(path), leaf) for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]]


def candidate_dims(forward: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tuple[DynamicDim, ...]:
    """The dims fxquant keeps dynamic: dimension 0 (batch) of every tensor input, and dimension 1
    (sequence) of every integer tensor of rank 2 (token ids, attention masks, position ids)."""
    dims: List[DynamicDim] = []
    for keys, leaf in input_tensors(args, kwargs):
        if keys is None or not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            continue
        name = _input_name(forward, keys)
        dims.append(DynamicDim(name, keys, 0, BATCH))
        if leaf.dim() == 2 and not leaf.is_floating_point() and not leaf.is_complex() and leaf.dtype != torch.bool:
            dims.append(DynamicDim(name, keys, 1, SEQUENCE))
    return tuple(dims)


def _map_inputs(args: Tuple[Any, ...], kwargs: Dict[str, Any], fn: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """`(args, kwargs)` with every leaf replaced by `fn(keys, leaf)`."""
    out = pytree.tree_map_with_path(lambda path, leaf: fn(_keys_of(path), leaf), (args, kwargs))
    return tuple(out[0]), dict(out[1])


def widen_size_one(
    args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: Sequence[DynamicDim]
) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    """The inputs with every dynamic dim of size 1 repeated to size 2.

    torch.export specializes a dimension whose example size is 0 or 1 to that constant, even when it is
    declared dynamic (its "0/1 specialization"); from a size of 2 it keeps it symbolic, and the graph then
    accepts size 1 as well.
    """
    axes: Dict[InputKeys, List[int]] = {}
    for d in dims:
        axes.setdefault(d.keys, []).append(d.axis)

    def widen(keys: Optional[InputKeys], leaf: Any) -> Any:
        if keys is None or not isinstance(leaf, torch.Tensor):
            return leaf
        for axis in axes.get(keys, ()):
            if leaf.shape[axis] == 1:
                leaf = torch.cat([leaf, leaf], dim=axis)
        return leaf

    return _map_inputs(args, kwargs, widen)


def dynamic_shapes_spec(forward: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: Sequence[DynamicDim]) -> Any:
    """torch.export's `dynamic_shapes`, by argument name of `forward`: `Dim.AUTO` at each of `dims`
    (torch.export finds which dims are equal and their bounds), every other dimension static."""
    from torch.export import Dim

    axes: Dict[InputKeys, List[int]] = {}
    for d in dims:
        axes.setdefault(d.keys, []).append(d.axis)

    def spec(keys: Optional[InputKeys], leaf: Any) -> Any:
        if keys is None or not isinstance(leaf, torch.Tensor) or keys not in axes:
            return None
        return {axis: Dim.AUTO for axis in axes[keys]}

    spec_args, spec_kwargs = _map_inputs(args, kwargs, spec)
    return dict(inspect.signature(forward).bind(*spec_args, **spec_kwargs).arguments)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


R = TypeVar("R")


def export_with_dynamic_dims(
    export: Callable[[Tuple[Any, ...], Dict[str, Any], Any], R],
    forward: Any,
    args: Tuple[Any, ...],
    kwargs: Dict[str, Any],
    wanted: Sequence[DynamicDim],
    kept: Callable[[R, Tuple[Any, ...], Dict[str, Any], Sequence[DynamicDim]], Dict[DynamicDim, Optional[int]]],
    give_up: Callable[[BaseException], bool] = lambda e: False,
) -> Tuple[R, InputShapes]:
    """Run `export(args, kwargs, dynamic_shapes)` with as many of `wanted` dynamic as the model allows.

    Size-1 dims are widened to 2 first (`widen_size_one`). `kept(result, args, kwargs, dims)` says which of
    `dims` came out dynamic (each with its upper bound); the others were specialized by the model's code and are
    exported again static at the example's size. When the export raises, it is retried with the sequence
    dims static, then with every dim static; the last error is raised (at once when `give_up(error)`).

    Returns:
        The result of the successful export and the `InputShapes` it accepts.
    """
    dims = list(wanted)
    static: List[Tuple[DynamicDim, str]] = []
    while True:
        try:
            wide_args, wide_kwargs = widen_size_one(args, kwargs, dims)
            spec = dynamic_shapes_spec(forward, wide_args, wide_kwargs, dims) if dims else None
            result = export(wide_args, wide_kwargs, spec)
        except Exception as e:  # noqa: BLE001 - fewer dynamic dims may export; the static attempt raises
            if not dims or give_up(e):
                raise
            drop = [d for d in dims if d.role == SEQUENCE] or dims
            static += [(d, f"the export failed with it dynamic: {first_line(e)[:200]}") for d in drop]
            dims = [d for d in dims if d not in drop]
            continue
        bounds = kept(result, args, kwargs, dims) if dims else {}
        fixed = [d for d in dims if d not in bounds]
        if not fixed:
            dynamic = tuple(dataclasses.replace(d, max_size=bounds[d]) for d in dims)
            return result, InputShapes(dynamic, tuple(static))
        static += [(d, "the model's code fixes its size") for d in fixed]
        dims = [d for d in dims if d not in fixed]


def program_dims(ep: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], dims: Sequence[DynamicDim]) -> Dict[DynamicDim, Optional[int]]:
    """Which of `dims` the ExportedProgram `ep` kept symbolic, with the upper bound of each (None: none)."""
    from torch.export.graph_signature import InputKind

    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    leaves = input_tensors(args, kwargs)
    if len(names) != len(leaves):  # cannot pair inputs with placeholders: trust the request
        return {d: None for d in dims}
    vals = {keys: nodes[name].meta.get("val") if name in nodes else None for (keys, _), name in zip(leaves, names)}
    out: Dict[DynamicDim, Optional[int]] = {}
    for d in dims:
        val = vals.get(d.keys)
        size = val.shape[d.axis] if isinstance(val, torch.Tensor) and val.dim() > d.axis else None
        if isinstance(size, torch.SymInt) and not is_concrete_int(size):  # a SymInt may hold a constant
            vr = ep.range_constraints.get(size.node.expr)
            upper = getattr(vr, "upper", None)
            out[d] = int(upper) if getattr(upper, "is_Integer", False) else None  # int_oo: no bound
    return out
