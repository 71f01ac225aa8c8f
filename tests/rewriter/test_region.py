"""The frontend-neutral walk on hand-built op lists: which regions it finds, where they end, and why it
refuses. Keys and values are strings; maps are small dense / diagonal maps."""

from __future__ import annotations

import torch

from branchfold.rewriter.affine import F64, Conv, Dense, Diagonal
from branchfold.rewriter.region import Op, SplitSource, find_regions


def dense(seed: int, n: int = 4, m: int | None = None) -> Dense:
    g = torch.Generator().manual_seed(seed)
    return Dense(torch.randn(m or n, n, generator=g, dtype=F64), torch.randn(m or n, generator=g, dtype=F64))


def diag(n: int = 4) -> Diagonal:
    return Diagonal(torch.rand(n, dtype=F64) + 0.5, torch.randn(n, dtype=F64), -1)


def aff(key, x, m, **kw) -> Op:
    return Op(key, "affine", (x,), key, m, label=kw.pop("label", "linear"), **kw)


def add(key, a, b) -> Op:
    return Op(key, "add", (a, b), key, label="add")


def opaque(key, *xs) -> Op:
    return Op(key, "opaque", xs, key, label="relu")


def test_parallel_sum_is_one_region_ending_before_the_nonlinearity():
    ops = [aff("a", "x", dense(1)), aff("b", "x", dense(2)), aff("c", "x", dense(3)), add("s1", "a", "b"),
           add("s2", "s1", "c"), opaque("r", "s2")]  # fmt: skip
    w = find_regions(ops, ["r"])
    (r,) = w.regions
    assert (r.value, r.source, r.kind) == ("s2", "x", "parallel-sum")
    assert set(r.ops) == {"a", "b", "c", "s1", "s2"}
    expected = sum((dense(i).weight for i in (1, 2, 3)), torch.zeros(4, 4, dtype=F64))
    assert torch.allclose(r.map.weight, expected)
    assert r.cost_after < r.cost_before


def test_value_with_several_consumers_ends_a_region_and_is_not_duplicated():
    """A dense value read twice is a boundary: folding it into both readers would duplicate its work."""
    ops = [aff("a", "x", dense(1)), aff("b", "x", dense(2)), add("s", "a", "b"), aff("c", "s", dense(3)),
           opaque("r", "s"), opaque("t", "c")]  # fmt: skip
    w = find_regions(ops, ["r", "t"])
    assert [r.value for r in w.regions] == ["s"]  # c stays a separate op on the materialized sum


def test_diagonal_with_several_consumers_folds_into_each():
    ops = [aff("bn", "x", diag(), label="bn"), aff("a", "bn", dense(1)), aff("b", "bn", dense(2)),
           opaque("r", "a", "b")]  # fmt: skip
    w = find_regions(ops, ["r"])
    assert sorted(r.value for r in w.regions) == ["a", "b"]
    assert all(r.ops[0] == "bn" and r.source == "x" for r in w.regions)


def test_sum_read_by_sum_and_by_opaque_is_materialized_once():
    ops = [aff("a", "x", dense(1)), aff("b", "x", dense(2)), add("s", "a", "b"), aff("c", "x", dense(3)),
           add("t", "s", "c"), opaque("r", "t"), opaque("q", "s")]  # fmt: skip
    w = find_regions(ops, ["r", "q"])
    # s is a boundary (DESIGN §2): t = s + c(x) adds values of different sources, so c stays its own op
    assert [r.value for r in w.regions] == ["s"]


def test_residual_identity_branch():
    ops = [aff("a", "x", dense(1)), add("s", "x", "a"), opaque("r", "s")]
    (r,) = find_regions(ops, ["r"]).regions
    assert r.source == "x" and torch.allclose(r.map.weight, dense(1).weight + torch.eye(4, dtype=F64))


def test_subtraction_negates():
    ops = [aff("a", "x", dense(1)), aff("b", "x", dense(2)), Op("s", "sub", ("a", "b"), "s", label="sub"),
           opaque("r", "s")]  # fmt: skip
    (r,) = find_regions(ops, ["r"]).regions
    assert torch.allclose(r.map.weight, dense(1).weight - dense(2).weight)


def test_low_rank_chain_is_refused_for_cost_after_a_fixpoint():
    ops = [aff("a", "x", dense(1, 16, 2)), aff("b", "a", dense(2, 2, 16)), opaque("r", "b")]
    w = find_regions(ops, ["r"])
    assert w.regions == [] and [n.category for n in w.not_folded] == ["cost"]
    assert w.rounds >= 2


def test_split_source_needed_folded_and_unfolded_keeps_the_layer_norm_whole():
    ops = [aff("ln", "x", diag(), split=True, label="layer_norm"), aff("a", "ln", dense(1)),
           opaque("r", "ln"), opaque("t", "a")]  # fmt: skip
    assert find_regions(ops, ["r", "t"]).regions == []


def test_split_source_region():
    ops = [aff("ln", "x", diag(), split=True, label="layer_norm"), aff("a", "ln", dense(1)), opaque("t", "a")]
    (r,) = find_regions(ops, ["t"]).regions
    assert r.source == SplitSource("ln") and r.kind == "chain"


def test_shape_query_does_not_pin_a_diagonal_value_but_does_pin_a_dense_one():
    ops = [aff("ln", "x", diag(), split=True, label="layer_norm"), Op("shape", "meta", ("ln",), "shape"),
           aff("a", "ln", dense(1)), opaque("t", "a", "shape")]  # fmt: skip
    w = find_regions(ops, ["t"])
    assert [r.value for r in w.regions] == ["a"] and w.meta_sources == {"shape": "x"}
    ops = [aff("a", "x", dense(1)), aff("b", "x", dense(2)), Op("shape", "meta", ("a",), "shape"),
           add("s", "a", "b"), opaque("t", "s", "shape")]  # fmt: skip
    w = find_regions(ops, ["t"])
    assert w.regions == [] and w.meta_sources == {}


def test_shared_weight_is_not_mixed_with_private_ones():
    ops = [aff("ln", "x", diag(), split=True, label="layer_norm", shared=False),
           aff("a", "ln", dense(1), shared=True), opaque("t", "a")]  # fmt: skip
    w = find_regions(ops, ["t"])
    assert w.regions == [] and "shared-weight" in {n.category for n in w.not_folded}
    ops = [aff("a", "x", dense(1), shared=True), aff("b", "x", dense(2), shared=True), add("s", "a", "b"),
           opaque("t", "s")]  # fmt: skip
    assert len(find_regions(ops, ["t"]).regions) == 1  # all-shared branches fold (to one deduplicated copy)


def test_graph_output_ends_a_region():
    ops = [aff("a", "x", dense(1)), aff("b", "x", dense(2)), add("s", "a", "b"), aff("c", "s", dense(3))]
    w = find_regions(ops, ["s", "c"])
    assert [r.value for r in w.regions] == ["s"]


def test_x_plus_x_is_twice_the_identity():
    """export drops nn.Identity branches, leaving ``x + x`` beside a linear branch."""
    ops = [add("xx", "x", "x"), aff("a", "x", dense(1)), add("s", "xx", "a"), opaque("r", "s")]
    (r,) = find_regions(ops, ["r"]).regions
    assert r.source == "x" and torch.allclose(r.map.weight, dense(1).weight + 2 * torch.eye(4, dtype=F64))


def _conv(seed: int, k: int, groups: int, c: int = 4) -> Conv:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c, c // groups, k, k, generator=g, dtype=F64)
    return Conv(w, torch.zeros(c, dtype=F64), (1, 1), ((k // 2, k // 2),) * 2, (1, 1), groups)


def test_a_sum_refused_on_cost_still_folds_the_chain_inside_a_branch():
    # x -> 1x1 (dense) -> 1x1 (2 groups) is an exact, cheaper chain; adding a 3x3 of 2 groups would widen
    # the sum to one group (144 MACs vs 100): the sum stays, the chain folds on its own.
    ops = [
        Op("pre", "affine", ("x",), "p", _conv(0, 1, 1), label="conv"),
        Op("a", "affine", ("p",), "a", _conv(1, 1, 2), label="conv"),
        Op("b", "affine", ("x",), "b", _conv(2, 3, 2), label="conv"),
        Op("sum", "add", ("a", "b"), "s", label="add"),
        Op("relu", "opaque", ("s",), "y"),
    ]
    walk = find_regions(ops, ["y"])
    assert [(r.value, r.ops) for r in walk.regions] == [("a", ("pre", "a"))]
    assert [n.category for n in walk.not_folded] == ["cost"]
