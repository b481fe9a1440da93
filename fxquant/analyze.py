"""Analysis: the FX graph as a `networkx` graph, and annotations of what gets quantized where.

`analyze(gm, config)` only writes `node.meta["fxquant"]` (a `NodeAnnotation`); it never changes the graph. It decides:

- which ops are quantized (conv 1d/2d/3d, conv-transpose, linear, matmul/bmm/mm, embedding, as module
  calls already turned into functional calls by `functionalize_modules`, or user functional calls) and
  the spec of each op's weight and input quantizers (overrides, first/last layer, defaults);
- activation quantization points: one per producer tensor (shared by all its quantized consumers with the
  same spec), at the inputs of quantized ops, with `quantize_joins` at the inputs of add/concat, and with
  `quantize_outputs` at the output (after a directly following ReLU) of each conv with quantized input;
- the sign of each tensor: provably non-negative when produced by ReLU, ReLU6, sigmoid, softmax, ... or
  by shape-only ops of such tensors (found on the graph, never by module order or names);
- groups of tensors that meet at add/concat joins (connected components on the networkx graph);
- first and last quantized layers (no quantized layer before / after them in the graph).

Insertion passes read these annotations (`passes/insert.py`).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

import networkx as nx
import torch
from torch import fx, nn

from fxquant.config import QuantConfig, QuantSpec, _check_weight_spec
from fxquant.errors import ConfigError
from fxquant.graph import is_quantizer_path, stored_tensor
from fxquant.op_registry import SIGN_CLAMP, SIGN_FOLLOWS, SIGN_NONNEGATIVE, SIGN_SCALED, OpFacts, facts_of
from fxquant.passes import ANALYZED, FUNCTIONAL, SHAPES, graph_pass
from fxquant.tracing import FLOAT_MODULES_ATTR

META_KEY = "fxquant"
MODULE_META_KEY = "fxquant_module"
"""`node.meta` key set by `functionalize_modules`: the module path a functional op came from."""


@dataclass
class QuantOp:
    """Annotation of a quantized op node.

    Attributes:
        kind: "conv", "conv_transpose", "linear", "matmul" or "embedding".
        name: the user-facing name (module path, else node name).
        weight_index: position of the weight parameter in `node.args` (None: no parameter weight).
        weight_spec: spec of its weight quantizer (None: weight float).
        channel_axis, block_axis: output-channel and input (block) axes of the weight.
        input_indices: positions of activation inputs in `node.args` that are quantized.
        input_spec: spec of the input quantizers (None: inputs float).
        is_first, is_last: first / last quantized layer.
        reason: why this spec ("default", "override 'glob'", "first layer", ...).
        int32_bias: its stored bias is rounded to the int32 grid `s_x * s_w` (a `BiasQuantizer`): the op adds
            its bias in int32 in integer kernels, `QuantConfig(integer_bias=True)`, and its input (per tensor)
            and weight (per tensor or channel) are quantized.

    Every spec is resolved here (granularity included), so insertion builds quantizers without deciding.
    """

    kind: str
    name: str
    weight_index: Optional[int]
    weight_spec: Optional[QuantSpec]
    channel_axis: Optional[int]
    block_axis: Optional[int]
    input_indices: Tuple[int, ...]
    input_spec: Optional[QuantSpec]
    is_first: bool = False
    is_last: bool = False
    reason: str = "default"
    int32_bias: bool = False


@dataclass
class ActPoint:
    """One activation quantizer to insert after a producer node, serving `consumers`.

    `spec` is resolved (per tensor); `nonnegative` is the sign of the quantizer, which for a quantizer shared
    by a join group (`join_group`, with `QuantConfig(share_join_scales=True)`) holds for every member.
    """

    consumers: Tuple[str, ...]
    spec: QuantSpec
    nonnegative: bool
    join_group: Optional[int] = None


@dataclass
class TensorInfo:
    """Annotation of a tensor-producing node: sign, join group, and quantizers to insert after it."""

    nonnegative: bool = False
    join_group: Optional[int] = None
    points: List[ActPoint] = field(default_factory=list)


@dataclass
class NodeAnnotation:
    """What analysis wrote on one node: `node.meta["fxquant"]`."""

    op: Optional[QuantOp] = None
    tensor: Optional[TensorInfo] = None


def _tensor_info(
    gm: fx.GraphModule,
    node: fx.Node,
    memo: Dict[str, bool],
    group_of: Dict[str, int],
    consumers_of: Dict[str, List[Tuple[str, QuantSpec]]],
    config: QuantConfig,
) -> TensorInfo:
    info = TensorInfo(nonnegative=_is_nonnegative(gm, node, memo), join_group=group_of.get(node.name))
    items = consumers_of.get(node.name, [])
    specs: List[QuantSpec] = []
    for _, spec in items:
        if spec not in specs:
            specs.append(spec)
    for spec in specs:
        consumers = tuple(dict.fromkeys(c for c, s in items if s == spec))
        info.points.append(
            ActPoint(
                consumers=consumers,
                spec=spec if spec.granularity is not None else spec.replace(granularity="per_tensor"),
                nonnegative=info.nonnegative,
                join_group=info.join_group if config.share_join_scales else None,
            )
        )
    return info


def to_networkx(gm: fx.GraphModule) -> "nx.DiGraph":
    """The FX graph as a `networkx.DiGraph`: one node per FX node (by name), edges producer -> user.

    Node attributes: `op`, `target` (as a string), `fxquant` (the annotation, if any), `module` (the
    originating module path if known), and `shape` (from shape propagation, if run).
    """
    g = nx.DiGraph()
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        shape = tuple(tm.shape) if hasattr(tm, "shape") else None
        g.add_node(
            node.name,
            op=node.op,
            target=_target_name(node),
            fxquant=node.meta.get(META_KEY),
            module=node.meta.get(MODULE_META_KEY),
            shape=shape,
        )
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", str(t))


def quantizable_info(node: fx.Node) -> Optional[OpFacts]:
    """The registry entry of a node if fxquant quantizes that op (`OpFacts.kind` set), else None."""
    facts = facts_of(node)
    return facts if facts is not None and facts.kind is not None else None


def _param_of(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The parameter or buffer behind a `get_attr` node, else None."""
    return stored_tensor(gm, node)


def _is_float_tensor(node: Any) -> bool:
    if not isinstance(node, fx.Node):
        return False
    dtype = getattr(node.meta.get("tensor_meta"), "dtype", None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


def module_stack_path(node: fx.Node) -> str:
    """The path of the innermost user module a node was recorded in (`nn_module_stack`), or ""."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path)


def _names_of(gm: fx.GraphModule, node: fx.Node, weight: Any) -> Tuple[str, ...]:
    """Candidate names for override matching: module path, weight owner, node name.

    For aten ops (torch.export graphs) the module path comes from `nn_module_stack`: a weighted op is
    named by the module that called it (`encoder.layer.0.attention.self.query`, also for tied weights),
    an op without weight by that module's path and the node name (`...attention.self.matmul_1`).
    """
    names: List[str] = []
    module = node.meta.get(MODULE_META_KEY)
    if not module and isinstance(node.target, torch._ops.OpOverload):
        path = module_stack_path(node)
        if path and isinstance(weight, fx.Node):
            module = path
        elif path:
            module = f"{path}.{node.name}"
    if module:
        names.append(module)
    if isinstance(weight, fx.Node) and weight.op == "get_attr":
        owner = str(weight.target).rpartition(".")[0]
        if owner and owner not in names:
            names.append(owner)
        names.append(str(weight.target))
    names.append(node.name)
    return tuple(names)


def _weight_axes(kind: str, weight_index: int, rank: int) -> Tuple[int, Optional[int]]:
    """Output-channel axis and input (block) axis of a weight of the given rank."""
    if kind == "conv_transpose":
        return 1, 0
    if kind == "matmul":
        if rank < 2:
            return 0, None
        if weight_index == 1:  # x @ W, W is (..., K, N): channels are N
            return rank - 1, rank - 2
        return rank - 2, rank - 1  # W @ x, W is (..., M, K)
    return 0, (1 if rank > 1 else None)


def _lower_bound(facts: OpFacts, node: fx.Node) -> Any:
    """The lower bound of a clamp-like op: its `min`/`min_val` argument, or a Hardtanh module's `min_val`."""
    if node.op == "call_module":
        return getattr(node.graph.owning_module.get_submodule(str(node.target)), "min_val", None)  # type: ignore[union-attr]
    return facts.argument(node, "min", facts.argument(node, "min_val"))


def _is_nonnegative(gm: fx.GraphModule, node: fx.Node, memo: Dict[str, bool]) -> bool:
    """Whether `node`'s output is provably >= 0, from the ops on the graph and their registry sign rules."""
    if node.name in memo:
        return memo[node.name]
    memo[node.name] = False  # cycles cannot happen in a DAG, but be safe while recursing
    facts = facts_of(node)
    tensor_inputs = [a for a in node.args if isinstance(a, fx.Node)]
    for a in node.args:
        if isinstance(a, (list, tuple)):
            tensor_inputs.extend(x for x in a if isinstance(x, fx.Node))
    if node.op == "call_module":
        tensor_inputs = tensor_inputs[:1]  # a module's first argument is its input

    def all_inputs_nonneg() -> bool:
        return bool(tensor_inputs) and all(_is_nonnegative(gm, a, memo) for a in tensor_inputs)

    result = False
    if facts is None:
        pass  # an op the registry does not know: nothing is known about its sign
    elif facts.sign == SIGN_NONNEGATIVE:
        result = True
    elif facts.sign == SIGN_CLAMP:
        low = _lower_bound(facts, node)
        result = (isinstance(low, (int, float)) and low >= 0) or all_inputs_nonneg()
    elif facts.sign == SIGN_SCALED:
        scalars = [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
        result = all(c >= 0 for c in scalars) and all_inputs_nonneg()
    elif facts.sign == SIGN_FOLLOWS:
        result = all_inputs_nonneg()
    memo[node.name] = result
    return result


def _join_inputs(node: fx.Node) -> List[fx.Node]:
    """Float tensor inputs of an add/concat join computed by the graph (not constants), if >= 2."""
    facts = facts_of(node)
    if facts is None or facts.join is None or node.op == "call_module":
        return []
    candidates: List[Any] = []
    if facts.join == "cat":
        seq = facts.argument(node, "tensors", ())
        candidates = list(seq) if isinstance(seq, (list, tuple)) else []
    else:
        candidates = list(node.args[:2])
    inputs = [c for c in candidates if _is_float_tensor(c) and c.op != "get_attr"]
    unique = list(dict.fromkeys(inputs))
    return unique if len(unique) >= 2 else []


def _match_override(
    config: QuantConfig, names: Tuple[str, ...], used: Set[int]
) -> Tuple[bool, Optional[QuantSpec], str]:
    for i, (pattern, spec) in enumerate(config.overrides):
        if any(fnmatch.fnmatchcase(n, pattern) for n in names):
            used.add(i)
            return True, spec, f"override {pattern!r}"
    return False, None, ""


def _weight_spec_from(spec: QuantSpec, where: str) -> QuantSpec:
    if spec.granularity is None:
        spec = spec.replace(granularity="per_channel")
    _check_weight_spec(where, spec)
    return spec


def _act_spec_from(spec: QuantSpec) -> QuantSpec:
    # Activation quantizers are per tensor; an override's weight granularity does not apply to them.
    return spec.replace(granularity="per_tensor", group_size=None, per_group_bits=False)


def _fixed(spec: QuantSpec, bits: int) -> QuantSpec:
    return spec.replace(
        bits=bits, min_bits=min(spec.min_bits, bits), max_bits=max(spec.max_bits, bits), learn_bits=False
    )


@graph_pass(requires=(FUNCTIONAL, SHAPES), ensures=(ANALYZED,), analysis=True)
def analyze(gm: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    """Annotate `gm`'s nodes with `node.meta["fxquant"]` (QuantOp on ops, TensorInfo on producers).

    Runs on a graph after `functionalize_modules` and shape propagation. Changes no node, edge or module.

    Raises:
        ConfigError: an override glob matches no quantizable op or join (with the available names), or a
            per-group weight whose input axis is not divisible by `group_size`.
    """
    nodes = list(gm.graph.nodes)
    for node in nodes:
        node.meta.pop(META_KEY, None)
    graph = to_networkx(gm)
    memo: Dict[str, bool] = {}
    used_overrides: Set[int] = set()
    all_names: List[str] = []

    # 1. Quantized ops and their specs.
    ops: Dict[str, QuantOp] = {}
    op_names: Dict[str, Tuple[str, ...]] = {}  # override/report names of each op
    weighted: List[str] = []
    for node in nodes:
        info = quantizable_info(node)
        if info is None or info.kind is None:
            continue
        kind: str = info.kind
        weight_index = info.weight_index
        input_indices = list(info.input_indices)
        if info.kind == "matmul":
            weight_index = None
            for i in info.input_indices:
                if i < len(node.args) and _param_of(gm, node.args[i]) is not None:
                    weight_index = i
                    input_indices.remove(i)
                    break
        weight = node.args[weight_index] if weight_index is not None and weight_index < len(node.args) else None
        if weight_index is not None and _param_of(gm, weight) is None:
            # A computed weight has no stored value to freeze: quantize it as an activation input.
            if _is_float_tensor(weight):
                input_indices.append(weight_index)
            weight_index = None
        input_indices = [i for i in input_indices if i < len(node.args) and _is_float_tensor(node.args[i])]
        names = _names_of(gm, node, weight if weight_index is not None else None)
        op_names[node.name] = names
        all_names.extend(names)
        channel_axis: Optional[int] = None
        block_axis: Optional[int] = None
        if weight_index is not None:
            param = _param_of(gm, weight)
            assert param is not None
            right = info.kind == "matmul" and weight_index == info.input_indices[-1]
            position = (1 if right else 0) if info.kind == "matmul" else weight_index
            channel_axis, block_axis = _weight_axes(kind, position, param.dim())
            weighted.append(node.name)
        ops[node.name] = QuantOp(
            kind=kind,
            name=names[0],
            weight_index=weight_index,
            weight_spec=None,
            channel_axis=channel_axis,
            block_axis=block_axis,
            input_indices=tuple(input_indices),
            input_spec=None,
        )

    weighted_set = set(weighted)
    firsts = {n for n in weighted if not (nx.ancestors(graph, n) & weighted_set)}
    lasts = {n for n in weighted if not (nx.descendants(graph, n) & weighted_set)}

    for node in nodes:
        op = ops.get(node.name)
        if op is None:
            continue
        op.is_first = node.name in firsts
        op.is_last = node.name in lasts
        matched, spec, reason = _match_override(config, op_names[node.name], used_overrides)
        if matched:
            weight_spec = None if spec is None else _weight_spec_from(spec, f"override for {op.name!r}")
            input_spec = None if spec is None else _act_spec_from(spec)
        else:
            weight_spec = config.weight
            input_spec = config.activation
            reason = "default"
            if (op.is_first or op.is_last) and config.first_last_bits is not None:
                bits = config.first_last_bits
                weight_spec = None if weight_spec is None else _fixed(weight_spec, bits)
                input_spec = None if input_spec is None else _fixed(input_spec, bits)
                reason = "first layer" if op.is_first else "last layer"
            if weight_spec is not None and weight_spec.granularity is None:
                weight_spec = weight_spec.replace(granularity="per_channel")
        if op.weight_index is not None and weight_spec is not None:
            if op.channel_axis is None:  # a weight without an output-channel axis has one scale
                weight_spec = weight_spec.replace(granularity="per_tensor", group_size=None)
            _check_group_size(gm, node, op, weight_spec)
        op.weight_spec = weight_spec if op.weight_index is not None else None
        op.input_spec = input_spec if op.input_indices else None
        op.reason = reason
        op.int32_bias = config.integer_bias and _has_int32_bias(gm, node, op)

    # 2. Activation quantization points of the quantized ops' inputs, per producer.
    consumers_of: Dict[str, List[Tuple[str, QuantSpec]]] = {}
    for node in nodes:
        op = ops.get(node.name)
        if op is None or op.input_spec is None:
            continue
        for i in op.input_indices:
            producer = node.args[i]
            assert isinstance(producer, fx.Node)
            consumers_of.setdefault(producer.name, []).append((node.name, op.input_spec))

    # 3. Joins (add/concat): their inputs are quantized when an integer kernel reads the join's result (or an
    # override names the join); groups of tensors meeting at them.
    join_specs: Dict[str, Optional[QuantSpec]] = {}
    integer_joins: Set[str] = set()
    for node in reversed(nodes):  # a join's readers are decided before it
        if not _join_inputs(node):
            continue
        all_names.append(node.name)
        matched, spec, _ = _match_override(config, (node.name,), used_overrides)
        if matched:
            join_specs[node.name] = None if spec is None else _act_spec_from(spec)
        elif _feeds_integer_kernel(node, consumers_of, integer_joins):
            join_specs[node.name] = _kernel_only(config, config.activation)
        else:
            join_specs[node.name] = None
        if join_specs[node.name] is not None:
            integer_joins.add(node.name)
    join_graph = nx.Graph()
    join_consumers: Dict[str, List[Tuple[str, QuantSpec]]] = {}
    for node in nodes:
        inputs = _join_inputs(node)
        join_spec = join_specs.get(node.name)
        for a in inputs:
            join_graph.add_edge(a.name, inputs[0].name)
            if config.quantize_joins and join_spec is not None:
                join_consumers.setdefault(a.name, []).append((node.name, join_spec))
    group_of: Dict[str, int] = {}
    for gid, component in enumerate(nx.connected_components(join_graph)):
        for name in component:
            group_of[name] = gid
    for producer, items in join_consumers.items():
        for consumer, spec in items:
            consumers_of.setdefault(producer, []).append((consumer, spec))

    if config.quantize_outputs:
        _add_output_points(nodes, ops, consumers_of, config)

    annotations: Dict[str, NodeAnnotation] = {}
    for node in nodes:
        tensor_info: Optional[TensorInfo] = None
        if _is_float_tensor(node):
            tensor_info = _tensor_info(gm, node, memo, group_of, consumers_of, config)
        if tensor_info is not None or node.name in ops:
            annotations[node.name] = NodeAnnotation(op=ops.get(node.name), tensor=tensor_info)
    _share_join_signs(annotations.values())
    for node in nodes:
        if node.name in annotations:
            node.meta[META_KEY] = annotations[node.name]

    unused = [config.overrides[i][0] for i in range(len(config.overrides)) if i not in used_overrides]
    if unused:
        pattern = unused[0]
        close = difflib.get_close_matches(pattern, sorted(set(all_names)), n=3, cutoff=0.3)
        hint = f" Did you mean {close}?" if close else ""
        available = sorted(set(all_names))
        raise ConfigError(
            f"override glob {pattern!r} matches no quantizable op or join in the model.{hint} "
            f"Names it can match: {available[:20]}{' ...' if len(available) > 20 else ''}."
        )
    return gm


def _has_int32_bias(gm: fx.GraphModule, node: fx.Node, op: QuantOp) -> bool:
    """Whether integer kernels add `node`'s stored bias in int32 on `s_x * s_w`: its input is quantized (per
    tensor) and its weight per tensor or per channel."""
    facts = quantizable_info(node)
    if facts is None or not facts.int32_bias or op.weight_spec is None or op.input_spec is None:
        return False
    if op.weight_spec.granularity == "per_group":
        return False
    x_node, bias_node = facts.argument(node, "input"), facts.argument(node, "bias")
    input_quantized = any(i < len(node.args) and node.args[i] is x_node for i in op.input_indices)
    stored = isinstance(bias_node, fx.Node) and bias_node.op == "get_attr" and _param_of(gm, bias_node) is not None
    return input_quantized and stored


def _share_join_signs(annotations: Iterable[NodeAnnotation]) -> None:
    """One sign per quantizer shared by a join group: non-negative only if every member it reads is."""
    points = [p for a in annotations if a.tensor is not None for p in a.tensor.points if p.join_group is not None]
    group_nonneg: Dict[Tuple[int, QuantSpec], bool] = {}
    for point in points:
        assert point.join_group is not None
        key = (point.join_group, point.spec)
        group_nonneg[key] = group_nonneg.get(key, True) and point.nonnegative
    for point in points:
        assert point.join_group is not None
        point.nonnegative = group_nonneg[(point.join_group, point.spec)]


def _is_fused_activation(node: fx.Node) -> bool:
    """ReLU/ReLU6/clamp: runtimes fold it into the integer op before a QuantizeLinear."""
    facts = facts_of(node)
    return facts is not None and facts.fused_activation


def _is_layout(node: fx.Node) -> bool:
    """Ops that runtimes move a QuantizeLinear across: shape-only functions and methods (reshape, transpose,
    ...; not modules), and max pooling (functions or modules: it selects values, `OpFacts.selects_values`)."""
    facts = facts_of(node)
    if facts is None:
        return False
    return facts.selects_values or (node.op != "call_module" and facts.layout_only)


def _through_layout(node: fx.Node) -> fx.Node:
    """The end of the chain of single-reader shape-only (or max pooling) ops that starts after `node`
    (`node` if none)."""
    while len(node.users) == 1 and _is_layout(next(iter(node.users))):
        node = next(iter(node.users))
    return node


def _feeds_integer_kernel(join: fx.Node, op_inputs: Dict[str, List[Tuple[str, QuantSpec]]], integer_joins: Set[str]) -> bool:
    """Whether the result of `join` reaches, through ReLU-like activations and shape-only ops, a quantized op's
    input (`op_inputs`: the inputs quantized ops quantize, by producer) or another join in `integer_joins`.

    Only then can a runtime run the join as an integer kernel (QLinearAdd/QLinearConcat between quantized
    tensors). A join read by float ops (the residual add before a transformer's LayerNorm, the inner add of a
    tanh GELU) stays float: quantizing its inputs adds Q/DQ pairs, costs accuracy, and hides the float
    pattern from onnxruntime's fusions (docs/decisions.md, "Joins an integer kernel reads")."""
    frontier, seen = [join], {join.name}
    while frontier:
        tensor = frontier.pop()
        if tensor.name in op_inputs:
            return True
        for reader in tensor.users:
            if reader.name in integer_joins:
                return True
            if reader.name not in seen and (_is_fused_activation(reader) or _is_layout(reader)):
                seen.add(reader.name)
                frontier.append(reader)
    return False


def _quantized_after_layout(node: fx.Node, consumers_of: Dict[str, List[Tuple[str, QuantSpec]]]) -> bool:
    """`node` starts a chain of single-reader shape-only ops whose result is quantized for all its readers."""
    if not _is_layout(node):
        return False
    node = _through_layout(node)
    served = {c for c, _ in consumers_of.get(node.name, [])}
    return bool(node.users) and all(r.name in served for r in node.users)


def _kernel_only(config: QuantConfig, spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
    """The spec of a quantizer that serves only integer kernels (join inputs, conv outputs): fixed at
    `config.join_bits` (the width those kernels compute in) or the spec's own initial bits if more, or `spec`
    itself when `join_bits` is None."""
    if spec is None or config.join_bits is None:
        return spec
    return _fixed(spec, max(config.join_bits, spec.bits))


def _add_output_points(
    nodes: List[fx.Node], ops: Dict[str, QuantOp], consumers_of: Dict[str, List[Tuple[str, QuantSpec]]],
    config: QuantConfig,
) -> None:
    """Quantize the output of each conv with quantized input for all its readers (`quantize_outputs`).

    The tensor is the op's output, followed through a ReLU/ReLU6/clamp that is its only reader and then
    through single-reader shape-only ops (runtimes fold the activation and move the QuantizeLinear across
    reshapes). Readers already served keep their quantizer; the others get one with the op's input spec
    fixed at `config.join_bits` (`_kernel_only`). Tensors the graph returns, and the inputs of ops kept
    float (override `None`), stay float.
    """
    for node in nodes:
        op = ops.get(node.name)
        facts = quantizable_info(node)
        if op is None or facts is None or not facts.output_quantized or op.input_spec is None or not _is_float_tensor(node):
            continue
        out = node
        if len(out.users) == 1 and _is_fused_activation(next(iter(out.users))):
            out = next(iter(out.users))
        out = _through_layout(out)
        readers = list(out.users)
        if not readers or any(r.op == "output" for r in readers):
            continue
        served = {c for c, _ in consumers_of.get(out.name, [])}
        for reader in readers:
            kept_float = reader.name in ops and ops[reader.name].input_spec is None  # e.g. an override None
            if reader.name not in served and not kept_float and not _quantized_after_layout(reader, consumers_of):
                spec = _kernel_only(config, op.input_spec)
                assert spec is not None
                consumers_of.setdefault(out.name, []).append((reader.name, spec))


def _check_group_size(gm: fx.GraphModule, node: fx.Node, op: QuantOp, spec: QuantSpec) -> None:
    if spec.granularity != "per_group":
        return
    param = _param_of(gm, node.args[op.weight_index])  # type: ignore[index]
    assert param is not None
    if op.block_axis is None:
        raise ConfigError(
            f"weight of {op.name!r} (shape {tuple(param.shape)}) has no input axis to split into groups; "
            "use granularity='per_channel' for it with an override."
        )
    size = param.shape[op.block_axis]
    if size % spec.group_size:  # type: ignore[operator]
        raise ConfigError(
            f"weight of {op.name!r} has {size} inputs along axis {op.block_axis}, not divisible by "
            f"group_size={spec.group_size}; pick a divisor of {size} or override this layer."
        )


def tensor_info(node: fx.Node) -> Optional[TensorInfo]:
    """The TensorInfo annotation of a node, if analysis wrote one."""
    value = node.meta.get(META_KEY)
    return value.tensor if isinstance(value, NodeAnnotation) else None


def quant_op(node: fx.Node) -> Optional[QuantOp]:
    """The QuantOp annotation of a node, if it is a quantized op."""
    value = node.meta.get(META_KEY)
    return value.op if isinstance(value, NodeAnnotation) else None


@dataclass(frozen=True)
class FloatOp:
    """An op or module that stays float in a prepared or frozen module, and why (for `fxq.report`)."""

    name: str
    op: str
    reason: str


def _reads_weight(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` reads a parameter of rank >= 2 directly (also inside list arguments)."""
    stack: List[Any] = list(node.args) + list(node.kwargs.values())
    while stack:
        a = stack.pop()
        if isinstance(a, (list, tuple)):
            stack.extend(a)
        elif isinstance(a, fx.Node) and a.op == "get_attr":
            value = _param_of(gm, a)
            if isinstance(value, nn.Parameter) and value.dim() >= 2:
                return True
    return False


def kept_float(gm: fx.GraphModule) -> List[FloatOp]:
    """Ops and modules of a prepared or frozen module that compute in float although they could matter.

    Lists: submodules kept as float leaves at capture (untraceable code, user `leaf_modules`); quantizable
    ops an override keeps float; modules and ops that hold weights fxquant does not quantize (LSTM, GRU,
    MultiheadAttention modules, aten.lstm, ...); fused attention and einsum kernels. Normalisation layers
    (float by design) and weight-free elementwise ops are not listed. Reads the graph; changes nothing.
    """
    leaves: Dict[str, str] = dict(getattr(gm, FLOAT_MODULES_ATTR, {}) or {})
    out = [FloatOp(path, "module", reason) for path, reason in leaves.items()]
    for node in gm.graph.nodes:
        op = quant_op(node)
        if op is not None:
            if op.weight_spec is None and op.input_spec is None:
                out.append(FloatOp(op.name, _target_name(node), f"kept float by {op.reason}"))
            continue
        if node.op == "call_module":
            target = str(node.target)
            if is_quantizer_path(target) or target in leaves:
                continue
            mod = gm.get_submodule(target)
            facts = facts_of(node)
            if any(True for _ in mod.parameters()) and not (facts is not None and facts.float_by_design):
                reason = facts.float_reason if facts is not None and facts.float_reason else "module type not quantized by fxquant"
                out.append(FloatOp(target, type(mod).__name__, reason))
        elif node.op == "call_function":
            name = _names_of(gm, node, None)[0]
            facts = facts_of(node)
            if facts is not None and facts.float_reason:
                out.append(FloatOp(name, _target_name(node), facts.float_reason))
            elif not (facts is not None and facts.float_by_design) and _reads_weight(gm, node):
                out.append(FloatOp(name, _target_name(node), "op with weights not quantized by fxquant"))
    return out
