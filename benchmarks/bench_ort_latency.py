"""onnxruntime latency of fxquant's W8A8 export at the sizes people deploy, against the float ONNX export and
against onnxruntime's own quantizers of that float export, in one run on this machine.

Models (random weights, BatchNorm statistics set to a sane state, definitions written here: no downloads):
ResNet-18 and MobileNetV2 at 224x224 (torchvision's architectures), a BERT-style encoder (hidden 256, 4
layers, 4 heads, 128 tokens; Hugging Face `BertForSequenceClassification`) and a ViT (hidden 192, 6 layers,
3 heads, 224x224 in 16x16 patches; `ViTForImageClassification`). Each goes `prepare -> calibrate (4 batches) ->
freeze -> export_onnx` at the default `QuantConfig()` (W8A8, first/last layers 8-bit too), then:

- the median ms per batch at `--batch` (1) and `--threads` (1) intra-op threads, ORT_ENABLE_ALL, the three
  models' runs interleaved (as in `coverage_table.py`, whose export and quantizer helpers this reuses);
- onnxruntime's baseline: `quantize_static` (QDQ, uint8 activations, int8 per-channel weights, calibrated on
  the same batches) for the CNNs, `quantize_dynamic` (int8 weights) for the transformers;
- the share of conv/matmul nodes that run as integer kernels in onnxruntime's optimized graph, and the parity
  `fxq.verify` reports.

Targets (issue 11): no export slower than float; CNNs as fast as `quantize_static` (ResNet-18 >= 3x float);
transformers as fast as `quantize_dynamic`. On an x86 CPU without VNNI the u8s8 kernels are slower than on
one with it, and they saturate with 8-bit weights: there fxquant's default export stores 8-bit weights as UINT8
(exact u8u8 kernels), and the INT8-weight file (`uint8_weights=False`, what `quantize_static` and
`quantize_dynamic` write) is timed beside it. The CPU is printed.

    python benchmarks/bench_ort_latency.py [--iters 60] [--threads 1] [--batch 1] [resnet18 mobilenet_v2 bert vit]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import coverage_table as ct  # noqa: E402 - benchmarks/ is on sys.path when this script runs
import deployed_models
import torch
from torch import nn

import fxquant as fxq
from fxquant.export.plan import u8s8_kernels_saturate
from fxquant.tracing import normalize_inputs


class _Basic(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Module] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18: 7x7 stem, max pool, four stages of two basic blocks, average pool, fc."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks: List[nn.Module] = []
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512)):
            blocks += [_Basic(cin, cout, 1 if i == 0 else 2), _Basic(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def _conv_bn(cin: int, cout: int, k: int, stride: int, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class _Inverted(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: List[nn.Module] = [_conv_bn(cin, hidden, 1, 1)] if expand != 1 else []
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's mobilenet_v2 (width 1.0): inverted residuals with depthwise 3x3 convs and ReLU6."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: List[nn.Module] = [_conv_bn(3, 32, 3, 2)]
        cin = 32
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(_Inverted(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, 1280, 1, 1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


def _bert(batch: int) -> Tuple[nn.Module, Any, List[Any]]:
    import transformers as T

    cfg = T.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=1024, max_position_embeddings=512, num_labels=2)
    torch.manual_seed(0)
    model = T.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(2)

    def tokens(b: int) -> Dict[str, torch.Tensor]:
        return {"input_ids": torch.randint(0, 30522, (b, 128), generator=g), "attention_mask": torch.ones(b, 128, dtype=torch.long)}

    return model, tokens(batch), [tokens(4) for _ in range(4)]


def _vit(batch: int) -> Tuple[nn.Module, Any, List[Any]]:
    import transformers as T

    cfg = T.ViTConfig(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768,
                      image_size=224, patch_size=16, num_labels=1000)
    torch.manual_seed(0)
    model = T.ViTForImageClassification(cfg).eval()
    x, calib = deployed_models.images(batch, 4)
    return model, {"pixel_values": x}, [{"pixel_values": c} for c in calib]


MODELS: Dict[str, Tuple[Callable[[int], Tuple[nn.Module, Any, List[Any]]], bool]] = {
    "resnet18": (deployed_models.vision(ResNet18), True),
    "mobilenet_v2": (deployed_models.vision(MobileNetV2), True),
    "bert": (_bert, False),
    "vit": (_vit, False),
    **deployed_models.MODELS,
}
"""name -> (factory of (model, example at the benchmark batch, calibration batches), quantize_static or not)"""


def bench(name: str, batch: int, iters: int, tmp: Path) -> Dict[str, str]:
    make, static = MODELS[name]
    model, example, calib = make(batch)
    qm = fxq.prepare(model, example)
    fxq.calibrate(qm, calib, progress=False)
    frozen = fxq.freeze(qm)
    ours = str(tmp / f"{name}_fxq.onnx")
    fxq.export_onnx(frozen, example, ours)
    result = fxq.verify(frozen, ours, calib[:1], raise_on_failure=False)
    float_path = str(tmp / f"{name}_float.onnx")
    ct._float_export(model, calib[0], float_path)
    ort_path, method = ct._ort_quantized(name, float_path, calib, tmp, static=static)
    paths = {"fxq": ours, "float": float_path, "ort": ort_path}
    saturating = u8s8_kernels_saturate()
    if saturating:  # the default export stores 8-bit weights as UINT8 here: also time the INT8 (u8s8) file
        paths["fxq_int8"] = str(tmp / f"{name}_fxq_int8.onnx")
        fxq.export_onnx(frozen, example, paths["fxq_int8"], uint8_weights=False)
    ms = ct._latencies_ms(paths, example, iters)
    args, kwargs = normalize_inputs(example)
    shape = tuple((list(kwargs.values())[0] if kwargs else args[0]).shape)
    parity = ", ".join(f"{r.level}: {r.relative_error:.2g}{'' if r.ok else ' (explained: VNNI)' if r.explained else ' !'}"
                       for r in result.results)
    return {
        "model": name, "input": "x".join(map(str, shape)), "float ms": f"{ms['float']:.2f}",
        f"ORT {method} ms": f"{ms['ort']:.2f}", "fxquant ms": f"{ms['fxq']:.2f}",
        "vs float": f"{ms['float'] / ms['fxq']:.2f}x", "vs ORT": f"{ms['ort'] / ms['fxq']:.2f}x",
        "ORT vs float": f"{ms['float'] / ms['ort']:.2f}x",
        "integer kernels / compute ops": f"{100 * result.integer_fraction:.0f}% ({result.integer_kernels}/{result.integer_kernels + result.float_compute})",
        "parity": parity,
        **({"fxquant INT8-weight ms (u8s8, saturating)": f"{ms['fxq_int8']:.2f}"} if saturating else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", default=list(MODELS), help=f"from {list(MODELS)}")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    ct.THREADS = args.threads
    torch.set_num_threads(2)
    print(f"CPU: {ct._cpu()}; onnxruntime {ct.ort.__version__}; batch {args.batch}, {args.threads} intra-op thread(s), "
          f"median of {args.iters} runs, ORT_ENABLE_ALL\n")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models:
            rows.append(bench(name, args.batch, args.iters, Path(tmp)))
            row = rows[-1]
            print(" | ".join(f"{k}: {v}" for k, v in row.items()), flush=True)
    keys = list(dict.fromkeys(k.replace("static", "quantizer").replace("dynamic", "quantizer") for r in rows for k in r))
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        cells = {k.replace("static", "quantizer").replace("dynamic", "quantizer"): v for k, v in r.items()}
        print("| " + " | ".join(cells.get(k, "") for k in keys) + " |")


if __name__ == "__main__":
    main()
