"""ONNX adapter: every rule folds to the expected op counts and the same numbers as the original
(onnxruntime with optimizations off), and the must-not-fold cases stay as they are."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import helper

from branchfold.passes.onnx import fold_passes

R = np.random.default_rng(0)
NEWEST = onnx.defs.onnx_opset_version()


def rnd(*shape):
    return R.standard_normal(shape).astype(np.float32)


def _run(proto, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return s.run(None, feeds)


def fold(proto):
    model = ir.from_proto(proto)
    passes = fold_passes()
    passes(model)
    out = ir.to_proto(model)
    onnx.checker.check_model(out, full_check=True)
    return out, passes.passes[0].result


def check_same(proto, folded, shapes, tol=1e-5):
    feeds = {k: rnd(*s) for k, s in shapes.items()}
    for a, b in zip(_run(proto, feeds), _run(folded, feeds)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= tol * max(np.abs(a).max(), 1e-30)


def counts(proto):
    return Counter(n.op_type for n in proto.graph.node)


def _branches_matmul(make_onnx, opset):
    nodes, inits = [], {}
    for i in range(3):
        inits[f"w{i}"], inits[f"b{i}"] = rnd(8, 8), rnd(8)
        nodes += [helper.make_node("MatMul", ["x", f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"], [f"l{i}"])]
    nodes += [helper.make_node("Add", ["l0", "l1"], ["s"]), helper.make_node("Add", ["s", "l2"], ["t"]),
              helper.make_node("Relu", ["t"], ["y"])]  # fmt: skip
    return make_onnx(nodes, [("x", ["N", 5, 8])], [("y", ["N", 5, 8])], inits, opset=opset), {"x": (3, 5, 8)}


@pytest.mark.parametrize("opset", [13, NEWEST])
def test_parallel_matmuls_fold_to_one(make_onnx, opset):
    proto, shapes = _branches_matmul(make_onnx, opset)
    folded, result = fold(proto)
    assert counts(folded)["MatMul"] == 1 and counts(folded)["Add"] == 1
    assert len(result.regions) == 1 and result.regions[0].kind == "parallel-sum"
    assert [o.name for o in folded.graph.output] == ["y"] and [i.name for i in folded.graph.input] == ["x"]
    check_same(proto, folded, shapes)


def test_gemm_branches_with_alpha_beta_trans(make_onnx):
    nodes = [
        helper.make_node("Gemm", ["x", "w0", "b0"], ["g0"], alpha=0.5, beta=2.0, transB=1),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["g1"], transB=0),
        helper.make_node("Sub", ["g0", "g1"], ["y"]),
    ]
    proto = make_onnx(nodes, [("x", [4, 6])], [("y", [4, 5])], {"w0": rnd(5, 6), "b0": rnd(5), "w1": rnd(6, 5), "b1": rnd(1, 5)})
    folded, _ = fold(proto)
    assert dict(counts(folded)) == {"Gemm": 1}
    check_same(proto, folded, {"x": (4, 6)})


def test_gemm_beta_zero_ignores_bias(make_onnx):
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], beta=0.0), helper.make_node("Mul", ["g", "s"], ["y"])]
    proto = make_onnx(nodes, [("x", [4, 6])], [("y", [4, 5])], {"w": rnd(6, 5), "b": rnd(5), "s": rnd(5)})
    folded, _ = fold(proto)
    assert sum(counts(folded).values()) == 1
    check_same(proto, folded, {"x": (4, 6)})


def _conv(name, x, out, cin, cout, k, pads, group=1, stride=1, bias=True):
    inits = {f"{name}_w": rnd(cout, cin // group, *k)}
    ins = [x, f"{name}_w"]
    if bias:
        inits[f"{name}_b"] = rnd(cout)
        ins.append(f"{name}_b")
    node = helper.make_node("Conv", ins, [out], pads=pads, group=group, strides=[stride] * len(k), kernel_shape=list(k))
    return node, inits


def _bn(name, x, out, c):
    inits = {f"{name}_{k}": v for k, v in (("s", rnd(c)), ("b", rnd(c)), ("m", rnd(c)), ("v", R.uniform(0.5, 2, c).astype(np.float32)))}
    return helper.make_node("BatchNormalization", [x] + [f"{name}_{k}" for k in "sbmv"], [out], epsilon=1e-3), inits


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_repvgg_block_folds_to_one_conv(make_onnx, nd):
    c, inits, nodes = 4, {}, []
    for name, k, p in (("a", 3, 1), ("b", 1, 0)):
        n, i = _conv(name, "x", f"{name}c", c, c, (k,) * nd, [p] * 2 * nd, bias=False)
        bn, j = _bn(name, f"{name}c", f"{name}n", c)
        nodes += [n, bn]
        inits |= i | j
    bn, j = _bn("id", "x", "idn", c)
    nodes += [bn, helper.make_node("Add", ["an", "bn"], ["s"]), helper.make_node("Add", ["s", "idn"], ["t"]),
              helper.make_node("Relu", ["t"], ["y"])]  # fmt: skip
    spatial = [6] * nd
    proto = make_onnx(nodes, [("x", ["N", c, *spatial])], [("y", None)], inits | j)
    folded, _ = fold(proto)
    assert dict(counts(folded)) == {"Conv": 1, "Relu": 1}
    check_same(proto, folded, {"x": (2, c, *spatial)})


def test_grouped_strided_conv_chain_with_pad_and_mul(make_onnx):
    n1, i1 = _conv("a", "xp", "a", 4, 8, (3, 3), [0, 0, 0, 0], group=2, stride=2)
    bn, j = _bn("bn", "a", "an", 8)
    nodes = [helper.make_node("Pad", ["x", "p"], ["xp"]), n1, bn, helper.make_node("Mul", ["an", "ls"], ["y"])]
    inits = i1 | j | {"p": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "ls": rnd(8, 1, 1)}
    proto = make_onnx(nodes, [("x", [2, 4, 9, 9])], [("y", None)], inits)
    folded, _ = fold(proto)
    assert dict(counts(folded)) == {"Conv": 1}
    check_same(proto, folded, {"x": (2, 4, 9, 9)})


def test_layer_norm_affine_folds_into_following_matmuls(make_onnx):
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], axis=-1, epsilon=1e-5)]
    inits = {"g": rnd(8), "b": rnd(8)}
    for i in range(2):
        inits[f"w{i}"] = rnd(8, 4)
        nodes.append(helper.make_node("MatMul", ["n", f"w{i}"], [f"y{i}"]))
    proto = make_onnx(nodes, [("x", ["N", 3, 8])], [("y0", None), ("y1", None)], inits, opset=17)
    folded, result = fold(proto)
    assert counts(folded)["LayerNormalization"] == 1 and len(result.regions) == 2
    ln = next(n for n in folded.graph.node if n.op_type == "LayerNormalization")
    assert ln.input[1] not in ("g",)  # the plain normalisation: γ = 1, β = 0
    check_same(proto, folded, {"x": (2, 3, 8)})


def test_chain_of_constant_ops_and_identity_dropout(make_onnx):
    nodes = [
        helper.make_node("Identity", ["x"], ["a"]),
        helper.make_node("Mul", ["a", "c1"], ["b"]),
        helper.make_node("Dropout", ["b"], ["d"]),
        helper.make_node("Div", ["d", "c2"], ["e"]),
        helper.make_node("Sub", ["e", "c3"], ["f"]),
        helper.make_node("Add", ["c4", "f"], ["y"]),
    ]
    inits = {"c1": rnd(3, 1, 1), "c2": np.float32(2.0), "c3": rnd(1, 3, 1, 1), "c4": rnd(3, 1, 1)}
    proto = make_onnx(nodes, [("x", ["N", 3, 4, 4])], [("y", None)], inits)
    folded, _ = fold(proto)
    assert dict(counts(folded)) == {"Mul": 1, "Add": 1}
    check_same(proto, folded, {"x": (2, 3, 4, 4)})


def test_transposed_weights_from_constant_nodes(make_onnx):
    w0, w1 = rnd(4, 6), rnd(4, 6)  # [out, in], transposed in the graph like torch's legacy exporter
    nodes = [
        helper.make_node("Constant", [], ["c0"], value=onnx.numpy_helper.from_array(w0)),
        helper.make_node("Transpose", ["c0"], ["t0"], perm=[1, 0]),
        helper.make_node("Transpose", ["w1"], ["t1"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "t0"], ["a"]),
        helper.make_node("MatMul", ["x", "t1"], ["b"]),
        helper.make_node("Add", ["a", "b"], ["y"]),
    ]
    proto = make_onnx(nodes, [("x", [2, 3, 6])], [("y", None)], {"w1": w1})
    folded, _ = fold(proto)
    assert counts(folded)["MatMul"] == 1 and "Transpose" not in counts(folded)
    check_same(proto, folded, {"x": (2, 3, 6)})


def test_shared_initializer_is_not_overwritten(make_onnx):
    """``w`` is read twice: summed with ``v``, then again after the sum. Folding writes new weights and
    leaves the input's ``w`` as it was; the written weight fits in the private ``v`` it replaces."""
    w = rnd(6, 6)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["x", "v"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"]), helper.make_node("MatMul", ["y", "w"], ["z"])]  # fmt: skip
    proto = make_onnx(nodes, [("x", [2, 6])], [("z", None)], {"w": w, "v": rnd(6, 6)})
    folded, result = fold(proto)
    assert len(result.regions) == 1 and [n.op_type for n in folded.graph.node] == ["MatMul"]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(proto.graph.initializer[0]), w)  # the input's
    assert sum(onnx.numpy_helper.to_array(t).size for t in folded.graph.initializer) <= 36
    check_same(proto, folded, {"x": (2, 6)})


def test_new_initializers_get_fresh_names(make_onnx):
    proto, shapes = _branches_matmul(make_onnx, NEWEST)
    proto.graph.initializer[0].name = "branchfold_1_weight"  # a name the emitter would pick first
    for n in proto.graph.node:
        n.input[:] = ["branchfold_1_weight" if i == "w0" else i for i in n.input]
    proto.graph.node.append(helper.make_node("MatMul", ["x", "branchfold_1_weight"], ["other"]))
    proto.graph.output.append(helper.make_tensor_value_info("other", 1, None))
    folded, _ = fold(proto)
    names = [t.name for t in folded.graph.initializer]
    assert len(names) == len(set(names))
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(next(t for t in folded.graph.initializer if t.name == "branchfold_1_weight")),
        onnx.numpy_helper.to_array(proto.graph.initializer[0]),
    )
    check_same(proto, folded, shapes)


def test_wrong_broadcast_axis_and_training_bn_do_not_fold(make_onnx):
    bn, j = _bn("bn", "x", "b", 4)
    bn.attribute.append(helper.make_attribute("training_mode", 1))
    bn.output.extend(["rm", "rv"])
    nodes = [bn, helper.make_node("Mul", ["x", "c"], ["m"]), helper.make_node("Add", ["m", "d"], ["y"])]
    inits = j | {"c": rnd(4, 1), "d": rnd(4)}  # c varies along H: not per-channel; d along W
    proto = make_onnx(nodes, [("x", [2, 4, 4, 4])], [("y", None), ("b", None), ("rm", None)], inits)
    folded, result = fold(proto)
    assert not result.regions
    assert {n.category for n in result.not_folded} >= {"training-mode"}


def test_float16_model_is_folded_in_float64_and_cast_back(make_onnx):
    proto, _ = _branches_matmul(make_onnx, NEWEST)
    f16 = onnx.ModelProto()
    f16.CopyFrom(proto)
    for t in f16.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in list(f16.graph.input) + list(f16.graph.output):
        v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    folded, _ = fold(f16)
    assert counts(folded)["MatMul"] == 1
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in folded.graph.initializer)
    x = rnd(2, 5, 8).astype(np.float16)
    ref = _run(proto, {"x": x.astype(np.float32)})[0]
    got = _run(folded, {"x": x})[0].astype(np.float32)
    assert np.abs(ref - got).max() <= 1e-2 * np.abs(ref).max()


# ----------------------------------------------------------------------------------------------
# random branch graphs

branch = st.fixed_dictionaries({
    "k": st.sampled_from([1, 3, 5]), "bn": st.booleans(), "pre1x1": st.booleans(), "groups": st.sampled_from([1, 2]),
})  # fmt: skip


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    branches=st.lists(branch, min_size=1, max_size=3),
    identity=st.booleans(),
    stride=st.sampled_from([1, 2]),
    opset=st.sampled_from([13, NEWEST]),
)
def test_random_conv_branch_graphs(make_onnx, branches, identity, stride, opset):
    c, nodes, inits, outs = 4, [], {}, []
    for i, b in enumerate(branches):
        x = "x"
        if b["pre1x1"]:
            n, j = _conv(f"p{i}", "x", f"p{i}", c, c, (1, 1), [0] * 4)
            nodes.append(n)
            inits |= j
            x = f"p{i}"
        k = b["k"]
        n, j = _conv(f"c{i}", x, f"c{i}", c, c, (k, k), [k // 2] * 4, group=b["groups"], stride=stride, bias=not b["bn"])
        nodes.append(n)
        inits |= j
        out = f"c{i}"
        if b["bn"]:
            n, j = _bn(f"n{i}", out, f"n{i}", c)
            nodes.append(n)
            inits |= j
            out = f"n{i}"
        outs.append(out)
    if identity and stride == 1:
        outs.append("x")
    acc = outs[0]
    for j, o in enumerate(outs[1:]):
        nodes.append(helper.make_node("Add", [acc, o], [f"s{j}"]))
        acc = f"s{j}"
    nodes.append(helper.make_node("Relu", [acc], ["y"]))
    proto = make_onnx(nodes, [("x", ["N", c, 7, 7])], [("y", None)], inits, opset=opset)
    folded, result = fold(proto)
    check_same(proto, folded, {"x": (2, c, 7, 7)}, tol=1e-5)
    border = any(b["pre1x1"] and b["k"] > 1 for b in branches)  # 1x1 bias before a padded KxK may refuse
    # Mixed group counts fold to the common (smaller) group count, and a 1x1 in front of a grouped conv
    # widens it to one group: the cost rule may refuse either.
    mixed_groups = len({b["groups"] for b in branches}) > 1
    widened = any(b["pre1x1"] and b["groups"] > 1 for b in branches)
    convs_before = len(branches) + sum(b["pre1x1"] for b in branches)
    if not border and not mixed_groups and not widened:
        assert counts(folded)["Conv"] == 1
    else:
        assert 1 <= counts(folded)["Conv"] <= convs_before


def test_lookups_of_one_index_tensor_fold_into_one_table_and_a_bare_lookup_stays(make_onnx):
    """``Gather(T, idx) + (Gather(A, idx) @ B) * s`` is one ``Gather`` of a folded table (LoRA on an embedding,
    as both torch exporters write it); lookups of different indices summed, and a bare lookup, stay."""
    t, a, b, u, v = rnd(20, 8), rnd(20, 2), rnd(2, 8), rnd(20, 8), rnd(20, 8)
    nodes = [helper.make_node("Gather", ["T", "idx"], ["base"]), helper.make_node("Gather", ["A", "idx"], ["low"]),
             helper.make_node("MatMul", ["low", "B"], ["up"]), helper.make_node("Mul", ["up", "s"], ["scaled"]),
             helper.make_node("Add", ["base", "scaled"], ["sum"]), helper.make_node("Relu", ["sum"], ["y"]),
             helper.make_node("Gather", ["V", "idx"], ["mine"]), helper.make_node("Gather", ["U", "jdx"], ["other"]),
             helper.make_node("Add", ["mine", "other"], ["apart"]), helper.make_node("Relu", ["apart"], ["z"]),
             helper.make_node("Gather", ["U", "idx"], ["bare"])]  # fmt: skip
    proto = make_onnx(nodes, [("idx", [3, 4]), ("jdx", [3, 4])], [("y", [3, 4, 8]), ("z", [3, 4, 8]), ("bare", [3, 4, 8])],
                      {"T": t, "A": a, "B": b, "s": np.float32(0.5), "U": u, "V": v})  # fmt: skip
    for value in proto.graph.input:
        value.type.tensor_type.elem_type = onnx.TensorProto.INT64
    folded, result = fold(proto)
    (region,) = result.regions
    assert region.labels.count("embedding") == 2 and region.map.table.shape == (20, 8)
    assert counts(folded)["Gather"] == 4 and counts(folded)["MatMul"] == 0  # the LoRA pair is in the table
    feeds = {"idx": R.integers(-20, 20, (3, 4)), "jdx": R.integers(-20, 20, (3, 4))}  # negative: from the end
    for want, got in zip(_run(proto, feeds), _run(folded, feeds)):
        assert np.abs(want - got).max() <= 1e-5 * np.abs(want).max()
