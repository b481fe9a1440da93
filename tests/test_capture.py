"""Capture front ends: symbolic trace, torch.export (aten graphs), the leaf fallback, and their errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from models_zoo import ControlFlowNet, Gate
from small_models import MODEL_FACTORIES, make
from torch import nn

import fxquant as fxq
from fxquant.quantizer import BiasQuantizer
from fxquant.tracing import capture_model, export_model

# torch's own deprecation inside deepcopy of torch.export's pytree specs
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def _quantizer_layout(qm: torch.fx.GraphModule) -> list:
    return sorted((q.kind, q.served, q.nonnegative, q.granularity) for q in qm.fxq_quantizers.values())


@pytest.mark.parametrize("name", sorted(MODEL_FACTORIES))
def test_export_front_end_matches_symbolic_trace(name: str) -> None:
    """Same quantizers (kind, served module paths, sign; int32 biases included) and same outputs from both front
    ends: the op registry knows the torch and the aten spelling of every op."""
    model, x = make(name)
    cfg = fxq.QuantConfig()
    traced = fxq.prepare(model, x, cfg, capture="symbolic_trace")
    exported = fxq.prepare(model, x, cfg, capture="export")
    assert exported.fxquant_capture == "export"
    assert any(isinstance(n.target, torch._ops.OpOverload) for n in exported.graph.nodes)
    assert _quantizer_layout(exported) == _quantizer_layout(traced)
    fxq.calibrate(traced, [x])
    fxq.calibrate(exported, [x])
    with torch.no_grad():
        assert torch.allclose(traced.eval()(x), exported.eval()(x), atol=1e-6)


def test_export_graph_folds_batchnorm_and_trains() -> None:
    model, x = make("cnn")
    qm = fxq.prepare(model, x, capture="export")
    targets = [str(n.target) for n in qm.graph.nodes]
    assert not [t for t in targets if "batch_norm" in t]
    with torch.no_grad(), fxq.quantizers_enabled(qm, False):
        assert torch.allclose(qm.eval()(x), model(x), atol=1e-5)
    qm.train()  # a plain GraphModule: train()/eval() work (torch.export's own module refuses them)
    assert qm.training
    fxq.calibrate(qm, [x])
    qm(x).sum().backward()
    learnable = [q for q in qm.fxq_quantizers.values() if isinstance(q, fxq.LearnableQuantizer)]
    assert learnable and all(q.hi.grad is not None for q in learnable)
    # the folded convs of the aten graph get int32 biases too (the registry knows aten.conv2d's bias)
    assert any(isinstance(q, BiasQuantizer) for q in qm.fxq_quantizers.values())


def test_export_names_come_from_nn_module_stack_and_overrides_use_them() -> None:
    model, x = make("mlp")
    cfg = fxq.QuantConfig(overrides=[("fc2", None)])
    qm = fxq.prepare(model, x, cfg, capture="export")
    served = {s for q in qm.fxq_quantizers.values() for s in q.served}
    assert served == {"fc1", "fc3"}
    with pytest.raises(fxq.ConfigError, match=r"override glob 'fc9' matches no quantizable op.*Did you mean"):
        fxq.prepare(model, x, fxq.QuantConfig(overrides=[("fc9", None)]), capture="export")


def test_export_activation_matmuls_named_by_module_path() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            q = self.q(x)
            return torch.matmul(torch.softmax(torch.matmul(q, q.transpose(1, 2)), -1), x)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = Attn()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x)

    x = torch.randn(2, 4, 8)
    qm = fxq.prepare(Net().eval(), x, capture="export")
    served = {s for q in qm.fxq_quantizers.values() for s in q.served}
    assert served == {"attn.q", "attn.matmul", "attn.matmul_1"}
    softmax_q = [q for q in qm.fxq_quantizers.values() if q.nonnegative]
    assert len(softmax_q) == 1  # softmax output is found non-negative on the aten graph


def test_export_functional_batch_norm_folds() -> None:
    class FunctionalBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.register_buffer("mean", torch.randn(4) * 0.1)
            self.register_buffer("var", torch.rand(4) + 0.5)
            self.gamma = nn.Parameter(torch.rand(4) + 0.5)
            self.beta = nn.Parameter(torch.randn(4) * 0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(F.batch_norm(self.conv(x), self.mean, self.var, self.gamma, self.beta, False))

    model = FunctionalBN().eval()
    x = torch.randn(2, 3, 8, 8)
    for capture in ("symbolic_trace", "export"):
        qm = fxq.prepare(model, x, capture=capture)
        assert not [n for n in qm.graph.nodes if "batch_norm" in str(n.target)], capture
        with torch.no_grad(), fxq.quantizers_enabled(qm, False):
            assert torch.allclose(qm.eval()(x), model(x), atol=1e-5), capture


def test_conv_transpose_and_upsample_on_export_graph() -> None:
    from models_zoo import ZOO

    model, x, batches = ZOO["unet"]()
    qm = fxq.prepare(model, x, capture="export")
    served = {s for q in qm.fxq_quantizers.values() if q.kind == "weight" for s in q.served}
    assert "up2" in served  # aten.conv_transpose2d
    up2 = next(q for q in qm.fxq_quantizers.values() if q.kind == "weight" and q.served == ("up2",))
    assert up2.channel_axis == 1  # ConvTranspose weights are (in, out, kH, kW)


def test_leaf_fallback_keeps_untraceable_submodule_float() -> None:
    torch.manual_seed(0)
    model = ControlFlowNet().eval()
    x = torch.randn(4, 16)
    qm = fxq.prepare(model, x)  # auto: symbolic trace and torch.export fail, the leaf fallback works
    assert qm.fxquant_capture == "symbolic_trace_leaves"
    assert list(qm.fxquant_float_modules) == ["gate"]
    assert "control flow" in qm.fxquant_float_modules["gate"]
    assert isinstance(qm.get_submodule("gate"), Gate)
    kept = fxq.report(qm).kept_float
    assert [(k.name, k.op) for k in kept] == [("gate", "module")]
    fxq.calibrate(qm, [x])
    with torch.no_grad():
        assert torch.allclose(qm.eval()(x), model(x), atol=0.1)
    assert fxq.report(fxq.freeze(qm)).kept_float == kept  # survives freeze's deepcopy
    assert fxq.prepare(model, x, capture="symbolic_trace_leaves").fxquant_capture == "symbolic_trace_leaves"


def test_user_leaf_modules_are_reported_and_skip_export() -> None:
    torch.manual_seed(0)
    model = ControlFlowNet().eval()
    x = torch.randn(4, 16)
    qm = fxq.prepare(model, x, leaf_modules=["gate"])
    assert qm.fxquant_capture == "symbolic_trace"
    assert qm.fxquant_float_modules == {"gate": "leaf_modules (user)"}


def test_symbolic_trace_error_names_module_and_fixes() -> None:
    torch.manual_seed(0)
    with pytest.raises(fxq.CaptureError, match=r"(?s)module 'gate' \(Gate\).*capture='symbolic_trace_leaves'"):
        fxq.prepare(ControlFlowNet().eval(), torch.randn(4, 16), capture="symbolic_trace")


class TopLevelBranch(nn.Module):
    """Control flow on tensor values in the top-level forward: no submodule can be kept float."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:
            return y
        return -y


def test_no_front_end_captures_gives_one_error_listing_each() -> None:
    with pytest.raises(fxq.CaptureError) as info:
        fxq.prepare(TopLevelBranch().eval(), torch.randn(2, 4))
    text = str(info.value)
    assert text.startswith("no front end could capture TopLevelBranch (tried symbolic_trace, export, symbolic_trace_leaves)")
    assert "- symbolic_trace:\n    torch.fx.symbolic_trace failed in the top-level TopLevelBranch" in text
    assert "- export:\n    torch.export.export(strict=False) failed" in text
    assert "What to do: make the failing code traceable" in text


def test_export_error_says_what_to_do() -> None:
    with pytest.raises(fxq.CaptureError, match=r"(?s)torch.export.export\(strict=False\) failed.*error: .*fix: make the failing code export-friendly"):
        fxq.prepare(TopLevelBranch().eval(), torch.randn(2, 4), capture="export")


def test_export_with_leaf_modules_is_refused() -> None:
    model, x = make("mlp")
    with pytest.raises(fxq.PrepareError, match=r"leaf_modules=\['fc1'\] cannot be used with capture='export'.*overrides"):
        fxq.prepare(model, x, capture="export", leaf_modules=["fc1"])


def test_unknown_capture_is_refused() -> None:
    model, x = make("mlp")
    with pytest.raises(fxq.PrepareError, match=r"capture='dynamo' is unknown; expected one of \('auto', 'symbolic_trace', 'export', 'symbolic_trace_leaves'\)"):
        fxq.prepare(model, x, capture="dynamo")


def test_export_inputs_that_do_not_match_the_spec_are_refused() -> None:
    from fxquant.tracing import propagate_shapes

    model, x = make("mlp")
    gm = export_model(model, x)
    with pytest.raises(fxq.PrepareError, match="example_inputs do not match the inputs the model was exported with"):
        propagate_shapes(gm, {"y": x})


def test_capture_model_restores_train_mode_and_keeps_batch_dynamic() -> None:
    model, x = make("transformer")
    model.train()
    gm, front_end = capture_model(model, "export", (), x)
    assert front_end == "export" and model.training and gm.training
    assert gm(torch.randn(3, 6, 16)).shape == (3, 10)


def test_fold_batchnorm_on_decomposed_export_graph() -> None:
    """`_native_batch_norm_legit_no_training` after `aten.convolution` (torch.export decompositions)."""
    from torch import fx

    from fxquant.passes.fold_bn import fold_batchnorm
    from fxquant.tracing import propagate_shapes

    model, x = make("cnn")
    exported = torch.export.export(model, (x,), strict=False).run_decompositions().module()
    gm = fx.GraphModule(exported, exported.graph)
    assert any("_native_batch_norm_legit_no_training" in str(n.target) for n in gm.graph.nodes)
    propagate_shapes(gm, x)
    fold_batchnorm(gm)
    gm.recompile()
    assert not [n for n in gm.graph.nodes if "batch_norm" in str(n.target)]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-5)


def test_export_bmm_and_parameter_matmul_are_quantized() -> None:
    class Mixer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Parameter(torch.randn(8, 6))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.bmm(F.relu(a), b) @ self.proj

    torch.manual_seed(0)
    a, b = torch.randn(2, 4, 5), torch.randn(2, 5, 8)
    qm = fxq.prepare(Mixer().eval(), (a, b), capture="export")
    targets = {str(n.target) for n in qm.graph.nodes}
    assert {"aten.bmm.default", "aten.matmul.default"} <= targets
    weights = [q for q in qm.fxq_quantizers.values() if q.kind == "weight"]
    assert len(weights) == 1 and weights[0].channel_axis == 1  # x @ W: W's last axis is the output
    acts = sorted((q.served, q.nonnegative) for q in qm.fxq_quantizers.values() if q.kind == "activation")
    assert acts == [(("bmm",), False), (("bmm",), True), (("proj",), False)]  # named by its weight
