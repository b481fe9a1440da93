"""`fxquant quantize MODULE:FACTORY --data DATA --bits W4A8`: the whole pipeline on a user's own model.

What it does, in order (every input is checked before the long work starts):

1. read the inputs: `--bits` (`W4A8`, `W8A8`, `W4` = weights only), `--data` (`load_inputs`: a `.pt` file
   holding a tensor `(N, ...)` or a dict/tuple/list whose first tensor is the inputs, a `.npy` file, or a
   folder of PNG/JPEG images, optionally in class subfolders), the model (`load_model`: an importable
   module or a `.py` path, a factory returning the `nn.Module`, an optional `--weights` state dict read
   with `torch.load(weights_only=True)`), and check that the float model runs on one batch;
2. `fxq.prepare` (`QuantConfig(first_last_bits=...)`), `fxq.calibrate`, `fxq.finetune` by distillation from
   the float model towards `BitTarget(weight=W, activation=A)` (skipped with `--steps 0`: post-training
   quantization at the initial 8 bits), `fxq.freeze`, `fxq.export_onnx`, `fxq.verify` (no raise: the
   parity is reported), `fxq.report`;
3. write `OUT/model.onnx`, then `OUT/summary.json` (bits, sizes, parity, step counts, and how close the
   quantized outputs are to the float model's, which needs no labels) as soon as the numbers exist, then
   `OUT/report.txt` (the quantizer table, the parity and the fine-tuning summary).

Bad input raises `QuantizeInputError` with a one-line message; `fxquant.cli` prints it on stderr and exits
with status 2. `write_summary`, `report_summary` and `verify_reported` also serve `fxquant demo`. Argument
parsing lives in `fxquant.cli`, reading the model and the data in `fxquant.cli_inputs`; the algorithms in the
library steps.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import fx, nn

import fxquant as fxq
from fxquant.cli_inputs import QuantizeInputError, load_inputs, load_model, make_batches, one_line

BITS_FORMAT = "W<bits>A<bits> such as W4A8 (4-bit weights, 8-bit activations) or W<bits> such as W4 (weights only)"
MIN_TARGET_BITS = 2
MAX_TARGET_BITS = 16
DEFAULT_STEPS = 300
DEFAULT_BATCH_SIZE = 32
CALIBRATION_BATCHES = 8
VERIFY_BATCHES = 4


# --------------------------------------------------------------------------------------------------
# --bits
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetBits:
    """Target bit-widths parsed from `--bits`: `weight`, and `activation` (None: weights only)."""

    weight: int
    activation: Optional[int] = None

    @property
    def text(self) -> str:
        """The canonical spelling, e.g. `W4A8` or `W4`."""
        return f"W{self.weight}" + (f"A{self.activation}" if self.activation is not None else "")


def parse_bits(text: str) -> TargetBits:
    """Parse `W4A8`, `W8A8` or `W4` (case-insensitive) into target bits.

    Raises:
        QuantizeInputError: the text does not follow the format, or a width is outside 2..16.

    Example:
        >>> parse_bits("W4A8")
        TargetBits(weight=4, activation=8)
    """
    match = re.fullmatch(r"[Ww](\d+)(?:[Aa](\d+))?", text.strip())
    if match is None:
        raise QuantizeInputError(f"--bits {text!r} is not understood; expected {BITS_FORMAT}.")
    weight = int(match.group(1))
    activation = int(match.group(2)) if match.group(2) is not None else None
    for kind, value in (("weight", weight), ("activation", activation)):
        if value is not None and not (MIN_TARGET_BITS <= value <= MAX_TARGET_BITS):
            raise QuantizeInputError(
                f"--bits {text!r}: {kind} bits {value} are outside {MIN_TARGET_BITS}..{MAX_TARGET_BITS}; "
                f"expected {BITS_FORMAT}."
            )
    return TargetBits(weight, activation)


def parse_first_last_bits(text: str) -> Optional[int]:
    """`--first-last-bits`: an integer in 2..16, or `none` (first and last layers learn like the rest).

    Raises:
        QuantizeInputError: neither an integer in 2..16 nor `none`.
    """
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not (MIN_TARGET_BITS <= value <= MAX_TARGET_BITS):
        raise QuantizeInputError(
            f"--first-last-bits {text!r} is not understood; give bits in {MIN_TARGET_BITS}..{MAX_TARGET_BITS} "
            "(8: the usual deployment choice) or 'none' (first and last layers learn like the rest)."
        )
    return value


def quant_config(bits: TargetBits, first_last_bits: Optional[int]) -> fxq.QuantConfig:
    """The configuration: quantizers start at 8 bits (or at a wider target) and may learn down to 2."""

    def spec(target: Optional[int]) -> fxq.QuantSpec:
        top = max(8, target or 8)
        return fxq.QuantSpec(bits=top, min_bits=MIN_TARGET_BITS, max_bits=top)

    return fxq.QuantConfig(weight=spec(bits.weight), activation=spec(bits.activation), first_last_bits=first_last_bits)


def write_summary(out_dir: str, summary: Dict[str, Any]) -> str:
    """Write `summary` to `out_dir/summary.json` (before anything that may fail: pictures, reports); return the path."""
    path = os.path.join(out_dir, "summary.json")
    with open(path, "w") as fh:
        json.dump(summary, fh, indent=2)
    return path


def report_summary(rep: fxq.QuantReport) -> Dict[str, Any]:
    """The numbers of a `fxq.report` for a JSON summary: average bits, sizes, and the bits of each quantizer."""
    return {
        "avg_weight_bits": rep.avg_weight_bits,
        "avg_activation_bits": rep.avg_activation_bits,
        "size_bytes_at_bits": rep.size_bytes,
        "float_size_bytes": rep.float_size_bytes,
        "compression": rep.compression,
        "bits_per_quantizer": [{"name": r.name, "serves": r.serves, "kind": r.kind, "bits": r.bits} for r in rep.rows],
    }


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def _check_model_runs(model: nn.Module, batch: torch.Tensor, spec: str) -> None:
    try:
        with torch.no_grad():
            model(batch)
    except Exception as e:  # noqa: BLE001
        raise QuantizeInputError(
            f"the model built by {spec} fails on a data batch of shape {tuple(batch.shape)} ({batch.dtype}): "
            f"{one_line(e)}; give --data shaped like the model's input."
        ) from e


def applicable_target(qm: nn.Module, target: TargetBits, first_last_bits: Optional[int], spec: str) -> Optional[fxq.BitTarget]:
    """The `BitTarget` for the quantizers of `qm` that learn their bits.

    An activation target is dropped (None returned for it) when no activation quantizer learns its bits:
    those activations stay at their fixed bits (e.g. a model whose only activations are those of the first
    and last layers). A weight target with no weight quantizer that learns its bits is an error.

    Raises:
        QuantizeInputError: no weight quantizer learns its bits (the fix: `--first-last-bits none`).
    """
    learnable = [m for m in qm.modules() if isinstance(m, fxq.LearnableQuantizer) and m.learn_bits]
    weights = [q for q in learnable if q.kind == "weight"]
    activations = [q for q in learnable if q.kind == "activation"]
    if not weights:
        fix = (
            f"with --first-last-bits {first_last_bits} its first and last layers stay at {first_last_bits} bits and it "
            "has no other quantized layer; give --first-last-bits none to quantize them to the target too"
            if first_last_bits is not None
            else "prepare found no weight that learns its bits"
        )
        raise QuantizeInputError(f"--bits {target.text}: no weight of the model built by {spec} can learn {target.weight} bits: {fix}.")
    activation = target.activation if activations else None
    return fxq.BitTarget(weight=target.weight, activation=activation)


def verify_reported(
    frozen: fx.GraphModule, onnx_path: str, batches: Sequence[Any], *, raise_on_failure: bool = False, **kwargs: Any
) -> fxq.VerifyReport:
    """`fxq.verify` for a caller that prints or saves the report itself (by default without raising).

    verify warns about each difference it explains by the machine's kernels (e.g. no VNNI); the report
    carries the same explanation, so those warnings are dropped here and every other warning is re-issued
    (when verify raises, its error says what failed).
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parity = fxq.verify(frozen, onnx_path, batches, raise_on_failure=raise_on_failure, **kwargs)
    explained = [r.explained for r in parity.results if r.explained]
    for w in caught:
        if not any(text in str(w.message) for text in explained):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return parity


@torch.no_grad()
def _fidelity(model: nn.Module, qm: nn.Module, batches: Sequence[torch.Tensor]) -> Dict[str, Optional[float]]:
    """How close the quantized module's outputs are to the float model's (no labels needed)."""
    num = den = 0.0
    agree = total = 0
    for b in batches:
        f, q = model(b), qm(b)
        if not isinstance(f, torch.Tensor) or not isinstance(q, torch.Tensor) or f.shape != q.shape:
            return {"relative_error_vs_float": None, "argmax_agreement_vs_float": None}
        num += float((q.float() - f.float()).pow(2).sum())
        den += float(f.float().pow(2).sum())
        if f.dim() == 2:
            agree += int((f.argmax(1) == q.argmax(1)).sum())
            total += f.shape[0]
    return {
        "relative_error_vs_float": (num / den) ** 0.5 if den > 0 else None,
        "argmax_agreement_vs_float": agree / total if total else None,
    }


def run_quantize(
    model_spec: str,
    data: str,
    bits: str,
    *,
    weights: Optional[str] = None,
    steps: int = DEFAULT_STEPS,
    out_dir: str = "fxquant-out",
    first_last_bits: Optional[int] = 8,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    quiet: bool = False,
) -> Dict[str, Any]:
    """Quantize the model built by `model_spec` (`MODULE:FACTORY`) on `data`; write and return the summary.

    Args:
        model_spec: `module:factory` or `path/to/file.py:factory`; the factory is called with no arguments.
        data: see `load_inputs`.
        bits: target bits as `W4A8`, `W8A8` or `W4` (see `parse_bits`).
        weights: a state dict for the model (`torch.load(weights_only=True)`).
        steps: fine-tuning steps; 0 skips fine-tuning (post-training quantization at the initial bits: 8, or
            a target width above 8).
        out_dir: where `model.onnx`, `summary.json` and `report.txt` go (created).
        first_last_bits: bits of the first and last quantized layers, or None to learn them like the rest.
        seed: seeds torch, numpy and random, and the shuffle of the data into batches.
        batch_size: samples per batch.
        quiet: no progress bars and no printed summary.

    Returns:
        The summary written to `out_dir/summary.json`.

    Raises:
        QuantizeInputError: a bad argument (checked before the long work starts).
        FxQuantError: a library step refused the model (its message says why).
    """
    t_start = time.perf_counter()
    say: Callable[..., None] = (lambda *a: None) if quiet else print
    target = parse_bits(bits)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise QuantizeInputError(f"--steps {steps!r} must be a non-negative integer (0: post-training quantization only).")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise QuantizeInputError(f"--batch-size {batch_size!r} must be a positive integer, e.g. 32.")
    if first_last_bits is not None and not (MIN_TARGET_BITS <= first_last_bits <= MAX_TARGET_BITS):
        raise QuantizeInputError(f"--first-last-bits {first_last_bits!r} must be in 2..16 or none.")
    config = quant_config(target, first_last_bits)
    torch.manual_seed(seed)  # before the factory: random initialisations are reproducible too
    np.random.seed(seed % 2**32)
    random.seed(seed)
    model = load_model(model_spec, weights)
    inputs = load_inputs(data, progress=not quiet)
    batches = make_batches(inputs, batch_size, seed)
    example = batches[0]
    _check_model_runs(model, example, model_spec)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise QuantizeInputError(f"--out {out_dir!r} is a file; give a folder for model.onnx, summary.json and report.txt.")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise QuantizeInputError(f"--out {out_dir!r} cannot be created: {one_line(e)}") from e

    say(f"[1/5] prepare {model_spec} ({sum(p.numel() for p in model.parameters())} parameters) on {len(inputs)} "
        f"inputs of shape {tuple(inputs.shape[1:])}; calibrate on {min(CALIBRATION_BATCHES, len(batches))} batches")
    qm = fxq.prepare(model, example, config)
    bit_target = applicable_target(qm, target, first_last_bits, model_spec) if steps > 0 else None
    fxq.calibrate(qm, batches, num_batches=CALIBRATION_BATCHES)
    result: Optional[fxq.FinetuneResult] = None
    if bit_target is not None:
        dropped = " (no activation learns its bits: activations keep their fixed bits)" if (
            target.activation is not None and bit_target.activation is None) else ""
        say(f"[2/5] fine-tune {steps} steps: distillation from the float model + bit penalty -> {target.text}{dropped}")
        result = fxq.finetune(qm, batches, teacher=model, steps=steps, target_bits=bit_target, progress=not quiet)
    else:
        say(f"[2/5] --steps 0: no fine-tuning (post-training quantization at the initial bits; {target.text} not applied)")
    qm.eval()
    fidelity = _fidelity(model, qm, batches[:VERIFY_BATCHES])

    say("[3/5] freeze and export integer QDQ ONNX")
    frozen = fxq.freeze(qm)
    onnx_path = os.path.join(out_dir, "model.onnx")
    fxq.export_onnx(frozen, example, onnx_path)

    say("[4/5] verify in onnxruntime")
    parity = verify_reported(frozen, onnx_path, batches[:VERIFY_BATCHES], num_batches=VERIFY_BATCHES)

    say("[5/5] report")
    rep = fxq.report(qm)
    summary: Dict[str, Any] = {
        "model": model_spec,
        "weights": weights,
        "data": data,
        "samples": len(inputs),
        "input_shape": list(inputs.shape[1:]),
        "batch_size": batch_size,
        "seed": seed,
        "bits": target.text,
        "target_bits": {"weight": target.weight, "activation": target.activation},
        "target_applied": {
            "weight": bit_target is not None and bit_target.weight is not None,
            "activation": bit_target is not None and bit_target.activation is not None,
        },
        "first_last_bits": first_last_bits,
        "steps": steps,
        "steps_run": result.steps_run if result is not None else 0,
        "best_step": result.best_step if result is not None else None,
        "target_met": bool(result.met_target) if result is not None else None,
        **report_summary(rep),
        "onnx_file_bytes": os.path.getsize(onnx_path),
        **fidelity,
        "parity_ok": parity.ok,
        "parity_max_error": parity.max_error,
        "parity_error_unit": parity.error_unit,
        "parity_argmax_agreement": parity.argmax_agreement,
        "integer_kernel_fraction": parity.integer_fraction,
        "parity": str(parity),
        "seconds": time.perf_counter() - t_start,
    }
    summary_path = write_summary(out_dir, summary)
    report_path = os.path.join(out_dir, "report.txt")
    with open(report_path, "w") as fh:
        fh.write(f"fxquant quantize {model_spec} --data {data} --bits {target.text} --steps {steps}\n\n")
        fh.write(f"{rep}\n\n{parity}\n")
        if result is not None:
            fh.write(f"\n{result}\n")
    from fxquant.plots import draw_pictures

    pictures = draw_pictures(
        out_dir, rep.rows, result, summary_path, "quantize", bits_title="bits per quantizer",
        history_title=f"fine-tune: {result.steps_run} steps" if result is not None else "",
    )

    say("")
    met = "no fine-tuning" if result is None else ("target met" if result.met_target else "target NOT met")
    fixed = f"; first and last layers fixed at {first_last_bits}" if first_last_bits is not None else ""
    say(f"bits      target {target.text} ({met}{fixed}): weights {rep.avg_weight_bits:.2f} on average (size-weighted), "
        f"activations {rep.avg_activation_bits:.2f}")
    say(f"size      {rep.size_bytes / 1024:.1f} KiB at these bits vs {rep.float_size_bytes / 1024:.1f} KiB float "
        f"({rep.compression:.1f}x); ONNX file {summary['onnx_file_bytes'] / 1024:.1f} KiB")
    if fidelity["argmax_agreement_vs_float"] is not None:
        say(f"fidelity  argmax agrees with the float model on {100 * fidelity['argmax_agreement_vs_float']:.1f}% "
            f"of {min(len(inputs), VERIFY_BATCHES * batch_size)} inputs")
    say(f"parity    onnxruntime vs frozen PyTorch: {'ok' if parity.ok else 'FAILED'} (max error {parity.max_error:.3g} "
        f"{parity.error_unit}); integer kernels {100 * parity.integer_fraction:.0f}% of compute ops")
    for r in parity.results:
        if r.explained:
            say(f"note      {r.provider} {r.level} differs by {r.error:.3g} {parity.error_unit}: {r.explained}")
    say(f"wrote {', '.join([onnx_path, summary_path, report_path, *pictures])} in {summary['seconds']:.0f} s")
    return summary
