"""Step time of `fxq.finetune` (quantizers on) vs a float distillation step on the same batches.

Both loops do the same work per step: a teacher forward, a student forward and backward with the
Jeffreys-divergence loss, one Adam step. The float loop trains a copy of the float model; `fxq.finetune`
trains the prepared module (W4A4 target, exterior penalty, every estimator) with its default optimizer (torch's
fused Adam, which the float loop uses too) and also does its bookkeeping (penalty, bits statistics, candidate
selection and state copies at the interval of a 300-step run; see `quant_steps_ms`). A step's time is the
interval between the ends of two optimizer steps (a step-post hook, `timed`), the mean over the second half of a
run (bits at their target). Prints ms/step for each and the ratio, for three models: the digits CNN, the
Fashion-MNIST ResNet of `bench_lowbit.py` (~147k parameters) and a ResNet-18 (11M parameters, 32x32 inputs).

Run: `python benchmarks/bench_finetune.py [--steps 30] [--threads 2] [--repeats 3] [--models digits,fashion,resnet18]`;
each ratio is the median over `--repeats` float/quantized pairs measured next to each other. Both loops run after
`fxquant.allocator.keep_freed_memory` (which `fxq.finetune` calls on the CPU): the float loop then keeps its freed
buffers in glibc's heap as fine-tuning does, and neither page-faults them in again every step.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_modes_digits import digits_setup  # noqa: E402
from fashion_setup import BasicBlock, FashionResNet20  # noqa: E402

import fxquant as fxq  # noqa: E402
from fxquant.allocator import keep_freed_memory  # noqa: E402
from fxquant.losses import distillation_loss  # noqa: E402
from fxquant.optimization import default_optimizer  # noqa: E402


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


def timed(optimizer: torch.optim.Optimizer) -> Tuple[torch.optim.Optimizer, List[float]]:
    """`optimizer` and the list its step-post hook fills with the end time of each `step()`: the intervals
    between them are whole training steps (forward, backward, penalty, bookkeeping), measured inside one run."""
    ends: List[float] = []
    optimizer.register_step_post_hook(lambda *_: ends.append(time.perf_counter()))
    return optimizer, ends


def steady_ms(ends: List[float]) -> float:
    """Mean ms per step over the second half of a run (bits at their target; the periodic candidate checks
    and state copies of `fxq.finetune` included)."""
    half = ends[len(ends) // 2 :]
    return (half[-1] - half[0]) * 1000.0 / max(len(half) - 1, 1)


def float_steps_ms(model: nn.Module, batches: List[torch.Tensor], steps: int) -> float:
    """ms per float distillation step (teacher forward, student forward/backward, Adam)."""
    student = copy.deepcopy(model).train()
    opt, ends = timed(torch.optim.Adam(student.parameters(), 1e-3, fused=True))
    for i in range(steps):
        x = batches[i % len(batches)]
        with torch.no_grad():
            t_out = model(x)
        loss = distillation_loss(student(x), t_out)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steady_ms(ends)


EVAL_EVERY = 300 // 20
"""Steps between candidate checks of a default 300-step `fxq.finetune` (its `max(1, steps // 20)`)."""


def quant_steps_ms(model: nn.Module, batches: List[torch.Tensor], steps: int, mode: str) -> float:
    """ms per `fxq.finetune` step (W4A4, exterior penalty) in the second half of a run, calibration
    excluded, with the per-step bookkeeping of a 300-step run (candidate checks and state copies every
    `EVAL_EVERY` steps)."""
    qm = fxq.prepare(model, batches[0][:8], fxq.QuantConfig(mode=mode))
    fxq.calibrate(qm, batches[:2], num_batches=2)
    made: List[List[float]] = []

    def timed_default(groups: List[Dict[str, Any]]) -> torch.optim.Optimizer:
        optimizer, ends = timed(default_optimizer(groups))
        made.append(ends)
        return optimizer

    fxq.finetune(qm, batches, teacher=model, steps=steps, target_bits=4, progress=False, eval_every=EVAL_EVERY,
                 optimizer=timed_default)
    return steady_ms(made[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="batch of the digits CNN")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="digits,fashion,resnet18")
    parser.add_argument("--repeats", type=int, default=3, help="float/quantized pairs per estimator (median ratio)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    keep_freed_memory()  # what fxq.finetune does on the CPU, for the float loop too
    print(f"{args.steps} steps, {torch.get_num_threads()} thread(s), device cpu")
    print(f"| model | params | float ms/step | {' | '.join(f'{m} ms/step (ratio)' for m in fxq.quantizer.ESTIMATORS)} |")
    print("|---|---|---|" + "---|" * len(fxq.quantizer.ESTIMATORS))
    for name in args.models.split(","):
        model, batches = setups(args.batch)[name]()
        steps = max(10, args.steps // (3 if name == "resnet18" else 1))
        float_steps_ms(model, batches, 2)  # warm-up
        floats: List[float] = []
        cells = []
        for mode in fxq.quantizer.ESTIMATORS:
            # float and quantized steps measured next to each other, `repeats` times: the ratio of each pair,
            # then the median (a busy machine moves both alike; one pair alone varied by +-0.25x)
            pairs = []
            for _ in range(args.repeats):
                fp = float_steps_ms(model, batches, steps)
                pairs.append((fp, quant_steps_ms(model, batches, steps, mode)))
                floats.append(fp)
            ratio = statistics.median(q / f for f, q in pairs)
            ms = statistics.median(q for _, q in pairs)
            cells.append(f"{ms:.1f} ({ratio:.2f}x)")
        params = sum(p.numel() for p in model.parameters())
        print(f"| {name} | {params / 1e6:.2f}M | {statistics.median(floats):.1f} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
