"""Pass `fold_batchnorm`: fold eval-mode BatchNorm into the conv/linear that feeds it.

Runs after `functionalize_modules`, on conv / conv-transpose / linear nodes (`F.*` calls, or aten ops in
torch.export graphs) whose only user is a BatchNorm in eval form: a BatchNorm module call, an
`F.batch_norm(..., training=False)` call, `aten.batch_norm(..., training=False)` or
`aten._native_batch_norm_legit_no_training` (through its `getitem(0)`). The folded weight and bias replace
the layer's parameters (in fxquant's own copy of the model), so the weight quantizer sees the folded
weight: what fine-tuning optimises is what is exported. A BatchNorm with no foldable producer (or in
training form, or with statistics that are not stored buffers) stays float. Uses torch's own fusion
formulas.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from fxquant.graph import stored_tensor
from fxquant.op_registry import facts_of
from fxquant.passes import ANALYZED, BN_FOLDED, FUNCTIONAL, SHAPES, graph_pass


@dataclass
class _BatchNorm:
    """One eval-mode BatchNorm found in the graph: its input, statistics, and the node to replace."""

    input: Any
    mean: torch.Tensor
    var: torch.Tensor
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    output: fx.Node
    erase: List[fx.Node]


def _tensor(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The stored tensor behind `node` (None for an absent argument); LookupError for anything else."""
    if node is None:
        return None
    tensor = stored_tensor(gm, node)
    if tensor is None:
        raise LookupError("not a stored tensor")
    return tensor


def _as_batchnorm(gm: fx.GraphModule, node: fx.Node) -> Optional[_BatchNorm]:
    """The eval-mode BatchNorm computed by `node`, or None (arguments read by their registry names)."""
    facts = facts_of(node)
    if facts is None or not facts.batchnorm:
        return None
    try:
        if node.op == "call_module":
            bn = gm.get_submodule(str(node.target))
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None or bn.running_var is None:
                return None
            return _BatchNorm(node.args[0] if node.args else None, bn.running_mean, bn.running_var, bn.weight,
                              bn.bias, bn.eps, node, [node])
        if node.op != "call_function" or facts.argument(node, "training", False):
            return None
        output, erase = node, [node]
        if "training" not in facts.arguments:  # aten's no-training form returns (out, mean, rstd)
            users = list(node.users)
            if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
                return None
            output, erase = users[0], [users[0], node]
        mean, var = _tensor(gm, facts.argument(node, "running_mean")), _tensor(gm, facts.argument(node, "running_var"))
        if mean is None or var is None:  # batch statistics only: nothing to fold
            return None
        return _BatchNorm(
            facts.argument(node, "input"), mean, var, _tensor(gm, facts.argument(node, "weight")),
            _tensor(gm, facts.argument(node, "bias")), float(facts.argument(node, "eps", 1e-5)), output, erase,
        )
    except LookupError:
        return None


def _uses_of_target(gm: fx.GraphModule, target: str) -> int:
    return sum(len(n.users) for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)


@graph_pass(requires=(FUNCTIONAL,), ensures=(BN_FOLDED,), invalidates=(SHAPES, ANALYZED))
def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold `layer -> BatchNorm` pairs into the layer's weight and bias (eval-mode statistics)."""
    for node in list(gm.graph.nodes):
        bn = _as_batchnorm(gm, node)
        if bn is None:
            continue
        producer = bn.input
        if not isinstance(producer, fx.Node) or producer.op != "call_function" or len(producer.users) != 1:
            continue
        facts = facts_of(producer)
        if facts is None or not facts.absorbs_batchnorm:
            continue
        is_linear = facts.kind == "linear"
        # A decomposed convolution (no kind) is one op for both directions, told apart by `transposed`.
        is_conv_t = facts.kind == "conv_transpose" or bool(facts.argument(producer, "transposed", False))
        weight_node = producer.args[1]
        bias_node = producer.args[2] if len(producer.args) > 2 else None
        if not isinstance(weight_node, fx.Node) or weight_node.op != "get_attr":
            continue
        if _uses_of_target(gm, str(weight_node.target)) != 1:
            continue  # the weight is shared with another layer: folding would change that layer too
        if bias_node is not None and (
            not isinstance(bias_node, fx.Node) or bias_node.op != "get_attr" or _uses_of_target(gm, str(bias_node.target)) != 1
        ):
            continue
        if is_linear:
            tm = producer.meta.get("tensor_meta")
            if tm is None or len(tm.shape) != 2:
                continue  # BatchNorm1d over (N, C, L) after a linear normalizes another axis
        owner_path, _, weight_name = str(weight_node.target).rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        weight = getattr(owner, weight_name)
        bias = gm.get_parameter(str(bias_node.target)) if bias_node is not None else None
        bn_weight = bn.weight if bn.weight is not None else torch.ones_like(bn.mean)
        bn_bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.mean)
        with torch.no_grad():
            if is_linear:
                new_w, new_b = fuse_linear_bn_weights(weight, bias, bn.mean, bn.var, bn.eps, bn_weight, bn_bias)
            else:
                new_w, new_b = fuse_conv_bn_weights(
                    weight, bias, bn.mean, bn.var, bn.eps, bn_weight, bn_bias, transpose=is_conv_t
                )
        setattr(owner, weight_name, nn.Parameter(new_w.detach().clone()))
        if bias_node is not None:
            b_owner_path, _, b_name = str(bias_node.target).rpartition(".")
            setattr(gm.get_submodule(b_owner_path) if b_owner_path else gm, b_name, nn.Parameter(new_b.detach().clone()))
        else:
            bias_target = f"{owner_path}.fxquant_folded_bias" if owner_path else "fxquant_folded_bias"
            owner.register_parameter("fxquant_folded_bias", nn.Parameter(new_b.detach().clone()))
            with gm.graph.inserting_before(producer):
                new_bias_node = gm.graph.get_attr(bias_target)
            args = list(producer.args)
            while len(args) < 3:
                args.append(None)
            args[2] = new_bias_node
            producer.args = tuple(args)
        bn.output.replace_all_uses_with(producer)
        for dead in bn.erase:
            gm.graph.erase_node(dead)
    gm.delete_all_unused_submodules()
    return gm
