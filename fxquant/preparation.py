"""`prepare` and `freeze`: the model-level steps around the passes.

`prepare`: copy the user's model (it is never modified), capture it, propagate shapes, run the
structural passes (functionalize quantizable module calls, fold BatchNorm), analyze, then insert weight
and activation quantizers. `freeze`: copy a prepared module and turn its quantizers into integer ones.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Optional, Sequence

from torch import fx, nn

from fxquant.analyze import analyze
from fxquant.batches import model_device
from fxquant.checkpoint import attach_checkpoint_info
from fxquant.config import QuantConfig
from fxquant.errors import PrepareError, StateError
from fxquant.passes import run_passes
from fxquant.passes.fold_bn import fold_batchnorm
from fxquant.passes.freeze import freeze_quantizers
from fxquant.passes.functionalize import functionalize_modules
from fxquant.passes.insert import (
    QUANTIZERS_ATTR,
    insert_activation_quantizers,
    insert_bias_quantizers,
    insert_weight_quantizers,
)
from fxquant.quantizer import iter_learnable
from fxquant.tracing import capture_model, propagate_shapes, set_preserved_attr

STATE_ATTR = "fxquant_state"
"""Attribute on fxquant's GraphModules: "prepared" or "frozen"."""
CONFIG_ATTR = "fxquant_config"
CAPTURE_ATTR = "fxquant_capture"


def module_state(module: nn.Module) -> Optional[str]:
    """"prepared", "frozen" or None for a module fxquant did not make."""
    return getattr(module, STATE_ATTR, None)



def prepare(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QuantConfig] = None,
    *,
    capture: str = "auto",
    leaf_modules: Sequence[str] = (),
) -> fx.GraphModule:
    """Capture `model` and insert learnable quantizers; the user's model is not modified.

    Args:
        model: any `nn.Module`.
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        config: what to quantize and how (default `QuantConfig()`: W8A8 per-channel weights).
        capture: `"auto"` (symbolic trace, then torch.export, then symbolic trace with untraceable
            submodules kept float), `"symbolic_trace"`, `"export"` or `"symbolic_trace_leaves"`
            (see `fxquant.tracing`).
        leaf_modules: module paths to keep as opaque float calls (for code symbolic tracing rejects).

    Returns:
        A `torch.fx.GraphModule` with BatchNorm folded and quantizers in `qm.fxq_quantizers`, in the
        same train/eval mode as `model`.

    Raises:
        PrepareError: `model` is already prepared or frozen, or the inputs do not fit it.
        CaptureError: no front end could capture the model (says where and what to do).
        ConfigError: an override matches nothing, or a spec does not fit a layer.

    Example:
        >>> qm = fxq.prepare(model, torch.randn(1, 3, 32, 32), fxq.QuantConfig(mode="dither"))
    """
    if not isinstance(model, nn.Module):
        raise PrepareError(f"prepare expects an nn.Module, got {type(model).__name__}.")
    state = module_state(model)
    if state is not None or any(True for _ in iter_learnable(model)):
        raise PrepareError(
            f"the model is already {state or 'prepared'} by fxquant; prepare the original float model "
            "instead (fxquant never modifies it), or keep training the prepared module as it is."
        )
    if config is None:
        config = QuantConfig()
    if not isinstance(config, QuantConfig):
        raise PrepareError(f"config must be a fxq.QuantConfig, got {type(config).__name__}.")
    work = copy.deepcopy(model)
    gm, front_end = capture_model(work, capture, leaf_modules, example_inputs)
    propagate_shapes(gm, example_inputs)
    run_passes(gm, (functionalize_modules, fold_batchnorm))
    propagate_shapes(gm, example_inputs)
    analyze(gm, config)
    run_passes(
        gm,
        (
            functools.partial(insert_weight_quantizers, config=config),
            functools.partial(insert_activation_quantizers, config=config),
            *((insert_bias_quantizers,) if config.integer_bias else ()),
        ),
    )
    if hasattr(gm, QUANTIZERS_ATTR):
        getattr(gm, QUANTIZERS_ATTR).to(model_device(work))
    # preserved: they survive copy.deepcopy(qm), which freeze and users rely on
    set_preserved_attr(gm, STATE_ATTR, "prepared")
    set_preserved_attr(gm, CONFIG_ATTR, config)
    set_preserved_attr(gm, CAPTURE_ATTR, front_end)
    attach_checkpoint_info(gm, model, config, front_end)
    gm.train(model.training)
    return gm


def freeze(qm: fx.GraphModule) -> fx.GraphModule:
    """A new module with integer quantizers: integer bits and zero points, weights as integer codes.

    Its forward equals the eval-mode prepared module exactly (same rounding, clamps and bits, and the same
    int32 biases on the grid `s_x * s_w` when `QuantConfig(integer_bias=True)`, the default).
    BatchNorm was folded at prepare. No learnable quantizer parameter remains; `qm` is left as it was.

    Raises:
        StateError: `qm` is not a module returned by `fxq.prepare`, or an activation quantizer was never
            calibrated.
    """
    if module_state(qm) != "prepared":
        raise StateError(
            f"freeze expects a module returned by fxq.prepare (state {module_state(qm)!r}); "
            "call fxq.prepare(model, example_inputs, config) first."
        )
    for name, q in iter_learnable(qm):
        if not bool(q.initialized):
            raise StateError(
                f"quantizer {name!r} (serving {', '.join(q.served)}) was never calibrated; run "
                "fxq.calibrate(qm, batches) before fxq.freeze."
            )
    frozen = copy.deepcopy(qm)
    run_passes(frozen, (freeze_quantizers,))
    frozen.eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    set_preserved_attr(frozen, STATE_ATTR, "frozen")
    return frozen
