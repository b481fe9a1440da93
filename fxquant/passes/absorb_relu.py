"""`absorb_relus`: a ReLU read only by non-negative activation quantizers leaves the graph.

Such a quantizer clamps at `lo = 0` with zero point 0 in training (both rounding estimators and the noise
estimator), in eval and frozen (`clamp(round(x / s), 0, qmax)`, ONNX QuantizeLinear's saturation), so
`quantizer(relu(x))` equals `quantizer(x)`: the ReLU's forward, its backward and the tensor it keeps for the
backward are work for nothing (docs/decisions.md, "ReLUs absorbed by their quantizers"). The quantizers then
read the ReLU's input and are marked `absorbed_relu`: every path of theirs that does not clamp (switched off,
observing during calibration, the samples of `follow_bits_`: `LearnableQuantizer._as_read`) applies the ReLU
itself, so the module computes the same values in every state. Gradients differ only for an input exactly 0 (the
ReLU's derivative there is 0; a clamp passes an element equal to it).
"""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.graph import attribute_at, quantizer_container, quantizer_name
from fxquant.op_registry import facts_of
from fxquant.passes import ACTIVATIONS_QUANTIZED, RELUS_ABSORBED, graph_pass
from fxquant.quantizer import KIND_ACTIVATION, LearnableQuantizer

_INPLACE_TARGETS = (torch.ops.aten.relu_.default, torch.relu_)


def _relu_input(node: fx.Node) -> Optional[fx.Node]:
    """The tensor node a ReLU call reads, or None when `node` is no ReLU (or reads no node)."""
    facts = facts_of(node)
    if facts is None or facts.name != "relu":
        return None
    source = node.args[0] if node.args else node.kwargs.get("input")
    return source if isinstance(source, fx.Node) else None


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the ReLU call writes its input (then the input's other readers see its result)."""
    if node.op == "call_function":
        if node.target in _INPLACE_TARGETS:
            return True
        flag = node.kwargs.get("inplace", node.args[1] if node.target is F.relu and len(node.args) > 1 else False)
        return bool(flag)
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_module":
        return bool(getattr(attribute_at(gm, str(node.target)), "inplace", False))
    return False


def _absorbing(container: nn.ModuleDict, readers: List[fx.Node], relu: fx.Node) -> Optional[List[LearnableQuantizer]]:
    """The quantizers of `readers` when every reader calls a non-negative activation quantizer on the ReLU alone."""
    found: List[LearnableQuantizer] = []
    for reader in readers:
        name = quantizer_name(reader)
        if name is None or reader.args != (relu,) or reader.kwargs:
            return None
        q = container[name]
        if not (isinstance(q, LearnableQuantizer) and q.kind == KIND_ACTIVATION and q.nonnegative
                and not isinstance(q.lo, nn.Parameter)):
            return None
        found.append(q)
    return found


@graph_pass(requires=(ACTIVATIONS_QUANTIZED,), ensures=(RELUS_ABSORBED,))
def absorb_relus(gm: fx.GraphModule) -> fx.GraphModule:
    """Remove every ReLU whose readers are all non-negative activation quantizers; they read its input instead
    (see the module docstring). An in-place ReLU goes only when nothing else reads its input."""
    container = quantizer_container(gm)
    for node in list(gm.graph.nodes):
        source = _relu_input(node)
        if source is None or not node.users:
            continue
        quantizers = _absorbing(container, list(node.users), node)
        if quantizers is None or (_in_place(gm, node) and len(source.users) > 1):
            continue
        for q in quantizers:
            q.absorbed_relu = True
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    return gm
