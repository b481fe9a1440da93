"""Where activation quantizers go beyond the inputs of quantized ops: joins and integer-kernel outputs.

The rules `fxquant.analyze.analyze` applies after it has annotated the quantized ops:

- joins (add/concat of two or more computed tensors, `join_inputs`) get quantizers on their inputs when an
  integer kernel reads their result (`feeds_integer_kernel`), so a runtime runs them as QLinearAdd/QLinearConcat;
- `quantize_outputs`: the output of a conv with quantized input is quantized for all its readers
  (`add_output_points`), after a directly following ReLU-like activation and across shape-only ops;
- gated products (`value * sigmoid(z)` or `* hardsigmoid(z)`: squeeze-excite, hardswish) whose result an
  integer kernel reads get quantizers on both inputs and on their output, so a runtime runs them as QLinearMul
  (and a hard-sigmoid gate as QLinearAdd, a sigmoid one as QLinearSigmoid) instead of float islands;
- the input of an average pooling over an image whose output is quantized (`add_pooling_points`: a CNN's head
  pool), so onnxruntime pools the codes (QLinearGlobalAveragePool) and the join before it is an integer add;
- such kernel-only quantizers have fixed bits (`kernel_only`: `QuantConfig.join_bits`);
- a quantizer shared by a join group has one sign (`share_join_signs`).

`ConsumersOf` maps a producer node's name to the `(consumer node name, spec)` pairs its quantizers serve.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from torch import fx

from fxquant.annotations import NodeAnnotation, QuantOp, is_float_tensor
from fxquant.config import Placement, QuantSpec
from fxquant.op_registry import facts_of, quantizable_info

ConsumersOf = Dict[str, List[Tuple[str, QuantSpec]]]
"""producer node name -> (consumer node name, spec of the quantizer that serves it)"""


def fixed_bits(spec: QuantSpec, bits: int) -> QuantSpec:
    """`spec` with its bits fixed at `bits` (not learned), the bounds widened to hold them."""
    return spec.replace(
        bits=bits, min_bits=min(spec.min_bits, bits), max_bits=max(spec.max_bits, bits), learn_bits=False
    )


def join_inputs(node: fx.Node) -> List[fx.Node]:
    """Float tensor inputs of an add/concat join computed by the graph (not constants), if >= 2."""
    facts = facts_of(node)
    if facts is None or facts.join is None or node.op == "call_module":
        return []
    candidates: List[Any] = []
    if facts.join == "cat":
        seq = facts.argument(node, "tensors", ())
        candidates = list(seq) if isinstance(seq, (list, tuple)) else []
    else:
        candidates = list(node.args[:2])
    inputs = [c for c in candidates if is_float_tensor(c) and c.op != "get_attr"]
    unique = list(dict.fromkeys(inputs))
    return unique if len(unique) >= 2 else []


def gated_product(node: fx.Node) -> Optional[Tuple[fx.Node, fx.Node]]:
    """`(value, gate)` of a product `value * gate` of two computed tensors whose gate is a sigmoid or hard
    sigmoid output (squeeze-excite's scaling, hardswish and SiLU after `decompose_gated_activations`), else None."""
    facts = facts_of(node)
    if facts is None or not facts.integer_product or node.op == "call_module" or len(node.args) < 2:
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a is not b and is_float_tensor(a) and is_float_tensor(b)):
        return None
    for value, gate in ((a, b), (b, a)):
        gate_facts = facts_of(gate)
        if gate_facts is not None and gate_facts.gate and value.op != "get_attr":
            return value, gate
    return None


def is_fused_activation(node: fx.Node) -> bool:
    """ReLU/ReLU6/clamp: runtimes fold it into the integer op before a QuantizeLinear."""
    facts = facts_of(node)
    return facts is not None and facts.fused_activation


def is_layout(node: fx.Node) -> bool:
    """Ops that runtimes move a QuantizeLinear across: shape-only functions, methods and modules (reshape,
    transpose, `nn.Flatten`, ...), and max pooling (it selects values, `OpFacts.selects_values`)."""
    facts = facts_of(node)
    if facts is None:
        return False
    return facts.selects_values or facts.layout_only


def through_layout(node: fx.Node) -> fx.Node:
    """The end of the chain of single-reader shape-only (or max pooling) ops that starts after `node`
    (`node` if none)."""
    while len(node.users) == 1 and is_layout(next(iter(node.users))):
        node = next(iter(node.users))
    return node


def feeds_integer_kernel(
    join: fx.Node, op_inputs: ConsumersOf, join_specs: Mapping[str, Optional[QuantSpec]]
) -> bool:
    """Whether the result of `join` reaches, through ReLU-like activations and shape-only ops, a quantized op's
    input (`op_inputs`: the inputs quantized ops quantize, by producer) or another join quantized already
    (`join_specs`: the joins decided so far, None for a float one).

    Only then can a runtime run the join as an integer kernel (QLinearAdd/QLinearConcat between quantized
    tensors). A join read by float ops (the residual add before a transformer's LayerNorm, the inner add of a
    tanh GELU) stays float: quantizing its inputs adds Q/DQ pairs, costs accuracy, and hides the float
    pattern from onnxruntime's fusions (docs/decisions.md, "Joins an integer kernel reads")."""
    frontier, seen = [join], {join.name}
    while frontier:
        tensor = frontier.pop()
        if tensor.name in op_inputs:
            return True
        for reader in tensor.users:
            if join_specs.get(reader.name) is not None:
                return True
            if reader.name not in seen and (is_fused_activation(reader) or is_layout(reader)):
                seen.add(reader.name)
                frontier.append(reader)
    return False


def quantized_for_all_readers(node: fx.Node, consumers_of: ConsumersOf) -> bool:
    """The result of `node`, followed through single-reader shape-only ops, is quantized for all its readers."""
    node = through_layout(node)
    served = {c for c, _ in consumers_of.get(node.name, [])}
    return bool(node.users) and all(r.name in served for r in node.users)


def quantized_after_layout(node: fx.Node, consumers_of: ConsumersOf) -> bool:
    """`node` starts a chain of single-reader shape-only ops whose result is quantized for all its readers."""
    return is_layout(node) and quantized_for_all_readers(node, consumers_of)


def kernel_only(placement: Placement, spec: Optional[QuantSpec]) -> Optional[QuantSpec]:
    """The spec of a quantizer that serves only integer kernels (join inputs, conv outputs): fixed at
    `placement.join_bits` (the width those kernels compute in) or the spec's own initial bits if more, or `spec`
    itself when `join_bits` is None."""
    if spec is None or placement.join_bits is None:
        return spec
    return fixed_bits(spec, max(placement.join_bits, spec.bits))


def add_output_points(
    nodes: List[fx.Node], ops: Dict[str, QuantOp], consumers_of: ConsumersOf,
    placement: Placement, products: Mapping[str, QuantSpec],
) -> None:
    """Quantize the output of each conv with quantized input, and of each quantized gated product
    (`products`: its spec), for all its readers (`quantize_outputs`).

    The tensor is the op's output, followed through a ReLU/ReLU6/clamp that is its only reader and then
    through single-reader shape-only ops (runtimes fold the activation and move the QuantizeLinear across
    reshapes). Readers already served keep their quantizer; the others get one with the op's input spec
    fixed at `placement.join_bits` (`kernel_only`). Tensors the graph returns, and the inputs of ops kept
    float (override `None`), stay float.
    """
    for node in nodes:
        op = ops.get(node.name)
        facts = quantizable_info(node)
        output_spec: Optional[QuantSpec] = products.get(node.name)
        if op is not None and facts is not None and facts.output_quantized and op.input_spec is not None:
            output_spec = kernel_only(placement, op.input_spec)
        if output_spec is None or not is_float_tensor(node):
            continue
        out = node
        if len(out.users) == 1 and is_fused_activation(next(iter(out.users))):
            out = next(iter(out.users))
        out = through_layout(out)
        readers = list(out.users)
        if not readers or any(r.op == "output" for r in readers):
            continue
        served = {c for c, _ in consumers_of.get(out.name, [])}
        for reader in readers:
            kept_float = reader.name in ops and ops[reader.name].input_spec is None  # e.g. an override None
            if reader.name not in served and not kept_float and not quantized_after_layout(reader, consumers_of):
                consumers_of.setdefault(out.name, []).append((reader.name, output_spec))


def add_pooling_points(nodes: List[fx.Node], consumers_of: ConsumersOf, spec: Optional[QuantSpec]) -> None:
    """Quantize the input of each average pooling over an image whose output is quantized for all its readers
    (through single-reader shape-only ops: a CNN's head pool before its linear), with `spec`: onnxruntime then runs
    the pooling on the codes, and the join or gated product before it sees an integer kernel read its result."""
    if spec is None:
        return
    for node in nodes:
        facts = facts_of(node)
        x = node.args[0] if node.args else None
        if facts is None or not facts.integer_pooling or not isinstance(x, fx.Node) or not is_float_tensor(x):
            continue
        meta = x.meta.get("tensor_meta")
        if meta is None or len(getattr(meta, "shape", ())) != 4:
            continue
        if quantized_for_all_readers(node, consumers_of):
            consumers_of.setdefault(x.name, []).append((node.name, spec))


def share_join_signs(annotations: Iterable[NodeAnnotation]) -> None:
    """One sign per quantizer shared by a join group: non-negative only if every member it reads is."""
    points = [p for a in annotations if a.tensor is not None for p in a.tensor.points if p.join_group is not None]
    group_nonneg: Dict[Tuple[int, QuantSpec], bool] = {}
    for point in points:
        assert point.join_group is not None
        key = (point.join_group, point.spec)
        group_nonneg[key] = group_nonneg.get(key, True) and point.nonnegative
    for point in points:
        assert point.join_group is not None
        point.nonnegative = group_nonneg[(point.join_group, point.spec)]
