"""Step time of `fxq.finetune` (quantizers on) vs a float distillation step on the same batches.

Both loops do the same work per step: a teacher forward, a student forward and backward with the
Jeffreys-divergence loss, one Adam step. The float loop trains a copy of the float model; `fxq.finetune`
trains the prepared module (W4A4 target, exterior penalty) and also does its bookkeeping (penalty, bits
statistics, candidate selection). Prints ms/step for each and the ratio.

Run: `python benchmarks/bench_finetune.py [--steps 100] [--batch 64] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

import fxquant as fxq
from fxquant.losses import distillation_loss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_modes_digits import digits_setup  # noqa: E402


def float_steps_ms(model: torch.nn.Module, batches: list, steps: int) -> float:
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


def quant_steps_ms(model: torch.nn.Module, batches: list, steps: int, mode: str) -> float:
    """ms per `fxq.finetune` step (W4A4, exterior penalty)."""
    qm = fxq.prepare(model, batches[0][:8], fxq.QuantConfig(mode=mode))
    fxq.calibrate(qm, batches[:4])
    t0 = time.perf_counter()
    fxq.finetune(qm, batches, teacher=model, steps=steps, target_bits=4, progress=False)
    return (time.perf_counter() - t0) * 1000.0 / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batches, _, _ = digits_setup(args.batch)
    print(f"digits CNN ({sum(p.numel() for p in model.parameters())} params), batch {args.batch}, {args.steps} "
          f"steps, {torch.get_num_threads()} thread(s), device cpu")
    float_steps_ms(model, batches, 10)  # warm-up
    fp = float_steps_ms(model, batches, args.steps)
    print(f"{'float distillation':22} {fp:8.2f} ms/step")
    for mode in ("dither", "noise", "ste"):
        ms = quant_steps_ms(model, batches, args.steps, mode)
        print(f"{'fxq.finetune ' + mode:22} {ms:8.2f} ms/step   ratio {ms / fp:5.2f}x")


if __name__ == "__main__":
    main()
