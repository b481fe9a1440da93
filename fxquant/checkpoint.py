"""Checkpoints: state dicts of prepared and frozen modules that load only where they fit.

`prepare` attaches a `CheckpointInfo` submodule (`qm.fxq_checkpoint`) recording what identifies the
module: the user model's class, the capture front end, the configuration's number format and placement (not
its training estimator: a module trained with one estimator loads into one prepared with another) and a
signature of the captured graph. It travels in every state dict as `fxq_checkpoint._extra_state` (plain strings and ints, so
`torch.load(path, weights_only=True)` reads it), with the module's state ("prepared" or "frozen") added
when the state dict is taken.

Loading is checked before anything is copied, both through `fxq.load_state_dict(module, state_dict)` and
through a plain `module.load_state_dict(state_dict)` (a load pre-hook on the module): a checkpoint of
another model, configuration, capture or state, or with other keys or shapes, is refused with one
`CheckpointError` that lists every difference and says what to do. Frozen weight codes whose integer
type differs (int8 vs int16, from the bits) are re-typed to the checkpoint's before loading.

This module does not save files (use `torch.save(module.state_dict(), path)`) and knows nothing of
training or export.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import fx, nn

from fxquant.config import EstimatorChoice, QuantConfig
from fxquant.errors import CheckpointError
from fxquant.graph import is_quantizer_path, module_state
from fxquant.quantizer import FrozenWeight

INFO_ATTR = "fxq_checkpoint"
INFO_KEY = f"{INFO_ATTR}._extra_state"
FORMAT_VERSION = 1
_SHOWN = 6


class CheckpointInfo(nn.Module):
    """What identifies a prepared module; saved in state dicts as `fxq_checkpoint._extra_state`.

    Args:
        info: plain data (strings, ints, dicts of strings): format, model, capture, config, graph.
    """

    def __init__(self, info: Dict[str, Any]) -> None:
        super().__init__()
        self.info = dict(info)

    def get_extra_state(self) -> Dict[str, Any]:
        return dict(self.info)

    def set_extra_state(self, state: Any) -> None:
        # The comparison happens in the root module's load pre-hook, before any tensor is copied.
        pass

    def extra_repr(self) -> str:
        return f"model={self.info.get('model')}, capture={self.info.get('capture')}, graph={self.info.get('graph')}"


def graph_signature(gm: fx.GraphModule) -> str:
    """A short hash of the captured graph's ops (targets in order, quantizer calls excluded)."""
    parts: List[str] = []
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            parts.append(f"{node.op}:{getattr(node.target, '__name__', str(node.target))}")
        elif node.op == "call_module" and not is_quantizer_path(str(node.target)):
            parts.append(f"call_module:{node.target}")
    digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]
    return f"{len(parts)} ops, {digest}"


ESTIMATOR_FIELDS = frozenset(f.name for f in dataclasses.fields(EstimatorChoice))
"""Configuration fields a checkpoint does not depend on (the training estimator: `finetune(mode=...)` may
pick another for any run); checkpoints saved before they were left out still carry them, and they are ignored."""


def _config_fields(config: Any) -> Dict[str, str]:
    """What identifies a configuration: the fields of its number format and placement."""
    if isinstance(config, QuantConfig):
        parts: Sequence[Any] = (config.number_format, config.placement)
        return {f.name: repr(getattr(part, f.name)) for part in parts for f in dataclasses.fields(part)}
    if dataclasses.is_dataclass(config):
        return {f.name: repr(getattr(config, f.name)) for f in dataclasses.fields(config)}
    return {"config": repr(config)}


def attach_checkpoint_info(gm: fx.GraphModule, model: nn.Module, config: Any, capture: str) -> fx.GraphModule:
    """Record what identifies `gm` and install the save/load hooks (called by `fxq.prepare`).

    Args:
        gm: the prepared module (changed in place).
        model: the user's model (only its class is recorded).
        config: the `QuantConfig` used.
        capture: the front end that captured the model.

    Returns:
        `gm`.
    """
    cls = type(model)
    info = {
        "format": FORMAT_VERSION,
        "model": f"{cls.__module__}.{cls.__qualname__}",
        "capture": capture,
        "config": _config_fields(config),
        "graph": graph_signature(gm),
    }
    setattr(gm, INFO_ATTR, CheckpointInfo(info))
    gm.register_state_dict_post_hook(_add_state_on_save)
    gm.register_load_state_dict_pre_hook(_check_on_load)
    return gm


def _add_state_on_save(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    key = prefix + INFO_KEY
    if isinstance(state_dict.get(key), dict):
        state_dict[key] = {**state_dict[key], "state": module_state(module) or "prepared"}


def _check_on_load(
    module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any, strict: bool,
    missing_keys: List[str], unexpected_keys: List[str], error_msgs: List[str],
) -> None:
    check_state_dict(module, state_dict, strict=strict, prefix=prefix)
    _match_code_dtypes(module, state_dict, prefix)


def _diff(label: str, saved: Any, here: Any) -> Optional[str]:
    if saved == here:
        return None
    return f"{label}: {saved} in the checkpoint, {here} here"


def _differences(module: nn.Module, state_dict: Mapping[str, Any], strict: bool, prefix: str) -> List[str]:
    diffs: List[str] = []
    mine = getattr(module, INFO_ATTR, None)
    theirs = state_dict.get(prefix + INFO_KEY)
    if isinstance(mine, CheckpointInfo):
        if not isinstance(theirs, dict):
            diffs.append(
                "the checkpoint was not saved from an fxquant module (it has no 'fxq_checkpoint._extra_state'); "
                "float weights belong in the float model: load them there, then call fxq.prepare"
            )
        else:
            here = {**mine.info, "state": module_state(module) or "prepared"}
            if "state" in theirs and theirs["state"] != here["state"]:
                diffs.append(
                    f"state: a {theirs['state']} module's checkpoint, this module is {here['state']} "
                    f"(load it into a {theirs['state']} module: fxq.prepare(...)"
                    f"{' then fxq.calibrate and fxq.freeze' if theirs['state'] == 'frozen' else ''})"
                )
            for key, label in (("model", "model class"), ("capture", "capture front end"), ("graph", "captured graph")):
                d = _diff(label, theirs.get(key), here.get(key))
                if d:
                    diffs.append(d)
            saved_cfg, here_cfg = (
                {k: v for k, v in dict(info.get("config", {})).items() if k not in ESTIMATOR_FIELDS}
                for info in (theirs, here)
            )
            saved_cfg = {k: _with_narrow_range(v) for k, v in saved_cfg.items()}
            for name in list(dict.fromkeys(list(saved_cfg) + list(here_cfg))):
                d = _diff(f"config.{name}", saved_cfg.get(name, "(absent)"), here_cfg.get(name, "(absent)"))
                if d:
                    diffs.append(d)
    own = {k: v for k, v in module.state_dict().items() if k != INFO_KEY}
    given = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and k[len(prefix):] != INFO_KEY}
    if strict:
        missing = [k for k in own if k not in given and not _narrow_frozen_weight_qmin(module, k, given)]
        unexpected = [k for k in given if k not in own]
        if missing:
            diffs.append(f"{len(missing)} key(s) of this module missing from the checkpoint: {_first(missing)}")
        if unexpected:
            diffs.append(f"{len(unexpected)} key(s) in the checkpoint that this module does not have: {_first(unexpected)}")
    shapes = [
        f"{k} {tuple(given[k].shape)} in the checkpoint vs {tuple(v.shape)} here"
        for k, v in own.items()
        if k in given and isinstance(v, torch.Tensor) and isinstance(given[k], torch.Tensor) and given[k].shape != v.shape
    ]
    if shapes:
        diffs.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:_SHOWN])}{' ...' if len(shapes) > _SHOWN else ''}")
    return diffs


def _narrow_frozen_weight_qmin(module: nn.Module, key: str, given: Mapping[str, Any]) -> bool:
    """Whether `key` is the `qmin` of a `FrozenWeight` that a checkpoint from before full-range codes lacks: it has
    the `qmax`, and its codes were -qmax..qmax (`FrozenWeight` loads it so)."""
    owner, _, name = key.rpartition(".")
    return name == "qmin" and owner + ".qmax" in given and isinstance(module.get_submodule(owner), FrozenWeight)


def _with_narrow_range(value: Any) -> Any:  # noqa: ANN401 - a saved config field, usually a string
    """A saved config field as this fxquant writes it: a `QuantSpec` saved before `narrow_range` existed had narrow
    weight codes, which is `narrow_range=True` now."""
    if not isinstance(value, str) or "QuantSpec(" not in value or "narrow_range=" in value:
        return value
    return re.sub(r"(per_group_bits=(?:True|False))\)", r"\1, narrow_range=True)", value)


def _first(keys: List[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (" ..." if len(keys) > _SHOWN else "")


def check_state_dict(module: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True, prefix: str = "") -> None:
    """Raise if `state_dict` does not fit `module`; does nothing when it does.

    Raises:
        CheckpointError: lists every difference (model class, capture, configuration fields, state,
            graph, missing/unexpected keys, shapes) and how to get a module that fits.
    """
    diffs = _differences(module, state_dict, strict, prefix)
    if diffs:
        raise CheckpointError(
            f"the checkpoint does not fit this {type(module).__name__} module:\n"
            + "\n".join(f"  - {d}" for d in diffs)
            + "\nLoad it into a module made the same way: fxq.prepare(<same model class and config>, example_inputs, "
            "config, capture=<same>) (and fxq.calibrate + fxq.freeze for a frozen checkpoint)."
        )


def _match_code_dtypes(module: nn.Module, state_dict: Mapping[str, Any], prefix: str) -> None:
    """Re-type frozen integer buffers (codes: int8 or int16 by bits) to the checkpoint's dtype."""
    for name, buf in list(module.named_buffers()):
        value = state_dict.get(prefix + name)
        if not isinstance(value, torch.Tensor) or value.dtype == buf.dtype or buf.dtype.is_floating_point:
            continue
        if value.dtype.is_floating_point or value.shape != buf.shape:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_path) if owner_path else module
        owner.register_buffer(attr, torch.zeros_like(buf, dtype=value.dtype))


def load_state_dict(module: nn.Module, state_dict: Mapping[str, Any], *, strict: bool = True) -> nn.Module:
    """Load a checkpoint into a prepared or frozen module after checking that it fits.

    Equivalent to `module.load_state_dict(state_dict, strict=strict)` on a module from `fxq.prepare` /
    `fxq.freeze` (whose load hook runs the same check); use this one for a clear name in user code.

    Args:
        module: a module returned by `fxq.prepare` or `fxq.freeze` (of the same model and config).
        state_dict: e.g. `torch.load(path, weights_only=True)`.
        strict: require the same keys (as `nn.Module.load_state_dict`).

    Returns:
        `module`, loaded.

    Raises:
        CheckpointError: the checkpoint comes from another model, configuration, capture or state, or
            its keys or shapes differ (all differences are listed).

    Example:
        >>> torch.save(qm.state_dict(), "qm.pt")
        >>> qm2 = fxq.prepare(model, example_inputs, cfg)
        >>> fxq.load_state_dict(qm2, torch.load("qm.pt", weights_only=True))
    """
    check_state_dict(module, state_dict, strict=strict)
    module.load_state_dict(dict(state_dict), strict=strict)
    return module
