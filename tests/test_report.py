"""fxq.report: one row per quantizer, size totals, prepared and frozen modules alike."""

from __future__ import annotations

import pytest
import torch
from small_models import make

import fxquant as fxq


def test_report_rows_and_totals() -> None:
    model, x = make("mlp")
    cfg = fxq.QuantConfig(weight=fxq.QuantSpec(bits=4), first_last_bits=None)
    qm = fxq.prepare(model, x, cfg)
    fxq.calibrate(qm, [x])
    rep = fxq.report(qm)
    assert [r.name for r in rep.rows] == ["fc1_weight", "fc2_weight", "fc3_weight", "act_x", "act_relu", "act_relu_1"]
    w = rep.rows[0]
    assert (w.kind, w.serves, w.granularity, w.bits, w.numel) == ("weight", "fc1", "per_channel", 4.0, 16 * 32)
    assert w.bytes_at_bits == 16 * 32 * 4 / 8
    # full-range 4-bit codes -8..7: the grid reaches one step further below zero than above
    assert w.signed and w.lo == pytest.approx(-w.hi * 8 / 7) and w.step_min <= w.step_max
    assert not rep.rows[4].signed  # after ReLU
    n_weights = 16 * 32 + 32 * 32 + 32 * 10
    n_bias = 32 + 32 + 10
    assert rep.quantized_weight_numel == n_weights and rep.float_param_numel == n_bias
    assert rep.avg_weight_bits == 4.0
    assert rep.size_bytes == n_weights * 0.5 + n_bias * 4
    assert rep.float_size_bytes == (n_weights + n_bias) * 4
    assert rep.compression == pytest.approx(rep.float_size_bytes / rep.size_bytes)
    text = str(rep)
    assert "fc1_weight" in text and "compression" not in text and "x smaller" in text
    assert rep.to_dict()["compression"] == rep.compression


def test_report_of_frozen_equals_prepared() -> None:
    model, x = make("cnn")
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=5)))
    fxq.calibrate(qm, [x])
    a, b = fxq.report(qm), fxq.report(fxq.freeze(qm))
    assert [(r.name, r.bits, r.numel, r.bytes_at_bits) for r in a.rows] == [
        (r.name, r.bits, r.numel, r.bytes_at_bits) for r in b.rows
    ]
    assert a.size_bytes == b.size_bytes and a.float_size_bytes == b.float_size_bytes
    for ra, rb in zip(a.rows, b.rows):
        assert ra.step_min == pytest.approx(rb.step_min) and ra.hi == pytest.approx(rb.hi, rel=1e-5)


def test_report_of_a_plain_module_is_refused() -> None:
    with pytest.raises(fxq.StateError, match=r"report expects a module from fxq.prepare or fxq.freeze"):
        fxq.report(torch.nn.Linear(2, 2))


def test_kept_float_ops_are_typed_and_the_report_is_plain_data() -> None:
    """An op kept float by an override is a `FloatOp` of the report (name, op, why), printed and in `to_dict`,
    which `json` writes as it is."""
    import json

    from fxquant.analyze import FloatOp

    model, x = make("mlp")
    qm = fxq.prepare(model, x, fxq.QuantConfig(overrides=[("fc2", None)]))
    rep = fxq.report(qm)
    assert rep.kept_float == [FloatOp("fc2", "linear", "kept float by override 'fc2'")]
    assert "kept float: fc2 (linear): kept float by override 'fc2'" in str(rep)
    data = json.loads(json.dumps(rep.to_dict()))
    assert data["kept_float"] == [{"name": "fc2", "op": "linear", "reason": "kept float by override 'fc2'"}]
    assert data["capture_notes"] == []
