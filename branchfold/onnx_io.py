"""Reading and writing ONNX files safely and at I/O speed: clear errors, external data, atomic writes.

``load`` reads the graph and leaves the weights in the file: inline weights are located by a scan of
the protobuf (``onnx_wire``) and external data files are mapped by ``onnx_ir``, so a 650 MB model opens
in a fraction of a second and only the weights a fold reads are ever paged in. ``save_model`` streams
each weight from where it lies into a temporary folder beside the target and renames the files into
place, so a failure leaves an existing output as it was. Folding in place is safe: the input's data is
still mapped (its old inode) while the new file replaces it, and nothing reads the input after that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from onnx_ir import external_data as ir_external_data

from branchfold import onnx_weights
from branchfold.errors import InputError
from branchfold.onnx_wire import WireError, load_weightless

PROTOBUF_LIMIT = onnx_weights.PROTOBUF_LIMIT  # a serialized ModelProto must stay under 2 GB


def _graph_tensors(graph: onnx.GraphProto | onnx.FunctionProto) -> Iterator[onnx.TensorProto]:
    """Initializers and attribute tensors of a graph and of the subgraphs (If/Loop/Scan bodies) in it."""
    yield from getattr(graph, "initializer", ())
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors of ``model`` (main graph, subgraphs, functions) whose data lives in external files."""
    found = list(_graph_tensors(model.graph))
    for function in model.functions:
        found += _graph_tensors(function)
    return [t for t in found if uses_external_data(t)]


def has_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` keeps tensors in external data files. Read without its weights:
    parsing a 650 MB file with protobuf to answer this would cost twice its size in memory."""
    p = Path(path)
    proto, _ = load_weightless(p)
    return any(e.key == "location" and e.value != p.name for t in external_tensors(proto) for e in t.external_data)


def check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data locations that would read outside the model's own folder."""
    root = folder.resolve()
    for t in external_tensors(model):
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        target = (root / location).resolve()
        if Path(location).is_absolute() or not target.is_relative_to(root):
            raise InputError(
                f"tensor {t.name!r} points to external data {location!r} outside the model's folder; "
                "move the data file next to the model"
            )
        if not target.is_file():
            raise InputError(f"external data file {location!r} of tensor {t.name!r} is missing in {root}")


def _checked_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {p}")
    if not p.is_file():
        raise InputError(f"not a file: {p}")
    return p


def _checked_model(model: onnx.ModelProto, p: Path) -> None:
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise InputError(f"{p} is not an ONNX model (no graph, IR version or opset)")
    check_external_locations(model, p.parent)


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file as an ``onnx_ir`` model whose weights stay in their files (memory-mapped when
    read), or raise one readable InputError."""
    p = _checked_path(path)
    try:
        proto, _ = load_weightless(p)
    except (DecodeError, WireError, RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{p} is not a readable ONNX model (truncated or another format): {e}") from None
    _checked_model(proto, p)
    if os.stat(p).st_nlink > 1:  # onnx_ir refuses to map a hard-linked file: read the weights now
        return ir.from_proto(load_model(p))
    model = ir.serde.deserialize_model(proto)
    ir_external_data.set_base_dir(model.graph, p.parent)
    return model


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with its external data into one ``onnx.ModelProto``, or raise one readable
    InputError (for callers that need a proto; ``load`` is the fast way)."""
    p = _checked_path(path)
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{p} is not a readable ONNX model (truncated or another format): {e}") from None
    _checked_model(model, p)
    if external_tensors(model):
        try:
            load_external_data_for_model(model, str(p.parent))
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the external data of {p}: {e}") from None
    return model


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return os.path.samefile(pa, pb)
    return pa.resolve() == pb.resolve()


def needs_external_data(model: onnx.ModelProto | ir.Model, limit: int = PROTOBUF_LIMIT) -> bool:
    """Whether ``model`` is too large for one protobuf (``ByteSize`` itself fails past 2 GB)."""
    if isinstance(model, ir.Model):
        return onnx_weights.model_bytes(model) >= limit
    try:
        return model.ByteSize() >= limit
    except Exception:  # protobuf raises EncodeError (or ValueError) for a message past what it can size
        return True


def save_model(
    model: onnx.ModelProto | ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    limit: int = PROTOBUF_LIMIT,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    ``external_data``: None decides by size (models over ``limit`` are written with their weights in
    ``<name>.data`` beside the model). ``model`` itself is not changed. Weights are streamed from where
    they lie (the input file for a model from ``load``), never assembled in memory.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"output path {target} is a folder")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist")
    graph = ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model
    tmp = Path(tempfile.mkdtemp(prefix=".branchfold-", dir=folder))
    try:
        staged = onnx_weights.save(graph, tmp / target.name, external_data=external_data, limit=limit)
        mode = 0o666 & ~_umask()
        written = []
        for f in staged:
            os.chmod(f, mode)
            os.replace(f, target.with_name(f.name))
            written.append(target.with_name(f.name))
        return written
    except OSError as e:
        raise InputError(f"cannot write {target}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
