"""Pass `decompose_attention`: fused attention and self-attention MHA become quantized matmuls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxquant as fxq

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


class Encoder(nn.Module):
    """One pre-norm encoder block around `nn.MultiheadAttention` (as torchvision's ViT has it)."""

    def __init__(self, batch_first: bool = True, need_weights: bool = False, padding_mask: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.head = nn.Linear(16, 5)
        self.need_weights = need_weights
        self.padding_mask = padding_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        mask = (x[..., 0] > 1.5) if self.padding_mask else None
        if mask is not None and not self.attn.batch_first:
            mask = mask.transpose(0, 1)
        out, weights = self.attn(h, h, h, need_weights=self.need_weights, key_padding_mask=mask)
        y = self.head(x + out)
        return y + weights.sum() if self.need_weights else y


class CrossAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x[:, :3], x[:, :3])
        return self.head(out)


class Sdpa(nn.Module):
    """Q/K/V projections and a fused causal, grouped-query attention call (as Hugging Face's sdpa path)."""

    def __init__(self, gqa: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(16, 16)
        self.kv = nn.Linear(16, 8 if gqa else 16)
        self.o = nn.Linear(16, 16)
        self.gqa = gqa

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, 4, 4).transpose(1, 2)
        kv_heads = 2 if self.gqa else 4
        k = self.kv(x).reshape(b, n, kv_heads, 4).transpose(1, 2)
        v = torch.relu(k)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.gqa)
        return self.o(a.transpose(1, 2).reshape(b, n, 16))


def _inputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 6, 16)


def _served(qm: torch.fx.GraphModule) -> set:
    return {s for q in qm.fxq_quantizers.values() for s in q.served}


@pytest.mark.parametrize("kwargs", [{}, {"batch_first": False}, {"need_weights": True}, {"padding_mask": True}])
def test_self_attention_mha_becomes_quantized_linears_and_matmuls(kwargs: dict) -> None:
    torch.manual_seed(0)
    model = Encoder(**kwargs).eval()
    x = _inputs() if kwargs.get("batch_first", True) else _inputs().transpose(0, 1)
    qm = fxq.prepare(model, x, capture="symbolic_trace")
    served = _served(qm)
    assert {"attn.in_proj", "attn.out_proj", "attn.scores", "attn.context", "head"} <= served
    assert not [f for f in fxq.report(qm).kept_float if f.name == "attn"]
    with torch.no_grad(), fxq.quantizers_enabled(qm, False):
        assert torch.allclose(qm.eval()(x), model(x), atol=1e-5)
    fxq.calibrate(qm, [x])
    with torch.no_grad():
        assert (qm(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()


def test_cross_attention_mha_stays_a_reported_float_module() -> None:
    torch.manual_seed(0)
    model = CrossAttention().eval()
    qm = fxq.prepare(model, _inputs(), capture="symbolic_trace")
    kept = {f.name: f.reason for f in fxq.report(qm).kept_float}
    assert "cross-attention" in kept["attn"]
    assert "head" in _served(qm)


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
@pytest.mark.parametrize("gqa", [False, True])
def test_fused_attention_becomes_two_quantized_matmuls(capture: str, gqa: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Sdpa(gqa).eval()
    x = _inputs()
    qm = fxq.prepare(model, x, capture=capture)
    targets = {str(n.target) for n in qm.graph.nodes}
    assert not [t for t in targets if "scaled_dot_product" in t]
    matmul_inputs = [q for q in qm.fxq_quantizers.values() if any(s.endswith((".scores", ".context")) for s in q.served)]
    assert len(matmul_inputs) >= 3  # q, k^T, softmax output, v (shared when one tensor feeds both)
    with torch.no_grad(), fxq.quantizers_enabled(qm, False):
        assert torch.allclose(qm.eval()(x), model(x), atol=1e-5)
    fxq.calibrate(qm, [x, torch.randn_like(x)])
    frozen = fxq.freeze(qm)
    path = tmp_path / "sdpa.onnx"
    fxq.export_onnx(frozen, x, path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    exact = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        ref = frozen(x).numpy()
    np.testing.assert_allclose(exact.run(None, feed)[0], ref, atol=1e-4 * np.abs(ref).max())
    assert sess.run(None, feed)[0].shape == ref.shape
