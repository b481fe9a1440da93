"""The op registry: one entry per op and argument layout, read the same way for torch and aten spellings."""

from __future__ import annotations

import collections

import onnx
import pytest
import torch
import torch.nn.functional as F
from small_models import make
from torch import fx, nn

import fxquant as fxq
from fxquant import op_registry
from fxquant.op_registry import REGISTRY, OpFacts, facts_of, functional_form

aten = torch.ops.aten
# torch's own deprecation inside deepcopy of torch.export's pytree specs
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

# (torch spelling, aten spelling) of the same op: the facts analysis, folding, insertion and export read
SAME_OP = [
    (F.conv1d, aten.conv1d.default),
    (F.conv2d, aten.conv2d.default),
    (F.conv2d, aten.conv2d.padding),
    (F.conv3d, aten.conv3d.default),
    (F.conv_transpose2d, aten.conv_transpose2d.input),
    (F.linear, aten.linear.default),
    (torch.matmul, aten.matmul.default),
    (F.relu, aten.relu.default),
    (torch.cat, aten.cat.default),
    (torch.reshape, aten.view.default),
]


def _call_node(target: object) -> fx.Node:
    graph = fx.Graph()
    x = graph.placeholder("x")
    return graph.call_function(target, (x,))  # type: ignore[arg-type]


@pytest.mark.parametrize("torch_op, aten_op", SAME_OP, ids=lambda t: getattr(t, "__name__", str(t)))
def test_torch_and_aten_spellings_share_one_entry(torch_op: object, aten_op: object) -> None:
    a, b = facts_of(_call_node(torch_op)), facts_of(_call_node(aten_op))
    assert a is not None and a is b


def test_argument_layouts_give_weight_bias_and_input_positions() -> None:
    linear = facts_of(_call_node(aten.linear.default))
    assert linear is not None and (linear.weight_index, linear.bias_index, linear.input_indices) == (1, 2, (0,))
    assert linear.int32_bias and linear.absorbs_batchnorm and not linear.output_quantized
    torch_embedding = facts_of(_call_node(F.embedding))
    aten_embedding = facts_of(_call_node(aten.embedding.default))
    assert torch_embedding is not None and aten_embedding is not None
    assert (torch_embedding.weight_index, aten_embedding.weight_index) == (1, 0)
    assert torch_embedding.kind == aten_embedding.kind == "embedding"
    matmul = facts_of(_call_node(torch.bmm))
    addmm = facts_of(_call_node(torch.addmm))
    assert matmul is not None and matmul.input_indices == (0, 1) and matmul.weight_index is None
    assert addmm is not None and addmm.input_indices == (1, 2)
    conv = facts_of(_call_node(F.conv2d))
    assert conv is not None and conv.int32_bias and conv.output_quantized


def test_every_target_is_declared_once() -> None:
    functions = [f for e in REGISTRY for f in e.functions]
    methods = [m for e in REGISTRY for m in e.methods]
    modules = [m for e in REGISTRY for m in e.modules]
    for keys in (functions, methods, modules):
        assert len(keys) == len(set(keys))
    with pytest.raises(ValueError, match=r"declared by both 'a' and 'b'"):
        op_registry._index([OpFacts("a", functions=(F.relu,)), OpFacts("b", functions=(F.relu,))])


def test_entries_are_validated() -> None:
    with pytest.raises(ValueError, match=r"kind 'lstm' is not one of"):
        OpFacts("x", kind="lstm")
    with pytest.raises(ValueError, match=r"sign 'positive' is not one of"):
        OpFacts("x", sign="positive")


def test_module_types_sign_rules_follow_subclasses_but_functional_forms_do_not() -> None:
    class MyReLU(nn.ReLU):
        pass

    class MyLinear(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    assert op_registry.facts_of_module(MyReLU()) is op_registry.facts_of_module(nn.ReLU())
    assert functional_form(nn.Linear(2, 2)) is not None
    assert functional_form(MyLinear(2, 2)) is None  # its forward is not F.linear
    assert functional_form(nn.ReLU()) is None


def test_aten_graph_exports_int32_biases_and_matmul_lowering(tmp_path) -> None:  # noqa: ANN001
    """A torch.export capture gets what a symbolic trace gets: int32 biases, linear -> MatMul(x, DQ(W^T))."""
    ops = {}
    for capture in ("symbolic_trace", "export"):
        model, x = make("mlp")
        qm = fxq.prepare(model, x, capture=capture)
        fxq.calibrate(qm, [x])
        path = tmp_path / f"{capture}.onnx"
        exported = fxq.export_onnx(fxq.freeze(qm), x, path)
        int32 = [i for i in exported.graph.initializer if i.data_type == onnx.TensorProto.INT32]
        assert len(int32) == 3, capture  # one bias per linear
        ops[capture] = collections.Counter(n.op_type for n in exported.graph.node)
    assert ops["export"]["MatMul"] == ops["symbolic_trace"]["MatMul"] == 3
    assert ops["export"]["Gemm"] == ops["export"]["Transpose"] == 0
