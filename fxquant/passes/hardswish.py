"""Pass `decompose_hardswish`: `hardswish(x)` becomes `x * hardsigmoid(x)`, a gated product, when activations
are quantized.

onnxruntime has no integer hardswish: a quantized `hardswish` ran as DequantizeLinear, HardSwish (two float
kernels) and QuantizeLinear between the integer convs of every MobileNetV3 block, while the float model fuses
it into its convs, and those islands made the whole network slower than float. As a product of the input and
its hard-sigmoid gate, analysis quantizes the gate and the product (`fxquant.activation_points`,
"gated products"), and export lowers the gate to QLinearAdd (`hardsigmoid(x) = clip(x + 3, 0, 6) / 6`, the clip
and the division folded into the gate's QuantizeLinear) and the product to QLinearMul (docs/decisions.md,
"Hardswish as integer kernels"). The same numbers as `F.hardswish` up to float rounding.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from fxquant.config import NumberFormat
from fxquant.op_registry import facts_of
from fxquant.passes import ANALYZED, SHAPES, graph_pass

aten = torch.ops.aten


@graph_pass(invalidates=(SHAPES, ANALYZED))
def decompose_hardswish(gm: fx.GraphModule, *, number_format: NumberFormat) -> fx.GraphModule:
    """Rewrite each hardswish call (function, aten op or `nn.Hardswish` module) with one input into
    `x * hardsigmoid(x)`, in the same spelling family; nothing when activations stay float."""
    if number_format.activation is None:
        return gm
    graph = gm.graph
    for node in list(graph.nodes):
        facts = facts_of(node)
        if facts is None or facts.name != "hardswish" or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        x = node.args[0]
        on_aten = node.op == "call_function" and node.target is aten.hardswish.default
        with graph.inserting_before(node):
            gate = graph.call_function(aten.hardsigmoid.default if on_aten else F.hardsigmoid, (x,))
            product = graph.call_function(aten.mul.Tensor if on_aten else operator.mul, (x, gate))
        gate.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta" and k != "val"}
        product.meta = dict(node.meta)
        node.replace_all_uses_with(product)
        graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    return gm
