"""Pass `freeze_quantizers`: learnable quantizers become frozen integer quantizers.

Each weight quantizer and the float parameter it reads become one `FrozenWeight` (integer codes and
scales, no input); each activation quantizer becomes a `FrozenActivationQuantizer` (integer bits and
zero point). Float weights that no node reads any more are deleted, so a frozen state dict holds codes:
each as soon as its codes exist, so that freezing the prepared module itself (`freeze(qm, inplace=True)`)
releases each float weight before the next weight's codes are made. `fxquant.freeze` runs it on a copy
(which shares the weights with the prepared module, so this releases nothing there) unless `inplace`.

Each `BiasQuantizer` and the float bias it reads become a `FrozenBias` (int32 codes on the grid
`s_x * s_w`, as integer kernels add them): the same numbers the eval-mode prepared module computes.
"""

from __future__ import annotations

from collections import Counter
from typing import Dict, Set

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
    unread = _UnreadParameters(gm)
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
                unread.erase(bias_node)
            continue
        if not isinstance(q, LearnableQuantizer):
            continue
        if q.kind == KIND_WEIGHT:
            weight_node = node.args[0]
            assert isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"
            if name not in frozen:
                weight = tensor_at(gm, str(weight_node.target))
                frozen[name] = FrozenWeight(q, weight)
                del weight
            node.args = ()
            if not weight_node.users:
                unread.erase(weight_node)  # the float weight goes now, before the next weight's codes are made
        elif name not in frozen:
            frozen[name] = FrozenActivationQuantizer(q)
    for name, module in frozen.items():
        container[name] = module
    unread.delete_rest()
    return gm


class _UnreadParameters:
    """Deletes the parameters of `gm` that no get_attr reads and whose module no call_module runs.

    The candidates are the paths `gm.named_parameters()` gives when the pass starts (one per tensor: an alias
    of a tied weight is never deleted). `erase` deletes one as soon as its last get_attr node is erased, so
    a module frozen in place releases each float weight once its codes exist; `delete_rest` deletes the
    remaining ones at the end (the same set the pass deleted all at once before).
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.readers = Counter(str(n.target) for n in gm.graph.nodes if n.op == "get_attr")
        self.called = [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]
        self.candidates = {path: None for path, _ in gm.named_parameters() if not is_quantizer_path(path)}  # ordered
        self.deleted: Set[str] = set()

    def erase(self, attr_node: fx.Node) -> None:
        """Erase a get_attr node that nothing reads; delete its parameter when no other node reads it."""
        self.gm.graph.erase_node(attr_node)
        path = str(attr_node.target)
        self.readers[path] -= 1
        if self.readers[path] == 0 and path in self.candidates:
            self._delete(path)

    def delete_rest(self) -> None:
        """Delete every candidate that no get_attr reads (those `erase` did not reach)."""
        for path in self.candidates:
            if self.readers[path] == 0 and path not in self.deleted:
                self._delete(path)

    def _delete(self, path: str) -> None:
        """Delete the parameter at `path` unless a module that a call_module runs owns it."""
        self.deleted.add(path)
        if any(path.startswith(c + ".") for c in self.called):
            return
        owner_path, _, attr = path.rpartition(".")
        owner = self.gm.get_submodule(owner_path) if owner_path else self.gm
        delattr(owner, attr)
        owner.register_parameter(attr, None)  # modules such as Conv2d read `self.bias` in their repr
