"""Low-bit accuracy of fxquant against a plain LSQ on a good Fashion-MNIST ResNet; writes BENCHMARKS-lowbit.

The float model is `fashion_setup.FashionResNet20` (~147k parameters, BatchNorm after every conv, >= 92.5%
top-1, trained here and cached outside git). Every method fine-tunes it for the same number of steps on
the same seeded batches (batch 128), Adam lr 1e-3:

- `lsq`: the independent plain LSQ of `plain_lsq.py` (BN kept, cross-entropy on the labels, cosine LR);
  `lsq-narrow` the same with narrow-range signed weights (codes -(2^(b-1) - 1)..2^(b-1) - 1, as fxquant's with
  `QuantSpec(narrow_range=True)`, its variant `narrow_range=1`; both default to the full range);
- `fxquant`: `prepare -> calibrate (2 batches = 256 images) -> finetune(teacher=float model)` with defaults:
  `learned` starts at 8 bits and descends to the target with the exterior penalty, `fixed` trains at the
  target bits from the start;
- two conventions: every layer quantized (`all`), or the first conv and the last linear at 8 bits (`fl8`).

Each run appends one JSON line to `--out` (default `benchmarks/results/lowbit.jsonl`), so an interrupted
sweep keeps what finished; `--table` prints the Markdown tables (mean +- std over seeds) from that file.

Run: `python benchmarks/bench_lowbit.py --bits 2,4 --seeds 0,1,2` then `python benchmarks/bench_lowbit.py --table`.
Variants for ablations: `--variant key=value,...` passes QuantConfig / finetune options (see `VARIANT_KEYS`);
`bits8=stem|fc` keeps the layers matching those globs at 8 bits (weights and inputs).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fashion_setup import accuracy, finetune_batches, load_fashion_mnist, train_float  # noqa: E402
from plain_lsq import lsq_model, train_lsq  # noqa: E402

import fxquant as fxq  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "lowbit.jsonl")
VARIANT_KEYS = ("mode", "quantize_joins", "quantize_outputs", "join_bits", "integer_bias", "calib_method", "lr",
                "clamp_lr", "bits_lr", "penalty_growth", "warmup", "decay_start", "final_lr_ratio", "loss", "bits8",
                "calib_batches", "reseed", "distill", "narrow_range")
SCHEDULE_KEYS = {"lr": "lr", "clamp_lr": "clamp_lr", "bits_lr": "bits_lr", "penalty_growth": "penalty_growth",
                 "warmup": "warmup", "decay_start": "decay_start", "final_lr_ratio": "final_lr_ratio"}


def run_lsq(model: torch.nn.Module, bits: int, convention: str, seed: int, steps: int,
            weights_only: bool = False, narrow: bool = False) -> Dict[str, Any]:
    """The plain LSQ; `narrow`: signed weight codes -(2^(b-1) - 1)..2^(b-1) - 1 (method `lsq-narrow`)."""
    torch.manual_seed(seed)
    batches = finetune_batches(steps, 128, seed)
    qmodel = lsq_model(model, bits, None if weights_only else bits, first_last_bits=8 if convention == "fl8" else None,
                       narrow=narrow)
    t0 = time.perf_counter()
    train_lsq(qmodel, batches, steps, calib=torch.cat([b[0] for b in batches[:2]]))
    return {"seconds": time.perf_counter() - t0, "model": qmodel}


def run_fxquant(model: torch.nn.Module, bits: int, convention: str, seed: int, steps: int, method: str,
                variant: Dict[str, str], weights_only: bool = False) -> Dict[str, Any]:
    """`method`: `fxquant-learned` (8 -> bits), `fxquant-fixed` (bits from the start) or `fxquant-mixed`
    (per-layer bits learned with a size-weighted average of `bits`)."""
    torch.manual_seed(seed)
    batches = finetune_batches(steps, 128, seed)
    learned = method != "fxquant-fixed"
    if learned:
        spec = fxq.QuantSpec(bits=8, min_bits=2, max_bits=8)
    else:
        spec = fxq.QuantSpec(bits=bits, min_bits=2, max_bits=8, learn_bits=False)
    # narrow_range=1: the weights' codes -(2^(b-1) - 1)..2^(b-1) - 1 instead of the full range (the ablation of
    # docs/decisions.md, "Full-range weight codes")
    weight_spec = spec.replace(narrow_range=variant.get("narrow_range") == "1")
    cfg_kwargs: Dict[str, Any] = {"weight": weight_spec, "activation": None if weights_only else spec,
                                  "first_last_bits": 8 if convention == "fl8" else None}
    for key in ("mode",):
        if key in variant:
            cfg_kwargs[key] = variant[key]
    for key in ("quantize_joins", "quantize_outputs", "integer_bias"):
        if key in variant:
            cfg_kwargs[key] = variant[key] == "1"
    if "join_bits" in variant:
        cfg_kwargs["join_bits"] = None if variant["join_bits"] == "none" else int(variant["join_bits"])
    if "bits8" in variant:  # ablation: these layers (globs joined by "|") at 8 bits, weights and inputs
        cfg_kwargs["overrides"] = [(glob, fxq.QuantSpec(bits=8, learn_bits=False)) for glob in variant["bits8"].split("|")]
    cfg = fxq.QuantConfig(**cfg_kwargs)
    qm = fxq.prepare(model, batches[0][0][:8], cfg)
    t0 = time.perf_counter()
    calib_kwargs = {"method": variant["calib_method"]} if "calib_method" in variant else {}  # else fxquant's default
    calib_batches = int(variant.get("calib_batches", 2))
    fxq.calibrate(qm, [b[0] for b in batches[:calib_batches]], num_batches=calib_batches, **calib_kwargs)
    if "reseed" in variant:
        # fine-tuning's random draws (the dither) start from the same state whatever calibration drew: variants of
        # calibration then differ by their clamps alone
        torch.manual_seed(seed * 1000 + int(variant["reseed"]))
    kwargs: Dict[str, Any] = {}
    schedule = {SCHEDULE_KEYS[k]: float(v) for k, v in variant.items() if k in SCHEDULE_KEYS}
    if schedule:
        kwargs["schedule"] = fxq.Schedule(**schedule)
    if "distill" in variant:
        kwargs["distill"] = variant["distill"]  # finetune's distillation loss: "jeffreys" (default on logits) or "mse"
    if variant.get("loss") == "ce":
        kwargs["loss_fn"] = lambda out, y: F.cross_entropy(out, y)
        teacher = None
    else:
        teacher = model
    target: Any = None
    if method == "fxquant-mixed":
        target = fxq.BitTarget(weight=bits, activation=None if weights_only else bits, weight_average=True)
    elif learned:
        target = fxq.BitTarget(weight=bits, activation=None if weights_only else bits)
    result = fxq.finetune(qm, batches, teacher=teacher, steps=steps, target_bits=target, progress=False, **kwargs)
    return {"seconds": time.perf_counter() - t0, "model": qm, "met": result.met_target,
            "best_step": result.best_step, "converged_step": result.converged_step,
            "avg_weight_bits": result.bits_after.get("avg_weight_bits")}


def parse_variant(text: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in VARIANT_KEYS:
            raise SystemExit(f"--variant key {key!r} is unknown; known: {VARIANT_KEYS}")
        out[key] = value
    return out


def table(path: str) -> str:
    rows: Dict[tuple, List[float]] = defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        rows[(r["method"], r.get("variant", ""), r["convention"], r["bits"])].append(r["top1"])
    out = ["| method | variant | layers | bits | top-1 % (mean +- std) | seeds |", "|---|---|---|---|---|---|"]
    for (method, variant, conv, bits), accs in sorted(rows.items(), key=lambda kv: (kv[0][2], -kv[0][3], kv[0][0], kv[0][1])):
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1))
        layers = "every layer" if conv.startswith("all") else "first/last 8-bit"
        label = f"W{bits} (weights only)" if conv.endswith("-w") else f"W{bits}A{bits}"
        if method == "fxquant-mixed":
            label = f"W avg {bits} (weights only)" if conv.endswith("-w") else f"W avg {bits} A{bits}"
        out.append(f"| {method} | {variant or '-'} | {layers} | {label} | {mean:.2f} +- {std:.2f} | {len(accs)} |")
    return "\n".join(out)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--conventions", default="all,fl8")
    parser.add_argument("--methods", default="lsq,fxquant-learned,fxquant-fixed")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--variant", default="")
    parser.add_argument("--weights-only", action="store_true", help="activations stay float (mixed-precision rows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--float-epochs", type=int, default=10, help="epochs of the float model (cached)")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--table", action="store_true", help="print the tables from --out and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    torch.set_num_threads(args.threads)
    variant = parse_variant(args.variant)
    model, float_acc = train_float(epochs=args.float_epochs)
    _, _, x_te, y_te = load_fashion_mnist()
    print(f"float model: {float_acc:.2f}% top-1", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    for bits in [int(b) for b in args.bits.split(",")]:
        for convention in args.conventions.split(","):
            for method in args.methods.split(","):
                for seed in [int(s) for s in args.seeds.split(",")]:
                    if method in ("lsq", "lsq-narrow"):
                        r = run_lsq(model, bits, convention, seed, args.steps, args.weights_only, method == "lsq-narrow")
                    else:
                        r = run_fxquant(model, bits, convention, seed, args.steps, method, variant, args.weights_only)
                    top1 = accuracy(r.pop("model"), x_te, y_te)
                    record = {"method": method, "variant": args.variant if not method.startswith("lsq") else "",
                              "convention": convention + ("-w" if args.weights_only else ""), "bits": bits, "seed": seed, "steps": args.steps,
                              "top1": top1, "float_top1": float_acc, "commit": commit, **r}
                    print(json.dumps(record), flush=True)
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
