"""The pipeline on a CUDA device: prepare, calibrate, fine-tune, freeze, export and verify a model that lives
on the GPU, and a Hugging Face causal LM with batches of other sizes. Skipped without CUDA (CI has none); a
session lent a GPU runs this file there (`python -m pytest tests/test_cuda.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from small_models import make

import fxquant as fxq

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]


@pytest.mark.parametrize("mode", ["dither", "ste", "noise"])
def test_the_whole_pipeline_runs_on_the_gpu(mode: str, tmp_path: Path) -> None:
    model, x = make("cnn", 8)
    model, x = model.cuda(), x.cuda()
    batches = [torch.randn_like(x) for _ in range(4)]
    qm = fxq.prepare(model, x, fxq.QuantConfig(mode=mode))
    assert all(p.is_cuda for p in qm.parameters())
    fxq.calibrate(qm, batches)
    result = fxq.finetune(qm, batches, teacher=model, steps=30, target_bits=4, progress=False)
    assert result.met_target and all(p.is_cuda for p in qm.parameters())
    frozen = fxq.freeze(qm)
    with torch.no_grad():
        assert torch.equal(frozen(x), qm.eval()(x))  # freeze equals the eval-mode prepared module on the GPU too
    path = tmp_path / "cnn.onnx"
    fxq.export_onnx(frozen, x, path)
    assert fxq.verify(frozen, path, batches[:2]).ok
    # the same module moved to the CPU computes the same integers
    with torch.no_grad():
        torch.testing.assert_close(frozen.cpu()(x.cpu()), frozen.cuda()(x).cpu(), rtol=1e-5, atol=1e-5)


def test_the_rounding_estimators_give_the_same_grid_on_cpu_and_gpu() -> None:
    """The CPU takes one clamp pair as numbers (`numerics.bounds_as_numbers`), the GPU keeps tensors: same
    values, same gradients."""
    from fxquant.quantizer import round_clamp

    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).requires_grad_(True) for t in (x, torch.tensor(0.25), torch.tensor(-1.0), torch.tensor(1.5))]
        y = round_clamp(*leaves)
        (y * torch.arange(y.numel(), device=device).reshape(y.shape)).sum().backward()
        results.append([y.detach().cpu()] + [t.grad.cpu() for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_a_causal_lm_on_the_gpu_calibrates_and_fine_tunes_with_other_batch_sizes() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval().cuda()
    example = {"input_ids": torch.randint(0, 64, (1, 8), device="cuda")}
    qm = fxq.prepare(model, example)
    batches = [{"input_ids": torch.randint(0, 64, (3, 12), device="cuda")} for _ in range(3)]
    fxq.calibrate(qm, batches)
    result = fxq.finetune(qm, batches, teacher=model, steps=5, progress=False)
    assert result.steps_run == 5 and all(p.is_cuda for p in qm.parameters())
    frozen = fxq.freeze(qm)
    with torch.no_grad():
        out = frozen(**batches[0])
    logits = out["logits"] if isinstance(out, dict) else out[0]
    assert logits.shape == (3, 12, 64) and logits.is_cuda
