"""Errors raised by fxquant: one base class, a few subclasses by pipeline step.

Every message names the thing that is wrong (module, node, value), what was expected and how to fix it.
"""

from __future__ import annotations

from typing import Optional


class FxQuantError(Exception):
    """Base class of every error fxquant raises on purpose."""


class ConfigError(FxQuantError, ValueError):
    """An invalid configuration value (QuantSpec, QuantConfig, an override or a call argument)."""


class CaptureError(FxQuantError, RuntimeError):
    """The model could not be captured as an FX graph by any front end that was tried."""

    fxq_module_path: Optional[str] = None
    """The submodule whose code stopped symbolic tracing, when known (read by the leaf fallback)."""


class PrepareError(FxQuantError, ValueError):
    """The model or its inputs cannot be prepared (already prepared, wrong inputs, ...)."""


class PassError(FxQuantError, RuntimeError):
    """A graph pass failed; the message names the pass and the passes that ran before it."""


class StateError(FxQuantError, RuntimeError):
    """A step was called out of order (e.g. export before freeze, training before calibration)."""


class ExportError(FxQuantError, RuntimeError):
    """A frozen module could not be exported to ONNX (unsupported op, bad opset, unwritable path)."""


class ParityError(FxQuantError, AssertionError):
    """onnxruntime's output differs from the frozen PyTorch module beyond the tolerance (`fxq.verify`)."""


class InputError(FxQuantError, ValueError):
    """A file or argument fxquant was given is missing or not what it must be (an ONNX model that is not one,
    a data or weights file that cannot be read, a bad command-line value)."""


class CheckpointError(FxQuantError, ValueError):
    """A state dict does not fit the module it is loaded into (other model, config, capture or state)."""
