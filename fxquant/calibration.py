"""Calibration: set quantizer clamps from data before fine-tuning (docs/algorithms.md, "Calibration").

Weights: per-group min/max of the (BatchNorm-folded) weights. Activations: running min/max over a few
batches, or a percentile of the observed values, seen with float weights and float activations upstream
(the batches run through the prepared module with every quantizer passing its input through). With
`method="mse"` (the default) both are then shrunk, per group, to the clip of least squared quantization
error at the quantizer's current integer bits (`LearnableQuantizer.fit_clamps_mse`, on the weight itself
or on a sample of the observed activations): min/max is near-optimal at 8 bits and poor at 2-4, so a
quantizer that starts at low bits starts from a grid fit for them. Bits stay where they are (the initial,
high precision after `prepare`) unless `bits` is given; fine-tuning then descends to the target.
The batches run through `observed_only(qm)`: the prepared graph without what no quantizer reads (a language
model's logits: as large as a small model's weights, and its largest matmul).
"""

from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from torch import fx
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from fxquant.batches import Batch, call_batch, check_batches
from fxquant.errors import ConfigError, PrepareError, StateError
from fxquant.graph import quantizer_calls, quantizer_container, quantizer_name, tensors_read_by_quantizers
from fxquant.quantizer import KIND_WEIGHT, LearnableQuantizer, iter_learnable

METHODS = ("mse", "minmax", "percentile")
SAMPLE_PER_BATCH = 16384
"""Activation values kept per batch and quantizer for `method="mse"` (a random sample)."""
SAMPLE_BATCHES = 8
"""Batches whose samples the clip search of `method="mse"` runs on, at most (a uniform random choice of the
observed batches): its cost stays fixed however many batches are observed."""


def calibrate(
    qm: fx.GraphModule,
    batches: Iterable[Batch],
    num_batches: int = 8,
    *,
    method: str = "mse",
    percentile: float = 99.99,
    bits: Optional[float] = None,
    progress: bool = True,
) -> fx.GraphModule:
    """Set every quantizer's clamps from data (in place) and return `qm`.

    Args:
        qm: a module returned by `fxq.prepare`.
        batches: an iterable of batches (see `fxquant.batches`); the first `num_batches` are used.
        num_batches: how many batches to observe.
        method: `"mse"` (min/max, then the clip of least squared error at the current integer bits, per
            group), `"minmax"` (running min/max) or `"percentile"` (the `percentile`-th and
            `100 - percentile`-th percentiles of each activation, averaged over batches).
        percentile: used with `method="percentile"`.
        bits: restart every learnable bit-width here (default: each quantizer's initial bits are kept).
        progress: show tqdm progress bars (batches observed, then quantizers fitted) on a terminal.

    Raises:
        ConfigError: unknown method or percentile outside (50, 100].
        PrepareError: no batches, a single tensor or dict given as `batches` (pass `[X]`), or a batch that
            does not fit the module (the message gives its shape and the example inputs' shape).
        StateError: `qm` has no quantizers (not prepared), or a quantizer saw no finite values.
    """
    if method not in METHODS:
        raise ConfigError(f"calibrate method={method!r} is unknown; expected one of {METHODS}.")
    if not (50.0 < percentile <= 100.0):
        raise ConfigError(f"calibrate percentile={percentile} must be in (50, 100], e.g. 99.99.")
    if num_batches < 1:
        raise ConfigError(f"calibrate num_batches={num_batches} must be at least 1.")
    check_batches(batches, "calibrate's batches")
    quantizers = iter_learnable(qm)
    if not quantizers:
        raise StateError("calibrate found no learnable quantizers; pass the module returned by fxq.prepare.")
    was_training = qm.training
    samples: Dict[str, List[torch.Tensor]] = {}
    reservoirs: Dict[str, _Reservoir] = {}
    hooks = []
    sample_owner = _sample_owners(qm)
    weights_enabled = [(q, q.enabled) for _, q in quantizers if q.kind == KIND_WEIGHT]
    for name, q in quantizers:
        if q.kind == KIND_WEIGHT:
            # the batches see float weights, like the observed activations (a fake-quantized copy of every
            # weight per batch cost many float forwards on large models)
            q.enabled = False
            continue
        q.observed_min.fill_(float("inf"))
        q.observed_max.fill_(float("-inf"))
        q.observing = True
        owner = sample_owner.get(name, name)
        if owner != name:
            continue  # samples[owner]/reservoirs[owner] hold the same tensors' values (below)
        if method == "percentile":
            samples[name] = []
            hooks.append(q.register_forward_hook(_percentile_hook(samples[name], percentile)))
        elif method == "mse":
            reservoirs[name] = _Reservoir(min(num_batches, SAMPLE_BATCHES), q.hi.device)
            hooks.append(q.register_forward_hook(reservoirs[name].hook))
    for name, owner in sample_owner.items():
        if owner in samples:
            samples[name] = samples[owner]
        if owner in reservoirs:
            reservoirs[name] = reservoirs[owner]
    seen = 0
    qm.eval()
    observer = observed_only(qm) if isinstance(qm, fx.GraphModule) else qm
    try:
        with torch.no_grad():
            bar = tqdm(itertools.islice(batches, num_batches), total=_length(batches, num_batches),
                       desc="calibrate: batches", unit="batch", leave=False, disable=None if progress else True)
            for batch in bar:
                call_batch(observer, batch, who="module returned by fxq.prepare")
                seen += 1
    finally:
        if observer is not qm:
            _release(observer)
        for h in hooks:
            h.remove()
        for _, q in quantizers:
            q.observing = False
        for q, enabled in weights_enabled:
            q.enabled = enabled
        qm.train(was_training)
    if seen == 0:
        raise PrepareError("calibrate got no batches; give at least one batch of model inputs.")
    weights = {name: t.detach() for name, t in tensors_read_by_quantizers(qm).items()}
    for name, q in tqdm(quantizers, desc="calibrate: clamps", unit="quantizer", leave=False,
                        disable=None if progress else True):
        weight = None
        if q.kind == KIND_WEIGHT:
            weight = weights.get(name)
            if weight is not None:
                q.init_from_tensor(weight)
        elif method == "percentile":
            stats = torch.stack(samples[name])  # (batches, 2): low and high percentile per batch
            q.load_observed(stats[:, 0].mean().reshape(q.param_shape), stats[:, 1].mean().reshape(q.param_shape))
        else:
            q.load_observed()
        if bits is not None and q.learn_bits:
            q.set_bits(bits)
        if method == "mse":
            if q.kind == KIND_WEIGHT and weight is not None:
                q.fit_clamps_mse(weight)
            elif q.kind != KIND_WEIGHT and name in reservoirs and reservoirs[name].seen:
                q.fit_clamps_mse(reservoirs[name].values())
    return qm


def _keeps(node: fx.Node) -> bool:
    """Whether `observed_only` keeps `node` though nothing reads it: placeholders and the output, every module call
    (the quantizers observe; other modules are not inspected), and any op that may write a tensor (FX's own impure
    ops, in-place methods and functions, mutable ATen schemas)."""
    if node.op in ("placeholder", "output", "call_module") or node.is_impure():
        return True
    target = node.target
    if node.op == "call_method":
        return str(target).endswith("_")
    if node.op == "call_function":
        schema = getattr(target, "_schema", None)
        if schema is not None:
            return bool(schema.is_mutable)
        return getattr(target, "__name__", "").endswith("_")
    return False


def observed_only(qm: fx.GraphModule) -> fx.GraphModule:
    """A module that runs only what `qm`'s quantizers read: its graph with every output value replaced by None
    (the output's structure kept, for the input/output spec of a `torch.export` capture) and then every node that
    nothing reads and `_keeps` does not keep removed, sharing `qm`'s submodules and tensors. A language model's
    calibration then never computes its logits (4 x 128 tokens x a 32000-token vocabulary are as large as a 19M
    model's weights). `qm` itself is not changed."""
    graph = fx.Graph()
    graph._codegen = qm.graph._codegen  # the same input/output handling (a torch.export capture's pytree specs)
    values: Dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(qm.graph, values, return_output_node=True)
    assert isinstance(output, tuple) and isinstance(output[1], fx.Node)
    graph.output(tree_map(lambda _: None, output[0]), type_expr=output[1].type)
    graph.eliminate_dead_code(is_impure_node=_keeps)
    pruned = fx.GraphModule(qm, graph, class_name=type(qm).__name__)
    pruned.training = qm.training
    if hasattr(qm, "fxquant_capture_notes"):  # read by call_batch's error on a batch the capture does not fit
        pruned.fxquant_capture_notes = qm.fxquant_capture_notes
    return pruned


def _release(module: fx.GraphModule) -> None:
    """Drop the submodules, parameters and buffers a temporary `GraphModule` shares with the prepared module: it sits in
    a reference cycle until the garbage collector runs, and meanwhile it would keep alive the float weights that
    `freeze(qm, inplace=True)` releases one by one."""
    module._modules.clear()
    module._parameters.clear()
    module._buffers.clear()


def _sample_owners(qm: fx.GraphModule) -> Dict[str, str]:
    """For every activation quantizer, the first quantizer (by name) that reads exactly the same tensors.

    A tensor read by a quantized op and by a join (or any two consumers with different specs) has one
    quantizer per spec, the second often reading the first's output (a requantization). In calibration every
    quantizer passes its input through, so they see the same values, and they share one sample of them: at equal bits their clip
    search then finds equal clamps, and the exported graph needs no requantization between them (a
    DequantizeLinear -> QuantizeLinear pair onnxruntime cannot fuse when the scales differ by the sample's
    randomness; docs/decisions.md, "One sample per tensor")."""
    container = quantizer_container(qm)
    sources: Dict[str, List[str]] = {}
    for node, name in quantizer_calls(qm.graph):
        relu = bool(getattr(container[name], "absorbed_relu", False))  # it sees the tensor's ReLU
        source = node.args[0] if node.args else None
        while isinstance(source, fx.Node) and quantizer_name(source) is not None and source.args:
            relu = relu or bool(getattr(container[str(quantizer_name(source))], "absorbed_relu", False))
            source = source.args[0]  # a quantizer of another quantizer's output: both see the tensor here
        if isinstance(source, fx.Node) and source.op != "get_attr":
            sources.setdefault(str(node.target), []).append(source.name + (" (relu)" if relu else ""))
    owners: Dict[Tuple[str, ...], str] = {}
    return {name: owners.setdefault(tuple(sorted(set(read))), name) for name, read in sorted(sources.items())}


def _length(batches: Iterable[Batch], num_batches: int) -> Optional[int]:
    """How many batches calibrate will observe, when `batches` has a length."""
    try:
        return min(len(batches), num_batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _percentile_hook(store: List[torch.Tensor], percentile: float):  # noqa: ANN202 - torch hook signature
    def hook(module: LearnableQuantizer, args, output) -> None:  # noqa: ANN001
        x = output.detach().float().flatten()  # observing, the quantizer passes its input (ReLU'd if it absorbed one)
        if x.numel() > 1_000_000:
            x = x[torch.randint(0, x.numel(), (1_000_000,), device=x.device)]
        q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0], device=x.device)
        store.append(torch.quantile(x, q).cpu())

    return hook


class _Reservoir:
    """Random samples of one activation, `SAMPLE_PER_BATCH` values from each of up to `slots` batches (a
    uniform choice among all observed batches), in one buffer allocated before the batches run. Small
    tensors kept from every batch between the batches' large temporaries fragment glibc's heap, and
    calibrate's resident memory then grows with every batch (see benchmarks/bench_scale.py)."""

    def __init__(self, slots: int, device: torch.device) -> None:
        self.buffer = torch.empty(slots, SAMPLE_PER_BATCH, device=device)
        self.lengths = [0] * slots
        self.seen = 0

    def hook(self, module: LearnableQuantizer, args, output) -> None:  # noqa: ANN001 - torch hook signature
        x = output.detach().flatten()  # observing, the quantizer passes its input (ReLU'd if it absorbed one)
        slot = self.seen if self.seen < len(self.lengths) else int(torch.randint(0, self.seen + 1, ()))
        self.seen += 1
        if slot >= len(self.lengths):
            return
        if x.numel() > SAMPLE_PER_BATCH:
            x = x[torch.randint(0, x.numel(), (SAMPLE_PER_BATCH,), device=x.device)]
        self.buffer[slot, : x.numel()].copy_(x)
        self.lengths[slot] = x.numel()

    def values(self) -> torch.Tensor:
        """The kept samples, concatenated."""
        return torch.cat([self.buffer[i, :n] for i, n in enumerate(self.lengths) if n])
