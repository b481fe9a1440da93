"""`passes.absorb_relu`: a ReLU read only by non-negative activation quantizers leaves the prepared graph, and the
prepared module computes what it computed with the ReLU, in every state of its quantizers (switched off,
calibrating, training, eval, frozen)."""

from __future__ import annotations

import copy
from typing import Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from small_models import make
from torch import fx, nn

import fxquant as fxq
import fxquant.preparation as preparation
from fxquant.op_registry import facts_of
from fxquant.passes import RELUS_ABSORBED, graph_pass
from fxquant.quantizer import iter_learnable


@graph_pass(ensures=(RELUS_ABSORBED,))
def _keep_relus(gm: fx.GraphModule) -> fx.GraphModule:
    return gm


def _relus(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if (f := facts_of(n)) is not None and f.name == "relu")


def _pair(model: nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch,
          config: Optional[fxq.QuantConfig] = None) -> Tuple[fx.GraphModule, fx.GraphModule]:
    """The model prepared as by default (ReLUs absorbed) and with every ReLU kept."""
    absorbed = fxq.prepare(model, x, config)
    with monkeypatch.context() as m:
        m.setattr(preparation, "absorb_relus", _keep_relus)
        kept = fxq.prepare(model, x, config)
    return absorbed, kept


def _calibrated(qm: fx.GraphModule, batches: list) -> fx.GraphModule:
    torch.manual_seed(3)  # calibration samples at random: the same draws for both modules
    return fxq.calibrate(qm, batches)


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_relus_read_only_by_nonnegative_quantizers_leave_the_graph(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = make(name)
    absorbed, kept = _pair(model, x, monkeypatch)
    assert _relus(kept) > 0
    assert _relus(absorbed) == 0
    flagged = [q for _, q in iter_learnable(absorbed) if q.absorbed_relu]
    assert flagged and all(q.nonnegative and q.kind == "activation" for q in flagged)
    assert "absorbed_relu=True" in repr(flagged[0])
    # the quantizers of the kept graph that read a ReLU are the flagged ones
    readers = {str(u.target) for n in kept.graph.nodes if (f := facts_of(n)) is not None and f.name == "relu"
               for u in n.users}
    assert readers == {n for n, q in iter_learnable(absorbed) if q.absorbed_relu}


class _ReluAndRaw(nn.Module):
    """A conv output read through a ReLU by one conv and as it is by another: the two quantizers see different
    values of one tensor, and calibration must not give them one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        return self.conv2(F.relu(y)) + self.conv3(y)


def _relu_and_raw() -> Tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return _ReluAndRaw().eval(), torch.randn(8, 3, 8, 8)


@pytest.mark.parametrize("name", ["cnn", "relu_and_raw"])
def test_absorbed_relus_compute_the_same_in_every_state(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, x = make("cnn", batch=8) if name == "cnn" else _relu_and_raw()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(3)]
    # 4 bits, where the clip search's sample decides the clamps (at 8 bits it keeps min/max)
    four = fxq.QuantConfig(activation=fxq.QuantSpec(bits=4, learn_bits=False), first_last_bits=None)
    absorbed, kept = _pair(model, x, monkeypatch, four)
    assert _relus(absorbed) == 0

    # quantizers switched off: the float (BatchNorm-folded) model
    with fxq.quantizers_enabled(absorbed, False), fxq.quantizers_enabled(kept, False), torch.no_grad():
        assert torch.equal(absorbed(x), kept(x))

    # calibration sees the ReLU's values (min/max and the clip search's samples): the same clamps
    _calibrated(absorbed, batches)
    _calibrated(kept, batches)
    assert {k: v for k, v in absorbed.fxq_quantizers.state_dict().items()}.keys() == kept.fxq_quantizers.state_dict().keys()
    for key, value in absorbed.fxq_quantizers.state_dict().items():
        assert torch.equal(value, kept.fxq_quantizers.state_dict()[key]), key

    # eval, and the frozen module
    absorbed.eval()
    kept.eval()
    with torch.no_grad():
        assert torch.equal(absorbed(x), kept(x))
        assert torch.equal(fxq.freeze(absorbed)(x), fxq.freeze(kept)(x))

    # training: the same outputs
    absorbed.train()
    kept.train()
    with torch.no_grad():
        torch.manual_seed(5)
        first = absorbed(batches[0])
        torch.manual_seed(5)
        assert torch.equal(first, kept(batches[0]))


def test_absorbed_relus_train_with_the_same_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the plain straight-through estimator, the same gradients where no input of a ReLU is exactly 0 (there the
    ReLU's derivative is 0, while a clamp passes an element equal to its bound; in the residual CNN the ReLU after
    the add often reads exact zeros, sums of two quantized values). The dither differs by design: it sums the
    upstream gradient of the elements inside the clamps, which counted the ReLU's zeros (on the grid, no rounding
    error) where the ReLU was kept."""
    model, x = make("mlp", batch=32)
    batches = [torch.randn(32, 16) for _ in range(3)]
    absorbed, kept = _pair(model, x, monkeypatch)
    grads = []
    for qm in (absorbed, kept):
        _calibrated(qm, batches)
        qm.train()
        for _, q in iter_learnable(qm):
            q.mode = "ste"
        out = qm(batches[0])
        out.square().sum().backward()
        grads.append({n: p.grad for n, p in qm.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=1e-5, atol=1e-8, msg=name)


def test_fine_tuning_with_absorbed_relus_follows_the_bits_as_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bits descend from 8 to 4 (`follow_bits_` samples what the ReLU would give): the same run."""
    model, x = make("mlp", batch=16)
    batches = [torch.randn(16, 16) for _ in range(4)]
    runs = []
    for qm in _pair(model, x, monkeypatch):
        _calibrated(qm, batches)
        torch.manual_seed(7)
        fxq.finetune(qm, batches * 3, teacher=model, steps=12, target_bits=4, progress=False, mode="ste")
        qm.eval()
        with torch.no_grad():
            runs.append(qm(x))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-5)


class _ReluReadTwice(nn.Module):
    """A ReLU read by a conv (through a quantizer) and by the output itself (float)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        y = F.relu(self.conv1(x))
        return self.conv2(y), y


class _InPlaceRelu(nn.Module):
    """An in-place ReLU whose input is also read afterwards (it reads the ReLU's result)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        z = F.relu(y, inplace=True)
        return self.conv2(z) + y.mean()


@pytest.mark.parametrize("cls", [_ReluReadTwice, _InPlaceRelu])
def test_a_relu_read_by_something_else_stays(cls: type) -> None:
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 8, 8)
    qm = fxq.prepare(model, x)
    assert _relus(qm) == 1
    assert not any(q.absorbed_relu for _, q in iter_learnable(qm))
    with fxq.quantizers_enabled(qm, False), torch.no_grad():
        got, want = qm(x), copy.deepcopy(model)(x)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(a, b)
