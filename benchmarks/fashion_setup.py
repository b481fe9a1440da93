"""The low-bit benchmark's float model and data: a ~150k-parameter ResNet for Fashion-MNIST (>= 92.5% top-1).

- data: Fashion-MNIST from Debian's `dataset-fashion-mnist` (installed with apt-get when missing and
  possible); 28x28 grey images scaled to [0, 1];
- model: `FashionResNet20` — a 3x3 stem, then BasicBlocks (two 3x3 conv + BatchNorm, 1x1 projection on
  stride or width changes) a 16-channel stem at 28x28, then widths 32 (14x14), 64 (7x7), 64 (7x7), global average pooling, a linear
  head; BatchNorm after every conv;
- training: seeded, random horizontal flips and 2-pixel shifts, SGD-Nesterov with OneCycle, cached in
  `$FXQUANT_BENCH_CACHE` (default `~/.cache/fxquant-bench`) outside git so reruns skip it.

Used by `bench_lowbit.py`; the plain LSQ baseline is `plain_lsq.py`.
"""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import time
from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FASHION_DIR = "/usr/share/datasets/fashion-mnist"
CACHE_DIR = os.environ.get("FXQUANT_BENCH_CACHE", os.path.expanduser("~/.cache/fxquant-bench"))
Batch = Tuple[torch.Tensor, torch.Tensor]


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_fashion_mnist() -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(x_train, y_train, x_test, y_test)`; raises SystemExit with the install command when missing."""
    if not os.path.isdir(FASHION_DIR) and shutil.which("apt-get"):
        subprocess.run(["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not os.path.isdir(FASHION_DIR):
        raise SystemExit("Fashion-MNIST is missing: run `apt-get install dataset-fashion-mnist` and retry.")

    def images(name: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(os.path.join(FASHION_DIR, name)).copy()).float().unsqueeze(1) / 255.0

    def labels(name: str) -> torch.Tensor:
        return torch.from_numpy(_read_idx(os.path.join(FASHION_DIR, name)).copy()).long()

    return (images("train-images-idx3-ubyte.gz"), labels("train-labels-idx1-ubyte.gz"),
            images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz"))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class FashionResNet20(nn.Module):
    """~150k parameters: stem 16 @28x28, blocks 32 (s2) -> 64 (s2) -> 64, pooling, linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.layer1 = BasicBlock(16, 32, 2)
        self.layer2 = BasicBlock(32, 64, 2)
        self.layer3 = BasicBlock(64, 64, 1)
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and shifts of up to 2 pixels (zero padding)."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    x = F.pad(x, (2, 2, 2, 2))[:, :, 2 + dy : 30 + dy, 2 + dx : 30 + dx]
    return x


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Top-1 % of `model` (eval mode) on `(x, y)`."""
    was = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    model.train(was)
    return 100.0 * correct / len(x)


def train_float(epochs: int = 10, batch: int = 128, seed: int = 0, verbose: bool = True) -> Tuple[nn.Module, float]:
    """The float model, from the cache when present; returns `(model in eval mode, test top-1 %)`."""
    path = os.path.join(CACHE_DIR, f"fashion_resnet20_e{epochs}_b{batch}_s{seed}.pt")
    x_tr, y_tr, x_te, y_te = load_fashion_mnist()
    torch.manual_seed(seed)
    model = FashionResNet20()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        return model, accuracy(model, x_te, y_te)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(x_tr) // batch
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=epochs * steps_per_epoch)
    model = model.to(memory_format=torch.channels_last)  # ~25% faster conv training on CPU
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x_tr), generator=gen)
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(augment(x_tr[idx], gen)), y_tr[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"  float epoch {epoch + 1}/{epochs}: test {accuracy(model, x_te, y_te):.2f}% "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model = model.to(memory_format=torch.contiguous_format).eval()
    os.makedirs(CACHE_DIR, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, accuracy(model, x_te, y_te)


def finetune_batches(steps: int, batch: int, seed: int) -> List[Batch]:
    """The fine-tuning batches every method sees: `steps` seeded random batches of the training split."""
    x_tr, y_tr, _, _ = load_fashion_mnist()
    gen = torch.Generator().manual_seed(1000 + seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (batch,), generator=gen)
        out.append((augment(x_tr[idx], gen), y_tr[idx]))
    return out


if __name__ == "__main__":
    torch.set_num_threads(2)
    m, acc = train_float()
    print(f"FashionResNet20: {sum(p.numel() for p in m.parameters())} params, test top-1 {acc:.2f}%")
