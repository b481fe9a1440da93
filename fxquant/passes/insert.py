"""Passes that put learnable quantizers into the graph, from the annotations written by `analyze`.

- `insert_weight_quantizers`: `get_attr weight -> call_module quantizer -> op`; one quantizer per
  parameter (tied weights share it), initialised to the weight's per-group absolute maximum.
- `insert_activation_quantizers`: `producer -> call_module quantizer -> consumers`; one quantizer per
  analysis `ActPoint` (shared by every consumer of that tensor with the same spec, and by a whole join
  group when scales are shared at joins).
- `insert_bias_quantizers`: `get_attr bias -> call_module BiasQuantizer -> op` for conv/linear ops whose
  input (per tensor) and weight (per tensor/channel) are quantized: the int32 bias on `s_x * s_w`, in
  eval and (straight-through) in training.

Quantizer modules live in the container of `fxquant.graph` (`gm.fxq_quantizers`); call_module targets
are `fxq_quantizers.<name>`.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

from torch import fx, nn

from fxquant.annotations import ActPoint, quant_op, tensor_info
from fxquant.config import EstimatorChoice, QuantSpec
from fxquant.graph import quantizer_container, quantizer_name, quantizer_target, stored_tensor
from fxquant.op_registry import facts_of
from fxquant.passes import ACTIVATIONS_QUANTIZED, ANALYZED, BIASES_QUANTIZED, SHAPES, WEIGHTS_QUANTIZED, graph_pass
from fxquant.quantizer import KIND_ACTIVATION, KIND_WEIGHT, BiasQuantizer, LearnableQuantizer


def _safe_name(name: str, taken: nn.ModuleDict) -> str:
    base = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    candidate, i = base, 1
    while candidate in taken:
        i += 1
        candidate = f"{base}_{i}"
    return candidate


def _quantizer_call(graph: fx.Graph, name: str, source: fx.Node) -> fx.Node:
    """A call of quantizer `name` on `source` (at the graph's insertion point), with `source`'s shape: a
    quantizer keeps the shape and dtype of what it reads, so the module keeps its `SHAPES` property."""
    node = graph.call_module(quantizer_target(name), (source,))
    if "tensor_meta" in source.meta:
        node.meta["tensor_meta"] = source.meta["tensor_meta"]
    return node


def _learnable(module: nn.Module) -> LearnableQuantizer:
    """A quantizer fetched back from the container (always a `LearnableQuantizer` before freeze)."""
    if not isinstance(module, LearnableQuantizer):
        raise TypeError(f"expected a LearnableQuantizer in the container, found {type(module).__name__}")
    return module


def _make_quantizer(
    spec: QuantSpec, estimator: EstimatorChoice, kind: str, shape: Tuple[int, ...], served: Tuple[str, ...], *,
    channel_axis: Optional[int] = None, block_axis: Optional[int] = None, nonnegative: bool = False,
) -> LearnableQuantizer:
    """The quantizer of an annotation's resolved `spec` (analysis decided granularity and sign)."""
    granularity = spec.granularity
    if granularity is None:
        raise AssertionError(f"analysis left the granularity of the quantizer serving {served} unresolved")
    return LearnableQuantizer(
        kind=kind,
        tensor_shape=shape,
        bits=spec.bits,
        min_bits=spec.min_bits,
        max_bits=spec.max_bits,
        granularity=granularity,
        channel_axis=channel_axis if granularity != "per_tensor" else None,
        block_axis=block_axis,
        group_size=spec.group_size,
        per_group_bits=spec.per_group_bits,
        learn_bits=spec.learn_bits,
        learn_clamps=spec.learn_clamps,
        mode=estimator.mode,
        noise=estimator.noise,
        symmetric=kind == KIND_WEIGHT,
        nonnegative=nonnegative,
        served=served,
    )


@graph_pass(requires=(ANALYZED, SHAPES), ensures=(WEIGHTS_QUANTIZED,))
def insert_weight_quantizers(gm: fx.GraphModule, *, estimator: EstimatorChoice) -> fx.GraphModule:
    """Insert a weight quantizer between each annotated op and its weight parameter (training with
    `estimator` until `finetune(mode=...)` picks another)."""
    container = quantizer_container(gm)
    by_param: Dict[int, str] = {}
    call_of: Dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        op = quant_op(node)
        if op is None or op.weight_spec is None or op.weight_index is None:
            continue
        weight_node = node.args[op.weight_index]
        assert isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"
        param = stored_tensor(gm, weight_node)
        assert param is not None, f"analysis annotated {node.name} with a weight that is not a stored tensor"
        name = by_param.get(id(param))
        if name is None:
            name = _safe_name(str(weight_node.target), container)
            q = _make_quantizer(
                op.weight_spec, estimator, KIND_WEIGHT, tuple(param.shape), (op.name,),
                channel_axis=op.channel_axis, block_axis=op.block_axis,
            )
            q.to(device=param.device)
            q.init_from_tensor(param.detach())
            container[name] = q
            by_param[id(param)] = name
        else:
            q = _learnable(container[name])
            q.served = q.served + (op.name,)
        qnode = call_of.get(weight_node)
        if qnode is None:
            # just before its first quantized user (graph order): a capture lists every weight at the start,
            # and a quantized copy computed there would keep all of them alive through the whole forward
            with gm.graph.inserting_before(node):
                qnode = _quantizer_call(gm.graph, name, weight_node)
            call_of[weight_node] = qnode
        node.replace_input_with(weight_node, qnode)
    return gm


@graph_pass(requires=(ANALYZED, SHAPES), ensures=(ACTIVATIONS_QUANTIZED,))
def insert_activation_quantizers(gm: fx.GraphModule, *, estimator: EstimatorChoice) -> fx.GraphModule:
    """Insert activation quantizers after annotated producers, rewiring only the annotated consumers (training
    with `estimator` until `finetune(mode=...)` picks another)."""
    container = quantizer_container(gm)
    nodes_by_name = {n.name: n for n in gm.graph.nodes}
    shared: Dict[Tuple[int, QuantSpec], str] = {}
    for node in list(gm.graph.nodes):
        info = tensor_info(node)
        if info is None or not info.points:
            continue
        tm = node.meta.get("tensor_meta")
        shape = tuple(tm.shape) if tm is not None else ()
        # Several quantizers of one tensor (e.g. a join's 8 bits and a conv input's 4): the finest reads the
        # tensor and the others read its output, so the producer ends in one QuantizeLinear, which onnxruntime
        # needs to fuse it into an integer kernel (two Q nodes after a conv left it a float FusedConv).
        first: Optional[fx.Node] = None
        for point in sorted(info.points, key=lambda p: -p.spec.bits):
            served = tuple(_display_name(nodes_by_name[c]) for c in point.consumers)
            name = _activation_quantizer(container, estimator, node, point, served, shape, shared)
            source = node if first is None else first
            with gm.graph.inserting_after(source):
                qnode = _quantizer_call(gm.graph, name, source)
            first = qnode if first is None else first
            for consumer_name in point.consumers:
                nodes_by_name[consumer_name].replace_input_with(node, qnode)
    return gm


def _display_name(node: fx.Node) -> str:
    """The user-facing name of a consumer: its op's module path if it is a quantized op, else the node."""
    op = quant_op(node)
    return op.name if op is not None else node.name


def _activation_quantizer(
    container: nn.ModuleDict,
    estimator: EstimatorChoice,
    node: fx.Node,
    point: ActPoint,
    served: Tuple[str, ...],
    shape: Tuple[int, ...],
    shared: Dict[Tuple[int, QuantSpec], str],
) -> str:
    key = (point.join_group, point.spec) if point.join_group is not None else None
    if key is not None and key in shared:
        q = _learnable(container[shared[key]])
        q.served = q.served + served
        return shared[key]
    # a second quantizer of the same tensor (another spec, e.g. a join's 8 bits) is named after its reader
    base = f"act_{node.name}" if f"act_{node.name}" not in container else f"act_{node.name}_to_{point.consumers[0]}"
    name = _safe_name(base, container)
    container[name] = _make_quantizer(point.spec, estimator, KIND_ACTIVATION, shape, served, nonnegative=point.nonnegative)
    if key is not None:
        shared[key] = name
    return name


def _learnable_call(gm: fx.GraphModule, node: object, kind: str) -> Optional[LearnableQuantizer]:
    """The learnable quantizer of `kind` that a call_module node runs, if it is one."""
    if quantizer_name(node) is None:
        return None
    assert isinstance(node, fx.Node)
    q = gm.get_submodule(str(node.target))
    return q if isinstance(q, LearnableQuantizer) and q.kind == kind else None


@graph_pass(requires=(WEIGHTS_QUANTIZED, ACTIVATIONS_QUANTIZED), ensures=(BIASES_QUANTIZED,))
def insert_bias_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Put a `BiasQuantizer` on the bias of each op analysis marked `int32_bias` (input and weight quantized)."""
    container = quantizer_container(gm)
    for node in list(gm.graph.nodes):
        op, facts = quant_op(node), facts_of(node)
        if op is None or not op.int32_bias or facts is None:
            continue
        x_node, w_node = facts.argument(node, "input"), facts.argument(node, "weight")
        x_q = _learnable_call(gm, x_node, KIND_ACTIVATION)
        w_q = _learnable_call(gm, w_node, KIND_WEIGHT)
        bias_node = facts.argument(node, "bias")
        bias = stored_tensor(gm, bias_node)
        if x_q is None or w_q is None or bias is None:
            raise AssertionError(f"analysis marked {op.name} for an int32 bias but its input, weight or bias "
                                 "is not quantized/stored after insertion")
        w_name = quantizer_name(w_node)
        name = _safe_name(f"{w_name}_bias", container)
        container[name] = BiasQuantizer(x_q, w_q, bias.numel())
        with gm.graph.inserting_before(node):
            b_node = _quantizer_call(gm.graph, name, bias_node)
        node.replace_input_with(bias_node, b_node)
    return gm
