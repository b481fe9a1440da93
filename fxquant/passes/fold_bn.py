"""Pass `fold_batchnorm`: fold eval-mode BatchNorm into the conv/linear that feeds it.

Runs after `functionalize_modules`, on conv / conv-transpose / linear nodes (`F.*` calls, or aten ops in
torch.export graphs) whose only user is a BatchNorm in eval form: a BatchNorm module call, an
`F.batch_norm(..., training=False)` call, `aten.batch_norm(..., training=False)` or
`aten._native_batch_norm_legit_no_training` (through its `getitem(0)`). The folded weight and bias replace
the layer's parameters (in fxquant's own copy of the model), so the weight quantizer sees the folded
weight: what fine-tuning optimises is what is exported. Uses torch's own fusion formulas.

A BatchNorm with no foldable producer (after a concat, an add or an activation: DenseNet's and pre-activation
ResNets' BN -> ReLU -> conv) becomes, with `affine_as_conv`, the per-channel affine it computes in eval form, as a
depthwise 1x1 conv (`y = x * s + t`, `s = gamma / sqrt(var + eps)`, `t = beta - mean * s`, one weight per channel)
marked `AFFINE_OF_BATCHNORM` in its node's meta: analysis quantizes it as a kernel-only op (its one weight per
channel is exact on a per-channel grid) so that onnxruntime runs it as a QLinearConv with the ReLU fused, between
the integer kernels around it, instead of a float BatchNormalization between a DequantizeLinear, a QuantizeLinear
and layout transposes (docs/decisions.md, "A BatchNorm that cannot be folded becomes a depthwise conv"). Without
it (or in training form, with statistics that are not stored buffers, or over a rank-2 input) it stays float.

Pass `fold_channel_scales`: a multiply of a conv's or linear's output (or of that output permuted, as torchvision's
ConvNeXt block does) by a stored per-output-channel tensor (a ConvNeXt block's layer scale `gamma * pwconv2(y)`)
folds into that layer's weight and bias the same way, in fxquant's copy: the product stops being a float Mul after
an integer kernel.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from fxquant.graph import stored_tensor
from fxquant.op_registry import facts_of
from fxquant.passes import ANALYZED, BN_FOLDED, FUNCTIONAL, SHAPES, graph_pass

AFFINE_OF_BATCHNORM = "fxquant_affine_of_batchnorm"
"""Node meta key of a depthwise conv that replaced an unfoldable BatchNorm (the value: the BatchNorm's name)."""
_DEPTHWISE = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}
"""The depthwise conv of a BatchNorm's affine, by the rank of its input."""


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


def _read_once(gm: fx.GraphModule, node: Any) -> bool:
    """`node` is a `get_attr` whose attribute no other node reads."""
    return isinstance(node, fx.Node) and node.op == "get_attr" and _uses_of_target(gm, str(node.target)) == 1


def _own_weight_and_bias(gm: fx.GraphModule, layer: fx.Node) -> Optional[Tuple[fx.Node, Optional[fx.Node]]]:
    """The `get_attr` nodes of a layer's weight and bias (None: no bias) when no other node reads them (folding
    into a shared tensor would change the other reader too), else None."""
    weight = layer.args[1] if len(layer.args) > 1 else None
    bias = layer.args[2] if len(layer.args) > 2 else None
    if not _read_once(gm, weight) or (bias is not None and not _read_once(gm, bias)):
        return None
    assert isinstance(weight, fx.Node) and (bias is None or isinstance(bias, fx.Node))
    return weight, bias


def _owner(gm: fx.GraphModule, target: str) -> Tuple[nn.Module, str, str]:
    """`(module, its path, attribute name)` of a dotted attribute target of `gm`."""
    path, _, name = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), path, name


def _replace_parameter(gm: fx.GraphModule, target: str, value: torch.Tensor) -> None:
    """Make the attribute at `target` a new parameter holding a copy of `value`."""
    owner, _, name = _owner(gm, target)
    setattr(owner, name, nn.Parameter(value.detach().clone()))


def _statistics_owner(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[nn.Module, str]]:
    """`(module, its path)` of the module that holds a BatchNorm's running statistics: the BatchNorm module of a
    module call, else the owner of the `running_mean` buffer a functional call reads (None when that is not a stored
    attribute)."""
    if node.op == "call_module":
        return gm.get_submodule(str(node.target)), str(node.target)
    facts = facts_of(node)
    mean = facts.argument(node, "running_mean") if facts is not None else None
    if not isinstance(mean, fx.Node) or mean.op != "get_attr":
        return None
    owner, path, _ = _owner(gm, str(mean.target))
    return owner, path


def _as_depthwise_conv(gm: fx.GraphModule, bn: _BatchNorm) -> bool:
    """Replace `bn` by the depthwise 1x1 conv of its affine (see the module docstring); False when its input is not
    a tensor of rank 3-5 with `mean.numel()` channels or its statistics have no owner module."""
    x = bn.input
    meta = x.meta.get("tensor_meta") if isinstance(x, fx.Node) else None
    shape = tuple(getattr(meta, "shape", ()))
    conv = _DEPTHWISE.get(len(shape))
    channels = bn.mean.numel()
    found = _statistics_owner(gm, bn.erase[-1])
    if conv is None or shape[1] != channels or found is None or not bn.mean.is_floating_point():
        return False
    owner, prefix = found
    with torch.no_grad():
        gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.mean)
        scale = gamma / torch.sqrt(bn.var + bn.eps)
        shift = beta - bn.mean * scale
    rank = len(shape)
    # one pair of names per BatchNorm, also where several share an owner (buffers of a torch.export graph's root)
    suffixes = itertools.chain([""], (f"_{k}" for k in itertools.count(1)))
    suffix = next(s for s in suffixes if not hasattr(owner, f"fxquant_affine_weight{s}"))
    weight_name, bias_name = f"fxquant_affine_weight{suffix}", f"fxquant_affine_bias{suffix}"
    owner.register_parameter(weight_name, nn.Parameter(scale.detach().reshape((channels, 1) + (1,) * (rank - 2)).clone()))
    owner.register_parameter(bias_name, nn.Parameter(shift.detach().clone()))
    path = f"{prefix}." if prefix else ""
    with gm.graph.inserting_before(bn.output):
        weight = gm.graph.get_attr(f"{path}{weight_name}")
        bias = gm.graph.get_attr(f"{path}{bias_name}")
        ones, zeros = [1] * (rank - 2), [0] * (rank - 2)
        affine = gm.graph.call_function(conv, (x, weight, bias, ones, zeros, ones, channels))
    affine.meta[AFFINE_OF_BATCHNORM] = bn.erase[-1].name
    affine.meta["tensor_meta"] = bn.output.meta.get("tensor_meta")
    bn.output.replace_all_uses_with(affine)
    for dead in bn.erase:
        gm.graph.erase_node(dead)
    return True


@graph_pass(requires=(FUNCTIONAL,), ensures=(BN_FOLDED,), invalidates=(SHAPES, ANALYZED))
def fold_batchnorm(gm: fx.GraphModule, *, affine_as_conv: bool = False) -> fx.GraphModule:
    """Fold `layer -> BatchNorm` pairs into the layer's weight and bias (eval-mode statistics); with
    `affine_as_conv`, a BatchNorm with no foldable producer becomes a depthwise 1x1 conv of its affine."""
    for node in list(gm.graph.nodes):
        bn = _as_batchnorm(gm, node)
        if bn is None:
            continue
        producer = bn.input
        facts = facts_of(producer) if isinstance(producer, fx.Node) else None
        foldable = (
            isinstance(producer, fx.Node) and producer.op == "call_function" and len(producer.users) == 1
            and facts is not None and facts.absorbs_batchnorm
        )
        if not foldable:
            if affine_as_conv:
                _as_depthwise_conv(gm, bn)
            continue
        assert isinstance(producer, fx.Node) and facts is not None
        is_linear = facts.kind == "linear"
        # A decomposed convolution (no kind) is one op for both directions, told apart by `transposed`.
        is_conv_t = facts.kind == "conv_transpose" or bool(facts.argument(producer, "transposed", False))
        own = _own_weight_and_bias(gm, producer)
        if own is None:
            continue
        weight_node, bias_node = own
        if is_linear:
            tm = producer.meta.get("tensor_meta")
            if tm is None or len(tm.shape) != 2:
                continue  # BatchNorm1d over (N, C, L) after a linear normalizes another axis
        owner, owner_path, weight_name = _owner(gm, str(weight_node.target))
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
        _replace_parameter(gm, str(weight_node.target), new_w)
        if bias_node is not None:
            _replace_parameter(gm, str(bias_node.target), new_b)
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


_PERMUTES = (torch.permute, torch.ops.aten.permute.default)


def _permutation(node: fx.Node) -> Optional[Tuple[int, ...]]:
    """The dims of a permute node (`torch.permute(x, dims)`, `x.permute(*dims)`, aten's), else None."""
    if node.op == "call_function" and node.target in _PERMUTES and len(node.args) == 2:
        dims = node.args[1]
    elif node.op == "call_method" and node.target == "permute" and len(node.args) >= 2:
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    else:
        return None
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(int(d) % len(dims) for d in dims)


def _channel_scale(gm: fx.GraphModule, node: fx.Node) -> Optional[Tuple[fx.Node, torch.Tensor, fx.Node]]:
    """`(layer, scale, product)` when `node` multiplies the output of a conv or linear (its only reader, unshared
    weights), or that output permuted (its only reader; torchvision's ConvNeXt block permutes a linear's output back
    to channels first before its `(C, 1, 1)` layer scale), by a stored tensor holding one value per output channel
    along the channel axis (the conv's axis 1, the linear's last, where the permute puts it), else None; `scale`
    flattened to `(C,)`, `product` the node whose value replaces the multiply (the layer, or the permute)."""
    facts = facts_of(node)
    if facts is None or facts.name != "mul" or len(node.args) != 2 or node.kwargs:
        return None
    for operand, other in (node.args, tuple(reversed(node.args))):
        scale = stored_tensor(gm, other)
        if not isinstance(operand, fx.Node) or scale is None or not scale.is_floating_point():
            continue
        dims = _permutation(operand)
        layer = operand.args[0] if dims is not None and len(operand.users) == 1 else operand
        if not isinstance(layer, fx.Node):
            continue
        layer_facts = facts_of(layer)
        if (layer_facts is None or layer_facts.kind not in ("conv", "linear") or layer.op != "call_function"
                or len(layer.users) != 1 or bool(layer_facts.argument(layer, "transposed", False))):
            continue
        own = _own_weight_and_bias(gm, layer)
        if own is None:
            continue
        meta = layer.meta.get("tensor_meta")
        shape = tuple(getattr(meta, "shape", ()))
        w = stored_tensor(gm, own[0])
        if w is None or not shape or (dims is not None and len(dims) != len(shape)):
            continue
        channels = w.shape[0]
        axis = len(shape) - 1 if layer_facts.kind == "linear" else 1
        if dims is not None:
            axis = dims.index(axis)  # where the permute puts the layer's channel axis
        sizes = tuple(scale.shape)
        padded = (1,) * (len(shape) - len(sizes)) + sizes  # the scale's shape broadcast against the output's
        if len(sizes) > len(shape) or padded[axis] != channels or any(n != 1 for i, n in enumerate(padded) if i != axis):
            continue
        return layer, scale.detach().reshape(channels), operand
    return None


@graph_pass(requires=(FUNCTIONAL, BN_FOLDED), invalidates=(SHAPES, ANALYZED))
def fold_channel_scales(gm: fx.GraphModule) -> fx.GraphModule:
    """Fold `layer(x) * scale` (one stored value per output channel) into the layer's weight and bias."""
    for node in list(gm.graph.nodes):
        found = _channel_scale(gm, node)
        if found is None:
            continue
        layer, scale, product = found
        weight, bias = layer.args[1], layer.args[2] if len(layer.args) > 2 else None
        for tensor in (weight, bias):  # both scaled along their first axis, the output channels
            if isinstance(tensor, fx.Node):
                owner, _, name = _owner(gm, str(tensor.target))
                value = getattr(owner, name)
                with torch.no_grad():
                    folded = value * scale.to(value.dtype).reshape((-1,) + (1,) * (value.dim() - 1))
                _replace_parameter(gm, str(tensor.target), folded)
        scale_nodes = [a for a in node.args if isinstance(a, fx.Node) and a is not product]
        node.replace_all_uses_with(product)
        gm.graph.erase_node(node)
        for dead in scale_nodes:
            if not dead.users:
                gm.graph.erase_node(dead)
    gm.delete_all_unused_submodules()
    return gm
