"""Fixtures shared by every test file: a fixed seed, and each tiny model of `small_models` with its inputs."""

from __future__ import annotations

from typing import Tuple

import pytest
import torch
from small_models import MODEL_FACTORIES
from torch import nn


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=sorted(MODEL_FACTORIES))
def model_and_inputs(request: pytest.FixtureRequest) -> Tuple[str, nn.Module, torch.Tensor]:
    """(name, eval-mode float model, example input batch of 4) for each test model."""
    make_model, make_input = MODEL_FACTORIES[request.param]
    torch.manual_seed(0)
    model = make_model().eval()
    return request.param, model, make_input(4)
