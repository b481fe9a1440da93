"""Models for the coverage suite (tests/test_coverage.py, benchmarks/coverage_table.py): CPU, tiny, seeded.

Our own ResNet-, MobileNetV3- (inverted residuals, depthwise, hardswish, squeeze-excite with hardsigmoid),
U-Net- (upsample, concat, conv-transpose), DenseNet- (dense concatenation, pre-activation BN), ConvNeXt-
(depthwise 7x7, channels-last LayerNorm via permute, linear MLP, layer scale) and Swin-style (window
partition/merge by reshape/permute, relative position bias) models, a torchvision-style ViT encoder on
`nn.MultiheadAttention`, a recurrent model (LSTM + GRU), a model with data-dependent control flow, and
Hugging Face `transformers` models built from small configs with random weights (no downloads): encoders
(BERT, DistilBERT, ViT), decoder-only LMs (GPT-2, Llama), an encoder-decoder (T5) and an audio conv front
end (Wav2Vec2). BatchNorm statistics are set to a sane state (`init_bn_statistics`).

`ZOO` maps a name to a factory returning `(model in eval mode, example inputs, batches)`; inputs are
what `fxq.prepare` takes (a tensor, a tuple or a dict of keyword arguments).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

Factory = Callable[[], Tuple[nn.Module, Any, List[Any]]]


def init_bn_statistics(model: nn.Module) -> nn.Module:
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


class MBConv(nn.Module):
    """EfficientNet's block: 1x1 expand, SiLU, depthwise 3x3, SiLU, squeeze-excite with a SiLU bottleneck and a
    sigmoid gate, 1x1 project, residual (when the shapes allow)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
        super().__init__()
        h = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
        self.se_reduce, self.se_expand = nn.Conv2d(h, max(cin // 4, 8), 1), nn.Conv2d(max(cin // 4, 8), h, 1)
        self.project = nn.Sequential(nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(self.expand(x))
        y = y * torch.sigmoid(self.se_expand(F.silu(self.se_reduce(F.adaptive_avg_pool2d(y, 1)))))
        y = self.project(y)
        return x + y if self.residual else y


class TinyEfficientNet(nn.Module):
    """EfficientNet-style: strided stem with SiLU, two MBConv blocks (SiLU, sigmoid squeeze-excite), pooled head."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(8, 8, 1, expand=2), MBConv(8, 16, 2, expand=2))
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


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


class DenseLayer(nn.Module):
    """DenseNet bottleneck layer: BN, ReLU, 1x1 conv, BN, ReLU, 3x3 conv; its output is concatenated to its input."""

    def __init__(self, c_in: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, 2 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * growth)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.relu(self.bn1(x)))
        y = self.conv2(F.relu(self.bn2(y)))
        return torch.cat([x, y], dim=1)


class TinyDenseNet(nn.Module):
    """DenseNet-style: stem, a dense block of three concatenating layers, transition (BN, ReLU, 1x1 conv,
    average pool), a second dense block, final BN, ReLU, global pool, linear head."""

    def __init__(self, growth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        c = 8
        layers = []
        for _ in range(3):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block1 = nn.Sequential(*layers)
        self.transition = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))
        c //= 2
        layers = []
        for _ in range(2):
            layers.append(DenseLayer(c, growth))
            c += growth
        self.block2 = nn.Sequential(*layers)
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block2(self.transition(self.block1(self.stem(x))))
        x = F.adaptive_avg_pool2d(F.relu(self.norm(x)), 1)
        return self.fc(torch.flatten(x, 1))


class ChannelsFirstLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor, as ConvNeXt's downsampling layers do it: permute to
    NHWC, `nn.LayerNorm`, permute back."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt block: depthwise 7x7 conv, permute to NHWC, LayerNorm, Linear 4x, GELU, Linear, layer scale
    (a learned per-channel multiply), permute back, residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    """ConvNeXt-style: patchify stem (2x2 stride 2 conv, channels-first LayerNorm), two blocks, a
    LayerNorm + 2x2 strided conv downsampling, one block, global pool, LayerNorm, linear head."""

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 2, 2), ChannelsFirstLayerNorm(c))
        self.stage1 = nn.Sequential(ConvNeXtBlock(c), ConvNeXtBlock(c))
        self.down = nn.Sequential(ChannelsFirstLayerNorm(c), nn.Conv2d(c, 2 * c, 2, 2))
        self.stage2 = ConvNeXtBlock(2 * c)
        self.norm = nn.LayerNorm(2 * c, eps=1e-6)
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head(self.norm(x.mean(dim=(2, 3))))


class WindowAttention(nn.Module):
    """Swin window attention on an NHWC map of fixed size: partition into `window` x `window` windows
    (reshape/permute), qkv `nn.Linear`, scaled dot-product scores plus a learned relative position bias
    (a table indexed by a buffer), softmax, projection, and the windows merged back."""

    def __init__(self, c: int, heads: int, size: int, window: int) -> None:
        super().__init__()
        self.c, self.heads, self.size, self.window = c, heads, size, window
        self.qkv = nn.Linear(c, 3 * c)
        self.proj = nn.Linear(c, c)
        self.scale = (c // heads) ** -0.5
        self.relative_bias = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("relative_index", rel[..., 0] * (2 * window - 1) + rel[..., 1], persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, h, s, w = self.c, self.heads, self.size, self.window
        n = w * w
        # (B, S, S, C) -> (B * windows, n, C)
        win = x.reshape(-1, s // w, w, s // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, c)
        q, k, v = self.qkv(win).reshape(-1, n, 3, h, c // h).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.relative_bias[self.relative_index.reshape(-1)].reshape(n, n, h).permute(2, 0, 1)
        attn = torch.softmax(q @ k.transpose(-2, -1) * self.scale + bias, dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(-1, n, c))
        # (B * windows, n, C) -> (B, S, S, C)
        return out.reshape(-1, s // w, s // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, c)


class SwinBlock(nn.Module):
    """Pre-norm Swin block: LayerNorm, window attention, residual; LayerNorm, GELU MLP, residual."""

    def __init__(self, c: int, heads: int, size: int, window: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c)
        self.attn = WindowAttention(c, heads, size, window)
        self.norm2 = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinySwin(nn.Module):
    """Swin-style: 2x2 patch embedding to an 8x8 NHWC map, LayerNorm, two window-attention blocks (4x4
    windows, 2 heads), LayerNorm, mean pool, linear head."""

    def __init__(self, c: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, c, 2, 2)
        self.norm0 = nn.LayerNorm(c)
        self.blocks = nn.Sequential(SwinBlock(c, 2, 8, 4), SwinBlock(c, 2, 8, 4))
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.norm0(self.patch(x).permute(0, 2, 3, 1)))
        return self.head(self.norm(x).mean(dim=(1, 2)))


class MHAEncoderBlock(nn.Module):
    """torchvision's ViT encoder block: LayerNorm, `nn.MultiheadAttention` (batch_first) self-attention,
    residual; LayerNorm, GELU MLP, residual."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class TinyMHAViT(nn.Module):
    """torchvision-style ViT: 4x4 patch conv, class token, learned position embedding, two
    `MHAEncoderBlock`s, LayerNorm, linear head on the class token."""

    def __init__(self, d: int = 32, heads: int = 2, image: int = 16, patch: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.conv_proj = nn.Conv2d(3, d, patch, patch)
        self.class_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.layers = nn.Sequential(MHAEncoderBlock(d, heads), MHAEncoderBlock(d, heads))
        self.ln = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding
        return self.head(self.ln(self.layers(x))[:, 0])


def first_sample(inputs: Any) -> Any:
    """The batch-1 example: the first sample of every input (a tensor or a dict of tensors)."""
    return {k: v[:1] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:1]


def _vision(model: nn.Module, shape: Tuple[int, ...]) -> Tuple[nn.Module, Any, List[Any]]:
    torch.manual_seed(0)
    batches = [torch.randn(4, *shape) for _ in range(3)]
    return init_bn_statistics(model).eval(), batches[0], batches


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


def hf_t5() -> Tuple[nn.Module, Any, List[Any]]:
    """Encoder-decoder: `T5ForConditionalGeneration` (one encoder and one decoder layer: self-, causal self- and
    cross-attention, relative position buckets) called with `decoder_input_ids` (teacher forcing)."""
    import transformers as T

    cfg = T.T5Config(vocab_size=64, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                     use_cache=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = _seeded(lambda: T.T5ForConditionalGeneration(cfg)).eval()
    torch.manual_seed(0)
    batches: List[Any] = [
        {"input_ids": torch.randint(2, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long),
         "decoder_input_ids": torch.randint(2, 64, (4, 6))}
        for _ in range(3)
    ]
    return model, batches[0], batches


def hf_wav2vec2() -> Tuple[nn.Module, Any, List[Any]]:
    """Audio: `Wav2Vec2ForSequenceClassification`, a strided conv feature encoder (group-norm first layer, GELU)
    over raw 16 kHz samples, the grouped positional conv, a transformer encoder, mean-pooled head."""
    import transformers as T

    cfg = T.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           conv_dim=(16, 16, 16), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),
                           num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, feat_extract_norm="group",
                           mask_time_prob=0.0, classifier_proj_size=16, num_labels=4, hidden_dropout=0.0,
                           attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0)
    model = _seeded(lambda: T.Wav2Vec2ForSequenceClassification(cfg)).eval()
    torch.manual_seed(0)
    batches: List[Any] = [{"input_values": torch.randn(4, 400)} for _ in range(3)]
    return model, batches[0], batches


ZOO: Dict[str, Factory] = {
    "resnet": lambda: _vision(_seeded(TinyResNet), (3, 16, 16)),
    "mobilenet": lambda: _vision(_seeded(TinyMobileNet), (3, 16, 16)),
    "efficientnet": lambda: _vision(_seeded(TinyEfficientNet), (3, 16, 16)),
    "unet": lambda: _vision(_seeded(TinyUNet), (3, 16, 16)),
    "recurrent": lambda: _tokens(_seeded(RecurrentTagger), 50, key="tokens"),
    "control_flow": lambda: _vision(_seeded(ControlFlowNet), (16,)),
    "bert": hf_bert,
    "gpt2": hf_gpt2,
    "vit": hf_vit,
    "distilbert": hf_distilbert,
    "llama": hf_llama,
    "densenet": lambda: _vision(_seeded(TinyDenseNet), (3, 16, 16)),
    "convnext": lambda: _vision(_seeded(TinyConvNeXt), (3, 16, 16)),
    "swin": lambda: _vision(_seeded(TinySwin), (3, 16, 16)),
    "mha_vit": lambda: _vision(_seeded(TinyMHAViT), (3, 16, 16)),
    "t5": hf_t5,
    "wav2vec2": hf_wav2vec2,
}
HF_MODELS = ("bert", "gpt2", "vit", "distilbert", "llama", "t5", "wav2vec2")
CNN_MODELS = ("resnet", "mobilenet", "efficientnet", "unet", "densenet", "convnext")
"""Convolutional networks (benchmarked against onnxruntime's `quantize_static`); the others are attention or
recurrent models (against `quantize_dynamic`)."""
