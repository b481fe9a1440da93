"""Models for the coverage suite (tests/test_coverage.py, benchmarks/coverage_table.py): CPU, tiny, seeded.

Our own ResNet-, MobileNet- (depthwise, hardswish, squeeze-excite) and U-Net-style (upsample, concat,
conv-transpose) models, a recurrent model (LSTM + GRU), a model with data-dependent control flow, and
Hugging Face `transformers` models built from small configs with random weights (no downloads).

`ZOO` maps a name to a factory returning `(model in eval mode, example inputs, batches)`; inputs are
what `fxq.prepare` takes (a tensor, a tuple or a dict of keyword arguments).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Factory = Callable[[], Tuple[nn.Module, Any, List[Any]]]


def _init_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


class BasicBlock(nn.Module):
    """ResNet basic block with an optional 1x1 projection shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, two basic blocks (one strided with a projection), max pool, global pool, linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class SqueezeExcite(nn.Module):
    """Squeeze-excite: global pool, 1x1 reduce, ReLU, 1x1 expand, hardsigmoid gate."""

    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.fc2 = nn.Conv2d(c // r, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nn.Module):
    """MobileNetV3 block: 1x1 expand, hardswish, depthwise 3x3, squeeze-excite, 1x1 project, residual."""

    def __init__(self, c: int, expand: int = 2) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, 1, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.Hardswish())
        self.se = SqueezeExcite(h)
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(self.se(self.dw(self.expand(x))))


class TinyMobileNet(nn.Module):
    """MobileNetV3-style: strided stem with hardswish, two inverted residual blocks, pooled linear head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8), InvertedResidual(8))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(x, 1))


class TinyUNet(nn.Module):
    """U-Net: two encoder levels, conv-transpose and nearest upsample decoders, skip concatenations."""

    def __init__(self, c: int = 8, out: int = 2) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(c, 2 * c, 3, 2, 1), nn.BatchNorm2d(2 * c), nn.ReLU())
        self.bottom = nn.Sequential(nn.Conv2d(2 * c, 2 * c, 3, 2, 1), nn.ReLU())
        self.up2 = nn.ConvTranspose2d(2 * c, 2 * c, 2, 2)
        self.dec2 = nn.Sequential(nn.Conv2d(4 * c, c, 3, 1, 1), nn.ReLU())
        self.up1 = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec1 = nn.Sequential(nn.Conv2d(2 * c, c, 3, 1, 1), nn.ReLU())
        self.out = nn.Conv2d(c, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        b = self.bottom(e2)
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return self.out(d1)


class RecurrentTagger(nn.Module):
    """Embedding, LSTM, GRU, linear head: recurrent layers stay float, the rest is quantized."""

    def __init__(self, vocab: int = 50, d: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lstm = nn.LSTM(d, d, batch_first=True)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.emb(tokens))
        x, _ = self.gru(x)
        return self.head(x)


class Gate(nn.Module):
    """Data-dependent control flow: which branch runs depends on the values of the input."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return F.relu(self.a(x))
        return F.relu(self.b(x))


class ControlFlowNet(nn.Module):
    """Linear -> Gate (an `if` on tensor values, untraceable) -> Linear."""

    def __init__(self, d_in: int = 16, d: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d)
        self.gate = Gate(d)
        self.out = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(F.relu(self.inp(x))))


def _vision(model: nn.Module, shape: Tuple[int, ...]) -> Tuple[nn.Module, Any, List[Any]]:
    torch.manual_seed(0)
    batches = [torch.randn(4, *shape) for _ in range(3)]
    return _init_bn(model).eval(), batches[0], batches


def _tokens(model: nn.Module, vocab: int, seq: int = 8, mask: bool = False, key: str = "input_ids"):  # noqa: ANN202
    torch.manual_seed(0)
    batches: List[Any] = []
    for _ in range(3):
        ids = torch.randint(0, vocab, (4, seq))
        batches.append({key: ids, "attention_mask": torch.ones(4, seq, dtype=torch.long)} if mask else {key: ids})
    return model.eval(), batches[0], batches


def _seeded(fn: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return fn()


def hf_bert() -> Tuple[nn.Module, Any, List[Any]]:
    import transformers as T

    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=16, num_labels=3)
    return _tokens(_seeded(lambda: T.BertForSequenceClassification(cfg)), 64, mask=True)


def hf_gpt2() -> Tuple[nn.Module, Any, List[Any]]:
    import transformers as T

    cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, use_cache=False,
                       bos_token_id=0, eos_token_id=0)
    return _tokens(_seeded(lambda: T.GPT2LMHeadModel(cfg)), 64)


def hf_vit() -> Tuple[nn.Module, Any, List[Any]]:
    import transformers as T

    cfg = T.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, num_labels=5)
    model = _seeded(lambda: T.ViTForImageClassification(cfg)).eval()
    torch.manual_seed(0)
    batches = [{"pixel_values": torch.randn(4, 3, 16, 16)} for _ in range(3)]
    return model, batches[0], batches


def hf_distilbert() -> Tuple[nn.Module, Any, List[Any]]:
    import transformers as T

    cfg = T.DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                             max_position_embeddings=16, num_labels=3)
    return _tokens(_seeded(lambda: T.DistilBertForSequenceClassification(cfg)), 64, mask=True)


def hf_llama() -> Tuple[nn.Module, Any, List[Any]]:
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return _tokens(_seeded(lambda: T.LlamaForCausalLM(cfg)), 64)


ZOO: Dict[str, Factory] = {
    "resnet": lambda: _vision(_seeded(TinyResNet), (3, 16, 16)),
    "mobilenet": lambda: _vision(_seeded(TinyMobileNet), (3, 16, 16)),
    "unet": lambda: _vision(_seeded(TinyUNet), (3, 16, 16)),
    "recurrent": lambda: _tokens(_seeded(RecurrentTagger), 50, key="tokens"),
    "control_flow": lambda: _vision(_seeded(ControlFlowNet), (16,)),
    "bert": hf_bert,
    "gpt2": hf_gpt2,
    "vit": hf_vit,
    "distilbert": hf_distilbert,
    "llama": hf_llama,
}
HF_MODELS = ("bert", "gpt2", "vit", "distilbert", "llama")
