"""Export: lowering frozen quantizers to integer QDQ ONNX, and reading such files back.

Export only sees frozen modules (`fxq.freeze`); it knows nothing of training.
"""

from __future__ import annotations

from typing import Any

from fxquant.errors import StateError


def onnx_report(model: Any) -> Any:
    """Report of the quant nodes of an exported ONNX model (path or ModelProto)."""
    raise StateError(
        "reading ONNX files is not available in this build of fxquant yet; report a prepared or frozen module."
    )
