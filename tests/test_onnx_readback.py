"""The file written is the model verified: every tensor of a written file reads back, from the file's own folder,
as the bytes of the model that was written; a writer that gets one wrong leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from branchfold.errors import BranchfoldError, InputError
from branchfold.passes.onnx_pipeline import fold_onnx
from branchfold.storage import onnx_io
from branchfold.storage.onnx_readback import WrittenFileMismatch, verify_written

R = np.random.default_rng(0)


def _branches_with_small_tensors(make_onnx) -> onnx.ModelProto:
    """Two parallel MatMuls (folded) beside tensors the fold never touches: a 512-byte float table read by a
    Gather and int64 indices, the kinds the dynamo exporter also stores in its data file."""
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("MatMul", ["x", "w1"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Gather", ["table", "idx"], ["g"], axis=0),
        helper.make_node("Add", ["s", "g"], ["y"]),
    ]
    inits = {
        "w0": R.standard_normal((64, 64)).astype(np.float32),
        "w1": R.standard_normal((64, 64)).astype(np.float32),
        "table": R.standard_normal((2, 64)).astype(np.float32),  # 512 bytes: under the streaming threshold
        "idx": np.array([1, 0, 1], np.int64),
    }
    return make_onnx(nodes, [("x", [3, 64])], [("y", [3, 64])], inits)


def _save_external(proto: onnx.ModelProto, folder: Path, name: str = "m.onnx", data: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(proto, path, save_as_external_data=True, location=data or f"{name}.data", size_threshold=0)
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_small_file_backed_tensors_are_written_with_the_output(make_onnx, tmp_path, monkeypatch):
    """Every tensor of an external-data input is external here, the small float table and int64 indices too.
    A tensor left as a reference would keep its offset into the input's data file, where the output's data
    file now holds other bytes (the dynamo-exported BERT's token_type_embeddings)."""
    src = _save_external(_branches_with_small_tensors(make_onnx), tmp_path / "in")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data is resolved from the model's folder, not the working one
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = fold_onnx(src, output=out)
    assert len(result.report.folded) == 1 and result.report.file_error is not None
    assert sorted(p.name for p in out.parent.iterdir()) == ["folded.onnx", "folded.onnx.data"]
    written = onnx.load(out, load_external_data=False)
    locations = {e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"folded.onnx.data"}
    x = R.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(src, x), rtol=1e-5, atol=1e-5)
    loaded = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(src).graph.initializer}
    for name in ("table", "idx"):
        np.testing.assert_array_equal(loaded[name], original[name])


def test_onnx_ir_model_loaded_elsewhere_folds_from_any_folder(make_onnx, tmp_path, monkeypatch):
    src = _save_external(_branches_with_small_tensors(make_onnx), tmp_path / "models")
    model = ir.load(src)
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    result = fold_onnx(model)
    assert len(result.report.folded) == 1 and result.report.verified


def test_proto_with_external_references_needs_its_folder(make_onnx, tmp_path, monkeypatch):
    src = _save_external(_branches_with_small_tensors(make_onnx), tmp_path / "models")
    proto = onnx.load(src, load_external_data=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="base_dir"):
        fold_onnx(proto)
    result = fold_onnx(proto, base_dir=src.parent)
    assert result.report.verified and len(result.report.folded) == 1


@pytest.mark.parametrize("cut", ["truncated", "missing"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_short_or_missing_data_file_is_one_input_error(make_onnx, tmp_path, cut, verify):
    src = _save_external(_branches_with_small_tensors(make_onnx), tmp_path / "in")
    data = src.with_name("m.onnx.data")
    if cut == "truncated":
        data.write_bytes(data.read_bytes()[:5000])
    else:
        data.unlink()
    with pytest.raises(InputError, match="truncated" if cut == "truncated" else "missing"):
        fold_onnx(src, verify=verify, output=tmp_path / "o.onnx")
    with pytest.raises(InputError):
        fold_onnx(ir.load(src), verify=verify)
    assert not (tmp_path / "o.onnx").exists()


def test_a_wrong_byte_in_the_written_data_is_caught(make_onnx, tmp_path):
    model = ir.from_proto(_branches_with_small_tensors(make_onnx))
    files = onnx_io.save_model(model, tmp_path / "m.onnx", external_data=True)
    assert verify_written(files[0], model) == {"w0": ("m.onnx.data", 0, 16384), "w1": ("m.onnx.data", 16384, 16384)}
    data = bytearray(files[1].read_bytes())
    data[-3] ^= 0xFF
    files[1].write_bytes(bytes(data))
    with pytest.raises(WrittenFileMismatch, match="reads back other bytes"):
        verify_written(files[0], model)


def test_a_reference_into_another_file_is_caught(make_onnx, tmp_path):
    """A stale reference: the written model points at its input's data file, with that file's offsets."""
    src = _save_external(_branches_with_small_tensors(make_onnx), tmp_path)
    model = ir.load(src)
    written = onnx.load(src, load_external_data=False)
    for t in written.graph.initializer:
        for e in t.external_data:
            if e.key == "offset":
                e.value = str(int(e.value) + 64)
    stale = tmp_path / "stale.onnx"
    onnx.save(written, stale)
    with pytest.raises(WrittenFileMismatch):
        verify_written(stale, model)


def test_nothing_is_written_when_the_written_file_fails_its_check(make_onnx, tmp_path, monkeypatch):
    """The byte check and the pipeline's onnxruntime check both run on the staged file before it is put in
    place: a failing check leaves an existing output as it was and no staging folder behind."""
    out = tmp_path / "o.onnx"
    out.write_bytes(b"keep me")
    model = ir.from_proto(_branches_with_small_tensors(make_onnx))

    def refuse(staged: Path) -> None:
        assert staged.is_file() and staged.parent != tmp_path
        raise BranchfoldError("no")

    with pytest.raises(BranchfoldError):
        onnx_io.save_model(model, out, check=refuse)
    assert out.read_bytes() == b"keep me" and sorted(os.listdir(tmp_path)) == ["o.onnx"]

    from branchfold.passes import onnx_pipeline

    real = onnx_pipeline._Checker.check_file

    def off_by_a_lot(self, path):
        outcome = real(self, path)
        return type(outcome)(1.0, outcome.tolerance, False)

    monkeypatch.setattr(onnx_pipeline._Checker, "check_file", off_by_a_lot)
    with pytest.raises(BranchfoldError, match="the file written differs"):
        fold_onnx(_branches_with_small_tensors(make_onnx), output=out)
    assert out.read_bytes() == b"keep me" and sorted(os.listdir(tmp_path)) == ["o.onnx"]


@pytest.mark.parametrize(
    ("inputs", "input_name", "expected"),
    [
        (["model.onnx_data"], "model.onnx", "out.onnx_data"),  # Hugging Face Optimum
        (["m.onnx.data", "m.onnx.data"], "m.onnx", "out.onnx.data"),  # torch
        (["weights.bin"], "m.onnx", "out.onnx.data"),
        (["a.bin", "b.bin"], "m.onnx", "out.onnx.data"),
        (["data/m.onnx.data"], "m.onnx", "out.onnx.data"),
        ([], "m.onnx", "out.onnx.data"),
    ],
)
def test_the_data_file_is_named_after_the_output_in_the_input_convention(inputs, input_name, expected):
    assert onnx_io.data_file_name(Path("x/out.onnx"), inputs, input_name) == expected


@pytest.mark.parametrize("layout", ["subfolder", "two-files", "inline"])
def test_other_tools_layouts_are_written_next_to_the_output(make_onnx, tmp_path, layout):
    """A location in a subfolder, weights split over several data files, or inline weights: the output's
    weights are all in one data file next to it (inline when the input was inline), every reference consistent."""
    proto = _branches_with_small_tensors(make_onnx)
    folder = tmp_path / "in"
    folder.mkdir()
    src = folder / "m.onnx"
    if layout == "inline":
        onnx.save(proto, src)
    else:
        for i, t in enumerate(proto.graph.initializer):
            location = f"data/w{i}.bin" if layout == "subfolder" else f"part{i % 2}.bin"
            (folder / location).parent.mkdir(exist_ok=True)
            onnx.external_data_helper.set_external_data(t, location=location)
        onnx.external_data_helper.write_external_data_tensors(proto, str(folder))
        onnx.save(proto, src)
    out = tmp_path / "out" / "f.onnx"
    out.parent.mkdir()
    fold_onnx(src, output=out)
    expected = ["f.onnx"] if layout == "inline" else ["f.onnx", "f.onnx.data"]
    assert sorted(p.name for p in out.parent.iterdir()) == expected
    x = R.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(out, x), _run(src, x), rtol=1e-5, atol=1e-5)


def test_the_api_takes_a_path_and_writes_a_checked_file(make_onnx, tmp_path, monkeypatch):
    import branchfold

    src = _save_external(_branches_with_small_tensors(make_onnx), tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    result = branchfold.fold_with_report("in/m.onnx", output="f.onnx")
    assert isinstance(result.model, ir.Model) and result.report.written == ["f.onnx", "f.onnx.data"]
    assert result.report.file_error is not None and result.report.file_error <= 1e-5
    x = R.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(tmp_path / "f.onnx", x), _run(src, x), rtol=1e-5, atol=1e-5)


def test_a_big_inline_file_is_checked_from_its_own_bytes(make_onnx, tmp_path, monkeypatch):
    """Past ``WHOLE_FILE_SESSION_BYTES`` the written file is not read whole by onnxruntime: its inline weights
    reach the runtime as regions of the file itself. The check still sees the file's bytes."""
    from branchfold.passes import onnx_pipeline

    monkeypatch.setattr(onnx_pipeline, "WHOLE_FILE_SESSION_BYTES", 0)
    src = tmp_path / "m.onnx"
    onnx.save(_branches_with_small_tensors(make_onnx), src)
    result = fold_onnx(src, output=tmp_path / "f.onnx")
    assert result.report.file_error is not None and result.report.file_error <= 1e-5
    staged = []
    real = onnx_io.load
    monkeypatch.setattr(onnx_io, "load", lambda path: staged.append(Path(path)) or real(path))
    fold_onnx(src, output=tmp_path / "g.onnx")
    (written,) = staged  # the input is read by onnx_io.read; the staged output through its own regions
    assert written.name == "g.onnx" and written.parent.name.startswith(".branchfold-")

