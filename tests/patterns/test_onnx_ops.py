"""ONNX node recognizers: each node kind to the right canonical map, or a refusal with its reason."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch
from onnx import helper

from branchfold.patterns.onnx_ops import OnnxContext, mark_shared, recognize
from branchfold.rewriter.affine import Conv, Dense, Diagonal, value

R = np.random.default_rng(0)


def _ops(proto):
    model = ir.from_proto(proto)
    import onnx_ir.passes.common as common

    common.ShapeInferencePass(strict_mode=False)(model)
    ctx = OnnxContext(model.graph)
    return ctx, {n.name or n.op_type: recognize(ctx, n) for n in model.graph}


def test_gemm_alpha_beta_trans_b(make_onnx):
    w, c = R.standard_normal((5, 4)).astype(np.float32), R.standard_normal(5).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="g", alpha=0.5, beta=3.0, transB=1)
    _, ops = _ops(make_onnx([node], [("x", [2, 4])], [("y", [2, 5])], {"w": w, "c": c}))
    m = ops["g"].map
    assert isinstance(m, Dense)
    torch.testing.assert_close(value(m.weight), torch.from_numpy(0.5 * w).double())
    torch.testing.assert_close(value(m.bias), torch.from_numpy(3.0 * c).double())  # beta scales the bias


def test_gemm_without_trans_b_transposes_the_weight(make_onnx):
    w = R.standard_normal((4, 5)).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="g")
    _, ops = _ops(make_onnx([node], [("x", [2, 4])], [("y", [2, 5])], {"w": w}))
    torch.testing.assert_close(value(ops["g"].map.weight), torch.from_numpy(w.T).double())


def test_gemm_trans_a_and_matrix_bias_are_refused(make_onnx):
    w = R.standard_normal((4, 4)).astype(np.float32)
    a = helper.make_node("Gemm", ["x", "w"], ["y"], name="a", transA=1)
    b = helper.make_node("Gemm", ["x", "w", "c"], ["z"], name="b")
    proto = make_onnx([a, b], [("x", [4, 4])], [("y", [4, 4]), ("z", [4, 4])], {"w": w, "c": w})
    _, ops = _ops(proto)
    assert ops["a"].kind == "opaque" and ops["a"].refusal.category == "geometry"
    assert ops["b"].kind == "opaque" and ops["b"].refusal.category == "broadcast"


def test_batch_norm_training_mode_and_used_statistics_are_refused(make_onnx):
    stats = {k: np.ones(3, np.float32) for k in ("s", "b", "m", "v")}
    t = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], name="t", training_mode=1)
    e = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["z", "rm", "rv"], name="e", training_mode=1)
    i = helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["w"], name="i", epsilon=1e-3)
    proto = make_onnx([t, e, i], [("x", [2, 3, 4, 4])], [("y", None), ("z", None), ("rm", None), ("w", None)], stats)
    _, ops = _ops(proto)
    assert ops["t"].refusal.category == "training-mode"
    assert ops["e"].refusal.category == "training-mode"
    m = ops["i"].map
    assert isinstance(m, Diagonal) and m.axis == -3
    torch.testing.assert_close(m.scale, torch.full((3,), 1 / np.sqrt(1 + 1e-3), dtype=torch.float64))


@pytest.mark.parametrize(
    ("const_shape", "ok", "axis"),
    [((1, 3, 1, 1), True, -3), ((3, 1, 1), True, -3), ((1, 1, 1, 5), True, -1), ((3,), False, None),
     ((1, 3, 5, 1), False, None), ((2, 3, 5, 5), False, None)],
)  # fmt: skip
def test_mul_broadcast_axis_is_checked(make_onnx, const_shape, ok, axis):
    node = helper.make_node("Mul", ["x", "c"], ["y"], name="m")
    c = R.standard_normal(const_shape).astype(np.float32)
    _, ops = _ops(make_onnx([node], [("x", [2, 3, 5, 5])], [("y", None)], {"c": c}))
    if ok:
        assert ops["m"].kind == "affine" and ops["m"].map.axis == axis
    else:
        assert ops["m"].kind == "opaque" and ops["m"].refusal.category == "broadcast"


def test_div_and_sub_by_constants(make_onnx):
    c = np.array([2.0, 4.0], np.float32)
    d = helper.make_node("Div", ["x", "c"], ["y"], name="d")
    s = helper.make_node("Sub", ["c", "y"], ["z"], name="s")
    _, ops = _ops(make_onnx([d, s], [("x", [3, 2])], [("z", None)], {"c": c}))
    torch.testing.assert_close(ops["d"].map.scale, torch.tensor([0.5, 0.25], dtype=torch.float64))
    assert torch.equal(ops["s"].map.scale, -torch.ones(2, dtype=torch.float64))  # c - y
    torch.testing.assert_close(ops["s"].map.shift, torch.from_numpy(c).double())


def test_weights_from_constant_nodes_and_transpose_reshape_of_constants(make_onnx):
    w = R.standard_normal((6,)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["flat"], value=helper.make_tensor("v", 1, [6], w)),
        helper.make_node("Constant", [], ["shape"], value_ints=[3, 2]),
        helper.make_node("Reshape", ["flat", "shape"], ["w32"]),
        helper.make_node("Transpose", ["w32"], ["w23"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w23"], ["y"], name="mm"),
    ]
    ctx, ops = _ops(make_onnx(nodes, [("x", ["N", 2])], [("y", ["N", 3])]))
    assert ops["mm"].kind == "affine"
    torch.testing.assert_close(value(ops["mm"].map.weight), torch.from_numpy(w.reshape(3, 2)).double())
    assert ops["Transpose"].kind == "opaque"  # constants computed from constants are not ops to fold


def test_matmul_of_two_activations_is_opaque(make_onnx):
    node = helper.make_node("MatMul", ["x", "z"], ["y"], name="mm")
    _, ops = _ops(make_onnx([node], [("x", [2, 3]), ("z", [3, 3])], [("y", None)]))
    assert ops["mm"].kind == "opaque"


def test_zero_pad_is_absorbed_into_conv(make_onnx):
    w = R.standard_normal((4, 3, 3, 3)).astype(np.float32)
    pads = np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"], name="c", pads=[1, 1, 1, 1])]
    _, ops = _ops(make_onnx(nodes, [("x", [1, 3, 8, 8])], [("y", None)], {"w": w, "p": pads}))
    m = ops["c"].map
    assert isinstance(m, Conv) and m.padding == ((2, 4), (3, 1))
    assert ops["c"].inputs[0].name == "x"


def test_pad_of_channels_or_nonzero_value_is_not_absorbed(make_onnx):
    w = R.standard_normal((4, 3, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Pad", ["x", "p", "v"], ["xp"]), helper.make_node("Conv", ["xp", "w"], ["y"], name="c")]
    inits = {"w": w, "p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "v": np.array(1.0, np.float32)}
    _, ops = _ops(make_onnx(nodes, [("x", [1, 3, 8, 8])], [("y", None)], inits))
    assert ops["c"].inputs[0].name == "xp" and ops["c"].map.padding == ((0, 0), (0, 0))


def test_auto_pad_same_upper_and_lower(make_onnx):
    w = R.standard_normal((2, 2, 2, 2)).astype(np.float32)
    up = helper.make_node("Conv", ["x", "w"], ["y"], name="up", auto_pad="SAME_UPPER")
    lo = helper.make_node("Conv", ["x", "w"], ["z"], name="lo", auto_pad="SAME_LOWER", strides=[2, 2])
    _, ops = _ops(make_onnx([up, lo], [("x", [1, 2, 7, 7])], [("y", None), ("z", None)], {"w": w}))
    assert ops["up"].map.padding == ((0, 1), (0, 1))
    assert ops["lo"].map.padding == ((1, 0), (1, 0))  # total = (4-1)*2 + 2 - 7 = 1


def test_layer_norm_is_a_split_affine_and_dropout_identity(make_onnx):
    g, b = R.standard_normal(4).astype(np.float32), R.standard_normal(4).astype(np.float32)
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], name="ln", axis=-1),
        helper.make_node("Dropout", ["n"], ["d"], name="do"),
        helper.make_node("Dropout", ["d", "r", "t"], ["e"], name="train"),
    ]
    inits = {"g": g, "b": b, "r": np.array(0.5, np.float32), "t": np.array(True)}
    _, ops = _ops(make_onnx(nodes, [("x", ["N", 3, 4])], [("e", None)], inits))
    assert ops["ln"].split and torch.equal(ops["ln"].map.shift, torch.from_numpy(b).double())
    assert ops["do"].kind == "affine" and ops["do"].map.is_identity
    assert ops["train"].refusal.category == "training-mode"


def test_add_of_differently_shaped_values_is_refused(make_onnx):
    node = helper.make_node("Add", ["x", "z"], ["y"], name="a")
    same = helper.make_node("Add", ["x", "x2"], ["y2"], name="same")
    proto = make_onnx([node, same], [("x", ["N", 3]), ("z", [1, 3]), ("x2", ["N", 3])], [("y", None), ("y2", None)])
    _, ops = _ops(proto)
    assert ops["a"].refusal.category == "broadcast"
    assert ops["same"].kind == "add"  # symbolic dims of the same name are equal


def test_shared_initializer_marks_its_readers(make_onnx):
    w = R.standard_normal((3, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"), helper.make_node("MatMul", ["a", "w"], ["b"], name="m2"),
             helper.make_node("MatMul", ["b", "v"], ["c"], name="m3")]  # fmt: skip
    ctx, ops = _ops(make_onnx(nodes, [("x", [2, 3])], [("c", None)], {"w": w, "v": w + 1}))
    mark_shared(ctx, list(ops.values()))
    assert ops["m1"].shared and ops["m2"].shared and ops["m3"].shared is False


def test_integer_arithmetic_is_not_folded(make_onnx):
    node = helper.make_node("Mul", ["x", "c"], ["y"], name="m")
    proto = make_onnx([node], [("x", [3])], [("y", None)], {"c": np.array(2, np.int64)})
    proto.graph.input[0].type.tensor_type.elem_type = 7  # int64
    _, ops = _ops(proto)
    assert ops["m"].kind == "opaque"


def test_gather_of_rows_of_a_constant_table_by_computed_indices_is_a_lookup(make_onnx):
    from onnx import TensorProto

    from branchfold.rewriter.affine import Lookup

    t = R.standard_normal((10, 4)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["t", "idx"], ["rows"], name="rows"),
             helper.make_node("Gather", ["t", "idx"], ["cols"], name="cols", axis=1),
             helper.make_node("Gather", ["t", "k"], ["fixed"], name="fixed"),
             helper.make_node("Gather", ["x", "idx"], ["data"], name="data")]  # fmt: skip
    proto = make_onnx(nodes, [("idx", [2, 3]), ("x", [10, 4])], [(n, None) for n in ("rows", "cols", "fixed", "data")],
                      {"t": t, "k": np.array([1, -1], np.int64)})  # fmt: skip
    proto.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    _, ops = _ops(proto)
    m = ops["rows"].map
    assert ops["rows"].kind == "affine" and isinstance(m, Lookup) and ops["rows"].inputs[0].name == "idx"
    torch.testing.assert_close(value(m.table), torch.from_numpy(t).double())
    # columns, constant indices (a constant), a table computed at run time: not lookups
    assert [ops[k].kind for k in ("cols", "fixed", "data")] == ["opaque"] * 3
