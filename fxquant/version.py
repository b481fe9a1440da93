"""The package version (one place: `pyproject.toml` reads it, `fxquant.__version__` and the exported ONNX
files' `producer_version` show it)."""

__version__ = "0.1.0"
