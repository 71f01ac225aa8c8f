"""fold_onnx end to end: same kind back, input untouched, verified, report, undo of failing regions,
torch exporters (dynamo and legacy), and agreement with the FX side."""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import helper

import branchfold
from branchfold.adapters import onnx as onnx_adapter
from branchfold.errors import InputError
from branchfold.passes.onnx_pipeline import fold_onnx
from branchfold.rewriter.affine import value
from branchfold.zoo import ZOO

R = np.random.default_rng(0)


def export(model, args, dynamo: bool) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(model, args, dynamo=True, verbose=False)
            return prog.model_proto
        torch.onnx.export(model, args, f, dynamo=False)
    return onnx.load_from_string(f.getvalue())


def linears(proto) -> int:
    c = Counter(n.op_type for n in proto.graph.node)
    return c["MatMul"] + c["Gemm"]


@pytest.fixture
def branches(make_onnx):
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("MatMul", ["x", "w1"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]  # fmt: skip
    inits = {"w0": R.standard_normal((8, 8)).astype(np.float32), "w1": R.standard_normal((8, 8)).astype(np.float32)}
    return make_onnx(nodes, [("x", ["batch", 8])], [("y", ["batch", 8])], inits)


def test_model_proto_in_model_proto_out_and_input_untouched(branches):
    before = branches.SerializeToString()
    result = branchfold.fold_with_report(branches)
    assert isinstance(result.model, onnx.ModelProto)
    assert branches.SerializeToString() == before
    assert linears(result.model) == 1
    onnx.checker.check_model(result.model, full_check=True)
    r = result.report
    assert r.verified and r.max_error <= r.tolerance and len(r.folded) == 1
    assert r.before.ops == 4 and r.after.ops == 2
    assert r.after.macs == r.before.macs // 2 and r.before.macs == 2 * 8 * 8 * 2  # dynamic batch given size 2


def test_ir_model_in_ir_model_out_and_input_untouched(branches):
    model = ir.from_proto(branches)
    before = ir.to_proto(model).SerializeToString()
    folded = branchfold.fold(model)
    assert isinstance(folded, ir.Model) and folded is not model
    assert ir.to_proto(model).SerializeToString() == before
    assert sum(1 for n in folded.graph if n.op_type == "MatMul") == 1


def test_no_verify_skips_the_check(branches):
    r = fold_onnx(branches, verify=False).report
    assert r.max_error is None and not r.verified and len(r.folded) == 1


def test_failing_region_is_undone_and_reported(make_onnx, monkeypatch):
    nodes = []
    inits = {}
    for g in range(2):
        for i in range(2):
            inits[f"w{g}{i}"] = R.standard_normal((4, 4)).astype(np.float32)
            nodes.append(helper.make_node("MatMul", [f"x{g}", f"w{g}{i}"], [f"m{g}{i}"]))
        nodes.append(helper.make_node("Add", [f"m{g}0", f"m{g}1"], [f"y{g}"]))
    proto = make_onnx(nodes, [("x0", [2, 4]), ("x1", [2, 4])], [("y0", None), ("y1", None)], inits)
    real = onnx_adapter.find_regions

    def corrupt(ops, outputs):  # a wrong fold for y1 only, as a bug in the algebra would produce
        walk = real(ops, outputs)
        for r in walk.regions:
            if r.value.name == "y1":
                r.map = type(r.map)(value(r.map.weight) * 1.5, r.map.bias)
        return walk

    monkeypatch.setattr(onnx_adapter, "find_regions", corrupt)
    result = fold_onnx(proto)
    assert result.report.verified
    assert [r.at for r in result.report.folded] == ["y0"]
    assert [(s.at, s.reason) for s in result.report.not_folded if s.reason == "failed-check"] == [("y1", "failed-check")]
    assert linears(result.model) == 3


def test_rewrites_that_fail_together_leave_the_model_unfolded(branches, monkeypatch):
    """If the check still fails after bisection, nothing folded is written: never the failing model."""
    from branchfold.passes import settle

    real = onnx_adapter.find_regions

    def corrupt(ops, outputs):
        walk = real(ops, outputs)
        for r in walk.regions:
            r.map = type(r.map)(value(r.map.weight) * 1.5, r.map.bias)
        return walk

    monkeypatch.setattr(onnx_adapter, "find_regions", corrupt)
    monkeypatch.setattr(settle, "bisect_passing", lambda items, ok: items)  # bisection finds nothing
    result = fold_onnx(branches)
    assert result.report.verified and result.report.folded == []
    assert result.report.skipped_by_reason().get("failed-check") == 1
    assert linears(result.model) == 2


def test_unknown_domain_is_refused(branches):
    branches.graph.node.append(helper.make_node("Foo", ["y"], ["z"], domain="my.custom"))
    with pytest.raises(InputError, match="unknown domain 'my.custom'"):
        fold_onnx(branches)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_seed_vit_folds_to_plain_vit_linear_count(dynamo):
    entry = ZOO["seed-vit-k2"]
    model = entry.build().eval()
    x = entry.example_input(model, 1)
    proto = export(model, x, dynamo)
    plain = export(entry.single_path(model).eval(), x, dynamo)
    result = fold_onnx(proto)
    assert result.report.verified
    assert linears(result.model) <= linears(plain) < linears(proto)


def test_grouped_mlp_shared_weights_stay_shared():
    entry = ZOO["grouped-mlp"]
    model = entry.build().eval()
    x = entry.example_input(model, 1)
    proto = export(model, x, dynamo=False)
    result = fold_onnx(proto)
    assert result.report.verified and result.report.folded
    # the folded weights of every call site of a shared MLP are equal and stored once
    arrays = [onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer if len(t.dims) == 2]
    keys = [(a.shape, a.tobytes()) for a in arrays]
    assert len(keys) == len(set(keys))
    assert result.report.after.params <= result.report.before.params


def test_agreement_with_fx_fold():
    entry = ZOO["repvgg"]
    model = entry.build().eval()
    x = entry.example_input(model, 1)
    via_fx = export(branchfold.fold(model, x), x, dynamo=False)
    via_onnx = fold_onnx(export(model, x, dynamo=False)).model
    def ops(proto):
        return Counter(n.op_type for n in proto.graph.node if n.op_type != "Constant")

    assert ops(via_onnx) == ops(via_fx)
    assert ops(via_onnx)["Conv"] < Counter(n.op_type for n in export(model, x, dynamo=False).graph.node)["Conv"]
