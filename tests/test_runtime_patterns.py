"""`fxquant.export.runtime_patterns`: the exported spellings onnxruntime fuses, with the frozen module's numbers."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch

import fxquant as fxq


class _RMSNormBlock(torch.nn.Module):
    """linear -> RMS norm as T5 and Llama write it (x * rsqrt(mean(x^2) + eps) * weight) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(16, 16), torch.nn.Linear(16, 4)
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.fc2(self.weight * h)


def test_an_rms_norm_is_exported_as_the_division_onnxruntime_fuses(tmp_path) -> None:  # noqa: ANN001
    """`x * rsqrt(v)` leaves export as `Div(x, Sqrt(v))`: onnxruntime fuses that (not the exporter's
    `Mul(x, Reciprocal(Sqrt(v)))`) into SimplifiedLayerNormalization; the numbers stay the frozen module's."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16)
    qm = fxq.prepare(_RMSNormBlock().eval(), x, fxq.QuantConfig())
    fxq.calibrate(qm, [x], progress=False)
    frozen = fxq.freeze(qm)
    path = str(tmp_path / "rms.onnx")
    model = fxq.export_onnx(frozen, x, path)
    assert not [n for n in model.graph.node if n.op_type == "Reciprocal"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    assert "SimplifiedLayerNormalization" in {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    other = torch.randn(2, 5, 16)  # another batch size
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: other.numpy()})[0],
                                   frozen(other).numpy(), rtol=1e-5, atol=1e-5)


def test_a_spatial_mean_becomes_global_average_pool_and_leaves_no_unused_initializer(tmp_path) -> None:  # noqa: ANN001
    """`x.mean((2, 3), keepdim=True)` after a quantized conv is exported as GlobalAveragePool (onnxruntime's
    QLinearGlobalAveragePool between Q/DQ), and the ReduceMean's axes constant does not stay behind (onnxruntime
    warns about every unused initializer)."""
    class Pool(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.conv(x)).mean((2, 3), keepdim=True))

    torch.manual_seed(0)
    model, x = Pool().eval(), torch.randn(2, 3, 8, 8)
    qm = fxq.prepare(model, x, fxq.QuantConfig(first_last_bits=None))
    fxq.calibrate(qm, [x])
    exported = fxq.export_onnx(fxq.freeze(qm), x, str(tmp_path / "pool.onnx"))
    ops = [n.op_type for n in exported.graph.node]
    assert "GlobalAveragePool" in ops and "ReduceMean" not in ops
    read = {i for n in exported.graph.node for i in n.input}
    assert all(init.name in read for init in exported.graph.initializer)
