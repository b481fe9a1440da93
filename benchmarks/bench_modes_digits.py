"""Accuracy vs bits on scikit-learn digits for the three training modes (dither, noise, ste).

The demo's ~38k-parameter residual CNN (`fxquant.demo.DigitsCNN`) is trained in float, then for each mode and target W{b}A{b}
(first/last layers fixed at 8 bits) it is prepared, calibrated and fine-tuned with the exterior penalty
(`fxq.finetune(..., target_bits=b)`); `noise` is also run with DiffQ's size penalty at a few lambdas
(weights only). Prints one row per run: accuracy on 450 held-out images, average bits after, time.

Run: `python benchmarks/bench_modes_digits.py [--steps 200] [--threads 1]`.
"""

from __future__ import annotations

import argparse
import time
from typing import List, Tuple

import torch
from torch import nn

import fxquant as fxq
from fxquant.demo import DigitsCNN, accuracy, load_digits_tensors, make_batches, train_float


def digits_setup(batch_size: int = 64) -> Tuple[nn.Module, List[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(float demo CNN trained on the training split, train batches of images, test images, test labels)."""
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = load_digits_tensors(0)
    model = train_float(DigitsCNN(), x_train, y_train, seed=0)
    batches = [xb for xb, _ in make_batches(x_train, y_train, batch_size, seed=1)]
    return model, batches, x_test, y_test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batches, x_te, y_te = digits_setup()
    fp = accuracy(model, x_te, y_te)
    print(f"float: {fp:.2f}% on {len(y_te)} test images; {sum(p.numel() for p in model.parameters())} parameters")
    print(f"fine-tune: {args.steps} steps of batch 64, teacher = float model; first/last layers fixed at 8 bits")
    header = f"{'mode':7} {'penalty':18} {'target':7} {'acc %':>7} {'d acc':>6} {'W avg':>6} {'W learn':>7} {'A avg':>6} {'met':>5} {'s':>5}"
    print(header)
    print("-" * len(header))
    runs = [(mode, "exterior", b, None) for mode in ("dither", "noise", "ste") for b in (8, 4, 3, 2)]
    runs += [("noise", "size", None, lam) for lam in (1.0, 5.0, 20.0)]
    for mode, penalty, bits, lam in runs:
        torch.manual_seed(0)
        activation = fxq.QuantSpec() if penalty == "exterior" else None
        qm = fxq.prepare(model, batches[0][:8], fxq.QuantConfig(mode=mode, activation=activation))
        fxq.calibrate(qm, batches[:4])
        t0 = time.perf_counter()
        if penalty == "size":
            result = fxq.finetune(qm, batches, teacher=model, steps=args.steps, penalty="size", size_lambda=lam,
                                  progress=False)
            label, target = f"size lam={lam:g}", "W only"
        else:
            result = fxq.finetune(qm, batches, teacher=model, steps=args.steps, target_bits=bits, progress=False)
            label, target = "exterior", f"W{bits}A{bits}"
        seconds = time.perf_counter() - t0
        acc = accuracy(qm, x_te, y_te)
        a = result.bits_after
        print(
            f"{mode:7} {label:18} {target:7} {acc:7.2f} {acc - fp:6.2f} {a['avg_weight_bits']:6.2f} "
            f"{a['avg_learnable_weight_bits']:7.2f} {a['avg_activation_bits']:6.2f} {str(result.met_target):>5} "
            f"{seconds:5.1f}"
        )
    print("W avg: all quantized weights, size-weighted; W learn: weights that learn bits; A avg: mean over "
          "activation quantizers (first/last fixed at 8 included).")


if __name__ == "__main__":
    main()
