"""`prepare` and `freeze`: the model-level steps around the passes.

`prepare`: copy the user's model (it is never modified), capture it, propagate shapes, run the
structural passes (functionalize quantizable module calls, fold BatchNorm), analyze, then insert weight
and activation quantizers. It refuses, before capture, models and inputs that are not float32, and, before
insertion, a model in which no op would be quantized (no conv, linear, matmul or embedding, or every one
kept float by the configuration). `freeze`: copy a prepared module (or, `inplace`, take it) and turn its quantizers
into integer ones.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from fxquant.analyze import analyze, kept_float, quant_op
from fxquant.batches import model_device
from fxquant.checkpoint import attach_checkpoint_info
from fxquant.config import NumberFormat, Placement, QuantConfig
from fxquant.errors import ConfigError, PrepareError, StateError
from fxquant.graph import STATE_ATTR, module_state, quantizers_of, tensors_read_by_quantizers
from fxquant.op_registry import quantized_kinds
from fxquant.passes import run_passes
from fxquant.passes.absorb_relu import absorb_relus
from fxquant.passes.attention import decompose_attention
from fxquant.passes.fold_bn import fold_batchnorm, fold_channel_scales
from fxquant.passes.freeze import freeze_quantizers
from fxquant.passes.functionalize import functionalize_modules
from fxquant.passes.gated_activations import decompose_gated_activations
from fxquant.passes.insert import insert_activation_quantizers, insert_bias_quantizers, insert_weight_quantizers
from fxquant.quantizer import iter_learnable
from fxquant.shared_weights import mark_shared, sharing_memo, should_share
from fxquant.tracing import FLOAT_MODULES_ATTR, capture_model, propagate_shapes, set_preserved_attr

CONFIG_ATTR = "fxquant_config"
CAPTURE_ATTR = "fxquant_capture"


_FLOAT32_FIX = "fxquant quantizes float32 models; call model.float() first (and cast inputs with x.float())."
_SHOWN = 12


def _tensors(value: Any, path: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """`(path, tensor)` for every tensor in nested tuples, lists and dicts of example inputs."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, v in enumerate(value):
            yield from _tensors(v, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors(v, f"{path}[{k!r}]")


def _model_tensors(model: nn.Module, example_inputs: Any) -> Iterator[Tuple[str, torch.Tensor]]:
    """`(what, tensor)` for the model's parameters and buffers ("the model's parameter 'fc1.weight'") and the
    example inputs ("example_inputs[1]"), the tensors prepare's checks look at."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            yield f"the model's {kind} {name!r}", t
    yield from _tensors(example_inputs, "example_inputs")


def check_float32(model: nn.Module, example_inputs: Any) -> None:
    """Refuse floating-point parameters, buffers and example inputs that are not float32.

    Quantizer parameters and the ONNX Q/DQ arithmetic are float32; a float16, bfloat16 or float64 model
    would fail later inside the first forward (or export), far from the cause.

    Raises:
        PrepareError: names the first such tensor and its dtype, and says to call `model.float()`.
    """
    for what, t in _model_tensors(model, example_inputs):
        if t.is_floating_point() and t.dtype != torch.float32:
            raise PrepareError(f"{what} is {str(t.dtype).replace('torch.', '')}; {_FLOAT32_FIX}")


def check_materialized(model: nn.Module, example_inputs: Any) -> None:
    """Refuse parameters, buffers and example inputs on the `meta` device (no data).

    `prepare` runs the model on its example inputs (shapes, the sign of tensors) and calibration reads the
    weights, so a model built under `torch.device("meta")` must get its weights first; it would otherwise fail
    deep inside shape propagation. The way that holds the weights once: `load_state_dict(state_dict,
    assign=True)` of a state dict loaded lazily (`torch.load(path, mmap=True)`); prepare then shares those
    tensors (`fxquant.shared_weights`).

    Raises:
        PrepareError: names the first such tensor, how many hold no data, and how to load them.
    """
    tensors = list(_model_tensors(model, example_inputs))
    empty = [what for what, t in tensors if t.is_meta]
    if empty:
        raise PrepareError(
            f"{empty[0]} is on the meta device ({len(empty)} of {len(tensors)} tensors hold no data); prepare runs "
            "the model on its example inputs, so give it its weights first: model.load_state_dict(state_dict, "
            "assign=True) makes the state dict's tensors the model's (no second copy; with "
            "state_dict = torch.load(path, mmap=True) they are read from the file as they are used), and prepare "
            "quantizes those weights without copying them."
        )


def _model_ops(gm: fx.GraphModule) -> List[str]:
    """The distinct ops of a captured graph, in order: functions, methods and module types."""
    leaves = dict(getattr(gm, FLOAT_MODULES_ATTR, {}) or {})
    names: List[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_function":
            name = getattr(node.target, "__name__", str(node.target))
        elif node.op == "call_method":
            name = f".{node.target}()"
        elif node.op == "call_module":
            name = type(gm.get_submodule(str(node.target))).__name__
            if str(node.target) in leaves:
                name += f" (kept float: {leaves[str(node.target)]})"
        else:
            continue
        if name not in names:
            names.append(name)
    return names


def check_something_quantized(
    gm: fx.GraphModule, model: nn.Module, number_format: NumberFormat, placement: Placement
) -> None:
    """Refuse an analyzed graph in which no op gets a weight or input quantizer.

    Raises:
        PrepareError: the model has no conv, conv_transpose, linear, matmul or embedding op (the message lists
            the ops it has), or every such op is kept float (by overrides with spec None, by
            `QuantConfig(weight=None, activation=None)` or as a float leaf module; the message says which).
    """
    ops = [op for op in (quant_op(n) for n in gm.graph.nodes) if op is not None]
    if any(op.weight_spec is not None or op.input_spec is not None for op in ops):
        return
    kinds = ", ".join(quantized_kinds())
    what = type(model).__name__
    if (
        ops and number_format.weight is None and number_format.activation is None
        and all(s is None for _, s in placement.overrides)
    ):
        raise PrepareError(
            f"no op of {what} could be quantized: QuantConfig(weight=None, activation=None) keeps all {len(ops)} "
            "quantizable ops float. Give QuantConfig a weight and/or activation QuantSpec, e.g. "
            "QuantConfig(weight=fxq.QuantSpec(bits=8))."
        )
    if ops:
        floats = [f"{f.name} ({f.reason})" for f in kept_float(gm)]
        shown = "; ".join(floats[:_SHOWN]) + (f"; and {len(floats) - _SHOWN} more" if len(floats) > _SHOWN else "")
        raise PrepareError(
            f"no op of {what} could be quantized: all {len(ops)} quantizable ops are kept float ({shown}). Remove "
            "the (glob, None) overrides that match every layer, or give QuantConfig a weight and/or activation "
            "QuantSpec."
        )
    found = _model_ops(gm)
    listed = ", ".join(found[:_SHOWN]) + (f" and {len(found) - _SHOWN} more" if len(found) > _SHOWN else "")
    raise PrepareError(
        f"no op of {what} could be quantized: it has {listed or 'no ops'}, and fxquant quantizes {kinds} ops "
        "(nn.Conv*/nn.Linear/nn.Embedding modules, their F.* functions, torch.matmul/@/bmm/mm/addmm). Prepare a "
        "model that has such layers, or do not keep them as float leaf_modules."
    )


def prepare(
    model: nn.Module,
    example_inputs: Any,
    config: Optional[QuantConfig] = None,
    *,
    capture: str = "auto",
    leaf_modules: Sequence[str] = (),
    dynamic: bool = True,
    inplace: bool = False,
) -> fx.GraphModule:
    """Capture `model` and insert learnable quantizers; the user's model is not modified (unless `inplace`).

    The prepared module has its own modules and parameter objects, but reads the model's own weight tensors
    until something would write into them: fine-tuning, a state-dict load or the first backward give it its
    own copies first (`fxquant.shared_weights`; `fxq.own_weights(qm)` does it by hand). Calibration, freeze
    and export only read weights, so post-training quantization holds a model's weights once. The other way
    round, until then a change of `model`'s own weights in place (`model.load_state_dict(...)`, training the
    float model further) shows in the prepared module too: call `fxq.own_weights(qm)` first.

    Args:
        model: any `nn.Module`.
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword arguments.
        config: what to quantize and how (default `QuantConfig()`: W8A8 per-channel weights).
        capture: `"auto"` (symbolic trace, then torch.export, then symbolic trace with untraceable
            submodules kept float), `"symbolic_trace"`, `"export"` or `"symbolic_trace_leaves"`
            (see `fxquant.tracing`).
        leaf_modules: module paths to keep as opaque float calls (for code symbolic tracing rejects).
        dynamic: accept any batch size, and any sequence length for integer inputs of rank 2 (token ids,
            attention masks), in the prepared module (torch.export capture) and in its ONNX export, as far
            as the model's code allows; the dims it fixes stay static, with a warning. `False` fixes every
            size to the example's.
        inplace: build the prepared module from `model`'s own parameters instead of a copy, so that a large
            model is not held twice: the prepared module then shares (and fine-tuning changes) the model's
            weights, BatchNorm-folded layers get new weights, and `model` itself is left in eval mode and
            must not be used as the float model afterwards (nor as a teacher: fine-tune with
            `teacher=None` or a separate float copy).

    Returns:
        A `torch.fx.GraphModule` with BatchNorm folded and quantizers in `qm.fxq_quantizers`, in the
        same train/eval mode as `model`. `qm.fxquant_dynamic_shapes` says which input dims may change
        size; `qm.fxquant_capture_notes` says what the capture changed (e.g. a Hugging Face causal LM
        captured with `use_cache=False`) or could not keep dynamic.

    Raises:
        PrepareError: `model` is already prepared or frozen, the inputs do not fit it, the model or its
            inputs are not float32 (call `model.float()`), no op of the model can be quantized, or
            `dynamic` or `inplace` is not a bool.
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
    if not isinstance(dynamic, bool):
        raise PrepareError(
            f"dynamic={dynamic!r} is not a bool; pass dynamic=True (any batch size and sequence length) or "
            "dynamic=False (the example's sizes only)."
        )
    if not isinstance(inplace, bool):
        raise PrepareError(
            f"inplace={inplace!r} is not a bool; pass inplace=False (prepare a copy, the default) or inplace=True "
            "(reuse the model's parameters; the model must not be used afterwards)."
        )
    check_materialized(model, example_inputs)
    check_float32(model, example_inputs)
    was_training = model.training
    # a copy of the modules around the model's own weight tensors, copied only before something writes them
    # (`fxquant.shared_weights`): post-training quantization holds a large model's weights once
    share = not inplace and should_share(model)
    work = model if inplace else copy.deepcopy(model, sharing_memo(model) if share else None)
    # Capture the inference graph: Python branches on `self.training` (stochastic depth, dropout as a function)
    # are decided at capture, and the training ones would be baked into every later step and the export.
    # Module-level dropout stays a module and follows `qm.train()` / `qm.eval()`.
    work.eval()
    gm, front_end = capture_model(work, capture, leaf_modules, example_inputs, dynamic)
    shapes = functools.partial(propagate_shapes, example_inputs=example_inputs)
    run_passes(
        gm,
        (
            shapes, functionalize_modules, decompose_attention,
            # an unfoldable BatchNorm becomes a depthwise conv only where integer kernels can run it (both quantized)
            functools.partial(fold_batchnorm, affine_as_conv=(
                config.number_format.weight is not None and config.number_format.activation is not None)),
            fold_channel_scales,
            functools.partial(decompose_gated_activations, number_format=config.number_format), shapes,
            functools.partial(analyze, number_format=config.number_format, placement=config.placement),
        ),
    )
    check_something_quantized(gm, model, config.number_format, config.placement)
    run_passes(
        gm,
        (
            functools.partial(insert_weight_quantizers, estimator=config.estimator),
            functools.partial(insert_activation_quantizers, estimator=config.estimator),
            *((insert_bias_quantizers,) if config.integer_bias else ()),
            absorb_relus,
        ),
    )
    container = quantizers_of(gm)
    if container is not None:
        container.to(model_device(work))
    # preserved: they survive copy.deepcopy(qm), which freeze and users rely on
    set_preserved_attr(gm, STATE_ATTR, "prepared")
    set_preserved_attr(gm, CONFIG_ATTR, config)
    set_preserved_attr(gm, CAPTURE_ATTR, front_end)
    attach_checkpoint_info(gm, model, config, front_end)
    if share:
        mark_shared(gm, model)
    gm.train(was_training)
    return gm


def freeze(qm: fx.GraphModule, *, inplace: bool = False) -> fx.GraphModule:
    """A new module with integer quantizers: integer bits and zero points, weights as integer codes.

    Its forward equals the eval-mode prepared module exactly (same rounding, clamps and bits, and the same
    int32 biases on the grid `s_x * s_w` when `QuantConfig(integer_bias=True)`, the default).
    BatchNorm was folded at prepare. No learnable quantizer parameter remains; `qm` is left as it was
    (unless `inplace`).

    Args:
        qm: a calibrated module returned by `fxq.prepare`.
        inplace: freeze `qm` itself instead of a copy, so that a large model's float weights and their codes
            are not held together: each float weight is released as soon as its integer codes exist. `qm` is
            returned, frozen; it is no longer a prepared module (it cannot be calibrated, fine-tuned or frozen
            again, and its float weights are gone), and an error part-way leaves it unusable. The frozen module
            is the same as without `inplace` (same outputs, same state dict).

    Raises:
        StateError: `qm` is not a module returned by `fxq.prepare`, or an activation quantizer was never
            calibrated.
        ConfigError: `inplace` is not a bool.
    """
    if module_state(qm) != "prepared":
        raise StateError(
            f"freeze expects a module returned by fxq.prepare (state {module_state(qm)!r}); "
            "call fxq.prepare(model, example_inputs, config) first."
        )
    if not isinstance(inplace, bool):
        raise ConfigError(
            f"inplace={inplace!r} is not a bool; pass inplace=False (freeze a copy, the default) or inplace=True "
            "(freeze the prepared module itself; it must not be used as a prepared module afterwards)."
        )
    for name, q in iter_learnable(qm):
        if not bool(q.initialized):
            raise StateError(
                f"quantizer {name!r} (serving {', '.join(q.served)}) was never calibrated; run "
                "fxq.calibrate(qm, batches) before fxq.freeze."
            )
    if inplace:
        frozen = run_passes(qm, (freeze_quantizers,))
    else:
        # The tensors the quantizers read are shared with the copy, not copied: the freeze pass only reads them
        # (into integer codes) and then drops them from the copy, so the weights are never held twice.
        memo = {id(t): t for t in tensors_read_by_quantizers(qm).values()}
        frozen = copy.deepcopy(qm, memo)
        run_passes(frozen, (freeze_quantizers,))
        for module in frozen.modules():  # a shared tensor that a node still reads (besides its quantizer) is copied
            for key, param in module._parameters.items():
                if param is not None and id(param) in memo:
                    module._parameters[key] = nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            for key, buffer in module._buffers.items():
                if buffer is not None and id(buffer) in memo:
                    module._buffers[key] = buffer.clone()
    frozen.eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    set_preserved_attr(frozen, STATE_ATTR, "frozen")
    return frozen
