"""The coverage zoo's families at the sizes people deploy them, for `bench_ort_latency.py`.

`tests/models_zoo.py` builds each family tiny (so the test suite stays fast); their latency there is mostly
onnxruntime's per-node overhead. Here the same building blocks (imported from the zoo, so the graphs are the
ones the tests check) are stacked into ImageNet-sized networks, and the Hugging Face families get small but
real configs (hidden 256, 4 layers, 128 tokens). Weights are random, BatchNorm statistics set to a sane state;
nothing is downloaded. Each factory returns `(model in eval mode, example at the benchmark batch, 4
calibration batches of 4)`.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
from models_zoo import (  # on the path coverage_table sets
    ChannelsFirstLayerNorm,
    ConvNeXtBlock,
    DenseLayer,
    InvertedResidual,
    MBConv,
    SwinBlock,
    init_bn_statistics,
)
from torch import nn
from torch.nn import functional as F

Factory = Callable[[int], Tuple[nn.Module, Any, List[Any]]]


class MobileNetV3Style(nn.Module):
    """MobileNetV3-style at 224 px: hardswish stem, strided conv-BN-hardswish transitions, inverted residual
    blocks with squeeze-excite (the zoo's `InvertedResidual`), pooled linear head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()]
        cin = 16
        for cout, blocks in ((24, 2), (40, 2), (80, 3), (160, 2)):
            layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.Hardswish()]
            layers += [InvertedResidual(cout, 3) for _ in range(blocks)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class EfficientNetStyle(nn.Module):
    """EfficientNet-B0-like at 224 px: SiLU stem, MBConv stages (16, 24, 40, 80, 112 channels), 1x1 head conv,
    pooled linear classifier."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()]
        cin = 32
        for cout, blocks, stride in ((16, 1, 1), (24, 2, 2), (40, 2, 2), (80, 3, 2), (112, 3, 1)):
            for i in range(blocks):
                layers.append(MBConv(cin, cout, stride if i == 0 else 1, expand=1 if cout == 16 else 4))
                cin = cout
        layers += [nn.Conv2d(cin, 640, 1, bias=False), nn.BatchNorm2d(640), nn.SiLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(640, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


class ConvNeXtStyle(nn.Module):
    """ConvNeXt-style at 224 px: 4x4 patchify stem, four stages of the zoo's `ConvNeXtBlock` (64-512
    channels), LayerNorm + 2x2 strided conv downsampling, pooled LayerNorm head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        widths, depths = (64, 128, 256, 512), (2, 2, 3, 2)
        layers: List[nn.Module] = [nn.Conv2d(3, widths[0], 4, 4), ChannelsFirstLayerNorm(widths[0])]
        for i, (c, d) in enumerate(zip(widths, depths)):
            if i:
                layers += [ChannelsFirstLayerNorm(widths[i - 1]), nn.Conv2d(widths[i - 1], c, 2, 2)]
            layers += [ConvNeXtBlock(c) for _ in range(d)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(widths[-1], eps=1e-6)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.features(x).mean(dim=(2, 3))))


class SwinStyle(nn.Module):
    """Swin-style at 224 px: 4x4 patch embedding to a 56x56 NHWC map, stages of the zoo's `SwinBlock` (7x7
    windows, relative position bias) at 64-512 channels, 2x2 strided conv merging between stages."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        widths, depths, sizes = (64, 128, 256, 512), (2, 2, 2, 1), (56, 28, 14, 7)
        self.patch = nn.Conv2d(3, widths[0], 4, 4)
        self.norm0 = nn.LayerNorm(widths[0])
        self.stages = nn.ModuleList(
            nn.Sequential(*[SwinBlock(c, c // 32, s, 7) for _ in range(d)]) for c, d, s in zip(widths, depths, sizes)
        )
        self.merges = nn.ModuleList(nn.Conv2d(a, b, 2, 2) for a, b in zip(widths, widths[1:]))
        self.norm = nn.LayerNorm(widths[-1])
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm0(self.patch(x).permute(0, 2, 3, 1))
        for i, stage in enumerate(self.stages):
            if i:
                x = self.merges[i - 1](x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            x = stage(x)
        return self.head(self.norm(x).mean(dim=(1, 2)))


class DenseNetStyle(nn.Module):
    """DenseNet-style at 224 px: 7x7 stem, max pool, three dense blocks of the zoo's `DenseLayer` (growth
    32) with BN-ReLU-1x1-conv-average-pool transitions, pooled linear head."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.MaxPool2d(3, 2, 1)]
        c = 64
        for i, n in enumerate((6, 8, 8)):
            for _ in range(n):
                layers.append(DenseLayer(c, 32))
                c += 32
            if i < 2:
                layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                c //= 2
        layers += [nn.BatchNorm2d(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))


def images(batch: int, n: int) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """A 224x224 example at `batch` and `n` calibration batches of 4 (seeded)."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(batch, 3, 224, 224, generator=g), [torch.randn(4, 3, 224, 224, generator=g) for _ in range(n)]


def vision(cls: Callable[[], nn.Module]) -> Factory:
    """The factory of a vision model class (seeded weights, BatchNorm statistics set)."""

    def make(batch: int) -> Tuple[nn.Module, Any, List[Any]]:
        torch.manual_seed(0)
        x, calib = images(batch, 4)
        return init_bn_statistics(cls()).eval(), x, calib

    return make


def _token_batches(batch: int, vocab: int, seq: int, **extra: Callable[[int], torch.Tensor]) -> Tuple[Any, List[Any]]:
    g = torch.Generator().manual_seed(2)

    def tokens(b: int) -> Dict[str, torch.Tensor]:
        out = {"input_ids": torch.randint(0, vocab, (b, seq), generator=g)}
        out.update({k: f(b) for k, f in extra.items()})
        return out

    return tokens(batch), [tokens(4) for _ in range(4)]


def gpt2(batch: int) -> Tuple[nn.Module, Any, List[Any]]:
    """GPT-2-style decoder: hidden 256, 4 layers, 4 heads, 128 tokens, vocab 32000, no cache."""
    import transformers as T

    cfg = T.GPT2Config(vocab_size=32000, n_embd=256, n_layer=4, n_head=4, n_positions=512, use_cache=False,
                       bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    example, calib = _token_batches(batch, 32000, 128)
    return T.GPT2LMHeadModel(cfg).eval(), example, calib


def llama(batch: int) -> Tuple[nn.Module, Any, List[Any]]:
    """Llama-style decoder: hidden 256, 4 layers, 4 heads / 2 KV heads, SwiGLU 688, 128 tokens, vocab 32000."""
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    example, calib = _token_batches(batch, 32000, 128)
    return T.LlamaForCausalLM(cfg).eval(), example, calib


def t5(batch: int) -> Tuple[nn.Module, Any, List[Any]]:
    """T5-style encoder-decoder: d_model 256, 2 + 2 layers, 4 heads, 128 input and 32 decoder tokens."""
    import transformers as T

    cfg = T.T5Config(vocab_size=32000, d_model=256, d_kv=64, d_ff=1024, num_layers=2, num_decoder_layers=2,
                     num_heads=4, dropout_rate=0.0, use_cache=False, decoder_start_token_id=0, pad_token_id=0,
                     eos_token_id=1)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    example, calib = _token_batches(
        batch, 32000, 128, attention_mask=lambda b: torch.ones(b, 128, dtype=torch.long),
        decoder_input_ids=lambda b: torch.randint(2, 32000, (b, 32), generator=g),
    )
    return T.T5ForConditionalGeneration(cfg).eval(), example, calib


def wav2vec2(batch: int) -> Tuple[nn.Module, Any, List[Any]]:
    """wav2vec2-style audio classifier: the default 7-layer conv feature encoder (512 channels) over 1 s of
    16 kHz audio, hidden 256, 4 layers, 4 heads."""
    import transformers as T

    cfg = T.Wav2Vec2Config(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                           feat_extract_norm="group", mask_time_prob=0.0, num_labels=4, hidden_dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    example = {"input_values": torch.randn(batch, 16000, generator=g)}
    calib = [{"input_values": torch.randn(4, 16000, generator=g)} for _ in range(4)]
    return T.Wav2Vec2ForSequenceClassification(cfg).eval(), example, calib


MODELS: Dict[str, Tuple[Factory, bool]] = {
    "mobilenet_v3": (vision(MobileNetV3Style), True),
    "efficientnet": (vision(EfficientNetStyle), True),
    "densenet": (vision(DenseNetStyle), True),
    "convnext": (vision(ConvNeXtStyle), True),
    "swin": (vision(SwinStyle), False),
    "gpt2": (gpt2, False),
    "llama": (llama, False),
    "t5": (t5, False),
    "wav2vec2": (wav2vec2, False),
}
"""name -> (factory, whether onnxruntime's baseline is `quantize_static` (CNNs) or `quantize_dynamic`)"""
