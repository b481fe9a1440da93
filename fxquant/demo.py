"""`fxquant demo`: the whole pipeline on scikit-learn's digits, in well under two minutes on 2 CPU cores.

Trains a small float CNN (conv-BN-ReLU, a residual block, global pool, linear), quantizes it to W4A4 with
GDNSQ's dithered rounding (first and last layers at 8 bits), fine-tunes by distillation from the float
model, freezes, exports integer QDQ ONNX, verifies it in onnxruntime, and prints accuracies, bits per
layer, size and latency (also of the same model with int8 weight containers, which onnxruntime runs as
integer conv kernels). Writes `model.onnx`, `model_int8_weights.onnx`, `summary.json` and `bits.png`.

`summary.json` is written as soon as the numbers exist, before the picture: a plotting failure costs
`bits.png` (with a warning), never the results. torch's exporter noise when exporting the float baseline
(`torchvision is not installed` lines, pytree deprecation warnings) is silenced like fxquant's own export.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fxquant as fxq
from fxquant.plots import draw_pictures
from fxquant.quantize_cli import report_summary, verify_reported, write_summary
from fxquant.tracing import silenced

EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "onnxscript")
"""Loggers of torch's ONNX exporter: below ERROR they only say what the export skipped (e.g. torchvision ops)."""


class DigitsCNN(nn.Module):
    """A ~30k-parameter CNN for 8x8 digits with a residual block."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.down_bn = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        x = F.relu(self.down_bn(self.down(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def load_digits_tensors(seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as (x_train, y_train, x_test, y_test); images (N, 1, 8, 8) in [0, 1]."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n_test = 450
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


def make_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled `(inputs, target)` batches."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    return [(x[perm[i : i + batch_size]], y[perm[i : i + batch_size]]) for i in range(0, len(x), batch_size)]


def train_float(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 12, seed: int = 0) -> nn.Module:
    """Train the float model with Adam and label cross-entropy; returns it in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(x) + 63) // 64))
    model.train()
    for epoch in range(epochs):
        for xb, yb in make_batches(x, y, 64, seed + epoch):
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent of a torch module (eval mode) or an onnxruntime session."""
    if hasattr(model, "run"):
        name = model.get_inputs()[0].name
        logits = torch.from_numpy(model.run(None, {name: x.numpy()})[0])
    else:
        logits = model(x)
    return float((logits.argmax(dim=1) == y).float().mean()) * 100.0


def ort_latency_ms(path: str, x: np.ndarray, repeats: int = 200) -> float:
    """Median onnxruntime CPU latency (ms) of one batch, 2 threads, full graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for _ in range(20):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def export_float_onnx(model: nn.Module, example: torch.Tensor, path: str) -> None:
    """Export the float model with torch's dynamo exporter (the latency baseline).

    The exporter's log lines, progress prints and warnings are silenced (errors still raise).
    """
    with silenced(EXPORTER_LOGGERS, logging.ERROR, "stdout"):
        torch.onnx.export(
            model, (example,), path, dynamo=True, external_data=False,
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}, verbose=False,
        )


def run_demo(out_dir: str = "fxquant-demo", steps: int = 300, quiet: bool = False, seed: int = 0) -> Dict[str, Any]:
    """Run the demo; returns the summary that it also writes to `out_dir/summary.json`."""
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    say = (lambda *a: None) if quiet else print
    t_start = time.perf_counter()

    x_train, y_train, x_test, y_test = load_digits_tensors(seed)
    # held-out validation batch: picks the best fine-tuned state without looking at the test set
    x_val, y_val = x_train[-256:], y_train[-256:]
    x_train, y_train = x_train[:-256], y_train[:-256]
    say(f"[1/6] training a float CNN on scikit-learn digits ({len(x_train)} train / {len(x_val)} validation / {len(x_test)} test images)")
    model = train_float(DigitsCNN(), x_train, y_train, seed=seed)
    fp_acc = accuracy(model, x_test, y_test)
    say(f"      float accuracy: {fp_acc:.2f}%")

    say("[2/6] prepare: trace, fold BatchNorm, insert learnable W4A4 quantizers (first/last layers 8 bits)")
    config = fxq.QuantConfig(
        weight=fxq.QuantSpec(bits=8, min_bits=2, max_bits=8),
        activation=fxq.QuantSpec(bits=8, min_bits=2, max_bits=8),
        mode="dither",
        first_last_bits=8,
    )
    qm = fxq.prepare(model, x_train[:64], config)
    train_batches = make_batches(x_train, y_train, 64, seed + 100)
    fxq.calibrate(qm, train_batches, num_batches=8)

    say(f"[3/6] fine-tune {steps} steps: Jeffreys distillation from the float model + exterior-point bit penalty -> 4 bits")
    result = fxq.finetune(
        qm, train_batches, teacher=model, steps=steps, target_bits=4.0,
        val_batches=[(x_val, y_val)], progress=not quiet,
    )
    qm.eval()
    fq_acc = accuracy(qm, x_test, y_test)
    say(f"      fake-quant accuracy: {fq_acc:.2f}% (target met: {result.met_target})")

    say("[4/6] freeze and export integer QDQ ONNX")
    frozen = fxq.freeze(qm)
    onnx_path = os.path.join(out_dir, "model.onnx")
    fxq.export_onnx(frozen, x_test[:8], onnx_path)
    # the same codes in int8 containers: a larger file that onnxruntime runs as QLinearConv integer kernels
    fast_path = os.path.join(out_dir, "model_int8_weights.onnx")
    fxq.export_onnx(frozen, x_test[:8], fast_path, int8_weights=True)
    float_path = os.path.join(out_dir, "model_float.onnx")
    export_float_onnx(model, x_test[:8], float_path)

    say("[5/6] verify in onnxruntime")
    # the parity report carries the explanation of machine-specific differences (printed and in summary.json)
    parity = verify_reported(
        frozen, onnx_path, [x_test[i : i + 150] for i in range(0, len(x_test), 150)], raise_on_failure=True
    )
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    ort_acc = accuracy(sess, x_test, y_test)
    batch = x_test[:64].numpy()
    lat_q = ort_latency_ms(onnx_path, batch)
    lat_fast = ort_latency_ms(fast_path, batch)
    lat_f = ort_latency_ms(float_path, batch)

    say("[6/6] report")
    rep = fxq.report(frozen)
    summary = {
        "float_accuracy": fp_acc,
        "fake_quant_accuracy": fq_acc,
        "onnxruntime_accuracy": ort_acc,
        "target_met": bool(result.met_target),
        **report_summary(rep),
        "onnx_file_bytes": os.path.getsize(onnx_path),
        "float_onnx_file_bytes": os.path.getsize(float_path),
        "ort_latency_ms_batch64": lat_q,
        "int8_weights_onnx_file_bytes": os.path.getsize(fast_path),
        "int8_weights_ort_latency_ms_batch64": lat_fast,
        "float_ort_latency_ms_batch64": lat_f,
        "parity": str(parity),
        "seconds": time.perf_counter() - t_start,
    }
    summary_path = write_summary(out_dir, summary)
    pictures = draw_pictures(
        out_dir, rep.rows, result, summary_path, "demo",
        bits_title="bits per quantizer after fine-tuning (first and last layers fixed at 8 bits)",
        history_title=f"fine-tune: {steps} steps, bits driven to 4",
    )
    say(str(rep))
    say("")
    say(str(parity))
    say("")
    say(f"accuracy  float {fp_acc:.2f}%   fake-quant {fq_acc:.2f}%   onnxruntime {ort_acc:.2f}%")
    say(f"size      {rep.size_bytes / 1024:.1f} KiB at learned bits vs {rep.float_size_bytes / 1024:.1f} KiB float "
        f"({rep.compression:.1f}x); ONNX file {summary['onnx_file_bytes'] / 1024:.1f} KiB vs "
        f"{summary['float_onnx_file_bytes'] / 1024:.1f} KiB float")
    say(f"latency   onnxruntime batch 64: {lat_q:.3f} ms quantized vs {lat_f:.3f} ms float ({lat_f / lat_q:.2f}x); "
        f"with int8_weights=True ({summary['int8_weights_onnx_file_bytes'] / 1024:.1f} KiB, integer conv kernels): "
        f"{lat_fast:.3f} ms ({lat_f / lat_fast:.2f}x)")
    written = ", ".join([onnx_path, fast_path, float_path, summary_path, *pictures])
    say(f"wrote {written} in {summary['seconds']:.0f} s")
    return summary
