"""Pass `freeze_quantizers`: learnable quantizers become frozen integer quantizers.

Each weight quantizer and the float parameter it reads become one `FrozenWeight` (integer codes and
scales, no input); each activation quantizer becomes a `FrozenActivationQuantizer` (integer bits and
zero point). Float weights that no node reads any more are deleted, so a frozen state dict holds codes.
Runs on a copy made by `fxquant.freeze`; the prepared module stays usable.

Each `BiasQuantizer` and the float bias it reads become a `FrozenBias` (int32 codes on the grid
`s_x * s_w`, as integer kernels add them): the same numbers the eval-mode prepared module computes.
"""

from __future__ import annotations

from typing import Dict

from torch import fx, nn

from fxquant.graph import is_quantizer_path, quantizer_calls, quantizer_container, tensor_at
from fxquant.passes import ACTIVATIONS_QUANTIZED, FROZEN, WEIGHTS_QUANTIZED, graph_pass
from fxquant.quantizer import (
    KIND_WEIGHT,
    BiasQuantizer,
    FrozenActivationQuantizer,
    FrozenBias,
    FrozenWeight,
    LearnableQuantizer,
)


@graph_pass(requires=(WEIGHTS_QUANTIZED, ACTIVATIONS_QUANTIZED), ensures=(FROZEN,))
def freeze_quantizers(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace every `LearnableQuantizer` call in `gm` by its frozen counterpart."""
    container = quantizer_container(gm)
    frozen: Dict[str, nn.Module] = {}
    for node, name in list(quantizer_calls(gm.graph)):
        q = container[name]
        if isinstance(q, BiasQuantizer):
            bias_node = node.args[0]
            assert isinstance(bias_node, fx.Node) and bias_node.op == "get_attr"
            found = q.integer_bias(tensor_at(gm, str(bias_node.target)))
            if found is None:  # codes beyond int32: the prepared module keeps this bias float too
                node.replace_all_uses_with(bias_node)
                gm.graph.erase_node(node)
                continue
            frozen[name] = FrozenBias(found[0], found[1], q.served)
            node.args = ()
            if not bias_node.users:
                gm.graph.erase_node(bias_node)
            continue
        if not isinstance(q, LearnableQuantizer):
            continue
        if q.kind == KIND_WEIGHT:
            weight_node = node.args[0]
            assert isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"
            if name not in frozen:
                weight = tensor_at(gm, str(weight_node.target))
                frozen[name] = FrozenWeight(q, weight)
            node.args = ()
            if not weight_node.users:
                gm.graph.erase_node(weight_node)
        elif name not in frozen:
            frozen[name] = FrozenActivationQuantizer(q)
    for name, module in frozen.items():
        container[name] = module
    _delete_unread_parameters(gm)
    return gm


def _delete_unread_parameters(gm: fx.GraphModule) -> None:
    """Delete parameters that no get_attr reads and whose module no call_module runs."""
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
    for path, _ in list(gm.named_parameters()):
        if path in read or is_quantizer_path(path):
            continue
        if any(path.startswith(c + ".") for c in called):
            continue
        owner_path, _, attr = path.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        delattr(owner, attr)
        owner.register_parameter(attr, None)  # modules such as Conv2d read `self.bias` in their repr



