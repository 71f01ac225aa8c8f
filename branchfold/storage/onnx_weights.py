"""An ONNX model's big tensors kept where they are: in the file they came from, or in memory, never copied
to serialize the model around them.

Everything the ONNX fold does with a model besides reading a few region weights — snapshotting it for the
undo path, shape inference, onnxruntime sessions for the checks, writing the result — needs the graph,
not the weights. ``weightless_proto`` serializes a model with each big float initializer replaced by a
placeholder reference (dims and type, no data), and hands back the tensors apart:

- ``Snapshot``: the weightless model (with shapes inferred once) plus the tensors; each ``model()`` is a
  fresh ``ir.Model`` sharing the same (immutable) tensor objects.
- ``ort_session``: onnxruntime reads file-backed tensors from their files itself (memory-mapped by the
  runtime, no copy in this process) and takes in-memory ones as ``OrtValue``s.
- ``save``: the file is written in one pass, each tensor streamed from where it lies (``copy_file_range``
  for a file-backed one), inline in the ``.onnx`` when the model fits one protobuf, else to ``.onnx.data``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from branchfold.storage.onnx_wire import LENGTH_DELIMITED, MIN_EXTERNAL_BYTES, TENSOR_RAW_DATA, key, varint

PLACEHOLDER = "<branchfold-weight>"
PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto must stay under 2 GB
DATA_ALIGNMENT = 4096  # external data offsets on page boundaries: onnxruntime can map them
FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16}
_ORT_VALUE_TYPES = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}


def big_initializers(model: ir.Model) -> list[ir.Value]:
    """The main graph's initializers whose bytes the writer streams rather than serializes: every one that
    lies in a file (whatever its size and dtype: a reference left as it is would point into a data file the
    output does not have) and every in-memory float one of at least ``MIN_EXTERNAL_BYTES``, in graph order."""
    return [
        v
        for v in model.graph.initializers.values()
        if v.const_value is not None
        and (
            isinstance(v.const_value, ir.ExternalTensor)
            or (v.const_value.dtype in FLOATS and v.const_value.nbytes >= MIN_EXTERNAL_BYTES)
        )
    ]


def graphs(graph: ir.Graph | ir.Function) -> Iterator[ir.Graph | ir.Function]:
    """``graph`` and every subgraph (If/Loop/Scan bodies) in it, at any depth."""
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield from graphs(attr.value)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    yield from graphs(sub)


def nested_file_tensors(model: ir.Model) -> list[tuple[object, str, ir.ExternalTensor]]:
    """File-backed tensors that are not main-graph initializers (subgraph initializers, ``Constant`` and
    other attribute tensors, functions' attributes), as ``(owner, key, tensor)``: the writer streams only
    main-graph initializers, so these are written inline."""
    found: list[tuple[object, str, ir.ExternalTensor]] = []
    roots: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for root in roots:
        for g in graphs(root):
            if g is not model.graph and isinstance(g, ir.Graph):
                for name, v in g.initializers.items():
                    if isinstance(v.const_value, ir.ExternalTensor):
                        found.append((v, name, v.const_value))
            for node in g:
                for name, attr in node.attributes.items():
                    if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                        found.append((node, name, attr.value))
    return found


@contextlib.contextmanager
def _placeholders(model: ir.Model) -> Iterator[dict[str, ir.TensorProtocol]]:
    """The streamed initializers' tensors (``big_initializers``), their values replaced meanwhile by
    placeholders that serialize to dims and type only, and every other file-backed tensor read into memory
    (restored on exit, so the model is as it was)."""
    swapped: dict[str, tuple[ir.Value, ir.TensorProtocol]] = {}
    inlined: list[tuple[object, str, ir.ExternalTensor]] = []
    try:
        for v in big_initializers(model):
            t = v.const_value
            assert t is not None and v.name is not None
            swapped[v.name] = (v, t)
            v.const_value = ir.ExternalTensor(PLACEHOLDER, 0, t.nbytes, t.dtype, shape=ir.Shape(t.shape), name=v.name)
        for owner, key, t in nested_file_tensors(model):
            inlined.append((owner, key, t))
            _set_nested(owner, key, ir.Tensor(t.numpy(), dtype=t.dtype, name=t.name))
        yield {name: t for name, (_, t) in swapped.items()}
    finally:
        for v, t in swapped.values():
            v.const_value = t
        for owner, key, t in inlined:
            _set_nested(owner, key, t)


def _set_nested(owner: object, key: str, tensor: ir.TensorProtocol) -> None:
    if isinstance(owner, ir.Node):
        owner.attributes[key] = ir.AttrTensor(key, tensor)
    else:
        assert isinstance(owner, ir.Value)
        owner.const_value = tensor


def weightless_proto(model: ir.Model) -> tuple[onnx.ModelProto, dict[str, ir.TensorProtocol]]:
    """``model`` serialized without its big tensors (placeholder references), and those tensors by name."""
    with _placeholders(model) as tensors:
        proto = ir.to_proto(model)
    return proto, tensors


def _clear_reference(t: onnx.TensorProto) -> None:
    del t.external_data[:]
    t.ClearField("data_location")


def _refer(t: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = k, v
    t.data_location = onnx.TensorProto.EXTERNAL


# ----------------------------------------------------------------------------------------------
# snapshots


def drop_pages(tensors: Iterable[ir.TensorProtocol]) -> None:
    """Drop from this process the pages of the memory-mapped tensors among ``tensors`` that were read
    (clean file pages: they stay mapped and are read again from the page cache if needed)."""
    for t in tensors:
        mapped = getattr(t, "raw", None) if isinstance(t, ir.ExternalTensor) else None
        if isinstance(mapped, mmap.mmap) and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)


def return_freed_memory() -> None:
    """Give the heap's free memory back to the system. A fold's float64 temporaries are tens of MB each;
    glibc raises its mmap threshold after freeing such blocks, so later ones come from the heap and stay
    in this process once freed (about 60 MB after GPT-2's 24 LayerNorm folds). No-op off glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None


INFERENCE_INLINE_BYTES = 2**16  # file-backed tensors this small are read for shape inference (shape constants)


def _inline_small(proto: onnx.ModelProto, tensors: dict[str, ir.TensorProtocol]) -> None:
    """Give shape inference the values of the small file-backed tensors (the dynamo exporter stores shape
    constants in its data file); the snapshot's models get the file-backed tensor objects back."""
    for t_proto in proto.graph.initializer:
        t = tensors.get(t_proto.name)
        if t is not None and (t.dtype not in FLOATS or t.nbytes < MIN_EXTERNAL_BYTES) and t.nbytes <= INFERENCE_INLINE_BYTES:
            _clear_reference(t_proto)
            t_proto.raw_data = t.tobytes()


class Snapshot:
    """A model to fold again and again: its graph serialized once without the big tensors, with shapes
    inferred once (ONNX shape inference on the weightless graph costs a fraction of a second on GPT-2)."""

    def __init__(self, model: ir.Model, infer_shapes: bool = True) -> None:
        proto, self.tensors = weightless_proto(model)
        if infer_shapes:
            _inline_small(proto, self.tensors)
            # best effort, as onnx_ir's ShapeInferencePass: the fold refuses what it cannot see
            with contextlib.suppress(Exception):
                proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False, data_prop=True)
        self.data = proto.SerializeToString()

    def release(self) -> None:
        """Drop the pages of the file-backed weights a fold read from this process (they stay mapped, and
        are read again from the page cache if a later fold needs them), so region weights are resident
        one fold at a time."""
        drop_pages(self.tensors.values())
        return_freed_memory()

    def model(self) -> ir.Model:
        """A fresh model: its own graph, the snapshot's tensors (never written to)."""
        fresh = ir.serde.deserialize_model(onnx.ModelProto.FromString(self.data))
        for name, tensor in self.tensors.items():
            fresh.graph.initializers[name].const_value = tensor
        return fresh


# ----------------------------------------------------------------------------------------------
# onnxruntime


class Session:
    """An onnxruntime session whose in-memory weights are fed as inputs on every run (``run``,
    ``get_inputs`` as ``onnxruntime.InferenceSession``'s, without those weights)."""

    def __init__(self, session, weights: dict[str, np.ndarray]) -> None:
        self.session, self.weights = session, weights

    def get_inputs(self) -> list:
        return [i for i in self.session.get_inputs() if i.name not in self.weights]

    def run(self, outputs, feed: dict[str, np.ndarray]) -> list:
        return self.session.run(outputs, {**feed, **self.weights})


WeightsMode = Literal["initializers", "inputs", "stand-ins"]


@dataclass(frozen=True)
class StandInFile:
    """A data file whose regions stand in for weights a fold wrote (``ort_session(weights="stand-ins")``)."""

    folder: str
    location: str
    size: int


def stand_in_file(model: ir.Model) -> StandInFile | None:
    """The longest data file ``model``'s file-backed weights lie in (in their most common folder)."""
    tensors = [t for t in (v.const_value for v in big_initializers(model)) if isinstance(t, ir.ExternalTensor)]
    folder = _common_folder(tensors)
    sizes = {}
    for t in tensors:
        if os.path.abspath(t.base_dir) == folder:
            with contextlib.suppress(OSError):
                sizes[str(t.location)] = os.path.getsize(os.path.join(folder, str(t.location)))
    if not sizes:
        return None
    location, size = max(sizes.items(), key=lambda item: item[1])
    return StandInFile(folder, location, size)


def _common_folder(tensors: Iterable[ir.TensorProtocol]) -> str | None:
    folders = [os.path.abspath(t.base_dir) for t in tensors if isinstance(t, ir.ExternalTensor)]
    return max(set(folders), key=folders.count) if folders else None


def ort_session(
    model: ir.Model,
    options,
    weights: WeightsMode = "initializers",
    stand_in: StandInFile | None = None,
    infer_shapes: bool = False,
):
    """An onnxruntime CPU session for ``model`` without serializing its big tensors: file-backed ones are
    read by the runtime from their file (one folder, memory-mapped, no copy here).

    ``weights`` says how the in-memory ones (the weights a fold wrote) reach the runtime:

    - ``"initializers"``: ``OrtValue``s, which onnxruntime copies (GPT-2's 24 folded weights: 190 MB more);
      what an optimizing session that is run needs, as its optimizer must see them as constants.
    - ``"inputs"``: declared graph inputs, fed on every run, which costs no copy; for a session that
      optimizes nothing (an input and an initializer then run the same kernels).
    - ``"stand-ins"``: for a session that is never run and only has its graph optimized (the runtime
      guard). Each refers to a region of the same length in a data file of the model (``stand_in``, by
      default ``stand_in_file(model)``; the original's, when the fold replaced every file-backed weight),
      so nothing is copied: the graph optimizer's fusions match op types, shapes and small constants
      (scalars, axes, epsilons: under ``MIN_EXTERNAL_BYTES``, passed as they are), never the values of a
      big float weight. Where no such file region is long enough, a tensor goes as an initializer.

    ``infer_shapes``: give the runtime the graph's shapes (inferred on the weightless graph) for a session
    that is run to check numbers: the model as written declares only the input's own types, and a session
    that knows no intermediate shape plans its memory worse (ViT-B/16: 230 MB more)."""
    import onnxruntime as ort

    proto, tensors = weightless_proto(model)
    if infer_shapes:  # best effort: a session that knows its shapes plans its memory (ViT-B: 230 MB less)
        with contextlib.suppress(Exception):
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    folder = _common_folder(tensors.values())
    if weights == "stand-ins":
        stand_in = stand_in or stand_in_file(model)
        if stand_in is not None and folder not in (None, stand_in.folder):
            stand_in = None  # onnxruntime reads external data from one folder
        folder = stand_in.folder if stand_in is not None else folder
    else:
        stand_in = None
    names, values, fed = [], [], {}
    kept = []
    for t_proto in proto.graph.initializer:
        t = tensors.get(t_proto.name)
        if t is None:
            kept.append(t_proto)
        elif isinstance(t, ir.ExternalTensor) and os.path.abspath(t.base_dir) == folder:
            _refer(t_proto, str(t.location), t.offset or 0, t.length or t.nbytes)
            kept.append(t_proto)
        elif stand_in is not None and t.dtype in FLOATS and MIN_EXTERNAL_BYTES <= t.nbytes <= stand_in.size:
            _refer(t_proto, stand_in.location, 0, t.nbytes)
            kept.append(t_proto)
        elif t.dtype in _ORT_VALUE_TYPES and weights == "inputs":
            fed[t_proto.name] = np.ascontiguousarray(t.numpy())
            proto.graph.input.append(onnx.helper.make_tensor_value_info(t_proto.name, t_proto.data_type, list(t_proto.dims)))
        elif t.dtype in _ORT_VALUE_TYPES:
            names.append(t_proto.name)
            values.append(ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(t.numpy())))
            kept.append(t_proto)
        else:  # bfloat16 has no numpy type onnxruntime takes: inline
            _clear_reference(t_proto)
            t_proto.raw_data = t.tobytes()
            kept.append(t_proto)
    if fed:
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    if names:
        options.add_external_initializers(names, values)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session._branchfold_values = values  # the runtime may read them until the session is gone
    return Session(session, fed)


# ----------------------------------------------------------------------------------------------
# writing


def model_bytes(model: ir.Model) -> int:
    """The size of ``model`` serialized as one protobuf (weightless graph plus the big tensors' bytes)."""
    return _serialized_size(*weightless_proto(model))


def _serialized_size(proto: onnx.ModelProto, tensors: dict[str, ir.TensorProtocol]) -> int:
    return proto.ByteSize() + sum(t.nbytes + 32 for t in tensors.values())


def save(
    model: ir.Model,
    path: str | os.PathLike,
    external_data: bool | None = None,
    limit: int = PROTOBUF_LIMIT,
    data_name: str | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` (not atomically: ``onnx_io.save_model`` stages it); returns the files.

    ``external_data``: None puts the streamed tensors (``big_initializers``: the file-backed ones and the big
    in-memory ones) in ``data_name`` (default ``<name>.data``) beside ``path`` only when the model does not fit
    one protobuf (``limit`` bytes). ``model`` is not changed (placeholders are swapped in and out while it is
    serialized)."""
    target = Path(path)
    proto, tensors = weightless_proto(model)
    if external_data is None:
        external_data = _serialized_size(proto, tensors) >= limit
    if external_data:
        data = target.with_name(data_name or target.name + ".data")
        _write_external(proto, tensors, target, data)
        return [target, data] if tensors else [target]
    _write_inline(proto, tensors, target)
    return [target]


def _write_external(proto: onnx.ModelProto, tensors: dict[str, ir.TensorProtocol], target: Path, data: Path) -> None:
    if not tensors:
        target.write_bytes(proto.SerializeToString())
        return
    with open(data, "wb") as f:
        for t_proto in proto.graph.initializer:
            t = tensors.get(t_proto.name)
            if t is None:
                continue
            offset = -(-f.tell() // DATA_ALIGNMENT) * DATA_ALIGNMENT
            f.write(b"\0" * (offset - f.tell()))
            f.flush()
            t.tofile(f)
            f.seek(0, os.SEEK_END)
            _refer(t_proto, data.name, offset, t.nbytes)
            if f.tell() != offset + t.nbytes:
                raise OSError(f"wrote {f.tell() - offset} bytes of tensor {t_proto.name!r}, expected {t.nbytes}")
    target.write_bytes(proto.SerializeToString())


def _write_inline(proto: onnx.ModelProto, tensors: dict[str, ir.TensorProtocol], target: Path) -> None:
    """One protobuf, written in one pass: the graph's other fields, then its initializers in their order,
    each big one as its header and its bytes streamed in as ``raw_data`` (lengths are known up front, so
    nothing is assembled in memory). Protobuf reads fields in any order, so the model parses as it was."""
    entries: list[tuple[bytes, ir.TensorProtocol | None, int]] = []
    for t_proto in proto.graph.initializer:
        if t_proto.name not in tensors:
            body = t_proto.SerializeToString()
            entries.append((key(5, LENGTH_DELIMITED) + varint(len(body)) + body, None, 0))
            continue
        _clear_reference(t_proto)
        header = t_proto.SerializeToString() + key(TENSOR_RAW_DATA, LENGTH_DELIMITED)
        n = tensors[t_proto.name].nbytes
        inner = len(header) + len(varint(n)) + n
        entries.append((key(5, LENGTH_DELIMITED) + varint(inner) + header + varint(n), tensors[t_proto.name], n))
    del proto.graph.initializer[:]
    graph = proto.graph.SerializeToString()
    proto.ClearField("graph")
    head = proto.SerializeToString()
    graph_length = len(graph) + sum(len(prefix) + n for prefix, _, n in entries)
    with open(target, "wb") as f:
        f.write(head + key(7, LENGTH_DELIMITED) + varint(graph_length) + graph)
        for prefix, tensor, n in entries:
            f.write(prefix)
            if tensor is None:
                continue
            start = f.tell()
            f.flush()
            tensor.tofile(f)
            f.seek(0, os.SEEK_END)
            if f.tell() != start + n:
                raise OSError(f"wrote {f.tell() - start} bytes of a tensor, expected {n}")
