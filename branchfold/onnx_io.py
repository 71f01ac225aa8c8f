"""Reading and writing ONNX files safely: clear errors, external data, atomic writes.

A model file is read whole (external tensors included) before anything is written, so writing the
result over the input (in-place) cannot read half-written data. Writes go to a temporary folder beside
the target and are renamed into place, so a failure leaves an existing output file as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model, uses_external_data

from branchfold.errors import InputError

PROTOBUF_LIMIT = 2**31 - 1  # a serialized ModelProto must stay under 2 GB


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
    """Whether the model file at ``path`` keeps tensors in external data files (read without them)."""
    return bool(external_tensors(onnx.load(str(path), load_external_data=False)))


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


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file with its external data, or raise one readable InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"no such file: {p}")
    if not p.is_file():
        raise InputError(f"not a file: {p}")
    try:
        model = onnx.load(str(p), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{p} is not a readable ONNX model (truncated or another format): {e}") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise InputError(f"{p} is not an ONNX model (no graph, IR version or opset)")
    check_external_locations(model, p.parent)
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


def needs_external_data(model: onnx.ModelProto, limit: int = PROTOBUF_LIMIT) -> bool:
    try:
        return model.ByteSize() >= limit
    except (ValueError, OverflowError):
        return True


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
    limit: int = PROTOBUF_LIMIT,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    ``external_data``: None decides by size (models over ``limit`` are written with their weights in
    ``<name>.data`` beside the model). ``model`` itself is not changed.
    """
    target = Path(path)
    if target.is_dir():
        raise InputError(f"output path {target} is a folder")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise InputError(f"output folder {folder} does not exist")
    if external_data is None:
        external_data = needs_external_data(model, limit)
    tmp = Path(tempfile.mkdtemp(prefix=".branchfold-", dir=folder))
    try:
        written = [target]
        staged = tmp / target.name
        if external_data:
            data_name = target.name + ".data"
            proto = onnx.ModelProto()
            proto.CopyFrom(model)  # convert_model_to_external_data edits the proto it is given
            onnx.external_data_helper.convert_model_to_external_data(
                proto, all_tensors_to_one_file=True, location=data_name, size_threshold=1024
            )
            onnx.save_model(proto, str(staged))
            written.append(target.with_name(data_name))
            if (tmp / data_name).exists():
                os.replace(tmp / data_name, written[1])
            else:
                written.pop()
        else:
            with open(staged, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(staged, target)
        return written
    except OSError as e:
        raise InputError(f"cannot write {target}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
