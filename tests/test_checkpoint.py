"""Checkpoints: prepared and frozen state dicts round-trip exactly; mismatched ones are refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models_zoo import ZOO
from small_models import make

import fxquant as fxq


def _trained(name: str = "cnn", config: fxq.QuantConfig | None = None):  # noqa: ANN202
    model, x = make(name)
    qm = fxq.prepare(model, x, config)
    fxq.calibrate(qm, [x])
    with torch.no_grad():  # move every learnable parameter away from its fresh value
        for p in qm.fxq_quantizers.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, x, qm


def _save_load(sd: dict, path: Path) -> dict:
    torch.save(sd, path)
    return torch.load(path, weights_only=True)


def test_prepared_round_trip_is_exact(tmp_path: Path) -> None:
    model, x, qm = _trained()
    sd = _save_load(qm.state_dict(), tmp_path / "qm.pt")
    assert sd["fxq_checkpoint._extra_state"]["state"] == "prepared"
    fresh = fxq.prepare(model, x)
    fxq.load_state_dict(fresh, sd)
    qm.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(qm(x), fresh(x))
    for (k, a), (k2, b) in zip(qm.state_dict().items(), fresh.state_dict().items()):
        assert k == k2
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), k


def test_frozen_round_trip_is_exact(tmp_path: Path) -> None:
    model, x, qm = _trained()
    frozen = fxq.freeze(qm)
    sd = _save_load(frozen.state_dict(), tmp_path / "frozen.pt")
    assert sd["fxq_checkpoint._extra_state"]["state"] == "frozen"
    fresh_qm = fxq.prepare(model, x)
    fxq.calibrate(fresh_qm, [torch.randn_like(x)])
    fresh = fxq.freeze(fresh_qm)
    fresh.load_state_dict(sd)  # the plain torch call is checked too
    with torch.no_grad():
        assert torch.equal(frozen(x), fresh(x))


def test_frozen_codes_take_the_checkpoint_integer_type(tmp_path: Path) -> None:
    model, x = make("mlp")
    wide = fxq.QuantConfig(weight=fxq.QuantSpec(bits=12, max_bits=12, granularity="per_channel"), first_last_bits=None)
    qm = fxq.prepare(model, x, wide)
    fxq.calibrate(qm, [x])
    frozen = fxq.freeze(qm)
    sd = _save_load(frozen.state_dict(), tmp_path / "f.pt")
    fresh_qm = fxq.prepare(model, x, wide)
    fxq.calibrate(fresh_qm, [x])
    with torch.no_grad():
        for _, q in fresh_qm.fxq_quantizers.items():
            if q.kind == "weight":
                q.set_bits(8)  # fresh module freezes to int8 codes; the checkpoint holds int16
    fresh = fxq.freeze(fresh_qm)
    fxq.load_state_dict(fresh, sd)
    with torch.no_grad():
        assert torch.equal(frozen(x), fresh(x))


def test_export_captured_round_trip(tmp_path: Path) -> None:
    model, example, batches = ZOO["bert"]()
    qm = fxq.prepare(model, example)
    fxq.calibrate(qm, batches)
    sd = _save_load(qm.state_dict(), tmp_path / "bert.pt")
    fresh = fxq.prepare(model, example)
    fresh.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(qm.eval()(**example)["logits"], fresh.eval()(**example)["logits"])


def test_other_config_is_refused_naming_the_field() -> None:
    model, x, qm = _trained()
    other = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    with pytest.raises(fxq.CheckpointError, match=r"config\.first_last_bits: 8 in the checkpoint, None here"):
        fxq.load_state_dict(other, qm.state_dict())
    with pytest.raises(fxq.CheckpointError, match=r"config\.first_last_bits"):
        other.load_state_dict(qm.state_dict())  # the plain call is refused the same way


@pytest.mark.parametrize("mode", ["noise", "ste"])
def test_a_checkpoint_loads_into_a_module_prepared_with_another_estimator(mode: str) -> None:
    """The estimator is fine-tuning's choice (`finetune(mode=...)`), not part of the checkpoint's identity; a
    checkpoint saved before it was left out (its config holds `mode`) loads too."""
    model, x, qm = _trained()
    other = fxq.prepare(model, x, fxq.QuantConfig(mode=mode))
    saved = qm.state_dict()
    other.load_state_dict(saved)
    with torch.no_grad():
        assert torch.equal(qm.eval()(x), other.eval()(x))
    info = saved["fxq_checkpoint._extra_state"]
    assert "mode" not in info["config"] and "first_last_bits" in info["config"]
    older = {**saved, "fxq_checkpoint._extra_state": {**info, "config": {**info["config"], "mode": "'dither'"}}}
    fxq.load_state_dict(fxq.prepare(model, x, fxq.QuantConfig(mode=mode)), older)


def test_refused_load_changes_nothing() -> None:
    model, x, qm = _trained()
    other = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(fxq.CheckpointError):
        other.load_state_dict(qm.state_dict())
    after = other.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if isinstance(before[k], torch.Tensor))


def test_other_model_is_refused_with_class_keys_and_shapes() -> None:
    _, _, qm = _trained("cnn")
    model, x = make("depthwise")
    other = fxq.prepare(model, x)
    with pytest.raises(fxq.CheckpointError, match=r"model class: small_models\.ResCatCNN in the checkpoint, small_models\.DepthwiseSeparable here") as e:
        fxq.load_state_dict(other, qm.state_dict())
    text = str(e.value)
    assert "captured graph" in text
    assert "missing from the checkpoint" in text
    assert "that this module does not have" in text
    assert "Load it into a module made the same way" in text


def test_other_size_is_refused_with_shapes() -> None:
    from small_models import MLP

    torch.manual_seed(0)
    x = torch.randn(4, 16)
    a = fxq.prepare(MLP(hidden=32).eval(), x)
    b = fxq.prepare(MLP(hidden=16).eval(), x)
    with pytest.raises(fxq.CheckpointError, match=r"shape mismatch\(es\): fc1\.weight \(32, 16\) in the checkpoint vs \(16, 16\) here"):
        fxq.load_state_dict(b, a.state_dict())


def test_frozen_checkpoint_into_prepared_module_is_refused() -> None:
    model, x, qm = _trained()
    frozen = fxq.freeze(qm)
    with pytest.raises(fxq.CheckpointError, match="state: a frozen module's checkpoint, this module is prepared"):
        fxq.load_state_dict(fxq.prepare(model, x), frozen.state_dict())


def test_float_state_dict_is_refused() -> None:
    model, x, qm = _trained()
    with pytest.raises(fxq.CheckpointError, match="not saved from an fxquant module"):
        fxq.load_state_dict(qm, model.state_dict())


def test_other_capture_is_refused() -> None:
    model, x, qm = _trained()
    other = fxq.prepare(model, x, capture="export")
    with pytest.raises(fxq.CheckpointError, match="capture front end: symbolic_trace in the checkpoint, export here"):
        fxq.load_state_dict(other, qm.state_dict())


def test_a_frozen_checkpoint_from_before_full_range_codes_loads_as_narrow(tmp_path: Path) -> None:
    """A frozen checkpoint saved before weights had full-range codes (no `qmin` buffers, `QuantSpec` without
    `narrow_range`) loads into a module made with `narrow_range=True`, which is what it was trained with, and is
    refused by a default (full-range) one with the difference named."""
    model, x = make("mlp")
    narrow = fxq.QuantConfig(weight=fxq.QuantSpec(bits=4, narrow_range=True), first_last_bits=None)

    def frozen_of(config: fxq.QuantConfig) -> torch.fx.GraphModule:
        qm = fxq.prepare(model, x, config)
        fxq.calibrate(qm, [x])
        return fxq.freeze(qm)

    saved = frozen_of(narrow)
    old = {k: v for k, v in _save_load(saved.state_dict(), tmp_path / "old.pt").items() if not k.endswith("_weight.qmin")}
    info = old["fxq_checkpoint._extra_state"]
    info["config"] = {k: v.replace(", narrow_range=True", "") for k, v in info["config"].items()}
    assert any("QuantSpec(" in v for v in info["config"].values())
    fresh = frozen_of(narrow)
    fresh.load_state_dict(old)
    with torch.no_grad():
        assert torch.equal(fresh(x), saved(x))
    assert all(torch.equal(m.qmin, -m.qmax) for m in fresh.modules() if isinstance(m, fxq.FrozenWeight))
    with pytest.raises(fxq.CheckpointError, match="narrow_range"):
        frozen_of(fxq.QuantConfig(weight=fxq.QuantSpec(bits=4), first_last_bits=None)).load_state_dict(old)
