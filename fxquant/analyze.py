"""Analysis: the FX graph as a `networkx` graph, and annotations of what gets quantized where.

`analyze(gm, number_format, placement)` only writes `node.meta["fxquant"]` (a `NodeAnnotation`); it never changes the graph. It decides:

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

The annotations are the dataclasses of `fxquant.annotations`; the placement rules for joins and integer-kernel
outputs are `fxquant.activation_points`; the last step names the quantizer of every weight, activation edge and
int32 bias, shared and derived ones resolved once (`fxquant.quantizer_names`). The annotations are the whole
plan: insertion passes (`passes/insert.py`) execute them and decide nothing.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import networkx as nx
import torch
from torch import fx, nn

from fxquant.activation_points import (
    ConsumersOf,
    add_output_points,
    add_pooling_points,
    feeds_integer_kernel,
    fixed_bits,
    gated_product,
    join_inputs,
    kernel_only,
    share_join_signs,
)
from fxquant.annotations import (
    META_KEY,
    MODULE_META_KEY,
    ActPoint,
    NodeAnnotation,
    QuantOp,
    TensorInfo,
    is_float_tensor,
    module_stack_path,
    quant_op,
)
from fxquant.config import NumberFormat, Placement, QuantSpec, _check_weight_spec
from fxquant.errors import ConfigError
from fxquant.graph import is_quantizer_path, stored_tensor
from fxquant.op_registry import (
    SIGN_CLAMP,
    SIGN_FOLLOWS,
    SIGN_NONNEGATIVE,
    SIGN_SCALED,
    OpFacts,
    facts_of,
    quantizable_info,
)
from fxquant.passes import ANALYZED, FUNCTIONAL, SHAPES, graph_pass
from fxquant.passes.fold_bn import AFFINE_OF_BATCHNORM
from fxquant.quantizer_names import name_quantizers
from fxquant.tracing import FLOAT_MODULES_ATTR


def _tensor_info(
    gm: fx.GraphModule,
    node: fx.Node,
    memo: Dict[str, bool],
    group_of: Dict[str, int],
    consumers_of: ConsumersOf,
    placement: Placement,
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
                join_group=info.join_group if placement.share_join_scales else None,
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


def _param_of(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The parameter or buffer behind a `get_attr` node, else None."""
    return stored_tensor(gm, node)


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


def _match_override(
    placement: Placement, names: Tuple[str, ...], used: Set[int]
) -> Tuple[bool, Optional[QuantSpec], str]:
    for i, (pattern, spec) in enumerate(placement.overrides):
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


@graph_pass(requires=(FUNCTIONAL, SHAPES), ensures=(ANALYZED,), analysis=True)
def analyze(gm: fx.GraphModule, number_format: NumberFormat, placement: Placement) -> fx.GraphModule:
    """Annotate `gm`'s nodes with `node.meta["fxquant"]` (QuantOp on ops, TensorInfo on producers).

    `number_format` gives each quantized op's specs, `placement` the overrides, first/last bits and the
    quantizers integer kernels need (`QuantConfig.number_format`, `QuantConfig.placement`).

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
            if is_float_tensor(weight):
                input_indices.append(weight_index)
            weight_index = None
        input_indices = [i for i in input_indices if i < len(node.args) and is_float_tensor(node.args[i])]
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

    # a BatchNorm's affine as a depthwise conv (`fold_bn.AFFINE_OF_BATCHNORM`) is not a layer of the model: it is
    # never the first or last layer, and it is quantized for the integer kernel alone (kernel-only specs below)
    affines = {n.name for n in nodes if n.name in ops and AFFINE_OF_BATCHNORM in n.meta}
    weighted = [n for n in weighted if n not in affines]
    weighted_set = set(weighted)
    firsts = {n for n in weighted if not (nx.ancestors(graph, n) & weighted_set)}
    lasts = {n for n in weighted if not (nx.descendants(graph, n) & weighted_set)}

    for node in nodes:
        op = ops.get(node.name)
        if op is None:
            continue
        op.is_first = node.name in firsts
        op.is_last = node.name in lasts
        matched, spec, reason = _match_override(placement, op_names[node.name], used_overrides)
        if matched:
            weight_spec = None if spec is None else _weight_spec_from(spec, f"override for {op.name!r}")
            input_spec = None if spec is None else _act_spec_from(spec)
        elif node.name in affines:
            # one weight per channel, exact on a per-channel grid at any width; its input quantizer exists for the
            # integer kernel alone, as a join's
            weight_spec = kernel_only(placement, number_format.weight)
            input_spec = kernel_only(placement, number_format.activation)
            reason = f"BatchNorm {node.meta[AFFINE_OF_BATCHNORM]} as a depthwise conv (kernel only)"
        else:
            weight_spec = number_format.weight
            input_spec = number_format.activation
            reason = "default"
            if (op.is_first or op.is_last) and placement.first_last_bits is not None:
                bits = placement.first_last_bits
                weight_spec = None if weight_spec is None else fixed_bits(weight_spec, bits)
                input_spec = None if input_spec is None else fixed_bits(input_spec, bits)
                reason = "first layer" if op.is_first else "last layer"
        if not matched and weight_spec is not None and weight_spec.granularity is None:  # the format's default
            weight_spec = weight_spec.replace(granularity="per_channel")
        if op.weight_index is not None and weight_spec is not None:
            if op.channel_axis is None:  # a weight without an output-channel axis has one scale
                weight_spec = weight_spec.replace(granularity="per_tensor", group_size=None)
            _check_group_size(gm, node, op, weight_spec)
        op.weight_spec = weight_spec if op.weight_index is not None else None
        op.input_spec = input_spec if op.input_indices else None
        op.reason = reason
        op.int32_bias = placement.integer_bias and _has_int32_bias(gm, node, op)

    # 2. Activation quantization points of the quantized ops' inputs, per producer.
    consumers_of: ConsumersOf = {}
    for node in nodes:
        op = ops.get(node.name)
        if op is None or op.input_spec is None:
            continue
        for i in op.input_indices:
            producer = node.args[i]
            assert isinstance(producer, fx.Node)
            consumers_of.setdefault(producer.name, []).append((node.name, op.input_spec))
    if placement.quantize_outputs:  # average poolings whose output is quantized pool the codes
        add_pooling_points(nodes, consumers_of, kernel_only(placement, number_format.activation))

    # 3. Joins (add/concat): their inputs are quantized when an integer kernel reads the join's result (or an
    # override names the join); groups of tensors meeting at them.
    joins = {node.name: inputs for node in nodes if (inputs := join_inputs(node))}  # graph order
    gated = {node.name: pair for node in nodes if (pair := gated_product(node))} if placement.quantize_outputs else {}
    join_specs: Dict[str, Optional[QuantSpec]] = {}  # joins, and the gated products of step 4
    # 4. Gated products (`value * sigmoid(z)`, ...) the same way: both inputs and the output quantized (QLinearMul).
    for node in reversed(nodes):  # a join's readers are decided before it
        if node.name not in joins and node.name not in gated:
            continue
        all_names.append(node.name)
        matched, spec, _ = _match_override(placement, (node.name,), used_overrides)
        if matched:
            join_specs[node.name] = None if spec is None else _act_spec_from(spec)
        elif feeds_integer_kernel(node, consumers_of, join_specs):
            join_specs[node.name] = kernel_only(placement, number_format.activation)
        else:
            join_specs[node.name] = None
    join_graph = nx.Graph()
    join_consumers: ConsumersOf = {}
    for join, inputs in joins.items():
        join_spec = join_specs[join]
        for a in inputs:
            join_graph.add_edge(a.name, inputs[0].name)
            if placement.quantize_joins and join_spec is not None:
                join_consumers.setdefault(a.name, []).append((join, join_spec))
    group_of: Dict[str, int] = {}
    for gid, component in enumerate(nx.connected_components(join_graph)):
        for name in component:
            group_of[name] = gid
    for producer, items in join_consumers.items():
        for consumer, spec in items:
            consumers_of.setdefault(producer, []).append((consumer, spec))

    products: Dict[str, QuantSpec] = {}
    for name, (value, gate) in gated.items():
        spec = join_specs.get(name)
        if spec is not None:
            products[name] = spec
            for tensor in (value, gate):
                consumers_of.setdefault(tensor.name, []).append((name, spec))
    if placement.quantize_outputs:
        add_output_points(nodes, ops, consumers_of, placement, products)

    annotations: Dict[str, NodeAnnotation] = {}
    for node in nodes:
        tensor_info: Optional[TensorInfo] = None
        if is_float_tensor(node):
            tensor_info = _tensor_info(gm, node, memo, group_of, consumers_of, placement)
        if tensor_info is not None or node.name in ops:
            annotations[node.name] = NodeAnnotation(op=ops.get(node.name), tensor=tensor_info)
    share_join_signs(annotations.values())
    for node in nodes:
        if node.name in annotations:
            node.meta[META_KEY] = annotations[node.name]
    name_quantizers(gm, nodes)

    unused = [placement.overrides[i][0] for i in range(len(placement.overrides)) if i not in used_overrides]
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
    What it reads (the `QuantOp`s on op nodes, the capture's float modules, the ops themselves) is what
    insertion and freeze leave as they are, so a prepared or frozen module gives the analysed graph's list.
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
