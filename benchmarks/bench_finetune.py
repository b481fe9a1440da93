"""Step time of `fxq.finetune` (quantizers on) vs a float distillation step on the same batches.

Both loops do the same work per step: a teacher forward, a student forward and backward with the
Jeffreys-divergence loss, one Adam step. The float loop trains a copy of the float model; `fxq.finetune`
trains the prepared module (W4A4 target, exterior penalty, every estimator) and also does its bookkeeping
(penalty, bits statistics, candidate selection and state copies at the interval of a 300-step run; see
`quant_steps_ms`). Prints ms/step for each and the ratio, measured in one run, for three models: the digits CNN, the Fashion-MNIST ResNet of `bench_lowbit.py` (~147k parameters)
and a ResNet-18 (11M parameters, 32x32 inputs).

Run: `python benchmarks/bench_finetune.py [--steps 30] [--threads 2] [--models digits,fashion,resnet18]`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_modes_digits import digits_setup  # noqa: E402
from fashion_setup import BasicBlock, FashionResNet20  # noqa: E402

import fxquant as fxq  # noqa: E402
from fxquant.losses import distillation_loss  # noqa: E402


class ResNet18(nn.Module):
    """ResNet-18 (BasicBlocks [2, 2, 2, 2], widths 64..512) for 32x32 RGB inputs: 11.2M parameters."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(64)
        layers: List[nn.Module] = []
        cin = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, width, stride), BasicBlock(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(F.relu(self.bn(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _bn_stats(model: nn.Module, batches: List[torch.Tensor]) -> nn.Module:
    """Give a random-weight model's BatchNorms real running statistics, then eval mode."""
    model.train()
    with torch.no_grad():
        for x in batches[:4]:
            model(x)
    return model.eval()


def setups(batch: int) -> Dict[str, Callable[[], Tuple[nn.Module, List[torch.Tensor]]]]:
    def digits() -> Tuple[nn.Module, List[torch.Tensor]]:
        model, batches, _, _ = digits_setup(batch)
        return model, batches

    def fashion() -> Tuple[nn.Module, List[torch.Tensor]]:
        batches = [torch.rand(128, 1, 28, 28) for _ in range(8)]
        return _bn_stats(FashionResNet20(), batches), batches

    def resnet18() -> Tuple[nn.Module, List[torch.Tensor]]:
        batches = [torch.randn(32, 3, 32, 32) for _ in range(8)]
        return _bn_stats(ResNet18(), batches), batches

    return {"digits": digits, "fashion": fashion, "resnet18": resnet18}


def float_steps_ms(model: nn.Module, batches: List[torch.Tensor], steps: int) -> float:
    """ms per float distillation step (teacher forward, student forward/backward, Adam)."""
    student = copy.deepcopy(model).train()
    opt = torch.optim.Adam(student.parameters(), 1e-3)
    t0 = time.perf_counter()
    for i in range(steps):
        x = batches[i % len(batches)]
        with torch.no_grad():
            t_out = model(x)
        loss = distillation_loss(student(x), t_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) * 1000.0 / steps


EVAL_EVERY = 300 // 20
"""Steps between candidate checks of a default 300-step `fxq.finetune` (its `max(1, steps // 20)`)."""


def quant_steps_ms(model: nn.Module, batches: List[torch.Tensor], steps: int, mode: str) -> float:
    """ms per `fxq.finetune` step (W4A4, exterior penalty), calibration excluded: the marginal cost
    `(T(2 * steps) - T(steps)) / steps`, so once-per-run work (the dry run, the first and the final state
    copies) is left out and the per-step bookkeeping of a 300-step run (candidate checks and state copies
    every `EVAL_EVERY` steps) is in."""

    def run(n: int) -> float:
        qm = fxq.prepare(model, batches[0][:8], fxq.QuantConfig(mode=mode))
        fxq.calibrate(qm, batches[:2], num_batches=2)
        t0 = time.perf_counter()
        fxq.finetune(qm, batches, teacher=model, steps=n, target_bits=4, progress=False, eval_every=EVAL_EVERY)
        return time.perf_counter() - t0

    run(2)  # warm-up
    return (run(2 * steps) - run(steps)) * 1000.0 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="batch of the digits CNN")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="digits,fashion,resnet18")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{args.steps} steps, {torch.get_num_threads()} thread(s), device cpu")
    print(f"| model | params | float ms/step | {' | '.join(f'{m} ms/step (ratio)' for m in fxq.quantizer.ESTIMATORS)} |")
    print("|---|---|---|" + "---|" * len(fxq.quantizer.ESTIMATORS))
    for name in args.models.split(","):
        model, batches = setups(args.batch)[name]()
        steps = max(5, args.steps // (6 if name == "resnet18" else 1))
        float_steps_ms(model, batches, 2)  # warm-up
        fp = float_steps_ms(model, batches, steps)
        cells = []
        for mode in fxq.quantizer.ESTIMATORS:
            ms = quant_steps_ms(model, batches, steps, mode)
            cells.append(f"{ms:.1f} ({ms / fp:.2f}x)")
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {fp:.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
