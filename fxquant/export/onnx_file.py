"""Writing an exported ONNX model to disk: a writability check before the long export, an atomic write (a
temporary file renamed into place, removed on any error or interrupt), the model's bytes written one
initializer at a time (no second serialized copy of the weights in memory), and external data past
protobuf's 2 GB limit.

What is written is `fxquant.export.qdq`'s business; this module only writes it.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Tuple

import onnx

from fxquant.errors import ExportError

TWO_GB = 2**31
"""Protobuf's limit on one serialized message: models at least this large store their tensors in `<path>.data`."""


def check_writable(path: Path) -> None:
    """Refuse, before exporting, a path that cannot be written: a directory, a missing parent directory, or
    a location where no file can be created (permissions, read-only file system).

    Raises:
        ExportError: names the path and what to do.
    """
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ExportError(f"cannot write the ONNX model to {str(path)!r}: it is a directory; give a file path such as model.onnx.")
    if not parent.is_dir():
        what = "is not a directory" if parent.exists() else "does not exist"
        raise ExportError(
            f"cannot write the ONNX model to {str(path)!r}: directory {str(parent)!r} {what}; create it first."
        )
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise ExportError(
            f"cannot write the ONNX model to {str(path)!r}: permission denied; choose a writable location."
        )
    try:  # os.access says yes on a read-only file system and for root: create a file to be sure
        fd, probe = _create_temporary(path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ExportError(
            f"cannot write the ONNX model to {str(path)!r}: {e.strerror or e}; choose a writable location."
        ) from e


def _create_temporary(path: Path) -> Tuple[int, str]:
    """A new hidden file `.<name>.<random>.tmp` next to `path`, opened for writing, with the permissions a
    plain `open` gives (0666 less the umask, not `tempfile.mkstemp`'s 0600)."""
    parent = path.parent if str(path.parent) else Path(".")
    for _ in range(100):
        name = str(parent / f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), name
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {str(path)!r}")


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Write `model` to `path` atomically (a temporary file renamed into place): no partial file is left on
    an error or an interrupt (Ctrl-C), and the file gets the usual permissions (0666 less the umask)."""
    fd, tmp = _create_temporary(path)
    os.close(fd)
    data_path = path.parent / (path.name + ".data")
    data_existed = data_path.exists()
    done = False
    try:
        if serialized_size(model) >= TWO_GB:
            onnx.save_model(
                model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data_path.name,
                size_threshold=1024,
            )
        else:
            with open(tmp, "wb") as f:
                write_model(model, f)
        os.replace(tmp, path)
        done = True
    except (OSError, ValueError) as e:
        raise ExportError(f"could not write the ONNX model to {str(path)!r}: {e}; choose a writable location with free space.") from e
    finally:
        if not done:  # also on KeyboardInterrupt
            with contextlib.suppress(OSError):
                os.remove(tmp)
            if not data_existed:
                with contextlib.suppress(OSError):
                    os.remove(data_path)


def _is_repeated(field: Any) -> bool:
    """Whether a protobuf field descriptor is a repeated field (`is_repeated` in protobuf 6+, `label` before)."""
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(field.label == field.LABEL_REPEATED)


def _serialized_fields(message: Any, keep: Callable[[int], bool]) -> bytes:
    """The serialization of `message`'s fields whose number `keep` accepts (a copy of those fields only)."""
    part = type(message)()
    for field, value in message.ListFields():
        if not keep(field.number):
            continue
        if _is_repeated(field):
            getattr(part, field.name).extend(value)
        elif field.type == field.TYPE_MESSAGE:
            getattr(part, field.name).CopyFrom(value)
        else:
            setattr(part, field.name, value)
    return bytes(part.SerializeToString())


def _varint(value: int) -> bytes:
    """`value` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(number: int, size: int) -> bytes:
    """The key and length of a length-delimited protobuf field (wire type 2) of `size` bytes."""
    return _varint(number << 3 | 2) + _varint(size)


RAW_DATA_NUMBER = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number

_T = onnx.TensorProto
ELEMENT_BITS: Dict[int, int] = {
    **{t: 8 for t in (_T.UINT8, _T.INT8, _T.BOOL, _T.FLOAT8E4M3FN, _T.FLOAT8E4M3FNUZ, _T.FLOAT8E5M2, _T.FLOAT8E5M2FNUZ)},
    **{t: 16 for t in (_T.UINT16, _T.INT16, _T.FLOAT16, _T.BFLOAT16)},
    **{t: 32 for t in (_T.FLOAT, _T.INT32, _T.UINT32)},
    **{t: 64 for t in (_T.DOUBLE, _T.INT64, _T.UINT64)},
    **{t: 4 for t in (_T.INT4, _T.UINT4, _T.FLOAT4E2M1)},
    **{t: 2 for t in (_T.INT2, _T.UINT2)},
}
"""Bits per element of the ONNX types whose `raw_data` length follows from the shape (sub-byte types packed, the
last byte padded); tensors of other types are measured by protobuf itself."""


def _raw_data_length(tensor: onnx.TensorProto) -> Optional[int]:
    """The length of `tensor.raw_data` from its type and dims, or None (not raw, or a type not in `ELEMENT_BITS`).
    Reading the field, or protobuf's `ByteSize()` (upb encodes the whole message to measure it), would copy it."""
    bits = ELEMENT_BITS.get(tensor.data_type)
    if bits is None or not tensor.HasField("raw_data"):
        return None
    return (math.prod(tensor.dims) * bits + 7) // 8


def _tensor_parts(tensor: onnx.TensorProto) -> Optional[Tuple[bytes, int, bytes]]:
    """`(fields before raw_data, raw_data's length, fields after it)`, or None where `_raw_data_length` is."""
    length = _raw_data_length(tensor)
    if length is None:
        return None
    before = _serialized_fields(tensor, lambda n: n < RAW_DATA_NUMBER)
    after = _serialized_fields(tensor, lambda n: n > RAW_DATA_NUMBER)
    return before, length, after


def _tensor_size(tensor: onnx.TensorProto) -> int:
    """`tensor.ByteSize()` without encoding (or copying) its data where its type allows."""
    parts = _tensor_parts(tensor)
    if parts is None:
        return int(tensor.ByteSize())
    before, length, after = parts
    return len(before) + len(_length_delimited(RAW_DATA_NUMBER, length)) + length + len(after)


def _write_tensor(tensor: onnx.TensorProto, f: BinaryIO) -> None:
    """Write the bytes of `tensor.SerializeToString()` to `f` holding one copy of its `raw_data` in memory.

    `SerializeToString` holds two copies of the data at once (protobuf's encoding buffer and the Python bytes made
    from it); here the fields before `raw_data`, the data itself (one copy: reading the field copies it) and the
    fields after it are written in turn, in field-number order as protobuf writes them."""
    parts = _tensor_parts(tensor)
    if parts is None:
        f.write(tensor.SerializeToString())
        return
    before, length, after = parts
    raw = tensor.raw_data
    if len(raw) != length:
        raise ExportError(
            f"initializer {tensor.name!r} holds {len(raw)} bytes of raw data where its type and shape {list(tensor.dims)} "
            f"need {length}: the model is malformed, so it is not written; check what built or edited that tensor "
            "(onnx.checker.check_model names it too)."
        )
    f.write(before)
    f.write(_length_delimited(RAW_DATA_NUMBER, length))
    f.write(raw)
    del raw
    f.write(after)


INIT_NUMBER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
GRAPH_NUMBER = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number


def _graph_parts(graph: onnx.GraphProto) -> Tuple[bytes, List[int], bytes, int]:
    """`(the graph's fields before its initializers, each initializer's size, its fields after them, the size of
    the whole serialized graph)`."""
    head = _serialized_fields(graph, lambda n: n < INIT_NUMBER)
    tail = _serialized_fields(graph, lambda n: n > INIT_NUMBER)
    sizes = [_tensor_size(init) for init in graph.initializer]
    size = len(head) + len(tail) + sum(len(_length_delimited(INIT_NUMBER, k)) + k for k in sizes)
    return head, sizes, tail, size


def serialized_size(model: onnx.ModelProto) -> int:
    """`model.ByteSize()` without encoding every weight (upb's `ByteSize` encodes the whole model to measure it)."""
    size = len(_serialized_fields(model, lambda n: n != GRAPH_NUMBER))
    if model.HasField("graph"):
        graph_size = _graph_parts(model.graph)[3]
        size += len(_length_delimited(GRAPH_NUMBER, graph_size)) + graph_size
    return size


def write_model(model: onnx.ModelProto, f: BinaryIO) -> None:
    """Write the bytes of `model.SerializeToString()` to `f`, the graph's initializers one at a time.

    Protobuf writes fields in field-number order, so the model is its fields before `graph`, the graph (its
    fields before `initializer`, each initializer, its fields after), then the fields after `graph`. The
    serialized model, a copy the size of every weight, is never held in memory: at most one copy of one
    initializer's data is (docs/decisions.md, "Export writes the model one initializer at a time").
    """
    f.write(_serialized_fields(model, lambda n: n < GRAPH_NUMBER))
    if model.HasField("graph"):
        graph = model.graph
        head, sizes, tail, size = _graph_parts(graph)
        f.write(_length_delimited(GRAPH_NUMBER, size))
        f.write(head)
        for init, k in zip(graph.initializer, sizes):
            f.write(_length_delimited(INIT_NUMBER, k))
            _write_tensor(init, f)
        f.write(tail)
    f.write(_serialized_fields(model, lambda n: n > GRAPH_NUMBER))
