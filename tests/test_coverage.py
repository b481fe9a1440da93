"""Coverage: every model of `tests/models_zoo.py` goes prepare -> calibrate -> train -> freeze -> export -> verify.

The zoo covers the families fxquant claims: residual CNNs (ResNet), depthwise + squeeze-excite + hardswish
inverted residuals (MobileNetV3), dense concatenation (DenseNet), channels-last LayerNorm CNNs (ConvNeXt),
window attention (Swin), U-Net, an `nn.MultiheadAttention` ViT, recurrent layers, and Hugging Face
`transformers` encoders (BERT, DistilBERT, ViT), decoder-only LMs (GPT-2, Llama), an encoder-decoder (T5) and
an audio conv front end (Wav2Vec2), built from tiny configs with random weights and captured by torch.export
(`capture="auto"` falls back to it); our own models by symbolic trace; the recurrent model keeps LSTM/GRU
float; the control-flow model keeps its untraceable submodule float (leaf fallback).

Each model is prepared and exported from a batch-1 example and then runs, in PyTorch and in onnxruntime, on
batches of 4 (a dynamic batch). At ORT_DISABLE_ALL and ORT_ENABLE_ALL onnxruntime's output differs from the
frozen module's by at most 2e-2 of its max |output| or the model's own sensitivity as `fxq.verify` measures
it (`sensitivity_factor x sensitivity`), whichever is larger, with the same argmaxes, at the default W8A8
(on x86 CPUs without VNNI, where onnxruntime's u8s8 kernels saturate with 8-bit weights, the default export
stores them as UINT8 for its exact u8u8 kernels). The control-flow model cannot be exported (its float leaf
keeps Python control flow): that error is tested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import torch.nn.functional as F
from models_zoo import HF_MODELS, ZOO, first_sample

import fxquant as fxq

# torch's own deprecation inside deepcopy of torch.export's pytree specs
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")

EXPECTED_CAPTURE = {
    "resnet": "symbolic_trace",
    "mobilenet": "symbolic_trace",
    "efficientnet": "symbolic_trace",
    "unet": "symbolic_trace",
    "recurrent": "symbolic_trace",
    "control_flow": "symbolic_trace_leaves",
    "densenet": "symbolic_trace",
    "convnext": "symbolic_trace",
    "swin": "symbolic_trace",
    "mha_vit": "symbolic_trace",
    **{name: "export" for name in HF_MODELS},
}
# Weight quantizers each model must have (one per conv/linear/embedding; tied weights share one).
EXPECTED_WEIGHT_QUANTIZERS = {
    "resnet": 7,  # 6 convs + fc
    "mobilenet": 12,  # stem + 2 x (expand, dw, se.fc1, se.fc2, project) + head
    "efficientnet": 12,  # stem + 2 x (expand, dw, se_reduce, se_expand, project) + head
    "unet": 7,  # 6 convs + conv-transpose
    "recurrent": 2,  # embedding + head (LSTM/GRU float)
    "control_flow": 2,  # inp + out (gate float)
    "bert": 3 + 2 * 6 + 2,  # 3 embeddings, 6 linears per layer, pooler, classifier
    "gpt2": 1 + 1 + 2 * 4,  # wte tied with lm_head, wpe, 4 Conv1D (addmm) per layer
    "vit": 1 + 2 * 6 + 1,  # patch conv, 6 linears per layer, classifier
    "distilbert": 2 + 2 * 6 + 2,  # 2 embeddings, 6 linears per layer, pre_classifier, classifier
    "llama": 1 + 2 * 7 + 1,  # embedding, 7 linears per layer, lm_head
    # stem, 2 convs per dense layer, transition conv, fc; and the 7 BatchNorms no conv feeds (each dense layer's
    # first, after its concat; the transition's; the last) as depthwise convs of their affine
    "densenet": 1 + 3 * 2 + 1 + 2 * 2 + 1 + 7,
    "convnext": 1 + 3 * 3 + 1 + 1,  # stem, (dwconv, pwconv1, pwconv2) per block, downsampling conv, head
    "swin": 1 + 2 * 4 + 1,  # patch conv, (qkv, proj, 2 MLP linears) per block, head; bias tables stay float
    "mha_vit": 1 + 2 * 4 + 1,  # patch conv, (MHA in/out projections, 2 MLP linears) per block, head
    # shared embedding (tied with lm_head); encoder: q, k, v, o, wi, wo + relative bias; decoder: self q, k, v,
    # o + relative bias, cross q, k, v, o, wi, wo
    "t5": 1 + 7 + 11,
    "wav2vec2": 3 + 1 + 2 * 6 + 2,  # 3 feature convs, feature projection, 6 linears per layer, projector, classifier
}
# Float ops fxquant reports (`report(qm).kept_float`): ops that read weights it does not quantize.
EXPECTED_KEPT_FLOAT = {
    "recurrent": 2,  # LSTM, GRU
    "control_flow": 1,  # the Gate leaf
    "swin": 2,  # the relative position bias gathers (table[index]), one per block
    "mha_vit": 1,  # the position embedding add
    "vit": 2,  # the class token expand and the position embedding add
    "wav2vec2": 1,  # the weight norm of the positional conv
}


def _run(module: torch.nn.Module, inputs: Any) -> torch.Tensor:
    out = module(**inputs) if isinstance(inputs, dict) else module(inputs)
    if isinstance(out, dict) or hasattr(out, "logits"):
        out = out["logits"]
    return out


def _ort_argmax_agreement(path: Path, frozen: torch.nn.Module, batch: Any, level: str) -> float:
    """Share of equal argmaxes between onnxruntime (at `level`) and the frozen module, over the class axis: 1 for
    NCHW maps (segmentation), the last axis otherwise (classifier, tagger and language-model logits)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {k: v.numpy() for k, v in batch.items() if k in names} if isinstance(batch, dict) else {names[0]: batch.numpy()}
    got = sess.run(None, feed)[0]
    with torch.no_grad():
        ref = _run(frozen, batch).numpy()
    assert got.shape == ref.shape
    axis = 1 if ref.ndim == 4 else -1
    return float((got.argmax(axis) == ref.argmax(axis)).mean())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_prepare_calibrate_train_freeze_export(name: str, tmp_path: Path) -> None:
    model, example, batches = ZOO[name]()
    single = first_sample(example)
    # prepared and exported from a batch-1 example; everything below runs on batches of 4
    qm = fxq.prepare(model, single, fxq.QuantConfig())
    assert qm.fxquant_capture == EXPECTED_CAPTURE[name]
    weights = [q for q in qm.fxq_quantizers.values() if q.kind == "weight"]
    assert len(weights) == EXPECTED_WEIGHT_QUANTIZERS[name]
    assert len(qm.fxq_quantizers) > len(weights)  # activation quantizers too
    # names in reports are the user's module paths, also for torch.export graphs
    served = {s for q in qm.fxq_quantizers.values() for s in q.served}
    model_paths = {n for n, _ in model.named_modules()}
    assert served & model_paths
    assert len(fxq.report(qm).kept_float) == EXPECTED_KEPT_FLOAT.get(name, 0)

    fxq.calibrate(qm, batches)
    with torch.no_grad():
        reference = _run(model, example)
        with fxq.quantizers_enabled(qm, False):
            assert torch.allclose(_run(qm.eval(), example), reference, atol=1e-5, rtol=1e-4)
        # W8A8 (W7A8) after calibration: close to the float model (relative to the output's spread)
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

    path = tmp_path / f"{name}.onnx"
    if name == "control_flow":
        # The float leaf keeps Python control flow on tensor values: torch.onnx (torch.export) cannot
        # export it; quantize such models by rewriting the branch with torch.where / torch.cond.
        with pytest.raises(fxq.ExportError, match="torch.onnx could not export the frozen module"):
            fxq.export_onnx(frozen, single, path)
        return
    fxq.export_onnx(frozen, single, path)
    # a dynamic batch from the batch-1 example: dimension 0 of every input is named, not 1
    for inp in onnx.load(str(path), load_external_data=False).graph.input:
        assert inp.type.tensor_type.shape.dim[0].dim_param, f"{inp.name}: batch dimension fixed by the export"
    result = fxq.verify(frozen, path, batches, num_batches=2, raise_on_failure=False)
    by_level = {r.level: r for r in result.results}
    assert set(by_level) == {"ORT_ENABLE_ALL", "ORT_DISABLE_ALL"}
    # ORT_DISABLE_ALL computes exactly the frozen integer semantics
    assert by_level["ORT_DISABLE_ALL"].ok, str(result)
    # ORT_ENABLE_ALL's fused kernels may round differently (e.g. the U-Net's ConvTranspose/concat; the ViT's
    # FusedMatMul/LayerNormalization flip an activation code that later layers amplify): within 3% of the
    # output's largest magnitude
    unexplained = [r.max_abs_error for r in by_level.values() if r.explained is None]
    assert max(unexplained) <= 0.03 * float(real.abs().max()), str(result)
    # Both levels: within 2e-2 of the max |output| or the model's own sensitivity, whichever is larger, and the
    # same argmaxes (verify's for (batch, classes) outputs; ours over the class axis of every output)
    allowed = max(2e-2, result.sensitivity_factor * result.sensitivity)
    for level, r in by_level.items():
        assert r.explained is None and r.relative_error <= allowed, f"{level}: {r.relative_error:.3g} > {allowed:.3g}\n{result}"
        assert r.argmax_agreement in (None, 1.0), f"{level}\n{result}"
        agreement = _ort_argmax_agreement(path, frozen, batches[1], level)
        assert agreement == 1.0, f"{level}: argmax agreement {agreement:.3f}\n{result}"


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
    kept = {row.name: row for row in fxq.report(qm).kept_float}
    assert set(kept) == {"lstm", "gru"}
    assert "not quantized" in kept["lstm"].reason
    assert "kept float: lstm (LSTM)" in str(fxq.report(qm))

    model, example, batches = ZOO["bert"]()
    qm = fxq.prepare(model, example)
    fxq.calibrate(qm, batches)
    # the fused sdpa attention is decomposed (passes/attention.py): nothing stays float, and both attention
    # matmuls of each layer get activation quantizers
    assert fxq.report(qm).kept_float == []
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
    assert fxq.report(qm).kept_float == []
