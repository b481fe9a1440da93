"""Analysis + insertion: golden quantizer placement on the test models, overrides, sign, joins, ties."""

from __future__ import annotations

import dataclasses
import functools
import operator
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from small_models import make
from torch import nn

import fxquant as fxq
from fxquant.annotations import quant_op, tensor_info


def layout(qm: torch.fx.GraphModule) -> Tuple[List[str], Dict[str, Tuple[Tuple[str, ...], bool]]]:
    """(weight quantizer names in graph order, {activation quantizer: (served, nonnegative)})."""
    weights, acts = [], {}
    for node in qm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith("fxq_quantizers."):
            name = str(node.target).split(".", 1)[1]
            q = qm.fxq_quantizers[name]
            if q.kind == "weight":
                weights.append(name)
            elif q.kind == "activation":
                acts[name] = (q.served, q.nonnegative)
    return weights, acts


GOLDEN = {
    "mlp": (
        ["fc1_weight", "fc2_weight", "fc3_weight"],
        {"act_x": (("fc1",), False), "act_relu": (("fc2",), True), "act_relu_1": (("fc3",), True)},
    ),
    "cnn": (
        ["stem_weight", "conv1_weight", "conv2_weight", "branch_a_weight", "branch_b_weight", "head_weight"],
        {
            "act_x": (("stem",), False),
            "act_relu_to_add": (("add",), True),  # join_bits: the add's input stays at 8 bits
            "act_relu": (("conv1",), True),
            "act_relu_1": (("conv2",), True),
            "act_conv2d_2": (("add",), False),
            "act_relu_2": (("branch_a", "branch_b"), True),
            "act_relu_3": (("cat",), True),
            "act_relu_4": (("cat",), True),
            "act_cat": (("adaptive_avg_pool2d",), True),  # the head pool runs on codes (QLinearGlobalAveragePool)
            "act_flatten": (("head",), True),
        },
    ),
    "depthwise": (
        ["stem_weight", "dw_weight", "pw_weight", "fc_weight"],
        {
            "act_x": (("stem",), False),
            "act_relu": (("dw",), True),
            "act_relu6": (("pw",), True),
            "act_conv2d_2": (("mean",), False),  # quantize_outputs: pw runs as an integer kernel
            "act_mean": (("fc",), False),
        },
    ),
    # the residual adds feed a LayerNorm and a mean, float ops: they stay float (no join quantizers)
    "transformer": (
        ["q_weight", "k_weight", "v_weight", "proj_weight", "mlp1_weight", "mlp2_weight", "head_weight"],
        {
            "act_ln1": (("q", "k", "v"), False),
            "act_transpose": (("matmul",), False),
            "act_transpose_2": (("matmul_1",), False),
            "act_transpose_3": (("matmul",), False),
            "act_softmax": (("matmul_1",), True),
            "act_reshape_3": (("proj",), False),
            "act_ln2": (("mlp1",), False),
            "act_gelu": (("mlp2",), False),
            "act_mean": (("head",), False),
        },
    ),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_placement(name: str) -> None:
    model, x = make(name)
    qm = fxq.prepare(model, x)
    weights, acts = layout(qm)
    assert weights == GOLDEN[name][0]
    assert acts == GOLDEN[name][1]
    # BatchNorm is folded away; no module of the user's model is called any more for quantized layers.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in qm.modules())


def test_joins_can_be_left_unquantized() -> None:
    model, x = make("transformer")
    _, acts = layout(fxq.prepare(model, x, fxq.QuantConfig(quantize_joins=False, quantize_outputs=False)))
    assert sorted(acts) == sorted(
        ["act_ln1", "act_transpose", "act_transpose_2", "act_transpose_3", "act_softmax", "act_reshape_3",
         "act_ln2", "act_gelu", "act_mean"]
    )
    model, x = make("cnn")
    _, acts = layout(fxq.prepare(model, x, fxq.QuantConfig(quantize_joins=False, quantize_outputs=False)))
    assert acts["act_relu"] == (("conv1",), True)
    assert len(acts) == 5


class _JoinsReadByFloatOps(nn.Module):
    """A residual add read by a conv (through a ReLU), one read by a LayerNorm, and a tanh GELU's inner add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv1(x) + x)  # read by conv2: an integer add
        t = self.conv2(y).mean((2, 3))
        t = self.norm(t + self.fc1(t))  # read by a LayerNorm: stays float
        return self.fc2(t * (1.0 + torch.tanh(t + 0.044715 * t * t * t)))  # GELU's inner add: float


def test_only_joins_an_integer_kernel_reads_are_quantized() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 6)
    adds = [n.name for n in torch.fx.symbolic_trace(_JoinsReadByFloatOps()).graph.nodes if n.target is operator.add]
    assert len(adds) == 4  # the three joins, then 1.0 + tanh (a constant: no join)
    qm = fxq.prepare(_JoinsReadByFloatOps(), x)
    _, acts = layout(qm)
    joined = {c for served, _ in acts.values() for c in served if c in adds}
    assert joined == {adds[0]}
    # an override naming a join quantizes it anyway
    qm = fxq.prepare(_JoinsReadByFloatOps(), x, fxq.QuantConfig(overrides=[(adds[1], fxq.QuantSpec(learn_bits=False))]))
    _, acts = layout(qm)
    assert {c for served, _ in acts.values() for c in served if c in adds} == {adds[0], adds[1]}


def test_join_groups_share_one_quantizer_when_asked() -> None:
    model, x = make("cnn")
    qm = fxq.prepare(model, x, fxq.QuantConfig(share_join_scales=True))
    targets = {}
    for node in qm.graph.nodes:
        if node.op == "call_function" and node.name in ("add", "cat"):
            targets[node.name] = {str(a.target) for a in node.all_input_nodes}
    assert len(targets["add"]) == 1 and len(targets["cat"]) == 1  # both inputs through one quantizer
    # relu feeds conv1 too; the shared quantizer is signed because the conv2 branch is signed
    shared = qm.get_submodule(next(iter(targets["add"])))
    assert not shared.nonnegative


def test_first_and_last_layers_fixed_at_8_bits() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=4), activation=fxq.QuantSpec(bits=4)))
    q = qm.fxq_quantizers
    assert not q["fc1_weight"].learn_bits and float(q["fc1_weight"].integer_bits()) == 8
    assert not q["fc3_weight"].learn_bits and float(q["fc3_weight"].integer_bits()) == 8
    assert q["fc2_weight"].learn_bits and float(q["fc2_weight"].integer_bits()) == 4
    assert float(q["act_x"].integer_bits()) == 8 and float(q["act_relu"].integer_bits()) == 4
    ops = {n.name: quant_op(n) for n in qm.graph.nodes if quant_op(n) is not None}
    assert ops["linear"].is_first and ops["linear_2"].is_last and ops["linear"].reason == "first layer"
    qm2 = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=4), first_last_bits=None))
    assert qm2.fxq_quantizers["fc1_weight"].learn_bits and float(qm2.fxq_quantizers["fc1_weight"].integer_bits()) == 4


def test_overrides_first_match_wins_and_none_keeps_float() -> None:
    model, x = make("mlp")
    cfg = fxq.QuantConfig(
        overrides=[("fc2", None), ("fc*", fxq.QuantSpec(bits=6, min_bits=6, max_bits=6))], first_last_bits=None
    )
    qm = fxq.prepare(model, x, cfg)
    weights, acts = layout(qm)
    assert weights == ["fc1_weight", "fc3_weight"]
    assert set(acts) == {"act_x", "act_relu_1"}
    assert float(qm.fxq_quantizers["fc1_weight"].integer_bits()) == 6
    assert qm.fxq_quantizers["fc1_weight"].granularity == "per_channel"


def test_override_that_matches_nothing_is_an_error_with_suggestions() -> None:
    model, x = make("mlp")
    with pytest.raises(fxq.ConfigError, match=r"override glob 'fc_2' matches no quantizable op .*Did you mean"):
        fxq.prepare(model, x, fxq.QuantConfig(overrides=[("fc_2", None)]))


def test_override_weight_spec_with_one_bit_is_refused() -> None:
    model, x = make("mlp")
    cfg = fxq.QuantConfig(overrides=[("fc2", fxq.QuantSpec(bits=1, min_bits=1))])
    with pytest.raises(fxq.ConfigError, match=r"override for 'fc2'.min_bits=1: weights are signed"):
        fxq.prepare(model, x, cfg)


def test_per_group_needs_divisible_inputs() -> None:
    model, x = make("mlp")
    cfg = fxq.QuantConfig(weight=fxq.QuantSpec(granularity="per_group", group_size=5))
    with pytest.raises(fxq.ConfigError, match=r"16 inputs along axis 1, not divisible by group_size=5"):
        fxq.prepare(model, x, cfg)
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(granularity="per_group", group_size=8)))
    assert tuple(qm.fxq_quantizers["fc1_weight"].hi.shape) == (32, 2)


class Functional(nn.Module):
    """Functional calls on parameters (no layer modules), as in timm-style or hand-written models."""

    def __init__(self) -> None:
        super().__init__()
        self.w_conv = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.w_proj = nn.Parameter(torch.randn(4, 5) * 0.2)
        self.emb = nn.Parameter(torch.randn(7, 4))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.w_conv, padding=1).mean(dim=(2, 3))
        y = torch.sigmoid(y)
        z = torch.matmul(y, self.w_proj)
        e = F.embedding(idx, self.emb).mean(dim=1)
        return z + torch.matmul(e, self.w_proj)


def test_functional_calls_and_tied_weights() -> None:
    model = Functional().eval()
    x, idx = torch.randn(2, 3, 6, 6), torch.randint(0, 7, (2, 3))
    qm = fxq.prepare(model, (x, idx), fxq.QuantConfig(quantize_joins=False))
    weights, acts = layout(qm)
    # w_proj is used by two matmuls: one quantizer, called twice; channels are the last axis of a (K, N) weight
    assert weights == ["w_conv", "w_proj", "emb"]
    assert qm.fxq_quantizers["w_proj"].channel_axis == 1 and qm.fxq_quantizers["w_proj"].served == ("w_proj", "w_proj")
    assert acts["act_sigmoid"][1] is True  # sigmoid output is provably non-negative
    assert "act_idx" not in acts  # embedding indices are not quantized


def test_analysis_only_writes_meta() -> None:
    from fxquant.analyze import analyze
    from fxquant.passes import run_passes
    from fxquant.passes.functionalize import functionalize_modules
    from fxquant.tracing import propagate_shapes

    model, x = make("cnn")
    gm = torch.fx.symbolic_trace(model)
    run_passes(gm, (functionalize_modules,))
    propagate_shapes(gm, x)
    before = [(n.name, n.op, str(n.target), tuple(map(str, n.args))) for n in gm.graph.nodes]
    config = fxq.QuantConfig()
    analyze(gm, config.number_format, config.placement)
    after = [(n.name, n.op, str(n.target), tuple(map(str, n.args))) for n in gm.graph.nodes]
    assert before == after
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    info = tensor_info(relu)
    assert info is not None and info.nonnegative and info.join_group is not None


def test_to_networkx_has_every_node_and_annotations() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x)
    g = fxq.to_networkx(qm)
    assert set(g.nodes) == {n.name for n in qm.graph.nodes}
    assert g.nodes["linear"]["fxquant"].op.kind == "linear"
    assert g.has_edge("fxq_quantizers_act_x", "linear")


@pytest.mark.parametrize("share, integer_bias", [(False, True), (True, False)])
def test_annotations_are_the_whole_plan_and_insertion_follows_them(share: bool, integer_bias: bool) -> None:
    """Analysis resolves every granularity, the sign of each (shared) activation quantizer and the int32-bias
    sites; the inserted quantizers are exactly what the annotations say."""
    from fxquant.analyze import analyze
    from fxquant.passes import run_passes
    from fxquant.passes.fold_bn import fold_batchnorm
    from fxquant.passes.functionalize import functionalize_modules
    from fxquant.tracing import propagate_shapes

    config = fxq.QuantConfig(share_join_scales=share, integer_bias=integer_bias,
                             activation=fxq.QuantSpec(bits=8))  # granularity left to analysis
    model, x = make("cnn")
    gm = torch.fx.symbolic_trace(model)
    run_passes(gm, (functionalize_modules, fold_batchnorm))
    propagate_shapes(gm, x)
    analyze(gm, config.number_format, config.placement)
    ops = {n.name: quant_op(n) for n in gm.graph.nodes if quant_op(n) is not None}
    points = [p for n in gm.graph.nodes if tensor_info(n) is not None for p in tensor_info(n).points]
    assert ops and points
    assert all(op.weight_spec is None or op.weight_spec.granularity == "per_channel" for op in ops.values())
    assert all(p.spec.granularity == "per_tensor" for p in points)
    assert {name for name, op in ops.items() if op.int32_bias} == (
        {name for name, op in ops.items() if op.weight_spec is not None and op.input_spec is not None}
        if integer_bias else set())
    if share:  # one sign per shared quantizer: signed, because the conv2 branch of the add is signed
        group_points = [p for p in points if p.join_group is not None]
        assert group_points and len({(p.join_group, p.spec, p.nonnegative) for p in group_points}) == len(
            {(p.join_group, p.spec) for p in group_points})

    # every quantizer is named by the plan: weights, activation edges (shared ones once), derived biases
    planned = {op.weight_quantizer for op in ops.values() if op.weight_quantizer is not None}
    planned |= {p.quantizer for p in points}
    planned |= {op.bias.quantizer for op in ops.values() if op.bias is not None}
    for op in ops.values():
        if op.int32_bias:
            assert op.bias is not None and op.bias.weight_quantizer == op.weight_quantizer
            assert op.bias.input_quantizer in {name for _, name in op.input_quantizers}
        else:
            assert op.bias is None
        assert len(op.input_quantizers) == (len(op.input_indices) if op.input_spec is not None else 0)
    if share:
        group_points = [p for p in points if p.join_group is not None]
        assert len({p.quantizer for p in group_points}) == len({(p.join_group, p.spec) for p in group_points})
        assert len({p.quantizer for p in group_points}) < len(group_points)  # shared, resolved once
    else:
        assert len({p.quantizer for p in points}) == len(points)

    qm = fxq.prepare(model, x, config)
    quantizers = qm.fxq_quantizers
    assert set(quantizers.keys()) - {"_checkpoint"} == planned
    biases = [q for q in quantizers.values() if q.kind == "bias"]
    assert len(biases) == sum(op.int32_bias for op in ops.values())
    acts = [q for q in quantizers.values() if q.kind == "activation"]
    assert all(q.granularity == "per_tensor" for q in acts)
    assert all(q.granularity == "per_channel" for q in quantizers.values() if q.kind == "weight")


def test_insertion_executes_the_plan_it_is_given() -> None:
    """Insertion decides nothing: renamed quantizers in the annotations, and a second point on one tensor
    planned to read the first one's output, are inserted exactly so (a hand-made plan on a two-layer MLP)."""
    from fxquant.analyze import analyze
    from fxquant.annotations import ActPoint, tensor_info
    from fxquant.config import EstimatorChoice
    from fxquant.passes import run_passes
    from fxquant.passes.functionalize import functionalize_modules
    from fxquant.passes.insert import insert_activation_quantizers, insert_bias_quantizers, insert_weight_quantizers
    from fxquant.tracing import propagate_shapes

    model, x = make("mlp")
    gm = torch.fx.symbolic_trace(model)
    config = fxq.QuantConfig(first_last_bits=None)
    run_passes(gm, (functionalize_modules, functools.partial(propagate_shapes, example_inputs=x),
                    functools.partial(analyze, number_format=config.number_format, placement=config.placement)))
    fc1 = next(n for n in gm.graph.nodes if quant_op(n) is not None)
    op = quant_op(fc1)
    info = tensor_info(fc1.args[0])
    assert op is not None and op.bias is not None and info is not None and len(info.points) == 1
    # the plan, changed by hand: other names, and a 6-bit quantizer of the input planned after the 8-bit one
    op.weight_quantizer = "w_first"
    info.points[0].quantizer = "x_in"
    op.input_quantizers = ((0, "x_in"),)
    op.bias = dataclasses.replace(op.bias, quantizer="b_first", input_quantizer="x_in", weight_quantizer="w_first")
    info.points.append(ActPoint(consumers=(), spec=info.points[0].spec.replace(bits=6, max_bits=6),
                                nonnegative=False, quantizer="x_six", reads="x_in"))
    estimator = EstimatorChoice()
    run_passes(gm, (functools.partial(insert_weight_quantizers, estimator=estimator),
                    functools.partial(insert_activation_quantizers, estimator=estimator), insert_bias_quantizers))
    names = set(gm.fxq_quantizers.keys())
    assert {"w_first", "x_in", "x_six", "b_first"} <= names
    calls = {str(n.target).split(".")[-1]: n for n in gm.graph.nodes if n.op == "call_module"}
    assert calls["x_six"].args[0] is calls["x_in"]  # reads the planned quantizer's call, not the tensor
    assert calls["x_in"].args[0].op == "placeholder"
    assert fc1.args[0] is calls["x_in"] and fc1.args[1] is calls["w_first"] and fc1.args[2] is calls["b_first"]
    assert gm.fxq_quantizers["b_first"].input_quantizer is gm.fxq_quantizers["x_in"]


def test_kept_float_reads_the_plan_that_insertion_and_freeze_keep() -> None:
    """`kept_float` reads only what analysis wrote on op nodes and the float modules of the capture, which
    insertion and freeze leave as they are: the same list on the analysed graph, the prepared and the frozen
    module (an LSTM and a GRU not quantized, a linear head kept float by an override)."""
    from models_zoo import RecurrentTagger

    from fxquant.analyze import analyze, kept_float
    from fxquant.passes import run_passes
    from fxquant.passes.functionalize import functionalize_modules
    from fxquant.tracing import propagate_shapes

    torch.manual_seed(0)
    model, tokens = RecurrentTagger().eval(), torch.randint(0, 50, (4, 8))
    config = fxq.QuantConfig(overrides=[("head", None)])
    gm = torch.fx.symbolic_trace(model)
    run_passes(gm, (functionalize_modules, functools.partial(propagate_shapes, example_inputs=tokens),
                    functools.partial(analyze, number_format=config.number_format, placement=config.placement)))
    planned = kept_float(gm)
    assert {f.name for f in planned} >= {"lstm", "gru", "head"}
    qm = fxq.prepare(model, tokens, config)
    fxq.calibrate(qm, [tokens])
    assert kept_float(qm) == planned
    assert kept_float(fxq.freeze(qm)) == planned


class _HardswishSE(nn.Module):
    """conv -> hardswish (module) -> squeeze-excite gated by a hard sigmoid -> conv -> pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.Hardswish()
        self.fc1, self.fc2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.project = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv(x))
        gate = F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return self.head(F.adaptive_avg_pool2d(self.project(y * gate), 1).flatten(1))


def test_gated_products_are_quantized_for_integer_kernels_and_hardswish_only_with_quantized_activations() -> None:
    """With quantized activations, hardswish becomes `x * hardsigmoid(x)`; each gated product an integer kernel
    reads gets its gate, its value and its output quantized at the kernel-only 8 bits (QLinearMul/QLinearAdd)
    even at W4A4, the gates unsigned. With float activations (weights only) hardswish stays one op."""
    torch.manual_seed(0)
    model, x = _HardswishSE().eval(), torch.randn(2, 3, 8, 8)
    spec = fxq.QuantSpec(bits=4, min_bits=2, max_bits=8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=spec, activation=spec, first_last_bits=None))
    targets = [n.target for n in qm.graph.nodes if n.op == "call_function"]
    assert F.hardswish not in targets and targets.count(F.hardsigmoid) == 2 and targets.count(operator.mul) == 2
    _, acts = layout(qm)
    served = {c: name for name, (consumers, _) in acts.items() for c in consumers}
    assert {"mul", "mul_1", "hardsigmoid", "hardsigmoid_1"} <= set(served)  # both products' inputs, the gates' inputs
    assert set(acts["act_mul_1"][0]) == {"mul", "adaptive_avg_pool2d"}  # the hardswish's output, for all its readers
    for name in ("act_mul_1", "act_hardsigmoid", "act_hardsigmoid_1", "act_conv2d"):
        q = qm.fxq_quantizers[name]
        assert int(q.integer_bits().max()) == 8 and not q.learn_bits
    gates = [name for name, (_, nonnegative) in acts.items() if name.startswith("act_hardsigmoid")]
    assert len(gates) == 2 and all(acts[g][1] for g in gates)
    with torch.no_grad():
        fxq.calibrate(qm, [x])
        qm.eval()
        assert torch.allclose(qm(x), model(x), atol=0.2)

    weights_only = fxq.prepare(model, x, fxq.QuantConfig(weight=spec, activation=None, first_last_bits=None))
    assert any(isinstance(m, nn.Hardswish) for m in weights_only.modules())


@pytest.mark.parametrize("spelling", ["module", "function"])
def test_silu_becomes_x_times_its_sigmoid_gate(spelling: str) -> None:
    """SiLU (module or function) is `x * sigmoid(x)` after preparation with quantized activations, with the
    same values; the product an integer kernel reads is quantized with its gate."""
    torch.manual_seed(0)
    act = nn.SiLU() if spelling == "module" else F.silu
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(), nn.Conv2d(4, 4, 1)).eval()
    model[1] = act if spelling == "module" else _Apply(act)
    x = torch.randn(2, 3, 8, 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    targets = [n.target for n in qm.graph.nodes if n.op == "call_function"]
    assert F.silu not in targets and torch.sigmoid in targets and operator.mul in targets
    assert not any(isinstance(m, nn.SiLU) for m in qm.modules())
    served = {c for q in qm.fxq_quantizers.values() if getattr(q, "kind", None) == "activation" for c in q.served}
    assert {"sigmoid", "mul"} <= served


class _Apply(nn.Module):
    def __init__(self, fn) -> None:  # noqa: ANN001
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)
