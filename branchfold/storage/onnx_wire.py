"""Reading and writing an ONNX file's big tensors without parsing them: the protobuf wire format.

An exported model keeps its weights inline, as the ``raw_data`` of the graph's initializers. Parsing such
a file with protobuf copies every weight into memory (twice while the file's bytes are held), and writing
one serializes every weight again. The fold needs none of that: it reads the few weights of the regions
it folds. So the file is scanned, memory-mapped, for where each initializer's ``raw_data`` lies, and the
model is parsed *without* those bytes: each big initializer becomes an external-data reference
(location, offset, length) into the ``.onnx`` file itself. ``onnx_ir`` then maps each weight lazily, and
a writer streams each weight from where it lies (``copy_file_range``) into the output.

Only the main graph's float initializers of at least ``MIN_EXTERNAL_BYTES`` are taken out: integer
tensors (shape constants) and small ones stay inline, so shape inference sees every value it can use.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import onnx

MIN_EXTERNAL_BYTES = 1024
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# field numbers (onnx.proto)
MODEL_GRAPH = 7
GRAPH_INITIALIZER = 5
TENSOR_DATA_TYPE, TENSOR_RAW_DATA, TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION = 2, 9, 13, 14
LENGTH_DELIMITED = 2
EXTERNAL = onnx.TensorProto.EXTERNAL


def graph_protos(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph (If/Loop/Scan bodies) in it, at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from graph_protos(attr.g)
            for sub in attr.graphs:
                yield from graph_protos(sub)


def model_tensors(model: onnx.ModelProto, main_initializers: bool = True) -> Iterator[onnx.TensorProto]:
    """Every tensor of ``model``: the main graph's initializers (unless ``main_initializers`` is False), and the
    initializers of subgraphs and the tensor attributes of nodes, in the graph and in functions."""
    if main_initializers:
        yield from model.graph.initializer
    yield from _node_tensors(model.graph.node)
    for function in model.functions:
        yield from _node_tensors(function.node)


def _node_tensors(nodes) -> Iterator[onnx.TensorProto]:
    for node in nodes:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from sub.initializer
                yield from _node_tensors(sub.node)


class WireError(ValueError):
    """The bytes are not a well-formed protobuf message."""


def read_varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise WireError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint too long")


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def _fields(buf, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """``(field, wire type, start of its key, start of its value, end)`` for each field of the message in
    ``buf[start:end]``; a length-delimited value starts after its length. Values are skipped, not read."""
    out = []
    pos = start
    while pos < end:
        field_start = pos
        tag, pos = read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value_start = pos
            _, pos = read_varint(buf, pos)
        elif wire_type == 1:
            value_start, pos = pos, pos + 8
        elif wire_type == LENGTH_DELIMITED:
            length, value_start = read_varint(buf, pos)
            pos = value_start + length
        elif wire_type == 5:
            value_start, pos = pos, pos + 4
        else:
            raise WireError(f"unsupported wire type {wire_type}")
        if pos > end:
            raise WireError("field runs past the end of its message")
        out.append((field, wire_type, field_start, value_start, pos))
    return out


def _external_entry(k: str, v: str) -> bytes:
    entry = key(1, LENGTH_DELIMITED) + varint(len(k)) + k.encode() + key(2, LENGTH_DELIMITED) + varint(len(v)) + v.encode()
    return key(TENSOR_EXTERNAL_DATA, LENGTH_DELIMITED) + varint(len(entry)) + entry


def _tensor_without_data(buf, start: int, end: int, location: str) -> tuple[bytes, int] | None:
    """The TensorProto in ``buf[start:end]`` with its big float ``raw_data`` replaced by a reference to
    ``location`` at the raw data's file offset, and the number of bytes moved out; None to keep it."""
    parts = _fields(buf, start, end)
    data_type = next((int(read_varint(buf, vs)[0]) for f, w, _, vs, _ in parts if f == TENSOR_DATA_TYPE and w == 0), 0)
    raw = [(vs, ve) for f, w, _, vs, ve in parts if f == TENSOR_RAW_DATA and w == LENGTH_DELIMITED]
    already = any(f in (TENSOR_EXTERNAL_DATA, TENSOR_DATA_LOCATION) for f, *_ in parts)
    if data_type not in FLOAT_TYPES or len(raw) != 1 or already:
        return None
    value_start, value_end = raw[0]
    length = value_end - value_start
    if length < MIN_EXTERNAL_BYTES:
        return None
    kept = b"".join(bytes(buf[fs:ve]) for f, _, fs, _, ve in parts if f != TENSOR_RAW_DATA)
    reference = (
        _external_entry("location", location)
        + _external_entry("offset", str(value_start))
        + _external_entry("length", str(length))
        + key(TENSOR_DATA_LOCATION, 0)
        + varint(EXTERNAL)
    )
    return kept + reference, length


def weightless_bytes(buf, location: str) -> tuple[bytes, int]:
    """The serialized ModelProto in ``buf`` (a memory map of the file named ``location``) with the main
    graph's big float initializers turned into references into that file, and the bytes left out.

    Only the bytes outside those tensors are read, so the weights' pages are never touched."""
    out: list[bytes] = []
    moved = 0
    for field, wire_type, field_start, value_start, value_end in _fields(buf, 0, len(buf)):
        if field != MODEL_GRAPH or wire_type != LENGTH_DELIMITED:
            out.append(bytes(buf[field_start:value_end]))
            continue
        graph: list[bytes] = []
        for g_field, g_wire, g_start, g_value, g_end in _fields(buf, value_start, value_end):
            if g_field == GRAPH_INITIALIZER and g_wire == LENGTH_DELIMITED:
                replaced = _tensor_without_data(buf, g_value, g_end, location)
                if replaced is not None:
                    tensor, n = replaced
                    moved += n
                    graph.append(key(GRAPH_INITIALIZER, LENGTH_DELIMITED) + varint(len(tensor)) + tensor)
                    continue
            graph.append(bytes(buf[g_start:g_end]))
        body = b"".join(graph)
        out.append(key(MODEL_GRAPH, LENGTH_DELIMITED) + varint(len(body)) + body)
    return b"".join(out), moved


def load_weightless(path: str | os.PathLike) -> tuple[onnx.ModelProto, int]:
    """The model at ``path`` parsed without its inline weights (see the module docstring), and how many
    bytes of weights stayed in the file. Raises ``WireError`` or protobuf's ``DecodeError`` on a file
    that is not a protobuf message."""
    p = Path(path)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise WireError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            data, moved = weightless_bytes(buf, p.name)
    return onnx.ModelProto.FromString(data), moved
