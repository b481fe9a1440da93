"""Coverage: every model of `tests/models_zoo.py` goes prepare -> calibrate -> train -> freeze -> export -> verify.

Hugging Face `transformers` models (BERT, GPT-2 with LM head, ViT, DistilBERT, Llama) are built from tiny
configs with random weights and captured by torch.export (`capture="auto"` falls back to it); our own
ResNet-, MobileNet- and U-Net-style models by symbolic trace; the recurrent model keeps LSTM/GRU float;
the control-flow model keeps its untraceable submodule float (leaf fallback).

Then each frozen model is exported to integer QDQ ONNX and verified against onnxruntime (exact at
ORT_DISABLE_ALL; within 2% at ORT_ENABLE_ALL, whose fused kernels may round differently). The
control-flow model cannot be exported (its float leaf keeps Python control flow): that error is tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from models_zoo import HF_MODELS, ZOO

import fxquant as fxq

# torch's own deprecation inside deepcopy of torch.export's pytree specs
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

EXPECTED_CAPTURE = {
    "resnet": "symbolic_trace",
    "mobilenet": "symbolic_trace",
    "unet": "symbolic_trace",
    "recurrent": "symbolic_trace",
    "control_flow": "symbolic_trace_leaves",
    **{name: "export" for name in HF_MODELS},
}
# Weight quantizers each model must have (one per conv/linear/embedding; tied weights share one).
EXPECTED_WEIGHT_QUANTIZERS = {
    "resnet": 7,  # 6 convs + fc
    "mobilenet": 12,  # stem + 2 x (expand, dw, se.fc1, se.fc2, project) + head
    "unet": 7,  # 6 convs + conv-transpose
    "recurrent": 2,  # embedding + head (LSTM/GRU float)
    "control_flow": 2,  # inp + out (gate float)
    "bert": 3 + 2 * 6 + 2,  # 3 embeddings, 6 linears per layer, pooler, classifier
    "gpt2": 1 + 1 + 2 * 4,  # wte tied with lm_head, wpe, 4 Conv1D (addmm) per layer
    "vit": 1 + 2 * 6 + 1,  # patch conv, 6 linears per layer, classifier
    "distilbert": 2 + 2 * 6 + 2,  # 2 embeddings, 6 linears per layer, pre_classifier, classifier
    "llama": 1 + 2 * 7 + 1,  # embedding, 7 linears per layer, lm_head
}


def _run(module: torch.nn.Module, inputs: Any) -> torch.Tensor:
    out = module(**inputs) if isinstance(inputs, dict) else module(inputs)
    if isinstance(out, dict) or hasattr(out, "logits"):
        out = out["logits"]
    return out


@pytest.mark.parametrize("name", sorted(ZOO))
def test_prepare_calibrate_train_freeze_export(name: str, tmp_path: Path) -> None:
    model, example, batches = ZOO[name]()
    qm = fxq.prepare(model, example)
    assert qm.fxquant_capture == EXPECTED_CAPTURE[name]
    weights = [q for q in qm.fxq_quantizers.values() if q.kind == "weight"]
    assert len(weights) == EXPECTED_WEIGHT_QUANTIZERS[name]
    assert len(qm.fxq_quantizers) > len(weights)  # activation quantizers too
    # names in reports are the user's module paths, also for torch.export graphs
    served = {s for q in qm.fxq_quantizers.values() for s in q.served}
    model_paths = {n for n, _ in model.named_modules()}
    assert served & model_paths

    fxq.calibrate(qm, batches)
    with torch.no_grad():
        reference = _run(model, example)
        with fxq.quantizers_enabled(qm, False):
            assert torch.allclose(_run(qm.eval(), example), reference, atol=1e-5, rtol=1e-4)
        # W8A8 after calibration: close to the float model (relative to the output's spread)
        error = (_run(qm, example) - reference).abs().max() / reference.std()
        assert error < 0.5, f"{name}: W8A8 error {error:.3f} of the output's std"

    qm.train()
    opt = torch.optim.Adam([p for p in qm.parameters() if p.requires_grad], lr=1e-3)
    for batch in batches:
        with torch.no_grad():
            target = _run(model, batch)
        loss = F.mse_loss(_run(qm, batch), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)

    qm.eval()
    frozen = fxq.freeze(qm)
    with torch.no_grad():
        fake = _run(qm, example)
        real = _run(frozen, example)
    scale = fake.abs().max().clamp_min(1e-6)
    assert ((real - fake).abs().max() / scale) < 1e-2
    report = fxq.report(frozen)
    assert report.rows


    if name == "control_flow":
        # The float leaf keeps Python control flow on tensor values: torch.onnx (torch.export) cannot
        # export it; quantize such models by rewriting the branch with torch.where / torch.cond.
        with pytest.raises(fxq.ExportError, match="torch.onnx could not export the frozen module"):
            fxq.export_onnx(frozen, example, tmp_path / f"{name}.onnx")
        return
    fxq.export_onnx(frozen, example, tmp_path / f"{name}.onnx")
    result = fxq.verify(frozen, tmp_path / f"{name}.onnx", batches, num_batches=2, raise_on_failure=False)
    by_level = {r.level: r for r in result.results}
    # ORT_DISABLE_ALL computes exactly the frozen integer semantics
    assert all(r.ok for r in result.results if r.level == "disabled"), str(result)
    # ORT_ENABLE_ALL's fused kernels may round differently (e.g. the U-Net's ConvTranspose/concat; the ViT's
    # FusedMatMul/LayerNormalization flip an activation code that later layers amplify): within 3% of the
    # output's largest magnitude
    # (a CPU without VNNI saturates u8s8 sums with 8-bit weights: verify explains that difference)
    unexplained = [r.max_abs_error for r in by_level.values() if r.explained is None]
    assert max(unexplained) <= 0.03 * float(real.abs().max()), str(result)


@pytest.mark.parametrize("name", ["bert", "resnet"])
def test_batch_size_is_free_after_capture(name: str) -> None:
    model, example, batches = ZOO[name]()
    qm = fxq.prepare(model, example, capture="export")
    fxq.calibrate(qm, batches)
    small = {k: v[:2] for k, v in example.items()} if isinstance(example, dict) else example[:2]
    with torch.no_grad():
        assert _run(qm.eval(), small).shape[0] == 2


def test_gpt2_conv1d_addmm_weights_are_per_output_channel() -> None:
    model, example, _ = ZOO["gpt2"]()
    qm = fxq.prepare(model, example)
    q = qm.fxq_quantizers["transformer_h_0_attn_c_attn_weight"]
    # HF Conv1D stores W as (in, out) and computes addmm(b, x, W): channels are the last axis
    assert q.channel_axis == 1
    assert q.served == ("transformer.h.0.attn.c_attn",)


def test_tied_gpt2_embedding_and_lm_head_share_one_quantizer() -> None:
    model, example, _ = ZOO["gpt2"]()
    qm = fxq.prepare(model, example)
    shared = [q for q in qm.fxq_quantizers.values() if q.kind == "weight" and len(q.served) == 2]
    assert len(shared) == 1
    assert set(shared[0].served) == {"lm_head", "transformer.wte"}


def test_kept_float_ops_are_listed_in_the_report() -> None:
    model, example, batches = ZOO["recurrent"]()
    qm = fxq.prepare(model, example)
    fxq.calibrate(qm, batches)
    kept = {row["name"]: row for row in fxq.report(qm).extra["kept_float"]}
    assert set(kept) == {"lstm", "gru"}
    assert "not quantized" in kept["lstm"]["reason"]
    assert "kept float: lstm (LSTM)" in str(fxq.report(qm))

    model, example, batches = ZOO["bert"]()
    qm = fxq.prepare(model, example)
    fxq.calibrate(qm, batches)
    # the fused sdpa attention is decomposed (passes/attention.py): nothing stays float, and both attention
    # matmuls of each layer get activation quantizers
    assert fxq.report(qm).extra["kept_float"] == []
    served = {s for q in qm.fxq_quantizers.values() for s in q.served}
    for layer in (0, 1):
        assert {f"bert.encoder.layer.{layer}.attention.self.{m}" for m in ("scores", "context")} <= served


def test_eager_attention_matmuls_are_quantized_with_unsigned_probabilities() -> None:
    """With `attn_implementation="eager"` HF attention is matmul/softmax/matmul: both matmuls get
    activation quantizers, named by module path, and the softmax probabilities are unsigned."""
    import transformers as T

    cfg = T.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=16, attn_implementation="eager")
    torch.manual_seed(0)
    model = T.BertModel(cfg).eval()
    example = {"input_ids": torch.randint(0, 64, (4, 8)), "attention_mask": torch.ones(4, 8, dtype=torch.long)}
    qm = fxq.prepare(model, example)
    served = {s for q in qm.fxq_quantizers.values() for s in q.served}
    assert {"encoder.layer.0.attention.self.matmul", "encoder.layer.0.attention.self.matmul_1"} <= served
    probs = [q for q in qm.fxq_quantizers.values() if "encoder.layer.0.attention.self.matmul_1" in q.served]
    assert any(q.nonnegative for q in probs)
    assert fxq.report(qm).extra["kept_float"] == []
