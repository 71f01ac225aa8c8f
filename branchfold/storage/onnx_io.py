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
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from onnx_ir import external_data as ir_external_data

from branchfold.errors import InputError
from branchfold.storage import onnx_weights
from branchfold.storage.onnx_readback import region_problem, resolve, verify_written
from branchfold.storage.onnx_wire import WireError, load_weightless, model_tensors

PROTOBUF_LIMIT = onnx_weights.PROTOBUF_LIMIT  # a serialized ModelProto must stay under 2 GB


def external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors of ``model`` (main graph, subgraphs, functions) whose data lives in external files."""
    return [t for t in model_tensors(model) if uses_external_data(t)]


def external_locations(path: str | os.PathLike) -> list[str]:
    """The data files (as written in the model, one entry per tensor) that the model file at ``path`` keeps
    tensors in. Read without its weights: parsing a 650 MB file with protobuf to answer this would cost
    twice its size in memory."""
    p = Path(path)
    return locations_in(load_weightless(p)[0], p.name)


def locations_in(proto: onnx.ModelProto, name: str) -> list[str]:
    """``external_locations`` of a model file named ``name`` whose graph is ``proto`` (as ``read`` gives it)."""
    return [e.value for t in external_tensors(proto) for e in t.external_data if e.key == "location" and e.value != name]


def has_external_data(path: str | os.PathLike) -> bool:
    """Whether the model file at ``path`` keeps tensors in external data files."""
    return bool(external_locations(path))


def check_external_locations(model: onnx.ModelProto, folder: Path) -> None:
    """Refuse external-data references that a runtime opening the model from ``folder`` could not read:
    outside the folder, to a missing file, past its end (a truncated data file), or of the wrong length."""
    for t in external_tensors(model):
        try:
            resolve(folder, t)
        except ValueError as e:
            raise InputError(f"{e}; the model's data files must lie next to it, as written") from None


def check_file_tensors(model: ir.Model) -> None:
    """The same for a model already in memory: every file-backed tensor must be readable where it points
    (``onnx_ir.load`` resolves them against the model file's folder; a proto's against ``base_dir``)."""
    for t in file_tensors(model):
        length = t.length if t.length is not None else t.nbytes
        problem = region_problem(str(t.name), str(t.location), Path(t.path), t.offset or 0, length)
        if problem:
            raise InputError(f"{problem}; load the model from its own file (onnx_ir.load(path)) or pass base_dir= its folder")


def file_tensors(model: ir.Model) -> list[ir.ExternalTensor]:
    """Every file-backed tensor of ``model``: main-graph initializers and the nested ones."""
    tensors = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    return tensors + [t for _, _, t in onnx_weights.nested_file_tensors(model)]


def set_base_dir(model: ir.Model, folder: str | os.PathLike) -> None:
    """Resolve ``model``'s file-backed tensors against ``folder`` (where its file lies)."""
    ir_external_data.set_base_dir(model.graph, folder)
    for function in model.functions.values():
        for node in function:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    attr.value.base_dir = folder


def data_file_name(output: Path, inputs: list[str] | None = None, input_name: str | None = None) -> str:
    """The name of the output's data file: the input's convention carried over when it had one data file named
    after itself (``model.onnx_data`` for ``model.onnx``, Optimum's; ``model.onnx.data``, torch's), else
    ``<output name>.data``."""
    if inputs and input_name and len(set(inputs)) == 1:
        (only,) = set(inputs)
        if only.startswith(input_name) and only != input_name and "/" not in only and os.sep not in only:
            return output.name + only[len(input_name) :]
    return output.name + ".data"


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
    return read(path)[0]


def read(path: str | os.PathLike) -> tuple[ir.Model, onnx.ModelProto]:
    """``load``, and the file's graph as written without its weights (what the file declares, the data files
    it names), from one scan of the file."""
    p = _checked_path(path)
    try:
        proto, _ = load_weightless(p)
    except (DecodeError, WireError, RuntimeError, ValueError, OSError) as e:
        raise InputError(f"{p} is not a readable ONNX model (truncated or another format): {e}") from None
    _checked_model(proto, p)
    if os.stat(p).st_nlink > 1:  # onnx_ir refuses to map a hard-linked file: read the weights now
        return ir.from_proto(load_model(p)), proto
    model = ir.serde.deserialize_model(proto)
    set_base_dir(model, p.parent)
    return model, proto


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
    data_name: str | None = None,
    check: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` atomically and prove the file holds it; returns the files written.

    ``external_data``: None decides by size (models over ``limit`` are written with their weights in a data
    file beside the model, ``data_name`` or ``<name>.data``). ``model`` itself is not changed. Weights are
    streamed from where they lie (the input file for a model from ``load``), never assembled in memory.

    Before anything is put in place, the staged file is read back from its own folder as a runtime reads it
    and every tensor is compared byte for byte with ``model``'s (``onnx_readback.verify_written``); then
    ``check`` (if given) runs on the staged file's path, e.g. onnxruntime against the original's outputs. If
    either fails, nothing is written and an existing output stays as it was.
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
        staged = onnx_weights.save(graph, tmp / target.name, external_data=external_data, limit=limit, data_name=data_name)
        verify_written(staged[0], graph)
        if check is not None:
            check(staged[0])
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
