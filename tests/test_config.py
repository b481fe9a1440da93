"""QuantSpec / QuantConfig validation: every bad value is a ConfigError (a ValueError) that says why."""

from __future__ import annotations

import pytest

import fxquant as fxq


def test_defaults_are_w8a8_per_channel_weights() -> None:
    cfg = fxq.QuantConfig()
    assert cfg.weight is not None and cfg.weight.bits == 8 and cfg.weight.granularity == "per_channel"
    assert cfg.activation is not None and cfg.activation.granularity == "per_tensor"
    assert cfg.mode == "dither" and cfg.first_last_bits == 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(min_bits=6, max_bits=4, bits=4), r"min_bits=6 is greater than max_bits=4"),
        (dict(bits=17, max_bits=16), r"bits=17 is outside 1\.\.16"),
        (dict(bits=0, min_bits=0), r"bits=0 is outside 1\.\.16"),
        (dict(max_bits=20), r"max_bits=20 is outside 1\.\.16"),
        (dict(bits=9), r"bits=9 is outside \[min_bits, max_bits\]=\[2, 8\]"),
        (dict(bits="8"), r"bits='8' is not a number"),
        (dict(granularity="per_row"), r"granularity='per_row' is unknown"),
        (dict(granularity="per_group"), r"group_size=None is invalid for granularity='per_group'"),
        (dict(granularity="per_channel", group_size=8), r"group_size=8 is only used with granularity='per_group'"),
    ],
)
def test_quant_spec_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fxq.QuantSpec(**kwargs)


def test_config_errors_are_fxquant_errors() -> None:
    with pytest.raises(fxq.ConfigError):
        fxq.QuantSpec(min_bits=5, max_bits=3, bits=4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="lsq"), r"mode='lsq' is unknown; expected one of \('dither', 'ste', 'noise'\)"),
        (dict(noise="laplace"), r"noise='laplace' is unknown"),
        (dict(weight=8), r"QuantConfig.weight=8 is not a QuantSpec"),
        (dict(first_last_bits=1), r"first_last_bits=1 is outside 2\.\.16"),
        (dict(first_last_bits="8"), r"first_last_bits='8' must be an integer"),
        (dict(join_bits=1), r"QuantConfig.join_bits=1 must be an integer in 2\.\.16 or None; use 8"),
        (dict(join_bits=True), r"join_bits=True must be an integer"),
        (dict(overrides="fc"), r"overrides='fc' must be a list"),
        (dict(overrides=[("fc",)]), r"overrides entry \('fc',\) must be a \(glob, QuantSpec \| None\) pair"),
        (dict(overrides=[("fc", 4)]), r"overrides entry for 'fc' has spec 4"),
        (
            dict(activation=fxq.QuantSpec(granularity="per_channel")),
            r"activations are quantized per tensor",
        ),
        (dict(weight=fxq.QuantSpec(bits=1, min_bits=1)), r"weights are signed .* at least 2 bits"),
    ],
)
def test_quant_config_rejects(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fxq.QuantConfig(**kwargs)


def test_config_is_frozen_and_overrides_become_a_tuple() -> None:
    cfg = fxq.QuantConfig(overrides=[("fc*", None)])
    assert cfg.overrides == (("fc*", None),)
    with pytest.raises(AttributeError):
        cfg.mode = "ste"  # type: ignore[misc]
    assert cfg.replace(mode="ste").mode == "ste"


def test_config_parts_are_typed_and_make_the_config_back() -> None:
    """`QuantConfig` splits into the number format (analysis), the placement (analysis, insertion) and the
    training estimator (fine-tuning's default); `from_parts` builds the same configuration from them."""
    from fxquant.config import EstimatorChoice, NumberFormat, Placement

    cfg = fxq.QuantConfig(weight=fxq.QuantSpec(bits=4), first_last_bits=None, overrides=[("fc", None)], mode="ste",
                          join_bits=None)
    assert cfg.number_format == NumberFormat(weight=fxq.QuantSpec(bits=4))
    assert cfg.placement == Placement(overrides=(("fc", None),), first_last_bits=None, join_bits=None)
    assert cfg.estimator == EstimatorChoice(mode="ste")
    assert fxq.QuantConfig.from_parts(cfg.number_format, cfg.placement, cfg.estimator) == cfg
    assert fxq.QuantConfig.from_parts() == fxq.QuantConfig()
    with pytest.raises(fxq.ConfigError, match=r"from_parts got .*Placement.* where a NumberFormat goes"):
        fxq.QuantConfig.from_parts(Placement())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.NumberFormat(weight=8), r"NumberFormat.weight=8 is not a QuantSpec"),
        (lambda p: p.Placement(first_last_bits=1), r"Placement.first_last_bits=1 is outside 2\.\.16"),
        (lambda p: p.Placement(overrides="fc"), r"Placement.overrides='fc' must be a list"),
        (lambda p: p.Placement(join_bits=17), r"Placement.join_bits=17 must be an integer in 2\.\.16 or None"),
        (lambda p: p.EstimatorChoice(noise="laplace"), r"EstimatorChoice.noise='laplace' is unknown"),
        (lambda p: p.EstimatorChoice(mode="lsq"), r"EstimatorChoice.mode='lsq' is unknown"),
    ],
)
def test_config_parts_validate_and_name_themselves(make, message: str) -> None:  # noqa: ANN001
    import fxquant.config as parts

    with pytest.raises(fxq.ConfigError, match=message):
        make(parts)
