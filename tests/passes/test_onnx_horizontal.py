"""ONNX HorizontalFusionPass on both torch exporters' graphs, against onnxruntime with no optimizations."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from branchfold.errors import InputError
from branchfold.passes.onnx_horizontal import HorizontalFusionPass


class Qkv(nn.Module):
    """Three projections of the graph input itself (where onnxoptimizer's fuse_qkv crashes)."""

    def __init__(self, inp: int = 16) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(inp, 8), nn.Linear(inp, 8, bias=False), nn.Linear(inp, 12)

    def forward(self, x):
        return self.q(x) * 2, self.k(x), torch.relu(self.v(x))


class Convs(nn.Module):
    def __init__(self, second: nn.Module | None = None) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = second if second is not None else nn.Conv2d(4, 2, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.relu(self.a(x)), self.b(x)


def _legacy(model: nn.Module, x: torch.Tensor, dynamic: dict | None = None) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), f, dynamo=False, input_names=["x"], dynamic_axes=dynamic)
    return onnx.load_from_string(f.getvalue())


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # its own fusions hide nothing
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _fuse(proto: onnx.ModelProto, mode: str = "on") -> tuple[onnx.ModelProto, HorizontalFusionPass]:
    model = ir.from_proto(proto)
    p = HorizontalFusionPass(mode)  # type: ignore[arg-type]
    p(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out)
    return out, p


def _assert_same(a: onnx.ModelProto, b: onnx.ModelProto, x: np.ndarray) -> None:
    sa, sb = _session(a), _session(b)
    assert [o.name for o in sa.get_outputs()] == [o.name for o in sb.get_outputs()]
    feed = {sa.get_inputs()[0].name: x}
    for ra, rb in zip(sa.run(None, feed), sb.run(None, feed)):
        np.testing.assert_allclose(rb, ra, rtol=1e-5, atol=1e-5)


def _ops(proto: onnx.ModelProto, *types: str) -> int:
    return sum(n.op_type in types for n in proto.graph.node)


@pytest.fixture(scope="module")
def dynamo_qkv() -> onnx.ModelProto:
    torch.manual_seed(0)
    dims = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")},)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(Qkv().eval(), (torch.randn(2, 3, 16),), dynamo=True, dynamic_shapes=dims,
                                 verbose=False)  # fmt: skip
    return prog.model_proto


def test_dynamo_export_with_dynamic_dims_on_a_graph_input(dynamo_qkv):
    assert _ops(dynamo_qkv, "MatMul", "Gemm") == 3
    fused, p = _fuse(dynamo_qkv)
    (group,) = p.result.fused
    assert group.sizes == (8, 8, 12) and group.source == dynamo_qkv.graph.input[0].name
    assert _ops(fused, "MatMul", "Gemm") == 1 and _ops(fused, "Split") == 1
    assert _ops(fused, "Add") == 1  # the biases were concatenated too, not added per branch
    for shape in ((2, 3, 16), (5, 7, 16)):  # other batch and sequence sizes than the export's
        _assert_same(dynamo_qkv, fused, np.random.default_rng(0).standard_normal(shape, dtype=np.float32))


def test_legacy_export_gemm_and_output_names():
    torch.manual_seed(0)
    proto = _legacy(Qkv(), torch.randn(3, 16), {"x": {0: "batch"}})
    assert _ops(proto, "Gemm") >= 2
    fused, p = _fuse(proto)
    assert len(p.result.fused) == 1
    assert _ops(fused, "MatMul", "Gemm") == 1
    assert [o.name for o in fused.graph.output] == [o.name for o in proto.graph.output]
    _assert_same(proto, fused, np.random.default_rng(1).standard_normal((6, 16), dtype=np.float32))


def test_convs_of_identical_geometry_fuse():
    torch.manual_seed(0)
    proto = _legacy(Convs(), torch.randn(1, 4, 6, 6), {"x": {0: "batch"}})
    fused, p = _fuse(proto)
    assert _ops(fused, "Conv") == 1 and p.result.fused[0].sizes == (6, 2)
    _assert_same(proto, fused, np.random.default_rng(2).standard_normal((3, 4, 6, 6), dtype=np.float32))


@pytest.mark.parametrize(
    "second",
    [nn.Conv2d(4, 2, 3, padding=1, stride=2), nn.Conv2d(4, 2, 3, padding=0), nn.Conv2d(4, 2, 1),
     nn.Conv2d(4, 2, 3, padding=1, groups=2)],
    ids=["stride", "padding", "kernel", "groups"],
)  # fmt: skip
def test_conv_geometry_differences_do_not_fuse(second):
    proto = _legacy(Convs(second), torch.randn(1, 4, 6, 6))
    _, p = _fuse(proto)
    assert p.result.groups == []


def _hand_model(weight_is_input: bool) -> onnx.ModelProto:
    """x·W1, x·W2 (W2 a graph input when asked) and y·W3: only a constant pair on one value may fuse."""
    rng = np.random.default_rng(0)
    w1, w2, w3 = (numpy_helper.from_array(rng.standard_normal((4, 3), dtype=np.float32), n) for n in ("w1", "w2", "w3"))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 4]) for n in ("x", "y")]
    if weight_is_input:
        inputs.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 3]))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("MatMul", ["x", "w2"], ["b"]),
             helper.make_node("MatMul", ["y", "w3"], ["c"])]  # fmt: skip
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 3]) for n in "abc"]
    inits = [w1, w3] if weight_is_input else [w1, w2, w3]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_non_constant_weights_and_different_inputs_do_not_fuse():
    _, p = _fuse(_hand_model(weight_is_input=True))
    assert p.result.groups == []
    fused, p = _fuse(_hand_model(weight_is_input=False))
    assert [g.ops for g in p.result.fused] and _ops(fused, "MatMul") == 2  # x·W1, x·W2 fused; y·W3 alone
    x = np.random.default_rng(3).standard_normal((5, 4), dtype=np.float32)
    sa, sb = _session(_hand_model(False)), _session(fused)
    for ra, rb in zip(sa.run(None, {"x": x, "y": x + 1}), sb.run(None, {"x": x, "y": x + 1})):
        np.testing.assert_allclose(rb, ra, rtol=1e-5, atol=1e-5)


def test_off_leaves_the_model_alone_and_bad_mode_is_refused():
    proto = _hand_model(False)
    fused, p = _fuse(proto, "off")
    assert not p.result.groups and _ops(fused, "MatMul") == 3
    with pytest.raises(InputError):
        HorizontalFusionPass("sometimes")  # type: ignore[arg-type]


def test_auto_follows_the_measured_onnx_policy(dynamo_qkv):
    from branchfold.patterns.horizontal import Policy

    _, p = _fuse(dynamo_qkv, "auto")
    assert p.result.groups and not p.result.fused  # onnxruntime CPU: measured not to pay
    model = ir.from_proto(dynamo_qkv)
    forced = HorizontalFusionPass("auto", policy=Policy())
    forced(model)
    assert forced.result.fused
