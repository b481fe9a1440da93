"""Fixtures shared by every test file: a fixed seed, the fused kernel's setting restored after a test that changed
it, and each tiny model of `small_models` with its inputs."""

from __future__ import annotations

from typing import Iterator, Tuple

import pytest
import torch
from small_models import MODEL_FACTORIES
from torch import nn

from fxquant.quantizer import fused_cpu


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fused_setting() -> Iterator[None]:
    """`FXQ_FUSED_KERNELS` is read once per process: a test that set it (and called `fused_cpu.reset()`) leaves the
    next test the setting of the restored environment."""
    yield
    if fused_cpu.enabled() != fused_cpu.enabled_in_environment():
        fused_cpu.reset()


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_and_inputs(request: pytest.FixtureRequest) -> Tuple[str, nn.Module, torch.Tensor]:
    """(name, eval-mode float model, example input batch of 4) for each test model."""
    make_model, make_input = MODEL_FACTORIES[request.param]
    torch.manual_seed(0)
    model = make_model().eval()
    return request.param, model, make_input(4)
