"""Pass `fold_batchnorm`: fold eval-mode BatchNorm into the conv/linear that feeds it.

Runs after `functionalize_modules`, on `F.conv*`/`F.conv_transpose*`/`F.linear` nodes whose only user is
a BatchNorm module call. The folded weight and bias replace the layer's parameters (in fxquant's own copy
of the model), so the weight quantizer sees the folded weight: what fine-tuning optimises is what is
exported. A BatchNorm with no foldable producer stays float. Uses torch's own fusion formulas.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

_CONVS = {F.conv1d, F.conv2d, F.conv3d}
_CONV_TS = {F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_BNS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _uses_of_target(gm: fx.GraphModule, target: str) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "get_attr" and n.target == target)


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold `layer -> BatchNorm` pairs into the layer's weight and bias (eval-mode statistics)."""
    for bn_node in list(gm.graph.nodes):
        if bn_node.op != "call_module":
            continue
        bn = gm.get_submodule(str(bn_node.target))
        if not isinstance(bn, _BNS) or bn.running_mean is None or bn.running_var is None:
            continue
        producer = bn_node.args[0] if bn_node.args else None
        if not isinstance(producer, fx.Node) or producer.op != "call_function" or len(producer.users) != 1:
            continue
        is_conv = producer.target in _CONVS
        is_conv_t = producer.target in _CONV_TS
        is_linear = producer.target is F.linear
        if not (is_conv or is_conv_t or is_linear):
            continue
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
        bias = getattr(owner, "bias", None) if bias_node is not None else None
        if bias_node is not None:
            bias = gm.get_parameter(str(bias_node.target))
        bn_weight = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
        bn_bias = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
        with torch.no_grad():
            if is_linear:
                new_w, new_b = fuse_linear_bn_weights(weight, bias, bn.running_mean, bn.running_var, bn.eps, bn_weight, bn_bias)
            else:
                new_w, new_b = fuse_conv_bn_weights(
                    weight, bias, bn.running_mean, bn.running_var, bn.eps, bn_weight, bn_bias, transpose=is_conv_t
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
        bn_node.replace_all_uses_with(producer)
        gm.graph.erase_node(bn_node)
    gm.delete_all_unused_submodules()
    return gm
