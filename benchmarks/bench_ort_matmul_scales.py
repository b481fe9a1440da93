"""What per-column weight scales cost onnxruntime's integer matmul, against one scale per tensor.

fxquant quantizes weights per output channel (the accuracy default); onnxruntime's `quantize_dynamic` uses one
scale per weight tensor. Both become `MatMulIntegerToFloat` (or `DynamicQuantizeMatMul`) in onnxruntime's
optimized graph; this times a QDQ `MatMul` of a uint8 activation `(1, M, K)` and an int8 weight `(K, N)` with
per-column or per-tensor scales, with and without an explicit (zero) weight zero point, in one process, rounds
interleaved (`coverage_table`'s sessions and timing). Default shape: the LM head of `deployed_models.t5` (32 decoder tokens, d_model 256, vocab 32000),
about a third of that model's time.

    python benchmarks/bench_ort_matmul_scales.py [--m 32] [--k 256] [--n 32000] [--threads 1] [--iters 300] [--rounds 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Dict, List

import coverage_table as ct  # benchmarks/ is on sys.path when this script runs
import numpy as np
import onnx
import onnxruntime as ort
import torch
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
    parser.add_argument("--iters", type=int, default=300, help="timed runs per variant, over --rounds rounds")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    ct.THREADS = args.threads
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, args.m, args.k)).astype(np.float32))
    variants = {(per_column, zero_point): f"{'per column' if per_column else 'per tensor'} | "
                f"{'zeros' if zero_point else 'none'}" for per_column in (True, False) for zero_point in (True, False)}
    kernels: Dict[str, List[str]] = {}
    paths: Dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for (per_column, zero_point), label in variants.items():
            paths[label] = str(Path(tmp) / f"{per_column}_{zero_point}.onnx")
            Path(paths[label]).write_bytes(matmul_model(args.m, args.k, args.n, per_column, zero_point))
            optimized = str(Path(tmp) / f"{per_column}_{zero_point}_optimized.onnx")
            ct._session(paths[label], optimized)
            kernels[label] = [node.op_type for node in onnx.load(optimized).graph.node]
        ms = ct._latencies_ms(paths, x, args.iters, args.rounds)
    reference = ms[variants[(False, True)]]
    print(f"onnxruntime {ort.__version__}, {args.threads} thread(s), (1, {args.m}, {args.k}) x ({args.k}, {args.n}), "
          f"median of {args.iters} runs\n")
    print("| weight scales | weight zero point | optimized graph | ms | vs per tensor |\n|---|---|---|---|---|")
    for label, value in ms.items():
        print(f"| {label} | {' + '.join(kernels[label])} | {value:.3f} | {value / reference:.2f}x |")


if __name__ == "__main__":
    main()
