"""The op registry: every fact fxquant uses about a torch op, declared once, for all its spellings.

An `OpFacts` entry names an op's spellings in both capture front ends — torch / `torch.nn.functional`
functions and aten overloads (`call_function` targets), Tensor methods (`call_method`), module types
(`call_module`) — and says what fxquant needs to know about it:

- `arguments`: the names of its positional arguments in that spelling (`"input"`, `"weight"`, `"bias"`,
  ...); weight, bias and activation-input positions come from these names, so spellings that order their
  arguments differently (`F.embedding(input, weight)` vs `aten.embedding(weight, indices)`) are separate
  entries of the same `kind`;
- `kind`: the quantized-op kind (conv, conv_transpose, linear, matmul, embedding) for ops fxquant
  quantizes, and whether integer kernels add its bias in int32 (`int32_bias`), whether it needs an output
  quantizer for its integer kernel (`output_quantized`), whether a BatchNorm after it folds into it
  (`absorbs_batchnorm`);
- `sign`: how the sign of the output follows from the inputs (`SIGN_*`);
- `layout_only` (shape-only ops a runtime moves a QuantizeLinear across), `fused_activation` (ReLU-like ops
  an integer kernel applies before its QuantizeLinear), `join` (add/concat of tensors that share scales);
- `float_reason` / `float_by_design`: ops with weights that stay float, and why (reports);
- `gate` (sigmoid, hard sigmoid: outputs in [0, 1]) and `integer_product` (a product of two tensors): a
  gated product an integer kernel reads is quantized for onnxruntime's QLinearMul (`activation_points`).

Analysis (`analyze.py`), module lowering (`passes/functionalize.py`), BatchNorm folding
(`passes/fold_bn.py`), bias insertion (`passes/insert.py`) and export (`export/qdq.py`) read this table
through `facts_of(node)`; none of them keeps an op list of its own. ONNX op types (what onnxruntime runs)
live in `verify.py`; they are not torch ops.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

aten = torch.ops.aten

SIGN_NONE = "none"
"""Nothing known about the sign of the output."""
SIGN_NONNEGATIVE = "nonnegative"
"""The output is >= 0 whatever the input (ReLU, sigmoid, softmax, exp, ...)."""
SIGN_FOLLOWS = "follows"
"""The output is >= 0 when every tensor input is (pooling, reshapes, add, concat, mean, ...)."""
SIGN_CLAMP = "clamp"
"""The output is >= 0 when the lower bound (argument/attribute `min`) is >= 0 or the input is >= 0."""
SIGN_SCALED = "scaled"
"""Like `SIGN_FOLLOWS`, and every scalar operand must be >= 0 too (x * -1 is not)."""
SIGNS = (SIGN_NONE, SIGN_NONNEGATIVE, SIGN_FOLLOWS, SIGN_CLAMP, SIGN_SCALED)

KINDS = ("conv", "conv_transpose", "linear", "matmul", "embedding")
"""Kinds of quantized ops (`OpFacts.kind`)."""


@dataclass(frozen=True)
class OpFacts:
    """Everything fxquant knows about one op in one argument layout (see the module docstring).

    Attributes:
        name: a short name for messages and tests.
        functions: `call_function` targets (torch, functional and aten spellings with this layout).
        methods: `call_method` names (Tensor methods with this layout).
        modules: `call_module` types; subclasses match for sign rules, only these exact types are turned into
            functional calls (`functional_form`).
        arguments: names of the positional arguments (`"input"`/`"other"`: activation inputs of quantized
            ops, `"weight"`, `"bias"`, and any other name readers look up with `argument`).
        kind: quantized-op kind (one of `KINDS`), None when fxquant does not quantize the op.
        sign: one of `SIGNS`.
        layout_only: moves data without computing (reshape, transpose, ...).
        selects_values: each output is one of its inputs' values (max pooling): quantizing after it equals
            quantizing before it (quantization is monotone), and onnxruntime moves a QuantizeLinear across
            it (QDQ propagation), so a conv's output quantizer goes after it, as after a reshape.
        fused_activation: an integer kernel applies it before its QuantizeLinear (ReLU, ReLU6, clamp).
        join: "add" or "cat" for joins whose inputs share a scale, else None.
        int32_bias: integer runtimes add its `bias` argument in int32 on the grid `s_x * s_w`.
        output_quantized: its integer kernel needs a QuantizeLinear after it (QLinearConv); linears and
            matmuls do not (onnxruntime's MatMulIntegerToFloat gives float outputs), and a Q/DQ pair on a GELU
            or softmax input costs more than it saves (docs/decisions.md, "No output quantizer after
            GELU/softmax inputs").
        absorbs_batchnorm: an eval-mode BatchNorm reading its output folds into its weight and bias.
        batchnorm: the op is an eval-mode-capable BatchNorm (its statistics are read by name).
        float_reason: it holds or applies weights that stay float, and why (reported by `kept_float`).
        float_by_design: it has parameters that are float by design (normalisation), not worth a report line.
        gate: its output lies in [0, 1] (sigmoid, hard sigmoid): `value * gate` is a gated product.
        integer_product: the product of two tensors, which onnxruntime runs as QLinearMul when both inputs and
            the output are quantized (done for gated products: squeeze-excite, hardswish).
        gate_of_input: the op is `x * gate(x)` (hardswish, SiLU): the gate's function and aten spellings.
        integer_pooling: over an image (rank 4), onnxruntime runs it on the codes between Q/DQ
            (QLinearAveragePool, QLinearGlobalAveragePool).
        clipped_shift: `(shift, range)` when the op is `clip(x + shift, 0, range) / range` (hard sigmoid: (3, 6)):
            quantized with scale `s` and zero point 0, it is `x + shift` quantized with `range * s`.
    """

    name: str
    functions: Tuple[Any, ...] = ()
    methods: Tuple[str, ...] = ()
    modules: Tuple[type, ...] = ()
    arguments: Tuple[str, ...] = ("input",)
    kind: Optional[str] = None
    sign: str = SIGN_NONE
    layout_only: bool = False
    selects_values: bool = False
    fused_activation: bool = False
    join: Optional[str] = None
    int32_bias: bool = False
    output_quantized: bool = False
    absorbs_batchnorm: bool = False
    batchnorm: bool = False
    float_reason: Optional[str] = None
    float_by_design: bool = False
    gate: bool = False
    integer_product: bool = False
    gate_of_input: Optional[Tuple[Any, Any]] = None
    clipped_shift: Optional[Tuple[float, float]] = None
    integer_pooling: bool = False

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"op {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        if self.sign not in SIGNS:
            raise ValueError(f"op {self.name!r}: sign {self.sign!r} is not one of {SIGNS}")

    def index(self, argument: str) -> Optional[int]:
        """Position of the named positional argument, or None when this layout has none."""
        return self.arguments.index(argument) if argument in self.arguments else None

    @property
    def weight_index(self) -> Optional[int]:
        """Position of the weight (a parameter for conv/linear/embedding; either operand of a matmul)."""
        return self.index("weight")

    @property
    def bias_index(self) -> Optional[int]:
        return self.index("bias")

    @property
    def input_indices(self) -> Tuple[int, ...]:
        """Positions of the activation inputs of a quantized op (matmul: both operands)."""
        if self.kind == "matmul":
            return tuple(i for i, a in enumerate(self.arguments) if a in ("input", "other"))
        if self.kind == "embedding":
            return ()  # its input is integer indices
        return tuple(i for i, a in enumerate(self.arguments) if a == "input")

    def argument(self, node: fx.Node, name: str, default: Any = None) -> Any:
        """The value of argument `name` of `node` (positional by this layout, else keyword)."""
        i = self.index(name)
        if i is not None and i < len(node.args):
            return node.args[i]
        return node.kwargs.get(name, default)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_MAX_POOLS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default, aten.max_pool2d_with_indices.default,
    aten.adaptive_max_pool2d.default,
)
_AVG_POOLS = (
    F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default, aten.adaptive_avg_pool1d.default,
    aten.adaptive_avg_pool2d.default, aten.adaptive_avg_pool3d.default,
)


def _conv(dims: int) -> List[OpFacts]:
    func = getattr(F, f"conv{dims}d")
    module = getattr(nn, f"Conv{dims}d")
    func_t = getattr(F, f"conv_transpose{dims}d")
    module_t = getattr(nn, f"ConvTranspose{dims}d")
    aten_t = getattr(aten, f"conv_transpose{dims}d")
    return [
        OpFacts(
            f"conv{dims}d", functions=(func, getattr(aten, f"conv{dims}d").default, getattr(aten, f"conv{dims}d").padding),
            modules=(module,), arguments=_CONV_ARGS, kind="conv", int32_bias=True, output_quantized=True,
            absorbs_batchnorm=True,
        ),
        OpFacts(
            f"conv_transpose{dims}d", functions=(func_t, aten_t.input if dims > 1 else aten_t.default),
            modules=(module_t,), arguments=_CONV_T_ARGS, kind="conv_transpose", output_quantized=True,
            absorbs_batchnorm=True,
        ),
    ]


REGISTRY: Tuple[OpFacts, ...] = (
    # Quantized ops.
    *_conv(1), *_conv(2), *_conv(3),
    OpFacts("linear", functions=(F.linear, aten.linear.default), modules=(nn.Linear,),
            arguments=("input", "weight", "bias"), kind="linear", int32_bias=True, absorbs_batchnorm=True),
    OpFacts("embedding", functions=(F.embedding,), modules=(nn.Embedding,),
            arguments=("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
            kind="embedding"),
    OpFacts("embedding (aten)", functions=(aten.embedding.default,), arguments=("weight", "input"), kind="embedding"),
    OpFacts("matmul", functions=(torch.matmul, operator.matmul, torch.bmm, torch.mm, aten.matmul.default,
                                 aten.bmm.default, aten.mm.default),
            methods=("matmul", "bmm", "mm"), arguments=("input", "other"), kind="matmul"),
    # addmm(bias, x, W) = x @ W + bias (Hugging Face GPT-2's Conv1D); the bias stays float.
    OpFacts("addmm", functions=(torch.addmm, aten.addmm.default), methods=("addmm",),
            arguments=("self", "input", "other"), kind="matmul"),
    # A decomposed convolution (one op for both directions, `transposed` at 6): folded, not quantized.
    OpFacts("convolution", functions=(aten.convolution.default,),
            arguments=("input", "weight", "bias", "stride", "padding", "dilation", "transposed"),
            absorbs_batchnorm=True),
    # Activations.
    OpFacts("relu", functions=(F.relu, torch.relu, aten.relu.default, aten.relu_.default), methods=("relu", "relu_"),
            modules=(nn.ReLU,), sign=SIGN_NONNEGATIVE, fused_activation=True),
    OpFacts("relu6", functions=(F.relu6, aten.relu6.default), modules=(nn.ReLU6,), sign=SIGN_NONNEGATIVE,
            fused_activation=True),
    OpFacts("clamp", functions=(torch.clamp, torch.clip, aten.clamp.default, aten.clip.default),
            methods=("clamp", "clamp_", "clip"), arguments=("input", "min", "max"), sign=SIGN_CLAMP,
            fused_activation=True),
    OpFacts("hardtanh", functions=(F.hardtanh, aten.hardtanh.default), modules=(nn.Hardtanh,),
            arguments=("input", "min_val", "max_val"), sign=SIGN_CLAMP, fused_activation=True),
    OpFacts("sigmoid", functions=(torch.sigmoid, F.sigmoid, aten.sigmoid.default), methods=("sigmoid", "sigmoid_"),
            modules=(nn.Sigmoid,), sign=SIGN_NONNEGATIVE, gate=True),
    OpFacts("hardsigmoid", functions=(F.hardsigmoid, aten.hardsigmoid.default), modules=(nn.Hardsigmoid,),
            sign=SIGN_NONNEGATIVE, gate=True, clipped_shift=(3.0, 6.0)),
    # x times a gate of x: `decompose_gated_activations` spells them so when activations are quantized
    OpFacts("hardswish", functions=(F.hardswish, aten.hardswish.default), modules=(nn.Hardswish,),
            gate_of_input=(F.hardsigmoid, aten.hardsigmoid.default)),
    OpFacts("silu", functions=(F.silu, aten.silu.default), modules=(nn.SiLU,),
            gate_of_input=(torch.sigmoid, aten.sigmoid.default)),
    OpFacts("nonnegative", functions=(
        F.softmax, torch.softmax, torch.abs, torch.exp, F.softplus, torch.square, aten.softmax.int,
        aten._softmax.default, aten.abs.default, aten.exp.default, aten.softplus.default, aten.square.default,
        aten.sqrt.default, aten.rsqrt.default,
    ), methods=("softmax", "abs", "exp"), modules=(nn.Softmax, nn.Softplus), sign=SIGN_NONNEGATIVE),
    # Shape-only ops.
    OpFacts("layout", functions=(
        torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
        aten.view.default, aten.reshape.default, aten.flatten.using_ints, aten.permute.default, aten.transpose.int,
        aten.t.default, aten.contiguous.default, aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default,
    ), methods=("view", "reshape", "flatten", "permute", "transpose", "contiguous", "squeeze", "unsqueeze"),
        modules=(nn.Flatten,), sign=SIGN_FOLLOWS, layout_only=True),
    # Ops that keep the sign of their inputs.
    OpFacts("max pooling", functions=_MAX_POOLS, modules=(
        nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    ), sign=SIGN_FOLLOWS, selects_values=True),
    OpFacts("average pooling", functions=_AVG_POOLS, modules=(
        nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    ), sign=SIGN_FOLLOWS, integer_pooling=True),
    OpFacts("add", functions=(operator.add, torch.add, operator.iadd, aten.add.Tensor, aten.add_.Tensor),
            methods=("add", "add_"), arguments=("input", "other"), sign=SIGN_FOLLOWS, join="add"),
    OpFacts("cat", functions=(torch.cat, torch.concat, aten.cat.default, aten.concat.default),
            arguments=("tensors", "dim"), sign=SIGN_FOLLOWS, join="cat"),
    OpFacts("mul", functions=(operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar), methods=("mul",),
            arguments=("input", "other"), sign=SIGN_SCALED, integer_product=True),
    OpFacts("div", functions=(operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar),
            arguments=("input", "other"), sign=SIGN_SCALED),
    OpFacts("keeps sign", functions=(
        operator.getitem, F.dropout, F.interpolate, torch.mean, torch.sum, torch.max, torch.amax, torch.chunk,
        torch.split, F.pad, aten.clone.default, aten.alias.default, aten.expand.default, aten.squeeze.default,
        aten.slice.Tensor, aten.select.int, aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default,
        aten.mean.dim, aten.mean.default, aten.sum.dim_IntList, aten.amax.default, aten.dropout.default,
        aten.upsample_nearest1d.vec, aten.upsample_nearest2d.vec, aten.upsample_nearest3d.vec,
        aten.upsample_bilinear2d.vec, aten.pad.default, aten.constant_pad_nd.default, aten.to.dtype,
        aten.to.dtype_layout, aten._to_copy.default, aten.pixel_shuffle.default, aten.repeat.default,
    ), methods=("mean", "sum", "expand", "repeat", "chunk", "split", "max", "amax", "__getitem__", "flip", "roll"),
        modules=(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Upsample, nn.PixelShuffle, nn.ZeroPad2d),
        sign=SIGN_FOLLOWS),
    # Normalisation: float by design; BatchNorm folds into the layer before it.
    OpFacts("batch_norm", functions=(F.batch_norm,), modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
            arguments=("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
            batchnorm=True, float_by_design=True),
    OpFacts("batch_norm (aten)", functions=(aten.batch_norm.default,),
            arguments=("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps"),
            batchnorm=True, float_by_design=True),
    OpFacts("batch_norm (aten, eval)", functions=(aten._native_batch_norm_legit_no_training.default,),
            arguments=("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"),
            batchnorm=True, float_by_design=True),
    OpFacts("normalization", functions=(
        F.layer_norm, F.group_norm, F.instance_norm, F.rms_norm, aten.layer_norm.default, aten.group_norm.default,
        aten.instance_norm.default, aten.native_layer_norm.default, aten.rms_norm.default,
    ), modules=(nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm,
                nn.PReLU), float_by_design=True),
    # Kernels that apply weights fxquant does not quantize.
    OpFacts("scaled_dot_product_attention",
            functions=(F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default),
            arguments=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
            float_reason="fused attention with dropout: its two matmuls stay float"),
    OpFacts("multi_head_attention", modules=(nn.MultiheadAttention,),
            float_reason="cross-attention or per-head masks: kept as a float module"),
    OpFacts("einsum", functions=(torch.einsum, aten.einsum.default), float_reason="einsum is not quantized"),
    OpFacts("baddbmm", functions=(torch.baddbmm, aten.baddbmm.default), float_reason="baddbmm is not quantized"),
)
"""Every op fxquant knows. An op missing here is float, with an unknown sign, and blocks nothing."""


def _index(entries: Iterable[OpFacts]) -> Tuple[Dict[Any, OpFacts], Dict[str, OpFacts], Dict[type, OpFacts]]:
    functions: Dict[Any, OpFacts] = {}
    methods: Dict[str, OpFacts] = {}
    modules: Dict[type, OpFacts] = {}
    for entry in entries:
        tables: Tuple[Tuple[Dict[Any, OpFacts], Tuple[Any, ...]], ...] = (
            (functions, tuple(entry.functions)), (methods, tuple(entry.methods)), (modules, tuple(entry.modules))
        )
        for table, keys in tables:
            for key in keys:
                if key in table:
                    raise ValueError(f"{key!r} is declared by both {table[key].name!r} and {entry.name!r}")
                table[key] = entry
    return functions, methods, modules


_BY_FUNCTION, _BY_METHOD, _BY_MODULE = _index(REGISTRY)


def facts_of_module(module: nn.Module) -> Optional[OpFacts]:
    """The entry of a module's type or of its nearest registered base class, else None."""
    for cls in type(module).__mro__:
        entry = _BY_MODULE.get(cls)
        if entry is not None:
            return entry
    return None


def facts_of(node: fx.Node) -> Optional[OpFacts]:
    """The registry entry of an FX node (call_function, call_method or call_module), or None."""
    if node.op == "call_function":
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(str(node.target))
    if node.op == "call_module":
        owner = node.graph.owning_module
        if owner is None:
            return None
        try:
            module = owner.get_submodule(str(node.target))
        except AttributeError:
            return None
        return facts_of_module(module)
    return None


def functional_form(module: nn.Module) -> Optional[OpFacts]:
    """The entry whose first function is the functional form of exactly this module type (not a subclass,
    whose `forward` may differ), for `functionalize_modules`; None for other modules."""
    entry = _BY_MODULE.get(type(module))
    return entry if entry is not None and entry.kind is not None and entry.functions else None


def quantized_kinds() -> Tuple[str, ...]:
    """The kinds of ops fxquant quantizes, in registry order (for messages)."""
    return tuple(dict.fromkeys(e.kind for e in REGISTRY if e.kind is not None))


def quantizable_info(node: fx.Node) -> Optional[OpFacts]:
    """The registry entry of a node if fxquant quantizes that op (`OpFacts.kind` set), else None."""
    facts = facts_of(node)
    return facts if facts is not None and facts.kind is not None else None
