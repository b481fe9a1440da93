"""Folding integer-code constants into initializers on the exporter's IR: `Cast(codes)` to INT4/INT2 (packed)
and `BitwiseXor(codes, 128)` (uint8 codes from int8 codes), computed lazily while the initializer is
serialized, so the file holds the integer codes in their container and no folded copy is held in memory.
"""

from __future__ import annotations

import functools
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import onnx_ir as ir


def fold_code_constants(model: ir.Model) -> None:
    """Fold `Cast(initializer)` and `BitwiseXor(initializer, scalar)` into an initializer of their result.

    The exporter's optimizer folds small ones but leaves large ones (size limits); without this an int4
    weight would be stored as int8 plus a Cast, and uint8 weight codes (int8 codes with the sign bit flipped,
    `fxquant.export.lowering._stored_codes`) as int8 plus a BitwiseXor: the file would not reflect the bits,
    and onnxruntime would not see integer weights. Done on the exporter's IR before it is serialized, each
    fold computed only while its initializer is serialized (`ir.LazyTensor`): no folded copy of the weights is
    held besides the one serialization. The same fold of the same initializer (a tied table read by a lookup
    and a head) gives one initializer. Repeated until nothing folds, so a Cast of a BitwiseXor folds too.
    """
    graph = model.graph
    folded_any = False
    while True:
        done: Dict[Tuple[str, str, int], ir.Value] = {}
        for node in list(graph):
            folding = _code_fold(graph, node)
            if folding is None:
                continue
            src, fold, key, dtype = folding
            out = node.outputs[0]
            value = done.get((src.name or "", node.op_type, key))
            if value is None:
                codes = src.const_value
                assert codes is not None
                shape = ir.Shape(codes.shape.numpy())
                lazy = ir.LazyTensor(
                    functools.partial(fold, codes, dtype, out.name), dtype=dtype, shape=shape, name=out.name
                )
                value = ir.Value(name=None, shape=shape, type=ir.TensorType(dtype), const_value=lazy)
                done[(src.name or "", node.op_type, key)] = value
            name = out.name
            out.replace_all_uses_with(value, replace_graph_outputs=True)
            graph.remove(node, safe=True)
            if value.name is None:
                value.name = name
                graph.register_initializer(value)
        if not done:
            break
        folded_any = True
    if not folded_any:
        return
    for name, init in list(graph.initializers.items()):
        if not init.uses() and not init.is_graph_output():
            del graph.initializers[name]


_CodeFold = Callable[[ir.TensorProtocol, ir.DataType, Optional[str]], ir.Tensor]


def _code_fold(graph: ir.Graph, node: ir.Node) -> Optional[Tuple[ir.Value, _CodeFold, int, ir.DataType]]:
    """The initializer `node` reads, the function that computes `node` from it, a key of its constant
    operand and the result's type, when `node` is a `Cast` or a `BitwiseXor` with a scalar constant of an initializer."""
    if node.domain or not node.inputs:
        return None
    src = node.inputs[0]
    if src is None or src.name is None or graph.initializers.get(src.name) is not src or src.is_graph_input():
        return None
    codes = src.const_value
    if codes is None:
        return None
    if node.op_type == "Cast":
        to = node.attributes["to"].as_int()
        return src, _cast, to, ir.DataType(to)
    if node.op_type == "BitwiseXor" and len(node.inputs) == 2 and node.inputs[1] is not None:
        operand = ir.convenience.get_const_tensor(node.inputs[1])
        if operand is None or operand.size != 1:
            return None
        mask = int(operand.numpy().reshape(()))
        return src, functools.partial(_xor, mask), mask, codes.dtype
    return None


def _cast(codes: ir.TensorProtocol, dtype: ir.DataType, name: Optional[str]) -> ir.Tensor:
    """`codes` (integers) as a tensor of `dtype` (int4 and int2 are packed when serialized)."""
    return ir.Tensor(codes.numpy().astype(np.int64).astype(dtype.numpy()), dtype=dtype, name=name)


def _xor(mask: int, codes: ir.TensorProtocol, dtype: ir.DataType, name: Optional[str]) -> ir.Tensor:
    """`codes` with the bits of `mask` flipped (uint8 codes + 128 from int8 codes: mask 128)."""
    array = codes.numpy()
    return ir.Tensor(np.bitwise_xor(array, np.asarray(mask, dtype=array.dtype)), dtype=dtype, name=name)
