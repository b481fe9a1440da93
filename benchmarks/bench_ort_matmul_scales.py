"""What per-column weight scales cost onnxruntime's integer matmul, against one scale per tensor.

fxquant quantizes weights per output channel (the accuracy default); onnxruntime's `quantize_dynamic` uses one
scale per weight tensor. Both become `MatMulIntegerToFloat` (or `DynamicQuantizeMatMul`) in onnxruntime's
optimized graph; this times a QDQ `MatMul` of a uint8 activation `(1, M, K)` and an int8 weight `(K, N)` with
per-column or per-tensor scales, with and without an explicit (zero) weight zero point, in one process, rounds
interleaved. Default shape: the LM head of `deployed_models.t5` (32 decoder tokens, d_model 256, vocab 32000),
about a third of that model's time.

    python benchmarks/bench_ort_matmul_scales.py [--m 32] [--k 256] [--n 32000] [--threads 1] [--iters 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def matmul_model(m: int, k: int, n: int, per_column: bool, zero_point: bool, seed: int = 0) -> bytes:
    """A QDQ MatMul: QuantizeLinear -> DequantizeLinear on the input, DequantizeLinear on an int8 weight."""
    rng = np.random.default_rng(seed)
    scale = np.full((n,), 0.01, np.float32) if per_column else np.array(0.01, np.float32)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (k, n), dtype=np.int8), "w"),
             numpy_helper.from_array(scale, "w_scale"), numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zero_point")]
    weight_inputs = ["w", "w_scale"]
    if zero_point:
        inits.append(numpy_helper.from_array(np.zeros(scale.shape, np.int8), "w_zero_point"))
        weight_inputs.append("w_zero_point")
    nodes = [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["x_q"]),
             helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero_point"], ["x_dq"]),
             helper.make_node("DequantizeLinear", weight_inputs, ["w_dq"], axis=1),
             helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"])]
    graph = helper.make_graph(nodes, "matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, m, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, m, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]).SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--n", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    x = np.random.default_rng(1).standard_normal((1, args.m, args.k)).astype(np.float32)
    sessions: Dict[Tuple[bool, bool], ort.InferenceSession] = {}
    kernels: Dict[Tuple[bool, bool], List[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for per_column in (True, False):
            for zero_point in (True, False):
                options = ort.SessionOptions()
                options.intra_op_num_threads = args.threads
                options.optimized_model_filepath = str(Path(tmp) / f"{per_column}_{zero_point}.onnx")
                sessions[(per_column, zero_point)] = ort.InferenceSession(
                    matmul_model(args.m, args.k, args.n, per_column, zero_point), options, providers=["CPUExecutionProvider"])
                kernels[(per_column, zero_point)] = [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]
    times: Dict[Tuple[bool, bool], List[float]] = {key: [] for key in sessions}
    for _ in range(args.rounds):
        for key, session in sessions.items():
            for _ in range(5):
                session.run(None, {"x": x})
            for _ in range(args.iters):
                t0 = time.perf_counter()
                session.run(None, {"x": x})
                times[key].append(time.perf_counter() - t0)
    reference = statistics.median(times[(False, True)])
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), (1, {args.m}, {args.k}) x ({args.k}, {args.n}), "
          f"median of {args.rounds * args.iters} runs\n")
    print("| weight scales | weight zero point | optimized graph | ms | vs per tensor |\n|---|---|---|---|---|")
    for (per_column, zero_point), ts in times.items():
        ms = statistics.median(ts)
        print(f"| {'per column' if per_column else 'per tensor'} | {'zeros' if zero_point else 'none'} | "
              f"{' + '.join(kernels[(per_column, zero_point)])} | {ms * 1000:.3f} | {ms / reference:.2f}x |")


if __name__ == "__main__":
    main()
