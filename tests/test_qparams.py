"""QParams: the typed parameters freeze hands to export (containers, layouts, exactness, validation)."""

from __future__ import annotations

import pytest
import torch
from small_models import make

import fxquant as fxq
from fxquant.export.ops import broadcast_scale
from fxquant.qparams import QParams, container_for
from fxquant.quantizer import FrozenActivationQuantizer, FrozenBias, FrozenWeight, fake_quantize


@pytest.mark.parametrize(
    "kind, bits, expected",
    [
        ("weight", 2, "int4"), ("weight", 3, "int4"), ("weight", 5, "int8"), ("weight", 8, "int8"),
        ("weight", 12, "int16"), ("activation", 2, "uint8"), ("activation", 8, "uint8"), ("activation", 10, "uint16"),
        ("bias", 32, "int32"),
    ],
)
def test_freeze_chooses_the_smallest_container_onnxruntime_runs(kind: str, bits: int, expected: str) -> None:
    assert container_for(kind, bits) == expected


def _frozen(weight: fxq.QuantSpec) -> torch.fx.GraphModule:
    model, x = make("cnn")
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=weight, first_last_bits=None))
    fxq.calibrate(qm, [x])
    return fxq.freeze(qm)


@pytest.mark.parametrize("narrow_range", [False, True], ids=["full range", "narrow range"])
@pytest.mark.parametrize("granularity, layout", [("per_channel", "per_axis"), ("per_tensor", "per_tensor")])
def test_weight_qparams_dequantize_to_the_frozen_weight(granularity: str, layout: str, narrow_range: bool) -> None:
    frozen = _frozen(fxq.QuantSpec(bits=4, granularity=granularity, narrow_range=narrow_range))
    weights = [q for q in frozen.fxq_quantizers.values() if isinstance(q, FrozenWeight)]
    assert weights
    qmin = -7 if narrow_range else -8
    for q in weights:
        qp = q.qparams()
        assert (qp.layout, qp.bits, qp.qmin, qp.qmax, qp.container) == (layout, 4, qmin, 7, "int4")
        assert int(q.codes.min()) >= qmin
        axis = -1 if qp.axis is None else qp.axis
        scale = broadcast_scale(q.codes, qp.scale, axis, 0)
        assert torch.equal(q.codes.to(scale.dtype) * scale, q())


def test_blocked_and_transposed_qparams() -> None:
    model, x = make("mlp")
    spec = fxq.QuantSpec(bits=4, granularity="per_group", group_size=8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=spec, activation=None, first_last_bits=None))
    frozen = fxq.freeze(qm)
    q = frozen.fxq_quantizers["fc1_weight"]
    qp = q.qparams()
    assert (qp.layout, qp.axis, qp.block_size) == ("blocked", 1, 8)
    assert qp.scale.shape == (q.codes.shape[0], q.codes.shape[1] // 8)
    assert torch.equal(q.codes.to(qp.scale.dtype) * broadcast_scale(q.codes, qp.scale, 1, 8), q())
    t = qp.transposed()
    assert (t.axis, t.scale.shape) == (0, qp.scale.t().shape)
    codes_t = q.codes.t()
    assert torch.equal(codes_t.to(t.scale.dtype) * broadcast_scale(codes_t, t.scale, 0, 8), q().t())


def test_activation_and_bias_qparams_match_the_frozen_modules() -> None:
    frozen = _frozen(fxq.QuantSpec(bits=8))
    acts = [q for q in frozen.fxq_quantizers.values() if isinstance(q, FrozenActivationQuantizer)]
    biases = [q for q in frozen.fxq_quantizers.values() if isinstance(q, FrozenBias)]
    assert acts and biases
    x = torch.randn(1000) * 3
    for q in acts:
        qp = q.qparams()
        assert qp.layout == "per_tensor" and qp.container == "uint8" and not qp.signed
        zp = qp.zero_point.to(qp.scale.dtype)
        y = fake_quantize(x, qp.scale, zp, torch.tensor(float(qp.qmin)), torch.tensor(float(qp.qmax)))
        assert torch.equal(y, q(x))
    for q in biases:
        qp = q.qparams()
        assert qp.container == "int32" and qp.bits == 32
        assert torch.equal(q.codes.to(qp.scale.dtype) * qp.scale.reshape(-1), q())


def test_inconsistent_qparams_are_refused() -> None:
    s = torch.ones(3)
    zp = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="per_tensor has no axis"):
        QParams("weight", 4, s, zp, -7, 7, "per_tensor", 0, None, "int4")
    with pytest.raises(ValueError, match="block_size"):
        QParams("weight", 4, s, zp, -7, 7, "blocked", 0, None, "int4")
    with pytest.raises(ValueError, match="scale .* and zero point .* differ"):
        QParams("weight", 4, s, zp[:2], -7, 7, "per_axis", 0, None, "int4")
    with pytest.raises(ValueError, match="container 'int3'"):
        QParams("weight", 4, s, zp, -7, 7, "per_axis", 0, None, "int3")
    with pytest.raises(ValueError, match="layout 'rows'"):
        QParams("weight", 4, s, zp, -7, 7, "rows", 0, None, "int4")


def test_every_quantizer_shares_one_base_and_freeze_keeps_each_integer_grid() -> None:
    """Learnable, bias and frozen quantizers are all `Quantizer`s; freeze keeps each one's integer grid and
    summary (bits, steps, clamps) exactly, the int32 bias included."""
    from fxquant.quantizer import BiasQuantizer, LearnableQuantizer, Quantizer

    model, x = make("cnn")
    qm = fxq.prepare(model, x, fxq.QuantConfig(weight=fxq.QuantSpec(bits=4), first_last_bits=None))
    fxq.calibrate(qm, [x])
    qm.eval()
    prepared = dict(qm.fxq_quantizers.items())
    frozen = dict(fxq.freeze(qm).fxq_quantizers.items())
    kinds = {type(q) for q in prepared.values()} | {type(q) for q in frozen.values()}
    assert {LearnableQuantizer, BiasQuantizer, FrozenWeight, FrozenActivationQuantizer, FrozenBias} <= kinds
    assert all(isinstance(q, Quantizer) for q in [*prepared.values(), *frozen.values()])
    for name, q in prepared.items():
        grid, frozen_grid = q.integer_grid(), frozen[name].integer_grid()
        for field in ("bits", "scale", "zero_point", "qmin", "qmax"):
            assert torch.equal(getattr(grid, field).reshape(-1), getattr(frozen_grid, field).reshape(-1)), (name, field)
        learned, kept = q.summary(), frozen[name].summary()
        assert (learned.kind, learned.served, learned.bits, learned.step_min, learned.hi_max, learned.lo_min) == (
            kept.kind, kept.served, kept.bits, kept.step_min, kept.hi_max, kept.lo_min)
        assert kept.learn_bits is False and kept.bits_continuous == kept.bits
