"""Accuracy vs bits of fxquant and the libraries users would pick instead; writes BENCHMARKS.md.

One command (`python benchmarks/compare_peers.py` or `make bench`) runs everything in one process on
this machine and writes `BENCHMARKS.md` with the versions that ran:

- data: scikit-learn digits (8x8) and Fashion-MNIST (Debian package `dataset-fashion-mnist`, installed
  with apt-get when missing and possible);
- models trained here: the demo's digits CNN (stem, residual block, strided conv, linear head) and, for
  Fashion-MNIST, `FashionResNet` (stride-2 stem, two stages with a residual block, linear head);
- fxquant at W8A8, W4A4, W3A3, W2A2 (GDNSQ dither mode, distillation from the float model; bits learned
  from 8 down to the target by the exterior penalty, and bits fixed at the target like the peers) and a
  weights-only mixed-precision point (DiffQ noise mode) at DiffQ's achieved size;
- peers, same model, same fine-tuning steps, same distillation loss: Brevitas QAT
  (`brevitas.graph.quantize`), PyTorch's FX QAT (`torch.ao.quantization.quantize_fx`), DiffQ
  (`diffq.DiffQuantizer`, weights only), onnxruntime static PTQ (8-bit, and 4-bit weights);
- fine-tune time per step vs the float model's training step, ORT latency and file sizes.

Like-for-like: every method quantizes every layer (fxquant `first_last_bits=None`).
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata as md
import os
import platform
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxquant as fxq
from fxquant.demo import (
    DigitsCNN,
    accuracy,
    export_float_onnx,
    load_digits_tensors,
    make_batches,
    ort_latency_ms,
    train_float,
)
from fxquant.losses import jeffreys_divergence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fashion_setup  # noqa: E402

Batches = List[Tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------------------------------------ data


def load_fashion_mnist() -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Fashion-MNIST (`fashion_setup.load_fashion_mnist`); None if unavailable."""
    try:
        return fashion_setup.load_fashion_mnist()
    except SystemExit:
        return None


# ------------------------------------------------------------------------------------------- model


class FashionResNet(nn.Module):
    """A ~30k-parameter ResNet-style CNN for 28x28 images: a stride-2 stem, two stages of a residual block
    (the second after a stride-2 conv), global pooling and a linear head."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))

        self.stem = conv_bn(1, width, 2)  # 14x14
        self.block1 = nn.ModuleList([conv_bn(width, width), conv_bn(width, width)])
        self.down = conv_bn(width, 2 * width, 2)  # 7x7
        self.block2 = nn.ModuleList([conv_bn(2 * width, 2 * width), conv_bn(2 * width, 2 * width)])
        self.head = nn.Linear(2 * width, classes)

    @staticmethod
    def _residual(block: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + block[1](torch.relu(block[0](x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._residual(self.block1, torch.relu(self.stem(x)))
        x = self._residual(self.block2, torch.relu(self.down(x)))
        # adaptive_avg_pool2d, not x.mean(dim=(2, 3)): Brevitas 0.13.4's preprocess_for_quantize fails on the
        # latter (TypeError in MeanMethodToAdaptiveAvgPool2d); fxquant takes either
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------------------------- training


def distill_train(
    student: nn.Module, teacher: nn.Module, batches: Batches, steps: int, lr: float = 1e-3,
    penalty: Optional[Callable[[], torch.Tensor]] = None,
    opt: Optional[torch.optim.Optimizer] = None,
) -> float:
    """Fine-tune a peer's fake-quant model with the same Jeffreys distillation fxquant uses; s/step."""
    if opt is None:
        opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    teacher.eval()
    t0 = time.perf_counter()
    for step in range(steps):
        xb, _ = batches[step % len(batches)]
        with torch.no_grad():
            t_logits = teacher(xb)
        out = student(xb)
        out = out.value if hasattr(out, "value") else out  # brevitas QuantTensor
        loss = jeffreys_divergence(out, t_logits)
        if penalty is not None:
            loss = loss + penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def float_step_time(model: nn.Module, teacher: nn.Module, batches: Batches, steps: int = 30) -> float:
    """Seconds per distillation step of the float model (no quantizers): the reference."""
    return distill_train(copy.deepcopy(model), teacher, batches, steps)


@torch.no_grad()
def peer_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), 500):
        out = model(x[i : i + 500])
        out = out.value if hasattr(out, "value") else out
        correct += int((out.argmax(1) == y[i : i + 500]).sum())
    return 100.0 * correct / len(x)


# ------------------------------------------------------------------------------------------- fxquant


def run_fxquant(
    model: nn.Module, train: Batches, val: Batches, example: torch.Tensor, steps: int, w_bits: int,
    a_bits: Optional[int], mode: str = "dither", weight_average: Optional[float] = None, per_group_bits: bool = False,
    learn_bits: bool = True,
) -> Dict[str, Any]:
    """fxquant: bits learned from 8 down to the target (exterior penalty), or fixed at the target."""
    if learn_bits:
        wspec = fxq.QuantSpec(bits=8, min_bits=2, max_bits=8, per_group_bits=per_group_bits)
        aspec = fxq.QuantSpec(bits=8, min_bits=2, max_bits=8) if a_bits is not None else None
    else:
        wspec = fxq.QuantSpec(bits=w_bits, min_bits=2, max_bits=8, learn_bits=False)
        aspec = fxq.QuantSpec(bits=a_bits, min_bits=2, max_bits=8, learn_bits=False) if a_bits is not None else None
    cfg = fxq.QuantConfig(weight=wspec, activation=aspec, mode=mode, first_last_bits=None)
    qm = fxq.prepare(model, example, cfg)
    fxq.calibrate(qm, train, num_batches=8)
    if not learn_bits:
        target: Any = None
    elif weight_average is not None:
        target = fxq.BitTarget(weight=weight_average, activation=a_bits, weight_average=True)
    else:
        target = {"weight": float(w_bits), "activation": float(a_bits)} if a_bits is not None else {"weight": float(w_bits)}
    t0 = time.perf_counter()
    result = fxq.finetune(qm, train, teacher=model, steps=steps, target_bits=target, val_batches=val, progress=False)
    step_s = (time.perf_counter() - t0) / max(result.steps_run, 1)
    qm.eval()
    rep = fxq.report(qm)
    return {"qm": qm, "result": result, "step_s": step_s, "report": rep}


# --------------------------------------------------------------------------------------------- peers


def run_brevitas(model: nn.Module, train: Batches, steps: int, w_bits: int, a_bits: int) -> Dict[str, Any]:
    from brevitas.graph.quantize import (
        COMPUTE_LAYER_MAP,
        QUANT_ACT_MAP,
        QUANT_IDENTITY_MAP,
        preprocess_for_quantize,
        quantize,
    )

    def with_bits(mapping: Dict[Any, Any], key: str, bits: int) -> Dict[Any, Any]:
        out = {}
        for k, v in mapping.items():
            if v is None:
                out[k] = None
                continue
            cls, kw = v
            out[k] = (cls, {**kw, key: bits})
        return out

    student = preprocess_for_quantize(copy.deepcopy(model).eval())
    student = quantize(
        student,
        compute_layer_map=with_bits(COMPUTE_LAYER_MAP, "weight_bit_width", w_bits),
        quant_act_map=with_bits(QUANT_ACT_MAP, "bit_width", a_bits),
        quant_identity_map=with_bits(QUANT_IDENTITY_MAP, "bit_width", a_bits),
    )
    with torch.no_grad():  # calibration-ish warm-up pass of the statistics-initialised quantizers
        student.train()
        for xb, _ in train[:8]:
            student(xb)
    step_s = distill_train(student, model, train, steps)
    return {"model": student, "step_s": step_s}


def run_torch_qat(model: nn.Module, train: Batches, example: torch.Tensor, steps: int, w_bits: int, a_bits: int) -> Dict[str, Any]:
    from torch.ao.quantization import (
        FakeQuantize,
        MovingAverageMinMaxObserver,
        MovingAveragePerChannelMinMaxObserver,
        QConfig,
        QConfigMapping,
    )
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    qconfig = QConfig(
        activation=FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=2**a_bits - 1,
                                          dtype=torch.quint8, qscheme=torch.per_tensor_affine),
        weight=FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-(2 ** (w_bits - 1)),
                                      quant_max=2 ** (w_bits - 1) - 1, dtype=torch.qint8, qscheme=torch.per_channel_symmetric),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        student = prepare_qat_fx(copy.deepcopy(model).train(), QConfigMapping().set_global(qconfig), (example,))
    step_s = distill_train(student, model, train, steps)
    return {"model": student, "step_s": step_s}


def run_diffq(model: nn.Module, train: Batches, steps: int, lambda_per_bit: float) -> Dict[str, Any]:
    """DiffQ weights-only; its penalty `size_lambda * model MB` with `size_lambda` set so that the penalty is
    `lambda_per_bit * average weight bits` whatever the model's size (0.1 lands near 3 bits here)."""
    from diffq import DiffQuantizer

    size_lambda = lambda_per_bit * 8 * 2**20 / sum(p.numel() for p in model.parameters())

    student = copy.deepcopy(model)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)  # DiffQ wants the optimizer first
    quantizer = DiffQuantizer(student, min_size=0.001, group_size=8, min_bits=2, max_bits=15, init_bits=8)
    # DiffQ's bits lr (1e-3) is tuned for runs of hundreds of epochs: scaled up for this step budget
    quantizer.setup_optimizer(opt, lr=3e-2)
    step_s = distill_train(
        student, model, train, steps, penalty=lambda: size_lambda * quantizer.model_size(), opt=opt,
    )
    student.eval()
    size_mb = float(quantizer.true_model_size())
    return {"model": student, "step_s": step_s, "size_bytes": size_mb * 2**20}


def run_ort_static(model: nn.Module, train: Batches, example: torch.Tensor, tmp: str, weight_bits: int) -> Dict[str, Any]:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path = os.path.join(tmp, "float.onnx")
    if not os.path.exists(float_path):
        export_float_onnx(model, example, float_path)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"x": xb.numpy()} for xb, _ in train[:8]])

        def get_next(self) -> Optional[Dict[str, np.ndarray]]:
            return next(self.items, None)

    out = os.path.join(tmp, f"ort_static_w{weight_bits}.onnx")
    quantize_static(
        float_path, out, Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8 if weight_bits == 8 else QuantType.QInt4, per_channel=True,
    )
    return {"path": out}


def ort_session_accuracy(path: str, x: torch.Tensor, y: torch.Tensor) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = 0
    for i in range(0, len(x), 500):
        logits = sess.run(None, {name: x[i : i + 500].numpy()})[0]
        correct += int((logits.argmax(1) == y[i : i + 500].numpy()).sum())
    return 100.0 * correct / len(x)


# ---------------------------------------------------------------------------------------------- main


def _safe(fn: Callable[[], Any], errors: List[str], label: str) -> Any:
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a peer failing is a result to report, not a crash
        errors.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None


def bench_dataset(name: str, data: Tuple[torch.Tensor, ...], make_model: Callable[[], nn.Module], epochs: int,
                  steps: int, batch: int, seed: int, tmp: str, diffq_lambda_per_bit: float) -> Tuple[List[List[str]], List[List[str]], List[str]]:
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = data
    x_val, y_val = x_train[-512:], y_train[-512:]
    x_train, y_train = x_train[:-512], y_train[:-512]
    t0 = time.perf_counter()
    model = train_float(make_model(), x_train, y_train, epochs=epochs, seed=seed)
    print(f"[{name}] float model trained in {time.perf_counter() - t0:.0f} s", flush=True)
    train = make_batches(x_train, y_train, batch, seed + 1)
    val = [(x_val, y_val)]
    example = x_test[:8]
    fp = accuracy(model, x_test, y_test)
    float_step = float_step_time(model, model, train)
    rows: List[List[str]] = [[name, "float32", "-", f"{fp:.2f}", "-", "1.00"]]
    errors: List[str] = []
    exports: List[List[str]] = []

    def add(method: str, bits: str, acc: Optional[float], step_s: Optional[float], size: str = "-") -> None:
        rows.append([name, method, bits, "failed" if acc is None else f"{acc:.2f}", size,
                     "-" if step_s is None else f"{step_s / float_step:.2f}"])

    def export_row(model_label: str, path: str, acc: float) -> None:
        exports.append([name, model_label, f"{acc:.2f}", f"{os.path.getsize(path) / 1024:.1f}",
                        f"{ort_latency_ms(path, x_test[:64].numpy()):.3f}"])

    for w, a in [(8, 8), (4, 4), (3, 3), (2, 2)]:
        label = f"W{w}A{a}"
        print(f"[{name}] {label}: fxquant", flush=True)
        r = _safe(lambda: run_fxquant(model, train, val, example, steps, w, a), errors, f"fxquant {label}")
        if r is not None:
            met = "" if r["result"].met_target else " (target not met)"
            add(f"fxquant dither, bits learned 8->{w}{met}", label, accuracy(r["qm"], x_test, y_test), r["step_s"],
                f"{r['report'].size_bytes / 1024:.1f} KiB")
            if (w, a) in ((8, 8), (4, 4)):
                frozen = fxq.freeze(r["qm"])
                path = os.path.join(tmp, f"fxq_{name}_{label}.onnx")
                ok = _safe(lambda: fxq.export_onnx(frozen, example, path), errors, f"fxquant export {label}")
                if ok is not None:
                    export_row(f"fxquant {label}", path, ort_session_accuracy(path, x_test, y_test))
                if w < 8:  # the same codes in int8 containers: onnxruntime's integer conv kernels need them
                    path8 = os.path.join(tmp, f"fxq_{name}_{label}_int8w.onnx")
                    ok = _safe(lambda: fxq.export_onnx(frozen, example, path8, int8_weights=True), errors,
                               f"fxquant export {label} int8_weights")
                    if ok is not None:
                        export_row(f"fxquant {label}, int8_weights=True", path8, ort_session_accuracy(path8, x_test, y_test))
        print(f"[{name}] {label}: fxquant fixed bits", flush=True)
        r = _safe(lambda: run_fxquant(model, train, val, example, steps, w, a, learn_bits=False), errors,
                  f"fxquant fixed {label}")
        if r is not None:
            add("fxquant dither, bits fixed", label, accuracy(r["qm"], x_test, y_test), r["step_s"],
                f"{r['report'].size_bytes / 1024:.1f} KiB")
        print(f"[{name}] {label}: brevitas", flush=True)
        r = _safe(lambda: run_brevitas(model, train, steps, w, a), errors, f"brevitas {label}")
        add("Brevitas QAT", label, None if r is None else peer_accuracy(r["model"], x_test, y_test), None if r is None else r["step_s"])
        print(f"[{name}] {label}: torch QAT", flush=True)
        r = _safe(lambda: run_torch_qat(model, train, example, steps, w, a), errors, f"torch QAT {label}")
        add("PyTorch FX QAT", label, None if r is None else peer_accuracy(r["model"], x_test, y_test), None if r is None else r["step_s"])

    for wbits in (8, 4):
        label = f"W{wbits}A8"
        print(f"[{name}] {label}: onnxruntime static PTQ", flush=True)
        r = _safe(lambda: run_ort_static(model, train, example, tmp, wbits), errors, f"ORT static {label}")
        if r is not None:
            acc = ort_session_accuracy(r["path"], x_test, y_test)
            add("onnxruntime quantize_static (PTQ)", label, acc, None)
            export_row(f"ORT quantize_static {label}", r["path"], acc)
    float_path = os.path.join(tmp, "float.onnx")
    if os.path.exists(float_path):
        export_row("float32 ONNX", float_path, fp)
        os.remove(float_path)

    print(f"[{name}] mixed precision: DiffQ then fxquant at the same size", flush=True)
    r = _safe(lambda: run_diffq(model, train, steps, diffq_lambda_per_bit), errors, "DiffQ")
    if r is not None:
        n_weights = sum(p.numel() for p in model.parameters())
        diffq_bits = r["size_bytes"] * 8 / n_weights
        add("DiffQ (weights only)", f"W{diffq_bits:.2f} avg", peer_accuracy(r["model"], x_test, y_test), r["step_s"],
            f"{r['size_bytes'] / 1024:.1f} KiB")
        target = min(max(diffq_bits, 2.0), 8.0)
        f = _safe(lambda: run_fxquant(model, train, val, example, steps, 8, None, mode="noise", weight_average=target,
                                      per_group_bits=True), errors, "fxquant mixed")
        if f is not None:
            add("fxquant noise (weights only, mixed)", f"W{f['report'].avg_weight_bits:.2f} avg", accuracy(f["qm"], x_test, y_test),
                f["step_s"], f"{f['report'].size_bytes / 1024:.1f} KiB")
    return rows, exports, errors


def versions() -> str:
    names = ["torch", "onnx", "onnxruntime", "brevitas", "diffq", "scikit-learn", "fxquant"]
    parts = []
    for n in names:
        try:
            parts.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            parts.append(f"{n} (not installed)")
    return ", ".join(parts)


def table(headers: List[str], rows: List[List[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps for every method")
    parser.add_argument("--datasets", default="digits,fashion")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--diffq-lambda-per-bit", type=float, default=0.1,
                        help="DiffQ penalty per average weight bit (0.1: about 3 bits); fxquant's mixed run then "
                             "targets the size DiffQ reached")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t0 = time.perf_counter()
    all_rows: List[List[str]] = []
    all_exports: List[List[str]] = []
    all_errors: List[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets.split(","):
            if ds == "digits":
                data = load_digits_tensors(args.seed)
                rows, exports, errors = bench_dataset("digits", data, DigitsCNN, 12, args.steps, 64, args.seed, tmp,
                                                   args.diffq_lambda_per_bit)
            elif ds == "fashion":
                data = load_fashion_mnist()
                if data is None:
                    all_errors.append("fashion: dataset-fashion-mnist is not installed and apt-get could not install it")
                    continue
                rows, exports, errors = bench_dataset("fashion-mnist", data, FashionResNet, 3, args.steps, 128, args.seed, tmp,
                                                   args.diffq_lambda_per_bit)
            else:
                raise SystemExit(f"unknown dataset {ds!r}; use digits and/or fashion")
            all_rows += rows
            all_exports += exports
            all_errors += errors
    text = [
        "# fxquant benchmarks",
        "",
        f"Produced by `python benchmarks/compare_peers.py --steps {args.steps} --datasets {args.datasets}` in {time.perf_counter() - t0:.0f} s on "
        f"{platform.machine()} with {torch.get_num_threads()} threads; Python {sys.version.split()[0]}; {versions()}.",
        "",
        "Every method quantizes every layer (fxquant `first_last_bits=None`) and fine-tunes the same float model for the "
        "same number of steps with the same Jeffreys distillation loss; accuracy is top-1 on the test split. "
        "'step time' is seconds per fine-tuning step divided by a float distillation step on the same batches; "
        "fxquant's includes its bookkeeping (bit statistics, penalty, choosing the best state on 512 held-out "
        "images every `steps // 20` steps).",
        "",
        "## Accuracy vs bits",
        "",
        table(["data", "method", "bits", "top-1 %", "size at bits", "step time vs float"], all_rows),
        "",
        "## Exported models in onnxruntime (CPU, ORT_ENABLE_ALL, batch 64, median latency)",
        "",
        table(["data", "model", "ORT top-1 %", "file KiB", "latency ms"], all_exports),
        "",
    ]
    if all_errors:
        text += ["## What failed", ""] + [f"- {e}" for e in all_errors] + [""]
    with open(args.out, "w") as fh:
        fh.write("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
