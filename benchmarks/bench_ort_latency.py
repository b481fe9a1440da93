"""onnxruntime latency of fxquant's W8A8 QDQ export vs the float ONNX export and vs
`onnxruntime.quantization.quantize_static` of that float export, on a ResNet-style CNN and a transformer
block. Same machine, same session settings, one run; prints milliseconds per batch and ratios.

    python benchmarks/bench_ort_latency.py [--threads 2] [--iters 50]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

import fxquant as fxq


class ResNetish(nn.Module):
    """Stem + 3 stages of two basic residual blocks (BN, ReLU), global pool, linear head."""

    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks = []
        c = width
        for stage, out in enumerate((width, 2 * width, 4 * width)):
            for i in range(2):
                stride = 2 if (i == 0 and stage > 0) else 1
                blocks.append(_Block(c, out, stride))
                c = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return F.relu(y + (x if self.down is None else self.down(x)))


class Transformer(nn.Module):
    """Two pre-LN encoder blocks (d=256, 4 heads, MLP 1024) over 64 tokens, mean-pooled head."""

    def __init__(self, d: int = 256, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Encoder(d, heads) for _ in range(layers)])
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(dim=1))


class _Encoder(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * (d // self.h) ** -0.5, dim=-1)
        x = x + self.proj(torch.matmul(att, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def _session(path: str, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _latency_ms(path: str, x: np.ndarray, threads: int, iters: int) -> float:
    sess = _session(path, threads)
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


class _Reader:
    """CalibrationDataReader for onnxruntime.quantization."""

    def __init__(self, name: str, batches: list) -> None:
        self.it = iter([{name: b.numpy()} for b in batches])

    def get_next(self):  # noqa: ANN201
        return next(self.it, None)


def bench(name: str, model: nn.Module, x: torch.Tensor, calib: list, tmp: str, threads: int, iters: int) -> None:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    model.eval()
    float_path = os.path.join(tmp, f"{name}_fp32.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), float_path, dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, verbose=False)
    ort_path = os.path.join(tmp, f"{name}_ort_qdq.onnx")
    pre = os.path.join(tmp, f"{name}_pre.onnx")
    try:
        quant_pre_process(float_path, pre)
    except Exception:  # noqa: BLE001 - pre-processing is optional
        pre = float_path
    quantize_static(pre, ort_path, _Reader(_session(float_path, 1).get_inputs()[0].name, calib),
                    quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, calib)
    frozen = fxq.freeze(qm)
    ours = os.path.join(tmp, f"{name}_fxq_w8a8.onnx")
    fxq.export_onnx(frozen, x, ours)
    report = fxq.verify(frozen, ours, calib[:2], raise_on_failure=False)
    xb = x.numpy()
    fp = _latency_ms(float_path, xb, threads, iters)
    oq = _latency_ms(ort_path, xb, threads, iters)
    fq = _latency_ms(ours, xb, threads, iters)
    print(f"{name}: batch {tuple(x.shape)}, {threads} threads, median of {iters}")
    print(f"  fp32 ONNX               {fp:8.2f} ms")
    print(f"  ORT quantize_static     {oq:8.2f} ms   ({fp / oq:.2f}x vs fp32)")
    print(f"  fxquant W8A8 QDQ        {fq:8.2f} ms   ({fp / fq:.2f}x vs fp32, {oq / fq:.2f}x vs quantize_static)")
    print(f"  fxquant integer kernels {report.integer_kernels}/{report.integer_kernels + report.float_compute}, "
          f"parity {report.max_error:.3g} {report.error_unit}, argmax {report.argmax_agreement}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        cnn = ResNetish()
        for m in cnn.modules():  # non-trivial BN statistics
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
                m.running_mean.normal_(0, 0.1)
        bench("resnet_cnn", cnn, torch.randn(8, 3, 64, 64), [torch.randn(8, 3, 64, 64) for _ in range(4)], tmp,
              args.threads, args.iters)
        bench("transformer", Transformer(), torch.randn(8, 64, 256), [torch.randn(8, 64, 256) for _ in range(4)], tmp,
              args.threads, args.iters)


if __name__ == "__main__":
    main()
