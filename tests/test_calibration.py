"""calibrate, batch reading and run_passes: behaviour and every error message."""

from __future__ import annotations

import functools

import pytest
import torch
from small_models import make

import fxquant as fxq
from fxquant.batches import cycle_batches, split_batch
from fxquant.passes import (
    ACTIVATIONS_QUANTIZED,
    ANALYZED,
    BN_FOLDED,
    FROZEN,
    FUNCTIONAL,
    SHAPES,
    WEIGHTS_QUANTIZED,
    graph_pass,
    properties,
    run_passes,
)
from fxquant.passes.freeze import freeze_quantizers
from fxquant.passes.functionalize import functionalize_modules
from fxquant.tracing import propagate_shapes


def test_minmax_and_percentile_set_activation_clamps() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    batches = [torch.randn(64, 16) for _ in range(3)]
    fxq.calibrate(qm, batches, method="minmax")
    lo, hi = (t.detach() for t in qm.fxq_quantizers["act_x"].clamp_bounds())
    assert float(lo) == pytest.approx(float(torch.cat(batches).min()))
    assert float(hi) == pytest.approx(float(torch.cat(batches).max()))
    fxq.calibrate(qm, batches, method="percentile", percentile=90.0)
    lo_p, hi_p = (t.detach() for t in qm.fxq_quantizers["act_x"].clamp_bounds())
    assert float(lo) < float(lo_p) < 0 < float(hi_p) < float(hi)
    fxq.calibrate(qm, batches, bits=6)
    assert float(qm.fxq_quantizers["fc2_weight"].bits()) == pytest.approx(6.0)


def test_mse_calibration_fits_the_clamps_to_the_bits_trained_on() -> None:
    """At 2 bits the least-squared-error clip beats min/max on both weights and activations."""
    torch.manual_seed(0)
    model, x = make("mlp")
    spec = fxq.QuantSpec(bits=2, learn_bits=False)
    batches = [torch.randn(64, 16) for _ in range(3)]
    errors = {}
    for method in ("minmax", "mse"):
        qm = fxq.prepare(model, x, fxq.QuantConfig(weight=spec, activation=spec, first_last_bits=None))
        fxq.calibrate(qm, batches, method=method)
        qm.eval()
        w_q = qm.fxq_quantizers["fc2_weight"]
        a_q = qm.fxq_quantizers["act_x"]
        w = qm.fc2.weight.detach()
        xs = torch.cat(batches)
        with torch.no_grad():
            errors[method] = (float((w_q(w) - w).pow(2).sum()), float((a_q(xs) - xs).pow(2).sum()))
    assert errors["mse"][0] < errors["minmax"][0] and errors["mse"][1] < errors["minmax"][1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="kl"), r"calibrate method='kl' is unknown"),
        (dict(method="percentile", percentile=40.0), r"calibrate percentile=40.0 must be in \(50, 100\]"),
        (dict(num_batches=0), r"calibrate num_batches=0 must be at least 1"),
    ],
)
def test_calibrate_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x)
    with pytest.raises(fxq.ConfigError, match=message):
        fxq.calibrate(qm, [x], **kwargs)


def test_calibrate_errors_on_state_and_data() -> None:
    model, x = make("mlp")
    with pytest.raises(fxq.StateError, match=r"calibrate found no learnable quantizers"):
        fxq.calibrate(torch.fx.symbolic_trace(model), [x])
    qm = fxq.prepare(model, x)
    with pytest.raises(fxq.PrepareError, match=r"calibrate got no batches"):
        fxq.calibrate(qm, [])
    with pytest.raises(fxq.StateError, match=r"saw no finite values during calibration"):
        fxq.calibrate(qm, [torch.full((4, 16), float("nan"))])


def test_weight_quantizer_refuses_a_tensor_of_another_shape() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x)
    with pytest.raises(fxq.StateError, match=r"expected shape \(32, 16\), got \(3, 3\)"):
        qm.fxq_quantizers["fc1_weight"].observe(torch.zeros(3, 3))


def test_split_batch_rules_and_errors() -> None:
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    assert split_batch(x, 1) == ((x,), {}, None)
    assert split_batch((x, y), 1)[2] is y  # a DataLoader pair for a one-input model
    assert split_batch((x, y), 2) == ((x, y), {}, None)  # two positional inputs
    assert split_batch(((x, y), y), 2)[0] == (x, y)
    assert split_batch({"x": x}, 1) == ((), {"x": x}, None)
    with pytest.raises(fxq.PrepareError, match=r"a batch of type str is not understood"):
        split_batch("x", 1)


def test_cycle_batches_errors() -> None:
    with pytest.raises(fxq.PrepareError, match=r"must be an iterable of batches .* wrap it in a list"):
        next(cycle_batches(torch.zeros(2)))
    with pytest.raises(fxq.PrepareError, match=r"batches is empty; give at least one batch"):
        next(cycle_batches([]))
    stream = cycle_batches(iter([torch.zeros(1)]))
    next(stream)
    assert next(stream, None) is None  # a one-shot iterator is read once: the stream ends
    assert [float(b) for b, _ in zip(cycle_batches([torch.tensor(1.0), torch.tensor(2.0)]), range(5))] == [1, 2, 1, 2, 1]


def test_run_passes_names_the_failing_pass() -> None:
    model, _ = make("mlp")
    gm = torch.fx.symbolic_trace(model)

    @graph_pass()
    def ok(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return g

    @graph_pass()
    def broken(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
        raise KeyError("boom")

    @graph_pass()
    def replaces(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return torch.fx.symbolic_trace(model)

    with pytest.raises(fxq.PassError, match=r"pass broken failed \(after \['ok'\]\): KeyError"):
        run_passes(gm, (ok, broken))
    with pytest.raises(fxq.PassError, match=r"pass replaces returned a new module"):
        run_passes(gm, (replaces,))


def test_run_passes_checks_each_contract_and_records_what_the_passes_ensure() -> None:
    model, x = make("mlp")
    gm = torch.fx.symbolic_trace(model)

    @graph_pass(requires=(FUNCTIONAL,), ensures=("tested",))
    def needs_functional(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return g

    @graph_pass(analysis=True)
    def rewrites_while_analysing(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
        out = next(n for n in g.graph.nodes if n.op == "output")
        with g.graph.inserting_before(out):
            negated = g.graph.call_function(torch.neg, (out.args[0],))
        out.args = (negated,)
        return g

    def undeclared(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
        return g

    with pytest.raises(fxq.PassError, match=r"pass needs_functional requires 'functional', which the module does "
                       r"not have \(it has no property\); 'functional' is ensured by functionalize_modules: run "
                       r"that pass first"):
        run_passes(gm, (needs_functional,))
    with pytest.raises(fxq.PassError, match=r"undeclared is not a declared graph pass; decorate it with @fxquant"):
        run_passes(gm, (undeclared,))
    run_passes(gm, (functools.partial(propagate_shapes, example_inputs=x), functionalize_modules, needs_functional))
    # functionalize rewrote the graph after the shapes were recorded: they are stale, the rest holds
    assert properties(gm) == {FUNCTIONAL, "tested"}
    run_passes(gm, (functools.partial(propagate_shapes, example_inputs=x),))
    assert properties(gm) == {FUNCTIONAL, "tested", SHAPES}
    with pytest.raises(fxq.PassError, match=r"analysis pass rewrites_while_analysing changed the graph"):
        run_passes(gm, (rewrites_while_analysing,))


def test_a_prepared_and_a_frozen_module_carry_the_properties_of_the_passes_that_made_them() -> None:
    model, x = make("cnn")
    qm = fxq.prepare(model, x)
    assert {FUNCTIONAL, BN_FOLDED, SHAPES, ANALYZED, WEIGHTS_QUANTIZED, ACTIVATIONS_QUANTIZED} <= properties(qm)
    assert FROZEN not in properties(qm)
    fxq.calibrate(qm, [x], progress=False)
    frozen = fxq.freeze(qm)
    assert FROZEN in properties(frozen) and FROZEN not in properties(qm)
    with pytest.raises(fxq.PassError, match=r"pass freeze_quantizers requires 'activation quantizers inserted', 'weight quantizers inserted'"):
        run_passes(torch.fx.symbolic_trace(model), (freeze_quantizers,))


def test_the_clip_search_keeps_samples_of_at_most_eight_batches_in_one_buffer() -> None:
    from fxquant.calibration import SAMPLE_BATCHES, SAMPLE_PER_BATCH, _Reservoir

    torch.manual_seed(0)
    reservoir = _Reservoir(SAMPLE_BATCHES, torch.device("cpu"))
    buffer = reservoir.buffer.data_ptr()
    small = torch.arange(10.0)
    reservoir.hook(None, (small,), small)  # an observing quantizer's output is what it observed
    small.fill_(-1.0)  # a copy was kept, not a view of the batch's tensor
    for b in range(1, 30):  # batch b holds the value b; the large ones are sampled
        batch = torch.full((3 * SAMPLE_PER_BATCH,), float(b))
        reservoir.hook(None, (batch,), batch)
    values = reservoir.values()
    assert reservoir.seen == 30 and reservoir.buffer.data_ptr() == buffer
    kept = set(values.unique().tolist())
    assert len(values) <= SAMPLE_BATCHES * SAMPLE_PER_BATCH and len(kept) <= SAMPLE_BATCHES
    assert -1.0 not in kept and kept <= set(range(0, 30)) | set(float(i) for i in range(10))
    assert any(v >= SAMPLE_BATCHES for v in kept)  # later batches replace earlier ones (reservoir)


class _Residual(torch.nn.Module):
    """A block input read by a conv and by the residual add: one quantizer each (the add's requantizes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        y = torch.relu(self.conv2(torch.relu(self.conv1(y))) + y)
        return self.head(y.mean((2, 3)))


def test_quantizers_of_one_tensor_share_its_sample_and_export_without_a_requantization(tmp_path) -> None:  # noqa: ANN001
    """The block input's two 8-bit quantizers (the conv's, the add's) fit one random sample of the tensor
    (large enough to be sampled), so they get equal clamps, and onnxruntime's optimized graph has no
    DequantizeLinear -> QuantizeLinear between them."""
    import onnx
    import onnxruntime as ort

    from fxquant.graph import quantizer_calls

    torch.manual_seed(0)
    model = _Residual().eval()
    batches = [torch.randn(4, 3, 64, 64) ** 3 for _ in range(3)]  # 4 * 8 * 64 * 64 = 131072 values per batch
    qm = fxq.prepare(model, batches[0][:1])
    fxq.calibrate(qm, batches, method="mse", progress=False)
    chained = [(name, node.args[0].target) for node, name in quantizer_calls(qm.graph)
               if isinstance(node.args[0], torch.fx.Node) and node.args[0].op == "call_module"
               and str(node.args[0].target).startswith("fxq_quantizers.")]
    assert chained, "the test model should requantize the block input for the add"
    for name, upstream in chained:
        q, up = qm.fxq_quantizers[name], qm.get_submodule(str(upstream))
        assert torch.equal(q.integer_grid().scale, up.integer_grid().scale), name
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "residual.onnx")
    fxq.export_onnx(frozen, batches[0][:1], path)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    producer = {out: node for node in graph.node for out in node.output}
    requantized = [n.name for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in producer
                   and producer[n.input[0]].op_type == "DequantizeLinear"]
    assert requantized == []


@pytest.mark.parametrize("name", ["llama", "resnet"])
def test_calibration_runs_only_what_the_quantizers_read(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`calibrate` runs the batches through `observed_only(qm)`: the graph without the nodes no quantizer reads (a
    language model's LM head and its logits, a CNN's last linear), in place ops and module calls kept; the clamps
    are those of running the whole prepared module, and the prepared module keeps its graph."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import models_zoo

    from fxquant import calibration

    model, example, batches = models_zoo.ZOO[name]()
    states = []
    made = []
    monkeypatch.setattr(calibration, "observed_only", lambda m, _f=calibration.observed_only: made.append(_f(m)) or made[-1])
    qm = fxq.prepare(model, example)
    fxq.calibrate(qm, batches[:1], progress=False)
    # the observer holds nothing of the prepared module's once calibrate returns (it would keep alive, until a
    # garbage collection, the float weights an in-place freeze releases)
    assert made and not list(made[0].parameters()) and not list(made[0].buffers()) and not list(made[0].children())
    monkeypatch.undo()
    for prune in (True, False):
        torch.manual_seed(0)
        qm = fxq.prepare(model, example)
        nodes = len(qm.graph.nodes)
        if not prune:
            monkeypatch.setattr(calibration, "observed_only", lambda m: m)
        pruned = calibration.observed_only(qm)
        if prune:
            output = next(n for n in qm.graph.nodes if n.op == "output")
            last = output.all_input_nodes  # what computes the model's outputs
            assert last and all(n.name not in {m.name for m in pruned.graph.nodes} for n in last)
        torch.manual_seed(1)
        fxq.calibrate(qm, batches, progress=False)
        assert len(qm.graph.nodes) == nodes
        states.append(qm.state_dict())
        monkeypatch.undo()
    assert states[0].keys() == states[1].keys()
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]) if isinstance(v, torch.Tensor) else v == states[1][k], k


def test_observed_only_keeps_in_place_ops_and_module_calls() -> None:
    """An in-place op whose result nothing reads still writes a tensor others read; a module call may observe: both
    stay in `observed_only`'s graph, a pure op nothing reads does not."""
    from fxquant.calibration import observed_only

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(4, 4))
            self.side = torch.nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            y.add_(1)
            self.side(y)
            unused = torch.sin(y)  # noqa: F841
            return y @ self.w

    gm = torch.fx.symbolic_trace(Net())
    pruned = observed_only(gm)
    kinds = [(n.op, str(n.target)) for n in pruned.graph.nodes]
    assert ("call_method", "add_") in kinds and ("call_module", "side") in kinds
    assert not any("sin" in t or "matmul" in t or t == "w" for _, t in kinds) and gm(torch.ones(1, 4)).shape == (1, 4)
    assert pruned(torch.ones(1, 4)) is None
