"""Folded ONNX weights computed as they are written (``onnx_folded``): the same bytes as computing them
whole, written a block at a time, never computed whole by an unverified fold, compared and de-duplicated
without being computed, and no memory that grows with the folded weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from branchfold.passes.onnx_pipeline import fold_onnx
from branchfold.rewriter.rounding import RoundedRows
from branchfold.storage import onnx_folded, onnx_io
from branchfold.storage.onnx_folded import FoldedTensor, fingerprint, same_bytes
from branchfold.storage.onnx_wire import MIN_EXTERNAL_BYTES

ROOT = Path(__file__).resolve().parents[1]
R = np.random.default_rng(11)


def _branches(make_onnx, width: int, forms=("matmul", "gemm"), identity: bool = True) -> onnx.ModelProto:
    """``Relu(A(x) + B(x) [+ x])`` with A and B a MatMul by [in, out] or a Gemm with transB and a bias."""
    nodes, inits = [], []
    for i, form in enumerate(forms):
        w = (R.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append((f"w{i}", w))
        if form == "matmul":
            nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"y{i}"]))
        else:
            inits.append((f"b{i}", R.standard_normal(width).astype(np.float32)))
            nodes.append(helper.make_node("Gemm", ["x", f"w{i}", f"b{i}"], [f"y{i}"], transB=1))
    nodes.append(helper.make_node("Add", ["y0", "y1"], ["s"]))
    last = "s"
    if identity:
        nodes.append(helper.make_node("Add", ["s", "x"], ["r"]))
        last = "r"
    nodes.append(helper.make_node("Relu", [last], ["y"]))
    return make_onnx(nodes, [("x", ["N", width])], [("y", ["N", width])], inits)


def _run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _folded_tensors(model: ir.Model) -> list[FoldedTensor]:
    return [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, FoldedTensor)]


@pytest.mark.parametrize("forms", [("matmul", "matmul"), ("gemm", "gemm"), ("matmul", "gemm")])
@pytest.mark.parametrize("identity", [False, True])
def test_a_sum_of_two_weights_is_written_as_computed(make_onnx, tmp_path, forms, identity):
    """Each layout pair (both stored [in, out], both [out, in], one of each) with and without the identity
    on the diagonal: the weight is a FoldedTensor, its bytes written in blocks are those of ``numpy()``,
    and the saved model computes what the original computes."""
    proto = _branches(make_onnx, 48, forms, identity)
    result = fold_onnx(ir.from_proto(proto), verify=False)
    (folded,) = _folded_tensors(result.model)
    whole = folded.numpy()
    assert whole.dtype == np.float32 and whole.shape == (48, 48) and whole.flags.c_contiguous
    w = [numpy_helper.to_array(t).astype(np.float64) for t in proto.graph.initializer if t.name in ("w0", "w1")]
    w = [wi if form == "matmul" else wi.T for wi, form in zip(w, forms)]  # both as [in, out]
    expected = (w[0] + w[1] + (np.eye(48) if identity else 0)).astype(np.float32)
    assert np.array_equal(whole, expected)  # the float64 sum cast once, bit for bit
    with open(tmp_path / "raw.bin", "wb") as f:
        folded.tofile(f)
    assert (tmp_path / "raw.bin").read_bytes() == whole.tobytes()
    x = R.standard_normal((3, 48)).astype(np.float32)
    for external in (False, True):
        out = tmp_path / f"out-{external}.onnx"
        onnx_io.save_model(result.model, out, external_data=external)
        np.testing.assert_allclose(_run(str(out), x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_tofile_writes_every_row_once_a_block_at_a_time():
    terms = (torch.randn(7, 3), torch.randn(3, 7).t())
    tensor = FoldedTensor(RoundedRows(terms, torch.arange(3, dtype=torch.float64)), ir.DataType.FLOAT, name="w")
    tensor.block_bytes = 2 * 3 * 4  # two rows a block

    class Sink:
        def __init__(self):
            self.writes = []

        def write(self, data):
            self.writes.append(bytes(data))

    sink = Sink()
    tensor.tofile(sink)
    assert [len(w) for w in sink.writes] == [24, 24, 24, 12]
    assert b"".join(sink.writes) == tensor.numpy().tobytes() == tensor.rows.full().numpy().tobytes()
    assert tensor.nbytes == 7 * 3 * 4 and tuple(tensor.shape.numpy()) == (7, 3)


def test_small_folded_weights_are_ordinary_tensors(make_onnx):
    """Under ``MIN_EXTERNAL_BYTES`` a folded weight is computed at once (nothing to gain from deferring)."""
    proto = _branches(make_onnx, 8)
    assert MIN_EXTERNAL_BYTES > 8 * 8 * 4
    result = fold_onnx(ir.from_proto(proto), verify=False)
    assert result.report.folded and not _folded_tensors(result.model)


def test_an_unverified_fold_and_save_never_compute_a_folded_weight_whole(make_onnx, tmp_path, monkeypatch):
    """The fold, the horizontal pass after it, the de-duplication of equal folded weights and the save all
    leave a FoldedTensor uncomputed: only its blocks are, as it is written."""
    proto = _branches(make_onnx, 64)
    calls = []
    real = onnx_folded._computed
    monkeypatch.setattr(onnx_folded, "_computed", lambda *a: calls.append(a) or real(*a))
    for horizontal in ("auto", "off"):
        result = fold_onnx(ir.from_proto(proto), verify=False, horizontal=horizontal)
        assert len(_folded_tensors(result.model)) == 1
        onnx_io.save_model(result.model, tmp_path / "out.onnx")
    assert calls == []
    x = R.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(str(tmp_path / "out.onnx"), x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_a_verified_fold_checks_the_folded_weights(make_onnx):
    proto = _branches(make_onnx, 64)
    result = fold_onnx(proto)  # a ModelProto in, a ModelProto out: its weights are computed into it
    assert result.report.verified and result.report.folded
    x = R.standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(_run(result.model, x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_folded_siblings_still_fuse_horizontally(make_onnx):
    """Two parallel sums reading one value, each with its own output: two FoldedTensors that horizontal
    fusion (forced on) reads as weights and concatenates into one op."""
    width = 32
    nodes, inits = [], []
    for i in range(4):
        inits.append((f"w{i}", R.standard_normal((width, width)).astype(np.float32)))
        nodes.append(helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]))
    nodes += [helper.make_node("Add", ["m0", "m1"], ["y0"]), helper.make_node("Add", ["m2", "m3"], ["y1"])]
    proto = make_onnx(nodes, [("x", ["N", width])], [("y0", ["N", width]), ("y1", ["N", width])], inits)
    folded = fold_onnx(ir.from_proto(proto), verify=False, horizontal="off")
    assert len(_folded_tensors(folded.model)) == 2
    fused = fold_onnx(proto, horizontal="on")
    assert fused.report.verified and sum(n.op_type == "MatMul" for n in fused.model.graph.node) == 1
    x = R.standard_normal((2, width)).astype(np.float32)
    np.testing.assert_allclose(_run(fused.model, x), _run(proto, x), rtol=1e-5, atol=1e-5)


def test_fingerprints_and_comparison_match_the_computed_bytes():
    """A FoldedTensor's fingerprint and byte comparison are those of its computed bytes, in either
    orientation and beside ordinary tensors; one element apart is told apart."""
    a, b = torch.randn(70, 50), torch.randn(50, 70)
    folded = FoldedTensor(RoundedRows((a, b.t())), ir.DataType.FLOAT)
    plain = ir.tensor(folded.numpy())
    assert fingerprint(folded) == fingerprint(plain) and same_bytes(folded, plain) and same_bytes(plain, folded)
    other = folded.numpy().copy()
    other[69, 0] += 1.0  # outside every sampled block: only the full comparison sees it
    assert fingerprint(ir.tensor(other)) == fingerprint(folded)
    assert not same_bytes(folded, ir.tensor(other))
    assert not same_bytes(folded, ir.tensor(folded.numpy().T.copy()))  # same dtype, other shape
    assert same_bytes(ir.tensor(np.float32(2.0)), ir.tensor(np.float32(2.0)))


def test_equal_folded_weights_are_stored_once(make_onnx, tmp_path, monkeypatch):
    """Two call sites of one block, duplicated by the exporter (the same values under two names): the two
    folded weights are equal and stored once, found without computing either whole."""
    width = 64
    w0, w1 = (R.standard_normal((width, width)).astype(np.float32) for _ in range(2))
    nodes, inits = [], []
    for site, x in (("a", "x"), ("b", "h")):
        inits += [(f"{site}0", w0), (f"{site}1", w1)]
        nodes += [
            helper.make_node("MatMul", [x, f"{site}0"], [f"{site}p"]),
            helper.make_node("MatMul", [x, f"{site}1"], [f"{site}q"]),
            helper.make_node("Add", [f"{site}p", f"{site}q"], [f"{site}s"]),
            helper.make_node("Relu", [f"{site}s"], ["h" if site == "a" else "y"]),
        ]
    proto = make_onnx(nodes, [("x", ["N", width])], [("y", ["N", width])], inits)
    monkeypatch.setattr(onnx_folded, "_computed", lambda *a: pytest.fail("a folded weight was computed whole"))
    result = fold_onnx(ir.from_proto(proto), verify=False)
    (kept,) = _folded_tensors(result.model)
    users = {use.node.op_type for v in result.model.graph.initializers.values() if v.const_value is kept for use in v.uses()}
    assert users == {"MatMul"} and len(list(result.model.graph.initializers[kept.name].uses())) == 2
    onnx_io.save_model(result.model, tmp_path / "out.onnx")
    x = R.standard_normal((2, width)).astype(np.float32)
    np.testing.assert_allclose(_run(str(tmp_path / "out.onnx"), x), _run(proto, x), rtol=1e-5, atol=1e-4)


_PEAK_CHILD = """
import json, sys
from branchfold.storage import onnx_io
from branchfold.passes.onnx_pipeline import fold_onnx

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
model = onnx_io.load(sys.argv[1])
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
before = status("VmRSS:")
onnx_io.save_model(fold_onnx(model, verify=False).model, sys.argv[2])
print(json.dumps({"before": before, "peak": status("VmHWM:")}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_folded_weights(tmp_path):
    """Unverified folds and saves of 3 and of 9 blocks of two 16 MB linears and an identity (external
    data; 48 and 144 MB of new weights): the process grows by two source weights and a few blocks, the
    same for both, not by what the fold writes. Each in a child process, so that its peak is its own."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.synthetic_big import write_stacked_branches

    weight = 2048 * 2048 * 4
    grown = {}
    for blocks in (3, 9):
        model = write_stacked_branches(tmp_path / f"big{blocks}.onnx", blocks=blocks, width=2048, seed=2)
        out = tmp_path / f"out{blocks}.onnx"
        done = subprocess.run([sys.executable, "-c", _PEAK_CHILD, str(model.path), str(out)],
                              capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
        figures = json.loads(done.stdout.strip().splitlines()[-1])
        grown[blocks] = figures["peak"] - figures["before"]
        graph = onnx.load(str(out), load_external_data=False).graph
        assert sum(n.op_type in ("MatMul", "Gemm") for n in graph.node) == blocks
    assert grown[9] < 0.5 * 9 * weight, grown
    assert grown[9] - grown[3] < weight, grown  # six more folded weights, not one more weight of memory


def test_every_read_of_the_stored_weights_releases_their_pages():
    """Whole (a check session's input), written, fingerprinted or compared: each read of the stored
    weights is followed by ``release`` (the fold's drops the pages of the mapped weights from the process)."""
    released = []
    tensor = FoldedTensor(RoundedRows((torch.randn(16, 16), torch.randn(16, 16))), ir.DataType.FLOAT,
                          release=lambda: released.append(1))  # fmt: skip

    class Null:
        def write(self, data):
            pass

    tensor.numpy()
    tensor.tobytes()
    tensor.tofile(Null())
    fingerprint(tensor)
    same_bytes(tensor, tensor)
    assert len(released) == 6  # same_bytes releases each operand


def test_the_heap_is_trimmed_after_regions_that_computed_big_weights(make_onnx, monkeypatch):
    """A LayerNorm folded into a 2048x2048 linear computes its 16 MB weight (float64 temporaries of twice
    that): the emitter gives the freed heap back after it, not only once the whole fold is done."""
    import branchfold.adapters.onnx as adapter

    width = 2048
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "w"], ["y"]),
    ]
    inits = [("gamma", R.standard_normal(width).astype(np.float32)), ("beta", R.standard_normal(width).astype(np.float32)),
             ("w", R.standard_normal((width, width)).astype(np.float32))]  # fmt: skip
    proto = make_onnx(nodes, [("x", ["N", width])], [("y", ["N", width])], inits)
    trims = []
    monkeypatch.setattr(adapter, "return_freed_memory", lambda: trims.append(1))
    result = fold_onnx(ir.from_proto(proto), verify=False)
    assert result.report.folded and not _folded_tensors(result.model)  # a scaled weight: computed at once
    assert trims == [1]
