"""Tiny seeded test models shared by the test files (CPU): an MLP, a CNN with a residual add and a concat, a
depthwise-separable CNN and a transformer block. `make(name, batch)` gives `(eval-mode model, inputs)`;
`MODEL_FACTORIES` maps each name to its model and input factories. The fixtures built on them are in
`conftest.py`; this is a plain module so that spawned processes (`test_distributed.py`) can import it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class ResCatCNN(nn.Module):
    """Conv-BN-ReLU stem, a residual block (add), a two-branch concat, global pool, linear head."""

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.branch_a = nn.Conv2d(c, c, 1)
        self.branch_b = nn.Conv2d(c, c, 3, padding=1)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = F.relu(x + y)
        x = torch.cat([F.relu(self.branch_a(x)), F.relu(self.branch_b(x))], dim=1)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.head(x)


class DepthwiseSeparable(nn.Module):
    """Conv stem, depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN, pool, linear."""

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
        self.dw_bn = nn.BatchNorm2d(c)
        self.pw = nn.Conv2d(c, 2 * c, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(2 * c)
        self.fc = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu6(self.dw_bn(self.dw(x)))
        x = self.pw_bn(self.pw(x))
        x = x.mean(dim=(2, 3))
        return self.fc(x)


class TransformerBlock(nn.Module):
    """Pre-LN block: LayerNorm, QKV linears, softmax attention (two activation matmuls), GELU MLP."""

    def __init__(self, d: int = 16, heads: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp1 = nn.Linear(d, 2 * d)
        self.mlp2 = nn.Linear(2 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.ln1(x)
        q = self.q(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        k = self.k(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(h).reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        x = x + self.mlp2(F.gelu(self.mlp1(self.ln2(x))))
        return self.head(x.mean(dim=1))


def _init_bn(model: nn.Module) -> nn.Module:
    """Give BatchNorms non-trivial running statistics so folding is actually tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


MODEL_FACTORIES = {
    "mlp": (lambda: MLP(), lambda n: torch.randn(n, 16)),
    "cnn": (lambda: _init_bn(ResCatCNN()), lambda n: torch.randn(n, 3, 8, 8)),
    "depthwise": (lambda: _init_bn(DepthwiseSeparable()), lambda n: torch.randn(n, 3, 8, 8)),
    "transformer": (lambda: TransformerBlock(), lambda n: torch.randn(n, 6, 16)),
}


def make(name: str, batch: int = 4):  # noqa: ANN201
    """(model, inputs) for a named test model."""
    make_model, make_input = MODEL_FACTORIES[name]
    torch.manual_seed(0)
    return make_model().eval(), make_input(batch)
