"""Dynamic shapes: a module prepared from a batch of 1 takes any batch size (and token models any sequence
length) in calibrate, finetune and its ONNX export; dims the model's code fixes stay static with a warning;
Hugging Face causal LMs capture with their default `use_cache=True`."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Optional

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from models_zoo import hf_bert
from torch import nn

import fxquant as fxq
from fxquant.dynamic_shapes import BATCH, SEQUENCE, DynamicDim, candidate_dims, widen_size_one
from fxquant.tracing import capture_model, export_model

# torch's own deprecation inside deepcopy of torch.export's pytree specs
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


class SmallCNN(nn.Module):
    """Conv, BatchNorm, ReLU, pooled linear head: symbolic trace captures it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class BatchBranch(nn.Module):
    """A Python branch on the batch size: torch.export fixes the batch (as convnext/swin do with a guard)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            return self.fc(x) * 2
        return self.fc(x)


class PositionTable(nn.Module):
    """Token model with a fixed-length position table: the sequence length is fixed, the batch is not."""

    def __init__(self, vocab: int = 20, d: int = 8, length: int = 6) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d))
        self.fc = nn.Linear(d, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids) + self.pos)


class FlattenBatch(nn.Module):
    """Flattens its whole input into one row: only a batch of 1 fits the linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(1, -1))


def _session(path: Path) -> ort.InferenceSession:
    # ORT_DISABLE_ALL: the Q/DQ arithmetic itself (fused kernels round differently on CPUs without VNNI)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _tokens(batch: int, seq: int, vocab: int = 64, positions: bool = False) -> Dict[str, torch.Tensor]:
    inputs = {"input_ids": torch.randint(0, vocab, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if positions:
        inputs["position_ids"] = torch.arange(seq).repeat(batch, 1)
    return inputs


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def test_candidate_dims_are_batch_and_token_sequence() -> None:
    def forward(input_ids: Any, pixel_values: Any, flag: bool = True) -> None: ...

    dims = candidate_dims(forward, (torch.zeros(1, 8, dtype=torch.long),), {"pixel_values": torch.zeros(1, 3, 4, 4), "flag": True})
    assert [(d.name, d.axis, d.role) for d in dims] == [
        ("input_ids", 0, BATCH), ("input_ids", 1, SEQUENCE), ("pixel_values", 0, BATCH)
    ]
    assert str(dims[1]) == "input_ids dim 1 (sequence)"


def test_size_one_dims_are_widened_to_two_for_the_export() -> None:
    ids = torch.tensor([[5]])
    (wide,), _ = widen_size_one((ids,), {}, [DynamicDim("ids", (0, 0), 0, BATCH), DynamicDim("ids", (0, 0), 1, SEQUENCE)])
    assert wide.tolist() == [[5, 5], [5, 5]]
    (same,), _ = widen_size_one((torch.zeros(3, 1),), {}, [DynamicDim("x", (0, 0), 0, BATCH)])
    assert same.shape == (3, 1)  # only the dims asked for, and only from size 1


def test_symbolic_trace_cnn_from_batch_1_calibrates_finetunes_and_exports_any_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    qm = fxq.prepare(model, torch.randn(1, 3, 8, 8))
    assert qm.fxquant_capture == "symbolic_trace"
    assert [str(d) for d in qm.fxquant_dynamic_shapes.dynamic] == ["x dim 0 (batch)"]
    fxq.calibrate(qm, [torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8)])
    fxq.finetune(qm, [torch.randn(4, 3, 8, 8)], teacher=model, steps=2, progress=False)
    frozen = fxq.freeze(qm)
    path = tmp_path / "cnn.onnx"
    fxq.export_onnx(frozen, torch.randn(1, 3, 8, 8), path)
    sess = _session(path)
    assert sess.get_inputs()[0].shape == ["batch", 3, 8, 8]
    x = torch.randn(3, 3, 8, 8)
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, frozen(x).numpy(), atol=1e-5)
    result = fxq.verify(frozen, path, [torch.randn(5, 3, 8, 8)], num_batches=1, levels=("disabled",), raise_on_failure=False)
    assert result.results and all(r.ok for r in result.results), str(result)


def test_hf_bert_from_batch_1_takes_other_batch_sizes_and_lengths(tmp_path: Path) -> None:
    model, _, _ = hf_bert()
    torch.manual_seed(0)
    qm = fxq.prepare(model, _tokens(1, 8))
    assert qm.fxquant_capture == "export"
    dims = {(d.name, d.role): d.max_size for d in qm.fxquant_dynamic_shapes.dynamic}
    assert dims == {("input_ids", BATCH): None, ("input_ids", SEQUENCE): 16, ("attention_mask", BATCH): None,
                    ("attention_mask", SEQUENCE): 16}  # max_position_embeddings bounds the length
    assert qm.fxquant_dynamic_shapes.static == () and qm.fxquant_capture_notes == ()
    fxq.calibrate(qm, [_tokens(4, 8), _tokens(2, 5)])
    fxq.finetune(qm, [_tokens(4, 6), _tokens(3, 11)], teacher=model, steps=2, progress=False)
    frozen = fxq.freeze(qm)
    path = tmp_path / "bert.onnx"
    fxq.export_onnx(frozen, _tokens(1, 8), path)
    sess = _session(path)
    assert [i.shape for i in sess.get_inputs()] == [["batch", "sequence"], ["batch_2", "sequence"]]
    batch = _tokens(3, 5)
    out = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, frozen(**batch).logits.numpy(), atol=1e-5)


def test_hf_llama_with_default_use_cache_captures_with_mask_and_positions(tmp_path: Path) -> None:
    import transformers as T

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(cfg).eval()
    assert model.config.use_cache is True  # the transformers default, left as it is
    qm = fxq.prepare(model, _tokens(1, 8, positions=True))
    assert model.config.use_cache is True  # the user's model is not modified
    assert qm.fxquant_capture_notes == (
        "LlamaForCausalLM was captured with use_cache=False (torch.export cannot return its key/value cache): the "
        "prepared module and its ONNX compute the outputs without past_key_values; the model itself keeps "
        "use_cache=True.",
    )
    assert {(d.name, d.role) for d in qm.fxquant_dynamic_shapes.dynamic} == {
        (name, role) for name in ("input_ids", "attention_mask", "position_ids") for role in (BATCH, SEQUENCE)
    }
    batch = _tokens(4, 6, positions=True)
    with torch.no_grad(), fxq.quantizers_enabled(qm, False):
        np.testing.assert_allclose(qm(**batch).logits, model(**batch, use_cache=False).logits, atol=1e-5)
    fxq.calibrate(qm, [batch, _tokens(2, 10, positions=True)])
    fxq.finetune(qm, [_tokens(4, 5, positions=True)], teacher=model, steps=2, progress=False)
    frozen = fxq.freeze(qm)
    path = tmp_path / "llama.onnx"
    fxq.export_onnx(frozen, _tokens(1, 8, positions=True), path)
    sess = _session(path)
    assert [o.shape for o in sess.get_outputs()] == [["batch", "sequence", 64]]  # logits only, no cache
    batch = _tokens(3, 5, positions=True)
    out = sess.run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, frozen(**batch).logits.numpy(), atol=1e-5)


def test_hf_gpt2_with_default_use_cache_takes_other_batches_and_lengths(tmp_path: Path) -> None:
    import transformers as T

    cfg = T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = T.GPT2LMHeadModel(cfg).eval()
    assert model.config.use_cache is True
    qm = fxq.prepare(model, _tokens(1, 8))
    assert "captured with use_cache=False" in qm.fxquant_capture_notes[0]
    assert {(d.name, d.role) for d in qm.fxquant_dynamic_shapes.dynamic} == {
        (name, role) for name in ("input_ids", "attention_mask") for role in (BATCH, SEQUENCE)
    }
    fxq.calibrate(qm, [_tokens(4, 6), _tokens(2, 10)])
    fxq.finetune(qm, [_tokens(3, 5)], teacher=model, steps=2, progress=False)
    frozen = fxq.freeze(qm)
    path = tmp_path / "gpt2.onnx"
    fxq.export_onnx(frozen, _tokens(1, 8), path)
    batch = _tokens(3, 5)
    out = _session(path).run(None, {k: v.numpy() for k, v in batch.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, frozen(**batch).logits.numpy(), atol=1e-5)


def test_batch_fixed_by_the_model_code_stays_static_with_a_warning() -> None:
    torch.manual_seed(0)
    model = BatchBranch().eval()
    with pytest.warns(UserWarning, match=r"^fxquant capture: x dim 0 \(batch\) is fixed at 1 \(the model's code fixes its size\)\. Inputs must have these sizes\.$"):
        qm = fxq.prepare(model, torch.randn(1, 16), capture="export")
    shapes = qm.fxquant_dynamic_shapes
    assert shapes.dynamic == () and [(str(d), why) for d, why in shapes.static] == [
        ("x dim 0 (batch)", "the model's code fixes its size")
    ]
    assert qm.fxquant_capture_notes == (
        "x dim 0 (batch) is fixed at 1 (the model's code fixes its size). Inputs must have these sizes.",
    )
    fxq.calibrate(qm, [torch.randn(1, 16)])
    with torch.no_grad(), fxq.quantizers_enabled(qm, False):
        x = torch.randn(1, 16)
        assert torch.allclose(qm(x), model(x), atol=1e-6)
    assert "capture: x dim 0 (batch) is fixed at 1" in str(fxq.report(qm))
    with pytest.raises(fxq.PrepareError, match=r"a batch of shape \(4, 16\) does not fit the module returned by "
                       r"fxq.prepare: the capture fixed some input sizes \(x dim 0 \(batch\) is fixed at 1"):
        fxq.calibrate(qm, [torch.randn(4, 16)])


def test_sequence_fixed_by_the_model_code_keeps_the_batch_dynamic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = PositionTable().eval()
    ids = torch.randint(0, 20, (1, 6))
    with pytest.warns(UserWarning, match=r"ids dim 1 \(sequence\) is fixed at 6 \(the model's code fixes its size\)"):
        qm = fxq.prepare(model, ids, capture="export")
    assert [str(d) for d in qm.fxquant_dynamic_shapes.dynamic] == ["ids dim 0 (batch)"]
    fxq.calibrate(qm, [torch.randint(0, 20, (4, 6))])
    frozen = fxq.freeze(qm)
    path = tmp_path / "pos.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the export keeps what the capture kept: nothing to warn about
        fxq.export_onnx(frozen, ids, path)
    sess = _session(path)
    assert sess.get_inputs()[0].shape == ["batch", 6]
    x = torch.randint(0, 20, (3, 6))
    np.testing.assert_allclose(sess.run(None, {"ids": x.numpy()})[0], frozen(x).numpy(), atol=1e-5)


def test_export_that_fails_with_a_dynamic_batch_falls_back_to_static() -> None:
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"x dim 0 \(batch\) is fixed at 1 \(the export failed with it dynamic: RuntimeError: "):
        qm = fxq.prepare(FlattenBatch().eval(), torch.randn(1, 16), capture="export")
    assert qm.fxquant_dynamic_shapes.dynamic == ()


def test_onnx_export_falls_back_to_a_static_batch_with_a_warning(tmp_path: Path) -> None:
    """Symbolic trace fixes no size; the ONNX export (torch.export) finds the batch fixed and says so."""
    torch.manual_seed(0)
    model = FlattenBatch().eval()
    qm = fxq.prepare(model, torch.randn(1, 16))
    assert qm.fxquant_capture == "symbolic_trace"
    fxq.calibrate(qm, [torch.randn(1, 16)])
    path = tmp_path / "flat.onnx"
    with pytest.warns(UserWarning, match=r"^fxquant export: x dim 0 \(batch\) is fixed at 1 \(the export failed with it dynamic: "):
        fxq.export_onnx(fxq.freeze(qm), torch.randn(1, 16), path)
    assert _session(path).get_inputs()[0].shape == [1, 16]


def test_dynamic_false_fixes_every_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # asked for: no warning
        qm = fxq.prepare(model, torch.randn(1, 16), capture="export", dynamic=False)
    shapes = qm.fxquant_dynamic_shapes
    assert shapes.dynamic == () and [why for _, why in shapes.static] == ["dynamic=False"]
    fxq.calibrate(qm, [torch.randn(1, 16)])
    with pytest.raises(AssertionError, match="Guard failed"):  # torch.export's own input check
        qm(torch.randn(4, 16))
    model_proto = fxq.export_onnx(fxq.freeze(qm), torch.randn(1, 16))
    dims = model_proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 16]


def test_dynamic_must_be_a_bool() -> None:
    with pytest.raises(fxq.PrepareError, match=r"dynamic='batch' is not a bool; pass dynamic=True \(any batch size and sequence length\) or dynamic=False"):
        fxq.prepare(SmallCNN().eval(), torch.randn(1, 3, 8, 8), dynamic="batch")  # type: ignore[arg-type]


class _Cache:
    """Stands in for a `transformers` DynamicCache: not a pytree type, so torch.export cannot return it."""


class CachedLM(nn.Module):
    """Returns a cache object next to its logits unless `use_cache` is off, like a Hugging Face causal LM."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(use_cache=True)
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 20)

    def forward(self, ids: torch.Tensor, use_cache: Optional[bool] = None) -> Any:
        logits = self.fc(self.emb(ids))
        return (logits, _Cache()) if (self.config.use_cache if use_cache is None else use_cache) else logits


def test_export_model_switches_the_cache_off_and_restores_the_config() -> None:
    torch.manual_seed(0)
    model = CachedLM().eval()
    gm = export_model(model, torch.randint(0, 20, (1, 5)))
    assert model.config.use_cache is True
    assert gm.fxquant_capture_notes == (
        "CachedLM was captured with use_cache=False (torch.export cannot return its key/value cache): the prepared "
        "module and its ONNX compute the outputs without past_key_values; the model itself keeps use_cache=True.",
    )
    ids = torch.randint(0, 20, (3, 7))
    assert torch.equal(gm(ids), model(ids, use_cache=False))


def test_symbolic_trace_records_the_example_dims_and_dynamic_false_pins_them() -> None:
    example = torch.randn(1, 3, 8, 8)
    gm, _ = capture_model(SmallCNN().eval(), "symbolic_trace", (), example)
    assert [str(d) for d in gm.fxquant_dynamic_shapes.dynamic] == ["x dim 0 (batch)"]
    gm, _ = capture_model(SmallCNN().eval(), "symbolic_trace", (), example, dynamic=False)
    shapes = gm.fxquant_dynamic_shapes
    assert shapes.dynamic == () and [(str(d), why) for d, why in shapes.static] == [("x dim 0 (batch)", "dynamic=False")]
    assert gm.fxquant_capture_notes == ()  # pinned on purpose: nothing to warn about
