"""Graph passes and the pass manager that runs them, checking what each one requires and ensures.

A pass is a plain function `GraphModule -> GraphModule` that changes the module in place and returns it.
It declares its contract with `@graph_pass(requires=..., ensures=..., invalidates=...)`: the properties of
the module (strings such as `BN_FOLDED`) it needs, the ones it establishes, and the ones its rewrite makes
stale. An *analysis* pass (`analysis=True`) may write only `node.meta`: the manager checks that the graph
is unchanged and does not recompile it. Passes that need settings take them as keyword arguments bound with
`functools.partial`.

`run_passes(gm, passes)` runs a literal tuple of them. Before each pass it checks the pass's requirements
against the properties recorded on the module (`gm.meta[PROPERTIES_META]`, kept by `copy.deepcopy`); after a
rewrite it lints and recompiles the graph; then it records the pass's properties. Any failure names the pass
and the passes that ran before it. This is torch.fx's and onnx-ir's pass-infrastructure idea (declared
preconditions, error context naming the pass) in the ~100 lines fxquant needs.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Sequence, Tuple, TypeVar

from torch import fx

from fxquant.errors import FxQuantError, PassError

Pass = Callable[[fx.GraphModule], fx.GraphModule]
_F = TypeVar("_F", bound=Callable[..., fx.GraphModule])

PROPERTIES_META = "fxquant_properties"
"""Key of `GraphModule.meta` holding the frozenset of properties the passes run so far established."""

SHAPES = "shapes"
"""Every node carries `node.meta["tensor_meta"]` for the current graph."""
FUNCTIONAL = "functional"
"""Quantizable layers are `call_function` nodes whose weight is an explicit `get_attr` edge."""
ATTENTION_DECOMPOSED = "attention decomposed"
"""Fused attention (SDPA, self-attention `nn.MultiheadAttention`) is `matmul -> softmax -> matmul`."""
BN_FOLDED = "batchnorm folded"
"""Eval-mode BatchNorm after a conv/linear is folded into its weight and bias."""
ANALYZED = "analyzed"
"""Every node carries the analysis annotation (`node.meta["fxquant"]`): the complete quantization plan."""
WEIGHTS_QUANTIZED = "weight quantizers inserted"
ACTIVATIONS_QUANTIZED = "activation quantizers inserted"
BIASES_QUANTIZED = "int32 bias quantizers inserted"
RELUS_ABSORBED = "relus absorbed"
"""A ReLU whose every reader is a non-negative activation quantizer is gone: those quantizers read its input, and
their lower clamp at 0 does its work (`LearnableQuantizer.absorbed_relu`)."""
FROZEN = "frozen"
"""Every learnable quantizer is a frozen integer one; the weights they read are integer codes."""
EXPORT_LOWERED = "lowered for export"
"""Frozen quantizers are the ONNX custom ops' modules; linears with integer weights are MatMul."""


@dataclass(frozen=True)
class PassContract:
    """What a pass needs from the module, what it establishes, what its rewrite makes stale."""

    requires: FrozenSet[str]
    ensures: FrozenSet[str]
    invalidates: FrozenSet[str]
    analysis: bool


_CONTRACTS: Dict[Callable[..., Any], PassContract] = {}


def graph_pass(
    *, requires: Iterable[str] = (), ensures: Iterable[str] = (), invalidates: Iterable[str] = (),
    analysis: bool = False,
) -> Callable[[_F], _F]:
    """Declare a function as a graph pass with its contract (the function itself is returned unchanged)."""

    def declare(fn: _F) -> _F:
        _CONTRACTS[fn] = PassContract(frozenset(requires), frozenset(ensures), frozenset(invalidates), analysis)
        return fn

    return declare


def pass_name(p: Callable[..., Any]) -> str:
    """The name of a pass function (also through `functools.partial`)."""
    while isinstance(p, functools.partial):
        p = p.func
    return getattr(p, "__name__", repr(p))


def contract_of(p: Callable[..., Any]) -> PassContract:
    """The contract declared with `graph_pass` (also through `functools.partial`).

    Raises:
        PassError: the function was not declared with `@graph_pass`.
    """
    fn = p
    while isinstance(fn, functools.partial):
        fn = fn.func
    contract = _CONTRACTS.get(fn)
    if contract is None:
        raise PassError(
            f"{pass_name(p)} is not a declared graph pass; decorate it with "
            "@fxquant.passes.graph_pass(requires=..., ensures=...) so the pass manager can check it."
        )
    return contract


def properties(gm: fx.GraphModule) -> FrozenSet[str]:
    """The properties the passes run on `gm` so far established."""
    found = gm.meta.get(PROPERTIES_META, frozenset())
    return frozenset(found)


def _ensured_by(prop: str) -> List[str]:
    return sorted(pass_name(fn) for fn, c in _CONTRACTS.items() if prop in c.ensures)


def _graph_fingerprint(graph: fx.Graph) -> List[Tuple[Any, ...]]:
    """What an analysis pass must leave as it was: every node, its target and its inputs, in order."""
    return [(id(n), n.op, n.target, n.args, tuple(n.kwargs.items())) for n in graph.nodes]


def run_passes(gm: fx.GraphModule, passes: Sequence[Callable[[fx.GraphModule], fx.GraphModule]]) -> fx.GraphModule:
    """Run `passes` in order on `gm`, checking each one's contract; lint and recompile after each rewrite.

    Raises:
        FxQuantError: errors raised on purpose by a pass pass through unchanged.
        PassError: a pass is not declared, its requirements are not met, an analysis pass changed the graph,
            a pass returned another module, or any other failure — naming the pass and the ones before it.
    """
    done: List[str] = []
    for p in passes:
        name = pass_name(p)
        contract = contract_of(p)
        have = properties(gm)
        missing = sorted(contract.requires - have)
        if missing:
            hints = "; ".join(f"{m!r} is ensured by {', '.join(_ensured_by(m)) or 'no declared pass'}" for m in missing)
            raise PassError(
                f"pass {name} requires {', '.join(map(repr, missing))}, which the module does not have "
                f"(it has {', '.join(map(repr, sorted(have))) or 'no property'}); {hints}: run that pass first."
            )
        before = _graph_fingerprint(gm.graph) if contract.analysis else None
        try:
            result = p(gm)
            if result is not gm:
                raise PassError(f"pass {name} returned a new module; passes change the graph in place")
            if before is not None:
                if _graph_fingerprint(gm.graph) != before:
                    raise PassError(f"analysis pass {name} changed the graph; an analysis writes only node.meta")
            else:
                gm.graph.lint()
                gm.recompile()
        except FxQuantError:
            raise
        except Exception as e:  # noqa: BLE001 - wrap with the pass context
            raise PassError(
                f"pass {name} failed (after {done or 'no other pass'}): "
                f"{type(e).__name__}: {e}. This is a bug in fxquant or an unsupported graph pattern; "
                "keep the offending layer float with an override or report it."
            ) from e
        gm.meta[PROPERTIES_META] = (have - contract.invalidates) | contract.ensures
        done.append(name)
    return gm
