"""What the ONNX fold's report carries for its HTML page: the graph's ops in order, the stage times, the
regions drawn with their labels, and onnxruntime's fused kernels before and after the fold."""

from __future__ import annotations

import numpy as np
from onnx import helper

from branchfold import fold_with_report

R = np.random.default_rng(0)


def _branches(make_onnx):
    """relu(conv3x3(x) + conv1x1(x)): a RepVGG block as an exporter writes it (BN already in the convs)."""
    nodes = [
        helper.make_node("Conv", ["x", "w3", "b3"], ["a"], name="/blocks.0/dense/Conv", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["b"], name="/blocks.0/point/Conv"),
        helper.make_node("Add", ["a", "b"], ["s"], name="/blocks.0/Add"),
        helper.make_node("Relu", ["s"], ["y"], name="/blocks.0/act/Relu"),
    ]
    inits = {"w3": R.standard_normal((16, 16, 3, 3)).astype(np.float32), "b3": np.zeros(16, np.float32),
             "w1": R.standard_normal((16, 16, 1, 1)).astype(np.float32), "b1": np.ones(16, np.float32)}  # fmt: skip
    return make_onnx(nodes, [("x", [1, 16, 8, 8])], [("y", [1, 16, 8, 8])], inits)


def test_the_onnx_report_has_the_graph_stages_drawing_and_fused_kernels(make_onnx):
    report = fold_with_report(_branches(make_onnx)).report
    (region,) = report.folded
    assert [s.label for s in region.steps] == ["Conv 3x3 s1 16→16", "Conv 1x1 s1 16→16", "+"]
    assert region.became == "Conv 3x3 s1 16→16" and region.place == "blocks.0"
    assert [g[0] for g in report.graph] == ["/blocks.0/dense/Conv", "/blocks.0/point/Conv", "/blocks.0/Add",
                                            "/blocks.0/act/Relu"]  # fmt: skip
    assert {"folding", "verifying with onnxruntime"} <= set(report.stages)
    assert report.checked_inputs.startswith("3 random input sets")  # random_checks=2 plus one
    before, after = report.fusions["before"], report.fusions["after"]
    assert sum(before.values()) > sum(after.values()) > 0  # two convs became one, the Relu still fused
    assert any("Relu" in k for k in after)
    page = report.to_html()
    assert 'id="fusions"' in page and "Conv 1x1 s1 16→16" in page


def test_no_fused_kernels_without_the_runtime_guard(make_onnx):
    report = fold_with_report(_branches(make_onnx), runtime_guard=False).report
    assert report.fusions == {} and 'id="fusions"' not in report.to_html()


def test_a_matmul_bias_add_reads_as_a_bias(make_onnx):
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["a"]), helper.make_node("Add", ["a", "b0"], ["ab"]),
             helper.make_node("MatMul", ["x", "w1"], ["c"]), helper.make_node("Add", ["ab", "c"], ["y"])]  # fmt: skip
    inits = {"w0": R.standard_normal((32, 16)).astype(np.float32), "b0": R.standard_normal(16).astype(np.float32),
             "w1": R.standard_normal((32, 16)).astype(np.float32)}  # fmt: skip
    report = fold_with_report(make_onnx(nodes, [("x", [4, 32])], [("y", [4, 16])], inits)).report
    (region,) = report.folded
    assert [s.label for s in region.steps] == ["Linear 32→16", "+ bias 16", "Linear 32→16", "+"]
