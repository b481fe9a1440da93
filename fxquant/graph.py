"""How fxquant finds its own things in a `GraphModule`: quantizers, tensors by path, and the module's state.

Every step reads the same conventions through this module, so none of them spells them out again:

- quantizer modules live in the `nn.ModuleDict` `gm.fxq_quantizers` (`QUANTIZERS_ATTR`); a quantizer
  named `n` is called by a `call_module` node whose target is `fxq_quantizers.n`;
- parameters, buffers and submodules are reached by dotted paths (`layer1.0.conv.weight`), the targets of
  `get_attr` nodes;
- a module fxquant made carries its state ("prepared" or "frozen") in the attribute `STATE_ATTR`.

This module imports nothing of fxquant's, so any step can use it without an import cycle.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import fx, nn

QUANTIZERS_ATTR = "fxq_quantizers"
"""Name of the `nn.ModuleDict` that holds a prepared or frozen module's quantizers."""
STATE_ATTR = "fxquant_state"
"""Attribute on fxquant's GraphModules: "prepared" or "frozen"."""

_PREFIX = QUANTIZERS_ATTR + "."


def quantizer_target(name: str) -> str:
    """The `call_module` target of the quantizer called `name`."""
    return _PREFIX + name


def is_quantizer_path(path: str) -> bool:
    """Whether a dotted path (a node target, a parameter or buffer name) lies inside the quantizer container."""
    return path.startswith(_PREFIX)


def quantizer_name(node: Any) -> Optional[str]:
    """The name of the quantizer that `node` calls, or None when it is not a quantizer call."""
    if isinstance(node, fx.Node) and node.op == "call_module" and is_quantizer_path(str(node.target)):
        return str(node.target)[len(_PREFIX) :]
    return None


def quantizer_calls(graph: fx.Graph) -> Iterator[Tuple[fx.Node, str]]:
    """`(node, quantizer name)` for every quantizer call of `graph`, in graph order."""
    for node in graph.nodes:
        name = quantizer_name(node)
        if name is not None:
            yield node, name


def quantizer_calls_by_name(graph: fx.Graph) -> Dict[str, List[fx.Node]]:
    """By quantizer name, its calls in graph order (a weight shared by two layers may be called twice)."""
    calls: Dict[str, List[fx.Node]] = {}
    for node, name in quantizer_calls(graph):
        calls.setdefault(name, []).append(node)
    return calls


def quantizer_readers(graph: fx.Graph) -> Dict[str, List[fx.Node]]:
    """By quantizer target, every node that reads one of its calls (a weight shared by two layers may be
    called twice): a lowering that changes what a quantizer computes must fit all of them."""
    readers: Dict[str, List[fx.Node]] = {}
    for node, _ in quantizer_calls(graph):
        readers.setdefault(str(node.target), []).extend(node.users)
    return readers


def quantizers_of(module: nn.Module) -> Optional[nn.ModuleDict]:
    """The quantizer container of a module fxquant made, or None when it has none."""
    container = getattr(module, QUANTIZERS_ATTR, None)
    return container if isinstance(container, nn.ModuleDict) else None


def quantizer_container(gm: fx.GraphModule) -> nn.ModuleDict:
    """The quantizer container of `gm`, created (empty) on first use."""
    container = quantizers_of(gm)
    if container is None:
        gm.add_submodule(QUANTIZERS_ATTR, nn.ModuleDict())
        container = getattr(gm, QUANTIZERS_ATTR)
        assert isinstance(container, nn.ModuleDict)
    return container


def attribute_at(root: nn.Module, path: str) -> Any:
    """The object at a dotted attribute path of `root` (a submodule, parameter, buffer or plain attribute).

    Raises:
        AttributeError: some part of the path does not exist (the message names the whole path).
    """
    obj: Any = root
    for part in path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{type(root).__name__} has no attribute path {path!r} (no {part!r})") from None
    return obj


def tensor_at(root: nn.Module, path: str) -> torch.Tensor:
    """The tensor (parameter, buffer or tensor attribute) at a dotted path of `root`.

    Raises:
        AttributeError: the path does not exist.
        TypeError: it exists but is not a tensor.
    """
    obj = attribute_at(root, path)
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"{path!r} of {type(root).__name__} is a {type(obj).__name__}, not a tensor")
    return obj


def stored_tensor(gm: fx.GraphModule, node: Any) -> Optional[torch.Tensor]:
    """The tensor behind a `get_attr` node, or None when `node` is not one or reads something else."""
    if not (isinstance(node, fx.Node) and node.op == "get_attr"):
        return None
    try:
        obj = attribute_at(gm, str(node.target))
    except AttributeError:
        return None
    return obj if isinstance(obj, torch.Tensor) else None


def tensors_read_by_quantizers(gm: fx.GraphModule) -> Dict[str, torch.Tensor]:
    """The parameter or buffer each weight and bias quantizer reads (its call node's `get_attr` input), by
    quantizer target, in one pass over the graph (a lookup per quantizer would be quadratic in the size of
    large models)."""
    found: Dict[str, torch.Tensor] = {}
    for node, _ in quantizer_calls(gm.graph):
        tensor = stored_tensor(gm, node.args[0]) if node.args else None
        if tensor is not None:
            found.setdefault(str(node.target), tensor)
    return found


def module_state(module: nn.Module) -> Optional[str]:
    """"prepared", "frozen" or None for a module fxquant did not make."""
    state = getattr(module, STATE_ATTR, None)
    return state if isinstance(state, str) else None
