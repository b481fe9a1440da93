"""Single passes on hand-built graphs: each pass alone, through `run_passes`, on a graph written node by node
(no tracing), checked for the nodes it leaves and for computing what the graph computed before."""

from __future__ import annotations

import functools
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxquant.config import NumberFormat, QuantSpec
from fxquant.errors import PassError
from fxquant.passes import BN_FOLDED, FUNCTIONAL, properties, run_passes
from fxquant.passes.attention import decompose_attention
from fxquant.passes.fold_bn import fold_batchnorm
from fxquant.passes.functionalize import functionalize_modules
from fxquant.passes.gated_activations import decompose_gated_activations
from fxquant.tracing import propagate_shapes


def _module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    graph.lint()
    return fx.GraphModule(root, graph)


def _targets(gm: fx.GraphModule) -> list:
    return [(n.op, n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_module")]


def test_functionalize_turns_a_module_call_into_its_function_on_the_module_weights() -> None:
    root = nn.Module()
    root.lin = nn.Linear(4, 3)
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("lin", (x,))
    graph.output(graph.call_function(torch.relu, (y,)))
    gm = _module(root, graph)
    inp = torch.randn(2, 4)
    expected = gm(inp)
    run_passes(gm, (functionalize_modules,))
    assert _targets(gm) == [("call_function", F.linear), ("call_function", torch.relu)]
    linear = next(n for n in gm.graph.nodes if n.target is F.linear)
    assert [a.target for a in linear.args[1:]] == ["lin.weight", "lin.bias"]
    assert FUNCTIONAL in properties(gm)
    assert torch.equal(gm(inp), expected)


def test_fold_batchnorm_folds_an_eval_batch_norm_into_the_conv_before_it() -> None:
    torch.manual_seed(0)
    root = nn.Module()
    root.register_parameter("w", nn.Parameter(torch.randn(4, 3, 3, 3)))
    for name, value in (("mean", torch.randn(4)), ("var", torch.rand(4) + 0.5), ("gamma", torch.rand(4) + 0.5),
                        ("beta", torch.randn(4))):
        root.register_buffer(name, value)
    graph = fx.Graph()
    x = graph.placeholder("x")
    conv = graph.call_function(F.conv2d, (x, graph.get_attr("w")), {"padding": 1})
    stats = [graph.get_attr(n) for n in ("mean", "var", "gamma", "beta")]
    bn = graph.call_function(F.batch_norm, (conv, *stats), {"training": False, "eps": 1e-5})
    graph.output(graph.call_function(F.relu, (bn,)))
    gm = _module(root, graph)
    inp = torch.randn(2, 3, 6, 6)
    expected = gm(inp)
    run_passes(gm, (functionalize_modules, fold_batchnorm))
    assert _targets(gm) == [("call_function", F.conv2d), ("call_function", F.relu)]
    folded = next(n for n in gm.graph.nodes if n.target is F.conv2d)
    assert len(folded.args) >= 3 and folded.args[2] is not None  # the folded bias
    assert BN_FOLDED in properties(gm)
    torch.testing.assert_close(gm(inp), expected, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_leaves_a_batch_norm_in_training_form() -> None:
    root = nn.Module()
    root.register_parameter("w", nn.Parameter(torch.randn(4, 3, 1, 1)))
    root.register_buffer("mean", torch.zeros(4))
    root.register_buffer("var", torch.ones(4))
    graph = fx.Graph()
    x = graph.placeholder("x")
    conv = graph.call_function(F.conv2d, (x, graph.get_attr("w")))
    bn = graph.call_function(F.batch_norm, (conv, graph.get_attr("mean"), graph.get_attr("var")), {"training": True})
    graph.output(bn)
    gm = _module(root, graph)
    run_passes(gm, (functionalize_modules, fold_batchnorm))
    assert _targets(gm) == [("call_function", F.conv2d), ("call_function", F.batch_norm)]


def test_decompose_attention_writes_fused_attention_as_two_matmuls_and_a_softmax() -> None:
    """It reads the query's shape (the default scale), so shapes are propagated first."""
    graph = fx.Graph()
    q, k, v = (graph.placeholder(n) for n in "qkv")
    graph.output(graph.call_function(F.scaled_dot_product_attention, (q, k, v)))
    gm = _module(nn.Module(), graph)
    inputs = [torch.randn(2, 3, 5, 8) for _ in range(3)]
    expected = gm(*inputs)
    run_passes(gm, (functools.partial(propagate_shapes, example_inputs=tuple(inputs)), decompose_attention))
    functions = [t for op, t in _targets(gm)]
    assert F.scaled_dot_product_attention not in functions
    assert functions.count(torch.matmul) == 2 and any("softmax" in getattr(t, "__name__", "") for t in functions)
    torch.testing.assert_close(gm(*inputs), expected, rtol=1e-5, atol=1e-5)


def test_a_pass_whose_requirement_is_missing_is_refused_with_the_pass_that_ensures_it() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(operator.add, (x, x)))
    gm = _module(nn.Module(), graph)
    with pytest.raises(PassError, match=r"pass fold_batchnorm requires 'functional'.*ensured by functionalize_modules"):
        run_passes(gm, (fold_batchnorm,))


class _Gated(nn.Module):
    """hardswish (module), SiLU (function and module), and an in-place SiLU whose input a later op reads."""

    def __init__(self) -> None:
        super().__init__()
        self.hardswish, self.silu = nn.Hardswish(), nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * 2.0
        y = F.silu(h, inplace=True)  # writes h: the next line reads the activated tensor
        return self.silu(self.hardswish(x)) + F.silu(x) + h + y


def test_decompose_gated_activations_writes_x_times_its_gate_with_the_same_values() -> None:
    """hardswish -> x * hardsigmoid(x), SiLU -> x * sigmoid(x) (module and function calls), the same values; an
    in-place call whose input is read again is left as it is; nothing changes when activations stay float."""
    torch.manual_seed(0)
    x = torch.randn(4, 5)
    quantized = NumberFormat(weight=QuantSpec(bits=8), activation=QuantSpec(bits=8))
    gm = decompose_gated_activations(fx.symbolic_trace(_Gated()), number_format=quantized)
    gm.recompile()
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert F.hardsigmoid in targets and targets.count(torch.sigmoid) == 2 and targets.count(F.silu) == 1  # the in-place one
    assert not [n for n in gm.graph.nodes if n.op == "call_module"]
    assert torch.allclose(gm(x.clone()), _Gated()(x.clone()), atol=1e-6)
    float_activations = NumberFormat(weight=QuantSpec(bits=8), activation=None)
    kept = decompose_gated_activations(fx.symbolic_trace(_Gated()), number_format=float_activations)
    assert sum(n.op == "call_module" for n in kept.graph.nodes) == 2
