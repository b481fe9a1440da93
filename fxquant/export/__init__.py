"""Export: lowering frozen quantizers to integer QDQ ONNX (`qdq.py`, with the stand-ins of `lowering.py`, the
quantizer plans of `plan.py`, the ONNX translations of `ops.py`, the runtime-pattern rewrites of
`runtime_patterns.py` and the code folds of `code_folding.py`), writing the file (`onnx_file.py`), and reading
such files back (`onnx_report.py`).

Export only sees frozen modules (`fxq.freeze`); it knows nothing of training.
"""

from __future__ import annotations

from fxquant.export.onnx_report import OnnxQuantReport, OnnxQuantRow, onnx_report, read_onnx_file
from fxquant.export.qdq import export_onnx, integer_initializer_bytes

__all__ = ["export_onnx", "onnx_report", "OnnxQuantReport", "OnnxQuantRow", "integer_initializer_bytes", "read_onnx_file"]
