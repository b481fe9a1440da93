"""Passes that put learnable quantizers into the graph: they execute the plan `analyze` wrote and decide nothing
(which quantizer serves which edge, its name, its spec, sharing and order are the annotations').

- `insert_weight_quantizers`: `get_attr weight -> call_module quantizer -> op`, with the quantizer
  `QuantOp.weight_quantizer` (tied weights share it), initialised to the weight's per-group absolute maximum.
- `insert_activation_quantizers`: `producer -> call_module quantizer -> consumers` for each `ActPoint`, in the
  plan's order, reading the tensor or the call of the quantizer `ActPoint.reads` (one quantizer module may
  serve several points: a join group's shared scale).
- `insert_bias_quantizers`: `get_attr bias -> call_module BiasQuantizer -> op` for each op with a derived
  int32 bias (`QuantOp.bias`): the bias on `s_x * s_w` of its input and weight quantizers, in eval and
  (straight-through) in training.

Quantizer modules live in the container of `fxquant.graph` (`gm.fxq_quantizers`); call_module targets
are `fxq_quantizers.<name>`.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import fx, nn

from fxquant.annotations import quant_op, tensor_info
from fxquant.config import EstimatorChoice, QuantSpec
from fxquant.graph import quantizer_container, quantizer_target, stored_tensor
from fxquant.op_registry import facts_of
from fxquant.passes import ACTIVATIONS_QUANTIZED, ANALYZED, BIASES_QUANTIZED, SHAPES, WEIGHTS_QUANTIZED, graph_pass
from fxquant.quantizer import KIND_ACTIVATION, KIND_WEIGHT, BiasQuantizer, LearnableQuantizer


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
        narrow_range=spec.narrow_range,
        nonnegative=nonnegative,
        served=served,
    )


@graph_pass(requires=(ANALYZED, SHAPES), ensures=(WEIGHTS_QUANTIZED,))
def insert_weight_quantizers(gm: fx.GraphModule, *, estimator: EstimatorChoice) -> fx.GraphModule:
    """Insert the planned weight quantizer between each annotated op and its weight parameter (training with
    `estimator` until `finetune(mode=...)` picks another)."""
    container = quantizer_container(gm)
    call_of: Dict[fx.Node, fx.Node] = {}
    for node in list(gm.graph.nodes):
        op = quant_op(node)
        if op is None or op.weight_quantizer is None:
            continue
        assert op.weight_spec is not None and op.weight_index is not None
        weight_node = node.args[op.weight_index]
        assert isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"
        name = op.weight_quantizer
        if name in container:  # a tied weight's
            q = _learnable(container[name])
            q.served = q.served + (op.name,)
        else:
            param = stored_tensor(gm, weight_node)
            assert param is not None, f"analysis annotated {node.name} with a weight that is not a stored tensor"
            q = _make_quantizer(
                op.weight_spec, estimator, KIND_WEIGHT, tuple(param.shape), (op.name,),
                channel_axis=op.channel_axis, block_axis=op.block_axis,
            )
            q.to(device=param.device)
            q.init_from_tensor(param.detach())
            container[name] = q
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
    """Insert the planned activation quantizers after annotated producers, rewiring only the annotated
    consumers (training with `estimator` until `finetune(mode=...)` picks another)."""
    container = quantizer_container(gm)
    nodes_by_name = {n.name: n for n in gm.graph.nodes}
    for node in list(gm.graph.nodes):
        info = tensor_info(node)
        if info is None or not info.points:
            continue
        tm = node.meta.get("tensor_meta")
        shape = tuple(tm.shape) if tm is not None else ()
        calls: Dict[str, fx.Node] = {}
        for point in info.points:
            served = tuple(_display_name(nodes_by_name[c]) for c in point.consumers)
            if point.quantizer in container:  # shared by a join group
                q = _learnable(container[point.quantizer])
                q.served = q.served + served
            else:
                container[point.quantizer] = _make_quantizer(
                    point.spec, estimator, KIND_ACTIVATION, shape, served, nonnegative=point.nonnegative
                )
            source = node if point.reads is None else calls[point.reads]
            with gm.graph.inserting_after(source):
                qnode = _quantizer_call(gm.graph, point.quantizer, source)
            calls.setdefault(point.quantizer, qnode)
            for consumer_name in point.consumers:
                nodes_by_name[consumer_name].replace_input_with(node, qnode)
    return gm


def _display_name(node: fx.Node) -> str:
    """The user-facing name of a consumer: its op's module path if it is a quantized op, else the node."""
    op = quant_op(node)
    return op.name if op is not None else node.name


@graph_pass(requires=(WEIGHTS_QUANTIZED, ACTIVATIONS_QUANTIZED), ensures=(BIASES_QUANTIZED,))
def insert_bias_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Put the planned `BiasQuantizer` on the bias of each op with a derived int32 bias (`QuantOp.bias`)."""
    container = quantizer_container(gm)
    for node in list(gm.graph.nodes):
        op, facts = quant_op(node), facts_of(node)
        if op is None or op.bias is None or facts is None:
            continue
        bias_node = facts.argument(node, "bias")
        bias = stored_tensor(gm, bias_node)
        assert isinstance(bias_node, fx.Node) and bias is not None, f"{op.name}'s int32 bias is not a stored tensor"
        input_quantizer = _learnable(container[op.bias.input_quantizer])
        weight_quantizer = _learnable(container[op.bias.weight_quantizer])
        container[op.bias.quantizer] = BiasQuantizer(input_quantizer, weight_quantizer, bias.numel())
        with gm.graph.inserting_before(node):
            b_node = _quantizer_call(gm.graph, op.bias.quantizer, bias_node)
        node.replace_input_with(bias_node, b_node)
    return gm
