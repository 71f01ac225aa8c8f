"""A quantized base weight is left quantized: an adapter beside it stays, and the report says why.

Folding ``dequantize(W_int8) + s·B·A`` would be exact, but the result is a float weight: 4x the memory of the
int8 one and none of the quantized kernels, the opposite of what the quantization was for. The rule is general
(``canonical.dequantizes``): a stored integer matrix cast to floating point, in FX (``.to(float)``, ``.float()``,
``dequantize``) and ONNX (``DequantizeLinear``, ``Cast``), and torch.ao's quantized modules, are ``quantized``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import rel_err
from torch import nn

import branchfold

D, R = 32, 4


class Int8Linear(nn.Module):
    """A weight-only int8 linear as quantization libraries write it: the weight is dequantized in forward."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(D, D, generator=torch.Generator().manual_seed(0))
        scale = w.abs().amax(1) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = nn.Parameter(torch.randn(D))

    def forward(self, x):
        return F.linear(x, self.qweight.to(x.dtype) * self.scale[:, None], self.bias)


class LoRA(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base, self.a, self.b = base, nn.Linear(D, R, bias=False), nn.Linear(R, D, bias=False)

    def forward(self, x):
        return torch.relu(self.base(x) + self.b(self.a(x)) * 2.0)


def x_in() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("capture", ["symbolic_trace", "export"])
def test_an_adapter_beside_an_int8_weight_stays_and_the_weight_stays_int8(capture):
    model = LoRA(Int8Linear()).eval()
    r = branchfold.fold_with_report(model, (x_in(),), capture=capture)
    assert r.report.verified and r.report.max_error <= 1e-6
    assert "quantized" in r.report.skipped_by_reason()
    assert not any(f.ops.count("add") for f in r.report.folded)  # the sum with the base is not folded
    stored = dict(r.model.named_buffers())
    assert any(t.dtype == torch.int8 and t.shape == (D, D) for t in stored.values())
    assert not any(t.is_floating_point() and t.shape == (D, D) for t in stored.values())  # no float copy
    assert any("dequantizes a quantized weight" in n for n in r.report.notes) == (capture == "export")
    with torch.no_grad():
        assert rel_err(model(x_in() * 2), r.model(x_in() * 2)) <= 1e-6


def test_int64_and_vector_constants_still_fold():
    """Positions and indices are int64, a scale is a vector: casting them is not a dequantization."""

    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("steps", torch.arange(D).reshape(1, D).repeat(D, 1))  # int64 matrix
            self.register_buffer("gain", torch.arange(D, dtype=torch.int8))  # an integer vector
            self.lin = nn.Linear(D, D)

        def forward(self, x):
            return torch.relu(F.linear(x, self.steps.float() * 0.01) * self.gain.float() + self.lin(x))

    model = Positions().eval()
    r = branchfold.fold_with_report(model, (x_in(),), capture="export")
    assert r.report.verified and "quantized" not in r.report.skipped_by_reason()
    assert any(f.ops.count("add") == 1 for f in r.report.folded)


def test_a_torch_ao_quantized_linear_is_reported():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(
            LoRA(nn.Linear(D, D)).eval(), {"base": torch.ao.quantization.default_dynamic_qconfig}
        )
    r = branchfold.fold_with_report(model, (x_in(),), capture="symbolic_trace")
    assert r.report.verified
    (why,) = [s for s in r.report.not_folded if s.reason == "quantized"]
    assert why.at == "base"


def qdq_model(dequantize: str):
    """``relu(x @ dequantize(Wq) + (x @ A @ B) * 2)`` in ONNX, the weight dequantized by ``DequantizeLinear``
    (QDQ format) or by ``Cast`` and ``Mul``."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper as h
    from onnx import numpy_helper as nh

    g = np.random.default_rng(0)
    inits = [nh.from_array(g.integers(-127, 127, (D, D)).astype(np.int8), "wq"), nh.from_array(np.float32(0.01), "scale"),
             nh.from_array(np.int8(0), "zp"), nh.from_array(g.standard_normal((D, R)).astype(np.float32), "A"),
             nh.from_array(g.standard_normal((R, D)).astype(np.float32), "B"), nh.from_array(np.float32(2.0), "s")]  # fmt: skip
    if dequantize == "DequantizeLinear":
        nodes = [h.make_node("DequantizeLinear", ["wq", "scale", "zp"], ["w"])]
    else:
        nodes = [h.make_node("Cast", ["wq"], ["wc"], to=onnx.TensorProto.FLOAT), h.make_node("Mul", ["wc", "scale"], ["w"])]
    nodes += [h.make_node("MatMul", ["x", "w"], ["base"]), h.make_node("MatMul", ["x", "A"], ["a"]),
              h.make_node("MatMul", ["a", "B"], ["b"]), h.make_node("Mul", ["b", "s"], ["bs"]),
              h.make_node("Add", ["base", "bs"], ["sum"]), h.make_node("Relu", ["sum"], ["y"])]  # fmt: skip
    graph = h.make_graph(nodes, "lora", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, D])],
                         [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, D])], inits)  # fmt: skip
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


@pytest.mark.parametrize("dequantize", ["DequantizeLinear", "Cast"])
def test_onnx_an_adapter_beside_a_dequantized_weight_stays(dequantize, tmp_path):
    import onnx

    path, out = tmp_path / "q.onnx", tmp_path / "folded.onnx"
    onnx.save(qdq_model(dequantize), path)
    r = branchfold.fold_with_report(str(path), output=str(out))
    assert r.report.verified
    (why,) = [s for s in r.report.not_folded if s.reason == "quantized"]
    assert "MatMul" in why.ops
    folded = onnx.load(out)
    assert [i.name for i in folded.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 2]
    assert sum(n.op_type == "MatMul" for n in folded.graph.node) == 3  # base, A, and B with the scale in it


def test_onnx_integer_kernels_are_reported(make_onnx):
    import onnx
    import onnx_ir as ir
    from onnx import helper as h

    from branchfold.patterns.onnx_ops import OnnxContext, recognize

    node = h.make_node("MatMulInteger", ["x", "w"], ["y"], name="mm")
    proto = make_onnx([node], [("x", [2, D])], [("y", [2, D])], {"w": np.ones((D, D), np.int8)})
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT8
    proto.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.INT32
    graph = ir.from_proto(proto).graph
    (op,) = [recognize(OnnxContext(graph), n) for n in graph]
    assert op.kind == "opaque" and op.refusal.category == "quantized"


def test_onnx_a_gather_of_a_dequantized_table_is_reported(make_onnx):
    import onnx
    import onnx_ir as ir
    from onnx import helper as h

    from branchfold.patterns.onnx_ops import OnnxContext, recognize

    nodes = [h.make_node("DequantizeLinear", ["tq", "scale"], ["table"]), h.make_node("Gather", ["table", "idx"], ["y"])]
    proto = make_onnx(nodes, [("idx", [2, 3])], [("y", [2, 3, D])],
                      {"tq": np.ones((10, D), np.int8), "scale": np.float32(0.1)})  # fmt: skip
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.INT64
    model = ir.from_proto(proto)
    import onnx_ir.passes.common as common

    common.ShapeInferencePass(strict_mode=False)(model)
    ctx = OnnxContext(model.graph)
    gather = [recognize(ctx, n) for n in model.graph][-1]
    assert gather.kind == "opaque" and gather.refusal.category == "quantized"
