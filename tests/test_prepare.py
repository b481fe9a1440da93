"""prepare / freeze end to end on the test models: fidelity, isolation from the user's model, errors."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from small_models import make
from torch import nn

import fxquant as fxq
from fxquant.graph import module_state

HIGH = fxq.QuantConfig(
    weight=fxq.QuantSpec(bits=16, min_bits=2, max_bits=16),
    activation=fxq.QuantSpec(bits=16, min_bits=2, max_bits=16),
    first_last_bits=16,
)


def test_high_bits_close_to_float_and_disabled_exact(model_and_inputs) -> None:
    name, model, x = model_and_inputs
    qm = fxq.prepare(model, x, HIGH)
    fxq.calibrate(qm, [x])
    qm.eval()
    with torch.no_grad():
        ref = model(x)
        out = qm(x)
        with fxq.quantizers_enabled(qm, False):
            exact = qm(x)
    # BatchNorm folding changes float rounding only; 16-bit quantizers change values by ~1e-4 relative
    assert torch.allclose(exact, ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(out, ref, atol=2e-3 * float(ref.abs().max()))


def test_frozen_equals_eval_prepared_exactly(model_and_inputs) -> None:
    name, model, x = model_and_inputs
    cfg = fxq.QuantConfig(weight=fxq.QuantSpec(bits=3), activation=fxq.QuantSpec(bits=4), first_last_bits=None)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    qm.eval()
    frozen = fxq.freeze(qm)
    with torch.no_grad():
        assert torch.equal(frozen(x), qm(x))
    assert not any(isinstance(m, fxq.LearnableQuantizer) for m in frozen.modules())
    assert not any(p.requires_grad for p in frozen.parameters())
    codes = [m.codes for m in frozen.modules() if isinstance(m, fxq.FrozenWeight)]
    assert codes and all(c.dtype == torch.int8 and -4 <= int(c.min()) and int(c.max()) <= 3 for c in codes)  # 3-bit full range
    # the prepared module stays usable
    qm.train()
    qm(x).sum().backward()


def test_deepcopy_of_prepared_module_can_be_frozen_and_exported(tmp_path) -> None:
    """A copy (e.g. to keep the best run, or an EMA) keeps its fxquant state: freeze and export accept it."""
    model, x = make("mlp")
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x])
    qm_copy = copy.deepcopy(qm).eval()
    assert qm_copy.fxquant_state == "prepared" and qm_copy.fxquant_config == qm.fxquant_config
    frozen = fxq.freeze(qm_copy)
    assert copy.deepcopy(frozen).fxquant_state == "frozen"
    with torch.no_grad():
        assert torch.equal(frozen(x), qm.eval()(x))
    fxq.export_onnx(copy.deepcopy(frozen), x, str(tmp_path / "copy.onnx"))
    assert (tmp_path / "copy.onnx").stat().st_size > 0


def test_user_model_is_not_modified_and_training_works() -> None:
    """A training loop of the user's own, with an optimizer over `qm.parameters()`: the weights the prepared
    module shared with the model (the layers without BatchNorm) get their own copies at the first backward."""
    model, x = make("cnn")
    before = copy.deepcopy(model.state_dict())
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=4)))
    assert isinstance(qm, torch.fx.GraphModule) and not qm.training  # same mode as the model
    assert _storages(model) & _storages(qm)  # shared until written
    qm.train()
    fxq.calibrate(qm, [x])
    opt = torch.optim.Adam(qm.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss = (qm(x) ** 2).mean()
        loss.backward()
        opt.step()
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "fxq_quantizers")
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_prepare_refuses_prepared_or_frozen_modules() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x)
    with pytest.raises(fxq.PrepareError, match=r"already prepared by fxquant; prepare the original float model"):
        fxq.prepare(qm, x)
    fxq.calibrate(qm, [x])
    frozen = fxq.freeze(qm)
    with pytest.raises(fxq.PrepareError, match=r"already frozen by fxquant"):
        fxq.prepare(frozen, x)
    with pytest.raises(fxq.StateError, match=r"freeze expects a module returned by fxq.prepare"):
        fxq.freeze(frozen)


def test_freeze_refuses_uncalibrated_activations() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x)
    with pytest.raises(fxq.StateError, match=r"was never calibrated; run fxq.calibrate"):
        fxq.freeze(qm)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.gate = Gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc(x))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: symbolic tracing cannot follow it
            return x
        return -x


def test_untraceable_model_error_names_module_line_and_fix() -> None:
    with pytest.raises(fxq.CaptureError) as info:
        fxq.prepare(Branchy(), torch.randn(2, 4), capture="symbolic_trace")
    message = str(info.value)
    assert "module 'gate' (Gate)" in message
    assert "test_prepare.py" in message and "if x.sum() > 0" in message
    assert "leaf_modules=['gate']" in message and "capture='export'" in message


def test_leaf_modules_keep_untraceable_parts_float() -> None:
    model = Branchy().eval()
    x = torch.randn(2, 4)
    qm = fxq.prepare(model, x, leaf_modules=["gate"], capture="symbolic_trace")
    assert any(n.op == "call_module" and n.target == "gate" for n in qm.graph.nodes)
    with pytest.raises(fxq.PrepareError, match=r"leaf_modules entry 'gaet' is not a submodule"):
        fxq.prepare(model, x, leaf_modules=["gaet"], capture="symbolic_trace")


def test_bad_inputs_are_clear_errors() -> None:
    model, x = make("mlp")
    with pytest.raises(fxq.PrepareError, match=r"example_inputs of type str is not supported"):
        fxq.prepare(model, "x")
    with pytest.raises(fxq.PrepareError, match=r"running example_inputs through the captured"):
        fxq.prepare(model, torch.randn(2, 7))
    with pytest.raises(fxq.PrepareError, match=r"keyword\(s\) \['y'\] that the model's forward does not take"):
        fxq.prepare(model, {"x": x, "y": x})
    with pytest.raises(fxq.PrepareError, match=r"config must be a fxq.QuantConfig"):
        fxq.prepare(model, x, {"mode": "ste"})  # type: ignore[arg-type]
    qm = fxq.prepare(model, {"x": x})  # keyword inputs work
    assert qm.fxq_quantizers is not None


class StochasticDepth(nn.Module):
    """A residual branch dropped at random in training (torchvision's StochasticDepth branches on training)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.training:
            y = y * (torch.rand(x.shape[0], 1, 1, 1) > 0.5).float()
        return x + F.dropout(y, 0.5, training=self.training)


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_a_model_in_training_mode_is_captured_as_its_inference_graph(capture: str, tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    model = StochasticDepth().train()
    x = torch.randn(2, 3, 8, 8)
    qm = fxq.prepare(model, x, capture=capture)
    assert model.training and qm.training  # the user's mode is kept on both
    targets = " ".join(str(n.target) for n in qm.graph.nodes)
    assert "rand" not in targets
    dropouts = [n for n in qm.graph.nodes if n.op == "call_function" and "dropout" in str(n.target)]
    assert dropouts and all(False in n.args or n.kwargs.get("training") is False for n in dropouts)
    fxq.calibrate(qm, [x])
    onnx_model = fxq.export_onnx(fxq.freeze(qm), x, tmp_path / "m.onnx")
    assert not [n.op_type for n in onnx_model.graph.node if "Random" in n.op_type or n.op_type == "Dropout"]


def test_freeze_shares_no_tensor_with_the_prepared_module_and_leaves_it_trainable() -> None:
    torch.manual_seed(0)
    shared = nn.Linear(8, 8)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = shared, nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # `a.weight` also feeds a float op besides its quantized linear: freeze must keep a copy
            return self.b(self.a(x)) + (self.a.weight.sum() * 0.0)

    x = torch.randn(4, 8)
    qm = fxq.prepare(Tied(), x)
    fxq.calibrate(qm, [x])
    trainable = [p.requires_grad for p in qm.parameters()]
    frozen = fxq.freeze(qm)
    ptrs = {t.data_ptr() for t in list(qm.parameters()) + list(qm.buffers())}
    assert not any(t.data_ptr() in ptrs for t in list(frozen.parameters()) + list(frozen.buffers()))
    assert [p.requires_grad for p in qm.parameters()] == trainable and any(trainable)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), qm.eval()(x))


def _storages(module: nn.Module) -> set:
    return {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_prepare_inplace_reuses_the_model_weights_and_holds_no_second_copy(capture: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    model.train()
    x = torch.randn(2, 3, 8, 8)
    reference = copy.deepcopy(model).eval()
    linear = model[4].weight
    qm = fxq.prepare(model, x, capture=capture, inplace=True)
    assert qm.training  # the model's mode is kept for the prepared module
    float_storages = _storages(model)
    prepared = {n: t.untyped_storage().data_ptr() for n, t in qm.named_parameters() if not n.startswith("fxq_quantizers.")}
    assert linear.untyped_storage().data_ptr() in prepared.values()  # the linear weight is the model's own tensor
    # every float tensor of the prepared module is the model's, except the BatchNorm-folded conv's new weights
    assert len([p for p in prepared.values() if p not in float_storages]) <= 2
    fxq.calibrate(qm, [x])
    with torch.no_grad(), fxq.quantizers_enabled(qm, False):
        torch.testing.assert_close(qm.eval()(x), reference(x))


def test_prepare_shares_the_model_weights_until_something_writes_them(tmp_path) -> None:  # noqa: ANN001
    """Calibrate, freeze and export read the model's own weight tensors (no second copy); `param_groups`
    (what finetune uses) and a state-dict load give the prepared module its own copies first."""
    model, x = make("mlp")
    before = copy.deepcopy(model.state_dict())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    qm = fxq.prepare(model, x)
    assert weights <= _storages(qm)  # every float weight shared: nothing was folded in an MLP
    fxq.calibrate(qm, [x])
    fxq.export_onnx(fxq.freeze(qm), x, str(tmp_path / "m.onnx"))
    assert weights <= _storages(qm)
    assert fxq.own_weights(copy.deepcopy(qm)) == 0  # a deep copy owns its tensors already
    state = {k: v + 1 if k.endswith("fc1.weight") else v for k, v in qm.state_dict().items()}
    qm.load_state_dict(state)
    assert not (_storages(model) & _storages(qm)) and fxq.own_weights(qm) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(qm.state_dict()["fc1.weight"], before["fc1.weight"] + 1)


def test_param_groups_and_finetune_own_the_weights_before_an_optimizer_writes_them() -> None:
    model, x = make("mlp")
    before = copy.deepcopy(model.state_dict())
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=4)))
    fxq.calibrate(qm, [x])
    groups = fxq.param_groups(qm)
    assert not (_storages(model) & {p.untyped_storage().data_ptr() for g in groups for p in g["params"]})
    qm2 = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=4)))
    fxq.calibrate(qm2, [x])
    fxq.finetune(qm2, [x], teacher=model, steps=3, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (_storages(model) & _storages(qm2))


def test_inplace_must_be_a_bool() -> None:
    model, x = make("mlp")
    with pytest.raises(fxq.PrepareError, match="inplace='yes' is not a bool; pass inplace=False"):
        fxq.prepare(model, x, inplace="yes")


def _state_dicts_equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        not isinstance(v, torch.Tensor) or (v.dtype == b[k].dtype and torch.equal(v, b[k])) for k, v in a.items()
    )


def test_freeze_inplace_is_the_frozen_copy_made_from_the_prepared_module_itself(model_and_inputs) -> None:
    name, model, x = model_and_inputs
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=4), first_last_bits=None))
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    copied = fxq.freeze(qm)
    frozen = fxq.freeze(qm, inplace=True)
    assert frozen is qm and module_state(frozen) == "frozen"
    assert not any(isinstance(m, fxq.LearnableQuantizer) for m in frozen.modules())
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    with torch.no_grad():
        assert torch.equal(frozen(x), copied(x))
    assert _state_dicts_equal(frozen.state_dict(), copied.state_dict())
    fxq.load_state_dict(copied, frozen.state_dict())  # a checkpoint of either loads into the other
    with pytest.raises(fxq.StateError, match="freeze expects a module returned by fxq.prepare"):
        fxq.freeze(frozen)


def test_freeze_inplace_releases_each_float_weight_once_its_codes_exist(monkeypatch: pytest.MonkeyPatch) -> None:
    """No second float copy: when a weight's codes are made, the weights frozen before are gone (from the module and
    from memory), and after freeze no float weight remains; a weight a float op also reads is kept."""
    import gc
    import weakref

    from fxquant.graph import tensors_read_by_quantizers
    from fxquant.quantizer import frozen as frozen_module

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x + self.layers[3].weight.sum() * 0.0  # the last weight also feeds a float op

    x = torch.randn(4, 16)
    model = Net()
    qm = fxq.prepare(model, x, fxq.QuantConfig(integer_bias=False), inplace=True)
    del model
    fxq.calibrate(qm, [x])
    with torch.no_grad():
        expected = fxq.freeze(qm)(x)
    weights = {id(t): t for t in tensors_read_by_quantizers(qm).values() if t.dim() == 2}
    assert len(weights) == 4
    alive = [weakref.ref(t) for t in weights.values()]
    storages = {t.untyped_storage().data_ptr() for t in weights.values()}
    del weights
    seen = []
    init = frozen_module.FrozenWeight.__init__

    def recording(self: fxq.FrozenWeight, source: fxq.LearnableQuantizer, weight: torch.Tensor) -> None:
        gc.collect()
        held = {t.untyped_storage().data_ptr() for t in list(qm.parameters()) + list(qm.buffers())} & storages
        seen.append((len(held), sum(r() is not None for r in alive)))
        init(self, source, weight)

    monkeypatch.setattr(frozen_module.FrozenWeight, "__init__", recording)
    frozen = fxq.freeze(qm, inplace=True)
    gc.collect()
    assert seen == [(4, 4), (3, 3), (2, 2), (1, 1)]
    kept = {t.untyped_storage().data_ptr() for t in frozen.parameters()} & storages
    assert len(kept) == 1 and sum(r() is not None for r in alive) == 1  # layers[3].weight only
    with torch.no_grad():
        assert torch.equal(frozen(x), expected)


def test_freeze_inplace_must_be_a_bool() -> None:
    model, x = make("mlp")
    qm = fxq.prepare(model, x)
    fxq.calibrate(qm, [x])
    with pytest.raises(fxq.ConfigError, match="inplace=1 is not a bool"):
        fxq.freeze(qm, inplace=1)  # type: ignore[arg-type]
    assert module_state(qm) == "prepared"
