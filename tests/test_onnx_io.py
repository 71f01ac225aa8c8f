"""Big-model I/O: weights stay in their files on load, are streamed on save, and come out byte-identical.

``onnx_wire`` finds each inline weight's bytes in the file without reading them; ``onnx_weights`` keeps
big tensors apart from the graph for snapshots, onnxruntime sessions and writing; ``onnx_io`` puts both
behind ``load`` / ``save_model``. Each test compares with what ``onnx.load`` reads.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from branchfold.passes.onnx_pipeline import fold_onnx
from branchfold.storage import onnx_io
from branchfold.storage.onnx_weights import (
    DATA_ALIGNMENT,
    Snapshot,
    ort_session,
    stand_in_file,
    weightless_proto,
)
from branchfold.storage.onnx_wire import MIN_EXTERNAL_BYTES, load_weightless

R = np.random.default_rng(3)


def _model(make_onnx, width: int = 64) -> onnx.ModelProto:
    """Two parallel MatMuls summed (16 KB weights), a small bias and an int64 shape constant."""
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("MatMul", ["x", "w1"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Add", ["s", "bias"], ["t"]),
        helper.make_node("Reshape", ["t", "shape"], ["y"]),
    ]
    inits = [
        ("w0", R.standard_normal((width, width)).astype(np.float32)),
        ("w1", R.standard_normal((width, width)).astype(np.float32)),
        ("bias", R.standard_normal(width).astype(np.float32)),
        ("shape", np.array([-1, width], dtype=np.int64)),
    ]
    return make_onnx(nodes, [("x", ["N", width])], [("y", ["N", width])], inits)


def _values(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def test_weightless_load_leaves_big_float_weights_in_the_file(make_onnx, tmp_path):
    path = tmp_path / "m.onnx"
    proto = _model(make_onnx)
    onnx.save(proto, path)
    light, moved = load_weightless(path)
    by_name = {t.name: t for t in light.graph.initializer}
    assert moved == 2 * 64 * 64 * 4
    for name in ("w0", "w1"):  # 16 KB each: references into the .onnx itself
        t = by_name[name]
        assert t.data_location == TensorProto.EXTERNAL and not t.raw_data
        refs = {e.key: e.value for e in t.external_data}
        assert refs["location"] == "m.onnx"
        with open(path, "rb") as f:
            f.seek(int(refs["offset"]))
            data = f.read(int(refs["length"]))
        assert np.array_equal(np.frombuffer(data, np.float32).reshape(64, 64), _values(proto)[name])
    assert by_name["bias"].raw_data and by_name["shape"].raw_data  # small, and integer: inline
    assert light.ByteSize() < MIN_EXTERNAL_BYTES * 2


def test_load_then_save_is_byte_identical_in_values(make_onnx, tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    proto = _model(make_onnx)
    onnx.save(proto, path)
    model = onnx_io.load(path)
    assert isinstance(model.graph.initializers["w0"].const_value, ir.ExternalTensor)
    assert onnx_io.save_model(model, out) == [out]
    onnx.checker.check_model(str(out), full_check=True)
    back = onnx.load(out)
    assert not any(t.data_location == TensorProto.EXTERNAL for t in back.graph.initializer)
    assert {k: v.tobytes() for k, v in _values(back).items()} == {k: v.tobytes() for k, v in _values(proto).items()}
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in proto.graph.node]


def test_external_output_is_page_aligned_and_equal(make_onnx, tmp_path):
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    proto = _model(make_onnx)
    onnx.save(proto, path)
    written = onnx_io.save_model(onnx_io.load(path), out, external_data=True)
    assert written == [out, tmp_path / "o.onnx.data"]
    assert onnx_io.has_external_data(out) and not onnx_io.has_external_data(path)  # its own bytes are not
    assert oct(os.stat(written[1]).st_mode & 0o777) == oct(0o666 & ~_umask())  # not the temp file's 0600
    light = onnx.load(out, load_external_data=False)
    for t in light.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            assert int({e.key: e.value for e in t.external_data}["offset"]) % DATA_ALIGNMENT == 0
    assert {k: v.tobytes() for k, v in _values(onnx.load(out)).items()} == {
        k: v.tobytes() for k, v in _values(proto).items()
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_snapshot_copies_share_the_tensors_and_carry_shapes(make_onnx):
    proto = _model(make_onnx)
    source = ir.from_proto(proto)
    snap = Snapshot(source)
    a, b = snap.model(), snap.model()
    assert a is not b and a.graph.initializers["w0"].const_value is source.graph.initializers["w0"].const_value
    assert len(snap.data) < 2 * 64 * 64 * 4  # the weights are not in it
    assert a.graph.node(2).outputs[0].shape is not None  # inferred once, on the weightless graph
    light, tensors = weightless_proto(source)
    assert set(tensors) == {"w0", "w1"} and source.graph.initializers["w0"].const_value is tensors["w0"]


def test_session_reads_file_weights_in_place_and_takes_folded_ones_as_inputs(make_onnx, tmp_path):
    path = tmp_path / "m.onnx"
    proto = _model(make_onnx)
    onnx.save(proto, path)
    folded = fold_onnx(onnx_io.load(path), verify=False).model
    assert any(not isinstance(v.const_value, ir.ExternalTensor) for v in folded.graph.initializers.values())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort_session(folded, options, weights="inputs")
    assert [i.name for i in session.get_inputs()] == ["x"]
    x = R.standard_normal((3, 64)).astype(np.float32)
    reference = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], reference.run(None, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_stand_ins_hand_the_runtime_no_copy_of_the_folded_weights(make_onnx, tmp_path):
    """For a session that is only optimized, the weights a fold wrote refer to a region of a data file of
    the model; as initializers they are OrtValues (copied by onnxruntime). Here the fold replaced every
    file-backed weight, so the file is the original's; without it, the folded weight goes as a value."""
    path = tmp_path / "m.onnx"
    onnx.save(_model(make_onnx), path)
    original = onnx_io.load(path)
    folded = fold_onnx(original, verify=False).model
    stand_in = stand_in_file(original)
    assert stand_in is not None and (stand_in.folder, stand_in.location) == (str(tmp_path), "m.onnx")
    assert stand_in_file(folded) is None  # w0 and w1 were file-backed; the folded weight is in memory

    def values(**how) -> int:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort_session(folded, options, **how)
        assert [i.name for i in session.get_inputs()] == ["x"]
        return len(session.session._branchfold_values)

    assert values(weights="stand-ins", stand_in=stand_in) == 0
    assert values(weights="stand-ins") == 1  # no file of its own: the folded w0 + w1 as a value
    assert values(weights="initializers", stand_in=stand_in) == 1


def test_in_place_fold_of_a_lazily_loaded_file(make_onnx, tmp_path):
    path = tmp_path / "m.onnx"
    proto = _model(make_onnx)
    onnx.save(proto, path)
    result = fold_onnx(onnx_io.load(path))  # verified
    assert result.report.verified and len(result.report.folded) == 1
    onnx_io.save_model(result.model, path)  # over the file its weights are mapped from
    folded = onnx.load(path)
    assert [n.op_type for n in folded.graph.node] == ["Gemm", "Reshape"]  # both MatMuls and the bias
    x = R.standard_normal((2, 64)).astype(np.float32)
    run = lambda m: ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]  # noqa: E731
    np.testing.assert_allclose(run(folded), run(proto), rtol=1e-4, atol=1e-4)


def test_hard_linked_input_is_read_whole(make_onnx, tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(make_onnx), path)
    os.link(path, tmp_path / "again.onnx")  # onnx_ir refuses to map such a file
    model = onnx_io.load(path)
    assert not isinstance(model.graph.initializers["w0"].const_value, ir.ExternalTensor)
    assert fold_onnx(model).report.verified


@pytest.mark.parametrize("cut", [0, 17, 200])
def test_truncated_or_empty_files_are_one_input_error(make_onnx, tmp_path, cut):
    path = tmp_path / "m.onnx"
    path.write_bytes(_model(make_onnx).SerializeToString()[:cut])
    with pytest.raises(onnx_io.InputError, match="ONNX model"):
        onnx_io.load(path)
