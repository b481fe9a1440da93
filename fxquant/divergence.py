"""Where onnxruntime departs from the frozen module, and the perturbation that measures a model's own sensitivity.

`perturbed_quantizer_inputs` scales the input of every activation quantizer by `1 + PERTURBATION`: the change
of the frozen module's output under it is the model's own sensitivity, against which `fxquant.verify` judges a
runtime difference (`SENSITIVITY_FACTOR`). When a level fails, `localize` runs one batch with every matched
activation quantizer's integer codes as extra ONNX outputs and names the first quantizer, in graph order,
whose codes depart from the frozen module's by more than its own tolerance (a `Divergence`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import onnx
import torch
from torch import fx

from fxquant.batches import Batch, call_batch, split_batch
from fxquant.export.onnx_file import save_model
from fxquant.graph import quantizer_calls, quantizers_of
from fxquant.ort_runs import open_session, run_session, session_feed
from fxquant.quantizer import FrozenActivationQuantizer

PERTURBATION = 1e-6
"""Relative perturbation of every activation quantizer's input that measures the model's own sensitivity:
about ten times the float32 rounding (~1e-7) by which two runtimes' sums differ, so it flips more rounding
ties than a runtime does (docs/decisions.md, "The model's own sensitivity")."""
SENSITIVITY_FACTOR = 1.5
"""A difference up to this many times the model's own sensitivity is the model's. The sensitivity is one
draw of how far flipped ties carry: on 12 random-weight tanh CNNs (12-16 layers, W7A8, 128 samples) the
runtime's difference was 0.13-0.80 times it at both levels (24 cases), on a random-weight mobilenet_v2
(W8A8, ORT_DISABLE_ALL) 0.99 times. 1.5 leaves room above the worst ratio seen; a wrong scale or zero point
shows at its own quantizer as many steps beyond what the perturbation moves there (see `Divergence`)."""


@dataclass
class Divergence:
    """Where onnxruntime first departs from the frozen module: the first activation quantizer, in graph
    order, whose output codes differ by more than its own tolerance (one batch)."""

    quantizer: Optional[str]
    """The quantizer (name in `fxq_quantizers`); None when none of the compared ones diverged."""
    fx_node: Optional[str]
    """The FX node that calls it."""
    after: Optional[str]
    """The FX node whose output it quantizes (the op where the difference arose or first showed)."""
    error_steps: float
    """Max |onnxruntime - frozen| at that quantizer, in its quantization steps."""
    allowed_steps: float
    """What that quantizer allowed, in its steps: the larger of the verify tolerance (output steps, or `rtol`
    of the quantizer's max magnitude) and `SENSITIVITY_FACTOR` times its own change under the perturbation."""
    compared: int
    """How many activation quantizers could be matched between the FX graph and the ONNX graph."""
    unmatched: List[str] = field(default_factory=list)
    """Quantizers with no single matching ONNX Q/DQ pair (shared by several calls, exported as float)."""
    note: str = ""

    def __str__(self) -> str:
        where = f"compared {self.compared} activation quantizers" + (
            f" ({len(self.unmatched)} not matched: {', '.join(self.unmatched[:5])}{' ...' if len(self.unmatched) > 5 else ''})"
            if self.unmatched else ""
        )
        if self.quantizer is None:
            return f"no activation quantizer diverged ({where}){'; ' + self.note if self.note else ''}"
        return (
            f"first diverges at quantizer {self.quantizer} (FX node {self.fx_node}, after {self.after}): "
            f"{self.error_steps:.3g} of its steps (allowed {self.allowed_steps:.3g}); {where}"
            + (f"; {self.note}" if self.note else "")
        )


def _activation_quantizers(frozen: fx.GraphModule) -> Dict[str, FrozenActivationQuantizer]:
    container = quantizers_of(frozen)
    if container is None:
        return {}
    return {name: q for name, q in container.named_children() if isinstance(q, FrozenActivationQuantizer)}


@contextlib.contextmanager
def perturbed_quantizer_inputs(frozen: fx.GraphModule, relative: float = PERTURBATION) -> Iterator[None]:
    """Within the block, every activation quantizer of `frozen` sees its input scaled by `1 + relative`.

    Args:
        frozen: a frozen module (`fxq.freeze`).
        relative: the relative perturbation (default `PERTURBATION`).

    Yields:
        Nothing; the hooks are removed when the block ends (also on an error).

    Example:
        >>> with perturbed_quantizer_inputs(frozen):
        ...     moved = frozen(x)
    """
    def scale(_module: torch.nn.Module, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
        return (args[0] * (1.0 + relative),) + tuple(args[1:])

    handles = [q.register_forward_pre_hook(scale) for q in _activation_quantizers(frozen).values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _recorded_quantizer_outputs(frozen: fx.GraphModule, store: Dict[str, List[torch.Tensor]]) -> Iterator[None]:
    """Within the block, each activation quantizer's outputs are appended to `store[name]`."""
    def recorder(name: str) -> Any:
        def hook(_module: torch.nn.Module, _args: Any, out: torch.Tensor) -> None:
            store.setdefault(name, []).append(out.detach())

        return hook

    handles = [q.register_forward_hook(recorder(n)) for n, q in _activation_quantizers(frozen).items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _onnx_activation_codes(model: onnx.ModelProto) -> Tuple[Dict[str, Tuple[str, np.ndarray, np.ndarray, int]], List[str]]:
    """For each activation quantizer with exactly one DequantizeLinear (by its `fxquant.quantizer` metadata):
    the name of the DQ's integer input, its scale and zero point, and the codes' ONNX type; and the
    quantizers that appear more than once (shared ones: not matched)."""
    inits = {i.name: i for i in model.graph.initializer}
    found: Dict[str, List[onnx.NodeProto]] = {}
    for node in model.graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if node.op_type == "DequantizeLinear" and meta.get("fxquant.kind") == "activation" and "fxquant.quantizer" in meta:
            found.setdefault(meta["fxquant.quantizer"], []).append(node)
    points: Dict[str, Tuple[str, np.ndarray, np.ndarray, int]] = {}
    shared = []
    for name, nodes in found.items():
        if len(nodes) != 1:
            shared.append(name)
            continue
        dq = nodes[0]
        if len(dq.input) < 2 or dq.input[1] not in inits or (len(dq.input) > 2 and dq.input[2] not in inits):
            shared.append(name)
            continue
        scale = onnx.numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        if len(dq.input) > 2 and dq.input[2]:
            zp_init = inits[dq.input[2]]
            zero_point, code_type = onnx.numpy_helper.to_array(zp_init).astype(np.float64), zp_init.data_type
        else:
            zero_point, code_type = np.zeros(()), onnx.TensorProto.UINT8
        points[name] = (dq.input[0], scale, zero_point, code_type)
    return points, shared


def localize(
    frozen: fx.GraphModule,
    model_path: str,
    provider: str,
    level: str,
    batch: Batch,
    n_req: int,
    tolerance_steps: float,
    rtol: float,
    tmp: str,
) -> Divergence:
    """Run one batch with every matched activation quantizer's codes as extra ONNX outputs (codes, not the
    DQ outputs, so onnxruntime still fuses the Q/DQ groups into the same integer kernels) and compare them,
    in graph order, with the frozen module's quantizer outputs."""
    model = onnx.load(model_path, load_external_data=False)
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return Divergence(None, None, None, 0.0, 0.0, 0, note="not localised: the model keeps its tensors in external data")
    points, shared = _onnx_activation_codes(model)
    quantizers = _activation_quantizers(frozen)
    calls: Dict[str, List[fx.Node]] = {}
    for node, name in quantizer_calls(frozen.graph):
        if name in quantizers:
            calls.setdefault(name, []).append(node)
    order = [name for name, nodes in calls.items() if name in points and len(nodes) == 1]  # graph order
    unmatched = sorted(set(quantizers) - set(order))
    existing = {o.name for o in model.graph.output}
    for name in order:
        codes = points[name][0]
        if codes not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(codes, points[name][3], None))
    path = os.path.join(tmp, "localise.onnx")
    save_model(model, Path(path))
    sess = open_session(path, [provider], level, None)
    args, kwargs, _ = split_batch(batch, n_req)
    names = [o.name for o in sess.get_outputs()]
    got = dict(zip(names, run_session(sess, session_feed(sess, args, kwargs), batch, (provider, level))))
    clean: Dict[str, List[torch.Tensor]] = {}
    moved: Dict[str, List[torch.Tensor]] = {}
    with torch.no_grad():
        with _recorded_quantizer_outputs(frozen, clean):
            call_batch(frozen, batch, n_req, who="frozen module")
        with _recorded_quantizer_outputs(frozen, moved), perturbed_quantizer_inputs(frozen):
            call_batch(frozen, batch, n_req, who="frozen module")
    for name in order:
        codes_name, scale, zero_point, _ = points[name]
        ref = clean[name][0].cpu().double().numpy()
        ort_value = (got[codes_name].astype(np.float64) - zero_point) * scale
        if ort_value.shape != ref.shape:
            unmatched.append(name)
            continue
        step = float(quantizers[name].scale.max())
        diff = float(np.abs(ort_value - ref).max(initial=0.0))
        own = float(np.abs(moved[name][0].cpu().double().numpy() - ref).max(initial=0.0))
        allowed = max(tolerance_steps * step, rtol * float(np.abs(ref).max(initial=0.0)), SENSITIVITY_FACTOR * own)
        if diff > allowed * (1 + 1e-6):
            node = calls[name][0]
            after = node.args[0].name if node.args and isinstance(node.args[0], fx.Node) else None
            return Divergence(name, node.name, after, diff / step, allowed / step, len(order), sorted(unmatched))
    return Divergence(
        None, None, None, 0.0, 0.0, len(order), sorted(unmatched),
        note="the difference arises after the last compared quantizer, in float ops (or exposing the codes "
        "changed how onnxruntime fused the graph)",
    )
