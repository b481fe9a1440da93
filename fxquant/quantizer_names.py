"""The last step of analysis: which quantizer each edge of the plan uses, resolved once.

- a weight: one quantizer per stored tensor (tied weights share it), named after the tensor's path
  (`QuantOp.weight_quantizer`);
- an activation edge: the quantizer of the `ActPoint` serving it. Points of one join group with one spec
  share one quantizer (`QuantConfig(share_join_scales=True)`); of several points on one tensor (a join's
  8 bits and a conv input's 4) the widest reads the tensor and the others read its output (`ActPoint.reads`),
  so that the producer ends in one QuantizeLinear, which onnxruntime needs to fuse it into an integer kernel
  (two after a conv left it a float FusedConv). `QuantOp.input_quantizers` lists each op's input edges;
- an int32 bias: derived from its op's input and weight quantizers (`QuantOp.bias`, a `DerivedBias`).

Names are unique module names of the quantizer container (`fxquant.graph`): weights first, then
activations, then biases, each in graph order. Insertion (`fxquant.passes.insert`) creates exactly these
quantizers and calls; it names, shares and orders nothing itself.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

from torch import fx

from fxquant.annotations import DerivedBias, quant_op, tensor_info
from fxquant.config import QuantSpec
from fxquant.graph import stored_tensor
from fxquant.op_registry import facts_of


def unique_name(name: str, taken: Set[str]) -> str:
    """`name` as a module name (characters other than letters, digits and `_` become `_`), made unique
    against `taken` by a suffix `_2`, `_3`, ...; the result is added to `taken`."""
    base = re.sub(r"[^0-9a-zA-Z_]", "_", name)
    candidate, i = base, 1
    while candidate in taken:
        i += 1
        candidate = f"{base}_{i}"
    taken.add(candidate)
    return candidate


def name_quantizers(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> None:
    """Set the quantizer names of every annotation on `nodes` (analysed, in graph order); see the module."""
    taken: Set[str] = set()
    by_tensor: Dict[int, str] = {}
    for node in nodes:
        op = quant_op(node)
        if op is None or op.weight_spec is None or op.weight_index is None:
            continue
        weight_node = node.args[op.weight_index]
        weight = stored_tensor(gm, weight_node)
        assert isinstance(weight_node, fx.Node) and weight is not None, f"{node.name}'s weight is not a stored tensor"
        name = by_tensor.get(id(weight))
        if name is None:
            name = by_tensor[id(weight)] = unique_name(str(weight_node.target), taken)
        op.weight_quantizer = name

    serving: Dict[Tuple[str, str], str] = {}  # (producer, consumer) -> the quantizer on that edge
    shared: Dict[Tuple[int, QuantSpec], str] = {}
    for node in nodes:
        info = tensor_info(node)
        if info is None or not info.points:
            continue
        info.points.sort(key=lambda p: -p.spec.bits)  # stable: the widest first
        first: Optional[str] = None
        for point in info.points:
            key = (point.join_group, point.spec) if point.join_group is not None else None
            name = shared.get(key) if key is not None else None
            if name is None:
                own = f"act_{node.name}"
                name = unique_name(own if own not in taken else f"{own}_to_{point.consumers[0]}", taken)
                if key is not None:
                    shared[key] = name
            point.quantizer, point.reads = name, first
            first = name if first is None else first
            for consumer in point.consumers:
                serving[(node.name, consumer)] = name

    for node in nodes:
        op = quant_op(node)
        if op is None:
            continue
        inputs: List[Tuple[int, str]] = []
        for i in op.input_indices:
            producer = node.args[i]
            if isinstance(producer, fx.Node) and (producer.name, node.name) in serving:
                inputs.append((i, serving[(producer.name, node.name)]))
        op.input_quantizers = tuple(inputs)
        if not op.int32_bias:
            continue
        facts = facts_of(node)
        x = facts.argument(node, "input") if facts is not None else None
        input_quantizer = serving.get((x.name, node.name)) if isinstance(x, fx.Node) else None
        if input_quantizer is None or op.weight_quantizer is None:
            raise AssertionError(f"analysis marked {op.name} for an int32 bias but its input or weight has no quantizer")
        op.bias = DerivedBias(unique_name(f"{op.weight_quantizer}_bias", taken), input_quantizer, op.weight_quantizer)
