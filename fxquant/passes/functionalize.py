"""Pass `functionalize_modules`: module calls of quantizable layers become functional calls.

`conv(x)` becomes `F.conv2d(x, get_attr conv.weight, get_attr conv.bias, stride, ...)`, and likewise for
Conv1d/3d, ConvTranspose1d/2d/3d, Linear and Embedding. Afterwards every weight is an explicit graph
edge, so weight quantizers are graph nodes like activation quantizers, and module calls and user
functional calls are handled the same way. The module path is kept in `node.meta["fxquant_module"]`.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import torch.nn.functional as F
from torch import fx, nn

from fxquant.annotations import MODULE_META_KEY
from fxquant.op_registry import functional_form
from fxquant.passes import ANALYZED, FUNCTIONAL, SHAPES, graph_pass


def _functional_call(gm: fx.GraphModule, node: fx.Node, mod: nn.Module) -> Optional[Tuple[Any, List[Any]]]:
    """The functional target and argument list for a module call, or None to leave it alone."""
    if node.kwargs or len(node.args) != 1:
        return None  # e.g. ConvTranspose with output_size: keep the module call (float)
    path = str(node.target)
    x = node.args[0]
    graph = gm.graph
    weight = graph.get_attr(f"{path}.weight")
    bias = graph.get_attr(f"{path}.bias") if getattr(mod, "bias", None) is not None else None
    facts = functional_form(mod)
    if facts is None:
        return None
    function = facts.functions[0]
    if facts.kind == "conv":
        conv: Any = mod
        padding: Any = conv.padding
        if conv.padding_mode != "zeros":
            pad: Tuple[int, ...] = tuple(conv._reversed_padding_repeated_twice)
            x = graph.call_function(F.pad, (x, pad), {"mode": str(conv.padding_mode)})
            padding = 0
        return function, [x, weight, bias, conv.stride, padding, conv.dilation, conv.groups]
    if facts.kind == "conv_transpose":
        ct = mod
        if ct.padding_mode != "zeros":
            return None
        return function, [
            x, weight, bias, ct.stride, ct.padding, ct.output_padding, ct.groups, ct.dilation,
        ]
    if facts.kind == "linear":
        return function, [x, weight, bias]
    if facts.kind == "embedding":
        emb = mod
        return function, [
            x, weight, emb.padding_idx, emb.max_norm, emb.norm_type, emb.scale_grad_by_freq, emb.sparse,
        ]
    return None


@graph_pass(ensures=(FUNCTIONAL,), invalidates=(SHAPES, ANALYZED))
def functionalize_modules(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace calls of quantizable modules (exactly the registry's Conv*/ConvTranspose*/Linear/Embedding types)
    by their functional form (`op_registry.functional_form`)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(str(node.target))
        if functional_form(mod) is None:
            continue
        with gm.graph.inserting_before(node):
            call = _functional_call(gm, node, mod)
            if call is None:
                continue
            target, args = call
            new = gm.graph.call_function(target, tuple(args))
        new.meta = dict(node.meta)
        new.meta[MODULE_META_KEY] = str(node.target)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    return gm
