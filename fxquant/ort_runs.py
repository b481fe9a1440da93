"""Running an exported ONNX model in onnxruntime on fxquant's batches (for `verify` and `divergence`).

`LEVELS` names the two optimisation levels verify compares; `open_session` opens a session at one of them
(optionally writing the optimized graph), `session_feed` turns one batch into onnxruntime's feed, and
`run_session` runs it, turning onnxruntime's refusal of a batch into a `PrepareError` that names the shapes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from fxquant.batches import Batch, describe_shapes
from fxquant.errors import PrepareError

LEVELS = {"all": "ORT_ENABLE_ALL", "disabled": "ORT_DISABLE_ALL"}
"""verify's level names -> onnxruntime's GraphOptimizationLevel names."""


def open_session(model_path: str, providers: Sequence[str], level: str, opt_path: Optional[str]) -> Any:
    """An onnxruntime session of `model_path` at `level` (a key of `LEVELS`), writing the optimized graph to `opt_path`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, LEVELS[level])
    so.log_severity_level = 3
    # MatMulNBits' default accuracy level quantizes its input: ask for the exact float path.
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if opt_path is not None:
        so.optimized_model_filepath = opt_path
    return ort.InferenceSession(model_path, so, providers=list(providers))


def run_session(sess: Any, feed: Dict[str, np.ndarray], batch: Batch, key: Tuple[str, str]) -> List[np.ndarray]:
    """`sess.run` on one batch; a refused input becomes a PrepareError naming the batch and ONNX shapes."""
    try:
        return sess.run(None, feed)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own (pybind) exception types
        wanted = ", ".join(f"{x.name}: {tuple(x.shape)}" for x in sess.get_inputs())
        raise PrepareError(
            f"onnxruntime ({key[0]}, {LEVELS[key[1]]}) could not run a batch of shape {describe_shapes(batch)}: the "
            f"ONNX model's inputs are {wanted} (named dimensions may vary). Give batches shaped like the example "
            f"inputs given to fxq.export_onnx, or export again with inputs of this shape. The error was "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from e


def session_feed(sess: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """onnxruntime's feed for one batch: positional inputs by order, keywords by name."""
    names = [x.name for x in sess.get_inputs()]
    feed = {name: a.detach().cpu().numpy() for name, a in zip(names, args)}
    feed.update({k: v.detach().cpu().numpy() for k, v in kwargs.items() if k in names})
    return feed
