"""fxquant: quantize any PyTorch model without touching its code, fine-tune the quantization
differentiably, export integer ONNX.

The pipeline (each step takes the previous step's output):

1. capture   `tracing.capture_model`: torch.fx symbolic trace (torch.export as a second front end)
2. analyze   `analyze.analyze`: networkx view of the graph, annotations in `node.meta["fxquant"]`
   (before analysis: `passes.functionalize`, `passes.attention`, `passes.fold_bn` lower modules, fused
   attention and BatchNorm to the ops of `op_registry`, the one table of op facts)
3. insert    `passes.insert`: learnable weight and activation quantizers (`quantizer.LearnableQuantizer`)
   -> `prepare(model, example_inputs, config)` runs 1-3 on a copy of the model
4. calibrate `calibrate(qm, batches)`: clamps from data, bits start high
5. finetune  `finetune(qm, batches, teacher=model, ...)`: distillation + bit-width penalty
6. freeze    `freeze(qm)`: integer bits, zero points and weight codes (ONNX Q/DQ arithmetic); each frozen
   quantizer's `qparams()` is the typed `qparams.QParams` export lowers
7. export    `export_onnx(frozen, example_inputs, path)`: integer QDQ ONNX
8. verify    `verify(frozen, path, batches)`: torch vs onnxruntime parity; `report(...)`: every quantizer

Three contracts hold everywhere:

1. a pass (`fxquant.passes`) is a plain function `GraphModule -> GraphModule` that changes the graph in
   place and returns it, declared with what it requires and ensures; `run_passes` checks that contract,
   lints and recompiles after each;
2. analysis only writes `node.meta["fxquant"]`;
3. fine-tuning changes parameter values, never the graph.
"""

from __future__ import annotations

from fxquant.analyze import to_networkx
from fxquant.calibration import calibrate
from fxquant.checkpoint import load_state_dict
from fxquant.config import EstimatorChoice, NumberFormat, Placement, QuantConfig, QuantSpec
from fxquant.errors import (
    CaptureError,
    CheckpointError,
    ConfigError,
    ExportError,
    FxQuantError,
    InputError,
    ParityError,
    PassError,
    PrepareError,
    StateError,
)
from fxquant.export import OnnxQuantReport, export_onnx
from fxquant.finetune import FinetuneWarning, finetune
from fxquant.finetune_result import FinetuneResult
from fxquant.objectives import BitTarget, Schedule
from fxquant.optimization import param_groups, project_quantizers
from fxquant.preparation import freeze, prepare
from fxquant.quantizer import FrozenActivationQuantizer, FrozenWeight, LearnableQuantizer
from fxquant.report import QuantReport, report
from fxquant.shared_weights import own_weights
from fxquant.utils import quantizers_enabled, set_quantizers_enabled
from fxquant.verify import VerifyReport, verify
from fxquant.version import __version__ as __version__

__all__ = [
    "QuantConfig",
    "QuantSpec",
    "NumberFormat",
    "Placement",
    "EstimatorChoice",
    "prepare",
    "calibrate",
    "finetune",
    "FinetuneResult",
    "FinetuneWarning",
    "BitTarget",
    "Schedule",
    "param_groups",
    "project_quantizers",
    "freeze",
    "own_weights",
    "load_state_dict",
    "report",
    "QuantReport",
    "to_networkx",
    "set_quantizers_enabled",
    "quantizers_enabled",
    "LearnableQuantizer",
    "FrozenActivationQuantizer",
    "FrozenWeight",
    "FxQuantError",
    "InputError",
    "ConfigError",
    "CaptureError",
    "CheckpointError",
    "PrepareError",
    "PassError",
    "StateError",
    "export_onnx",
    "verify",
    "VerifyReport",
    "OnnxQuantReport",
    "ExportError",
    "ParityError",
]
