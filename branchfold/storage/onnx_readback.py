"""Reading a written ONNX file back the way a runtime reads it, and proving it holds the model that was checked.

A check of the model in memory says nothing about the file: a tensor reference left with an offset into
another data file, a data file named after the input, a stale length — each reads back as other bytes, and
no in-memory check can see it. So after writing, every tensor of the file is resolved from the file's own
folder (``location``, ``offset``, ``length``, or the inline bytes a protobuf parser would take) and compared
byte for byte with the tensor the model in memory holds. The numerical check of the written file
(onnxruntime opening it from its path) is the pipeline's; this module is the part every writer runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from branchfold.errors import BranchfoldError
from branchfold.storage.onnx_wire import load_weightless, model_tensors

CHUNK_BYTES = 2**20  # small enough that the heap reuses each chunk's memory for the next


class WrittenFileMismatch(BranchfoldError):
    """The file written does not read back as the model that was written (a writer bug, never a user's)."""


def expected_bytes(tensor: onnx.TensorProto) -> int | None:
    """The byte length ``tensor``'s dims and type call for (None for packed sub-byte and string types)."""
    try:
        dtype = ir.DataType(tensor.data_type)
    except ValueError:
        return None
    if dtype == ir.DataType.STRING or dtype.bitwidth % 8:
        return None
    return int(np.prod(tensor.dims, dtype=np.int64)) * dtype.bitwidth // 8


def reference(tensor: onnx.TensorProto) -> tuple[str, int, int | None]:
    """``(location, offset, length)`` of an external tensor (length None when the file does not say)."""
    entries = {e.key: e.value for e in tensor.external_data}
    length = entries.get("length")
    return entries.get("location", ""), int(entries.get("offset", 0) or 0), int(length) if length else None


def resolve(folder: Path, tensor: onnx.TensorProto) -> tuple[Path, int, int]:
    """Where an external tensor's bytes lie, resolved as runtimes do: from the model file's own folder, never
    outside it, inside the file. Raises ``ValueError`` with the reason otherwise."""
    location, offset, length = reference(tensor)
    need = expected_bytes(tensor)
    if length is None:
        length = need
    if length is None:
        raise ValueError(f"tensor {tensor.name!r} in {location!r} has no length and a type without a fixed size")
    root = folder.resolve()
    path = (root / location).resolve()
    if not location or Path(location).is_absolute() or not path.is_relative_to(root):
        raise ValueError(f"tensor {tensor.name!r} points to {location!r}, outside the model's folder")
    problem = region_problem(tensor.name, location, path, offset, length)
    if problem:
        raise ValueError(problem)
    if need is not None and length != need:
        raise ValueError(f"tensor {tensor.name!r} is {length} bytes in {location!r}, its shape and type need {need}")
    return path, offset, length


def region_problem(name: str, location: str, path: Path, offset: int, length: int) -> str | None:
    """Why bytes ``offset..offset + length`` of the data file ``path`` cannot be read for tensor ``name``, or
    None: the file is missing, or ends before them (truncated, or another model's)."""
    if not path.is_file():
        return f"tensor {name!r} points to {location!r}, which is missing in {path.parent}"
    size = path.stat().st_size
    if offset < 0 or offset + length > size:
        return (
            f"tensor {name!r} needs bytes {offset}..{offset + length} of {location!r}, which has {size}: "
            "the data file is truncated or belongs to another model"
        )
    return None


class _Files:
    """Open files read with ``os.pread`` into short-lived chunks: nothing is mapped, so comparing a 2 GB model
    adds no resident pages to this process (a mapping would keep every page it read)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}

    def read(self, path: str | os.PathLike, offset: int, length: int) -> bytes:
        key = os.fspath(path)
        if key not in self.fds:
            self.fds[key] = os.open(key, os.O_RDONLY)
        data = os.pread(self.fds[key], length, offset)
        if len(data) != length:
            raise ValueError(f"{key} ends before byte {offset + length}")
        return data

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def _expected_chunks(tensor: ir.TensorProtocol, files: _Files) -> Iterator[bytes | memoryview]:
    """``tensor``'s serialized bytes in chunks: a file-backed tensor read from its file region, one that
    computes its bytes in blocks (``byte_blocks``: a folded weight, never held whole) block by block, computed
    as when it was written; any other serialized once."""
    if isinstance(tensor, ir.ExternalTensor):
        offset, length = tensor.offset or 0, tensor.length if tensor.length is not None else tensor.nbytes
        for start in range(0, length, CHUNK_BYTES):
            yield files.read(tensor.path, offset + start, min(CHUNK_BYTES, length - start))
        return
    blocks = getattr(tensor, "byte_blocks", None)
    if blocks is not None:
        yield from blocks()
        return
    yield tensor.tobytes()


def _same(read_written, length: int, tensor: ir.TensorProtocol, files: _Files) -> bool:
    """Whether the ``length`` written bytes (``read_written(offset, n)``) are ``tensor``'s serialized bytes."""
    start = 0
    for chunk in _expected_chunks(tensor, files):
        if start + len(chunk) > length or read_written(start, len(chunk)) != chunk:
            return False
        start += len(chunk)
    return start == length


def _inline_bytes(tensor: onnx.TensorProto) -> bytes:
    """The bytes an inline tensor holds, serialized as ``tobytes`` writes them (raw, little-endian)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return ir.serde.TensorProtoTensor(tensor).tobytes()


def verify_written(path: str | os.PathLike, model: ir.Model) -> dict[str, tuple[str, int, int]]:
    """Check that the ONNX file at ``path`` holds ``model``'s main-graph initializers byte for byte, every
    reference resolving inside the file's folder, and that no other tensor of the file is left external
    (the writer writes those inline). Returns where each initializer that is not inline in the graph lies,
    ``{name: (file name, offset, length)}`` (a big inline one: a region of the model file itself); raises
    ``WrittenFileMismatch``."""
    p = Path(path)
    try:
        proto, _ = load_weightless(p)  # inline weights become references into the file itself
    except Exception as e:  # protobuf and the wire scanner raise their own types
        raise WrittenFileMismatch(f"the file written to {p} does not parse as ONNX ({e})") from None
    expected = model.graph.initializers
    written = {t.name: t for t in proto.graph.initializer}
    if set(written) != set(expected):
        missing, extra = sorted(set(expected) - set(written)), sorted(set(written) - set(expected))
        raise WrittenFileMismatch(f"the file written to {p} has other initializers (missing {missing[:3]}, extra {extra[:3]})")
    stray = [t.name for t in model_tensors(proto, main_initializers=False) if t.data_location == onnx.TensorProto.EXTERNAL]
    if stray:
        raise WrittenFileMismatch(f"the file written to {p} keeps external references outside its initializers: {stray[:3]}")
    files = _Files()
    regions: dict[str, tuple[str, int, int]] = {}
    try:
        for name, t_proto in written.items():
            tensor = expected[name].const_value
            if tensor is None:
                raise WrittenFileMismatch(f"initializer {name!r} has no value in the model that was written")
            if t_proto.data_location == onnx.TensorProto.EXTERNAL:
                try:
                    where, offset, length = resolve(p.parent, t_proto)
                except ValueError as e:
                    raise WrittenFileMismatch(f"the file written to {p}: {e}") from None
                ok = _same(lambda at, n, w=where, o=offset: files.read(w, o + at, n), length, tensor, files)
                regions[name] = (where.name, offset, length)
            else:
                inline = memoryview(_inline_bytes(t_proto))
                ok = _same(lambda at, n, b=inline: b[at : at + n], len(inline), tensor, files)
            if not ok:
                raise WrittenFileMismatch(f"tensor {name!r} of the file written to {p} reads back other bytes than were written")
    finally:
        files.close()
    return regions
