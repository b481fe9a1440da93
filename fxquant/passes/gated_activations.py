"""Pass `decompose_gated_activations`: `hardswish(x)` becomes `x * hardsigmoid(x)` and `silu(x)` becomes
`x * sigmoid(x)`, gated products, when activations are quantized.

onnxruntime has no integer hardswish or SiLU: quantized, each ran as DequantizeLinear, float kernels and
QuantizeLinear (with layout transposes around them) between the integer convs of every MobileNetV3 or
EfficientNet block, while the float model fuses them into its convs, and those islands made the whole network
slower than float. As a product of the input and its gate, analysis quantizes the gate and the product
(`fxquant.activation_points`, "gated products"), so onnxruntime runs the product as QLinearMul, a sigmoid gate as
QLinearSigmoid, and a hard-sigmoid gate, which export writes as `x + 3` quantized at six times its scale
(`hardsigmoid(x) = clip(x + 3, 0, 6) / 6`), as QLinearAdd (docs/decisions.md, "Hardswish and SiLU as integer
kernels"). The same numbers as the fused activations up to float rounding. Which ops are `x * gate(x)`, and
their gates, is the op registry's `OpFacts.gate_of_input`.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from fxquant.config import NumberFormat
from fxquant.op_registry import facts_of
from fxquant.passes import ANALYZED, SHAPES, graph_pass

aten = torch.ops.aten


@graph_pass(invalidates=(SHAPES, ANALYZED))
def decompose_gated_activations(gm: fx.GraphModule, *, number_format: NumberFormat) -> fx.GraphModule:
    """Rewrite each call (function, aten op or module) of an op that is `x * gate(x)` into that product, in the
    same spelling family (aten ops stay aten ops); nothing when activations stay float. An in-place call
    (`inplace=True`) whose input other ops read too is left as it is: those readers see the activated tensor,
    which the product would not write into `x`."""
    if number_format.activation is None:
        return gm
    graph = gm.graph
    for node in list(graph.nodes):
        facts = facts_of(node)
        if facts is None or facts.gate_of_input is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        if _in_place(gm, node) and len(x.users) > 1:
            continue
        function_gate, aten_gate = facts.gate_of_input
        on_aten = node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
        with graph.inserting_before(node):
            gate = graph.call_function(aten_gate if on_aten else function_gate, (x,))
            product = graph.call_function(aten.mul.Tensor if on_aten else operator.mul, (x, gate))
        gate.meta = {k: v for k, v in node.meta.items() if k not in ("tensor_meta", "val")}
        product.meta = dict(node.meta)
        node.replace_all_uses_with(product)
        graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    return gm


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the call writes its result into its input (`inplace=True` as an argument or a module attribute)."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    return bool(node.kwargs.get("inplace", False)) or (len(node.args) > 1 and node.args[1] is True)
