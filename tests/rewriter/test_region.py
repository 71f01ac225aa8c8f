"""The frontend-neutral walk on hand-built op lists: which regions it finds, where they end, and why it
refuses. Keys and values are strings; maps are small dense / diagonal maps."""

from __future__ import annotations

import torch

from branchfold.rewriter.affine import F64, Conv, Dense, Diagonal, Lookup, value
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
    assert torch.allclose(value(r.map.weight), expected)
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
    # s is a boundary (docs/design.md §4): t = s + c(x) adds values of different sources; c stays alone
    assert [r.value for r in w.regions] == ["s"]


def test_residual_identity_branch():
    ops = [aff("a", "x", dense(1)), add("s", "x", "a"), opaque("r", "s")]
    (r,) = find_regions(ops, ["r"]).regions
    assert r.source == "x" and torch.allclose(value(r.map.weight), dense(1).weight + torch.eye(4, dtype=F64))


def test_subtraction_negates():
    ops = [aff("a", "x", dense(1)), aff("b", "x", dense(2)), Op("s", "sub", ("a", "b"), "s", label="sub"),
           opaque("r", "s")]  # fmt: skip
    (r,) = find_regions(ops, ["r"]).regions
    assert torch.allclose(value(r.map.weight), dense(1).weight - dense(2).weight)


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
    assert r.source == "x" and torch.allclose(value(r.map.weight), dense(1).weight + 2 * torch.eye(4, dtype=F64))


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


# -- cost refusals cut at the cheapest point --------------------------------------------------------


def _ops_after(ops: list[Op], walk) -> int:
    """Affine ops left once the regions are emitted: each region is one op, the rest stay as they are."""
    affine = [op.key for op in ops if op.kind != "opaque"]
    folded = {k for r in walk.regions for k in r.ops}
    return len(walk.regions) + sum(1 for k in affine if k not in folded)


def test_refused_inverted_residual_chain_keeps_both_conv_bn_pairs():
    """project 16->4 → BN → expand 4->16 → BN: the whole chain is a 16x16 map (256 MACs vs 148), so it is
    refused; the cheapest cut still folds each BN (2 ops left, not 3 as with "cut before the last op")."""
    ops = [aff("project", "x", dense(1, 16, 4)), aff("bn1", "project", diag(4), label="bn"),
           aff("expand", "bn1", dense(2, 4, 16)), aff("bn2", "expand", diag(16), label="bn"),
           opaque("act", "bn2")]  # fmt: skip
    w = find_regions(ops, ["act"])
    assert _ops_after(ops, w) == 2
    assert {k for r in w.regions for k in r.ops} >= {"bn1", "expand", "bn2"}
    assert all(r.cost_after <= r.cost_before for r in w.regions)
    assert "cost" in {n.category for n in w.not_folded}


def test_cheapest_cut_is_not_always_before_the_last_op():
    """a (16->2) → b (2->16) → BN → BN: the whole chain costs 256 MACs vs 96 and is refused. Cutting before
    the last op again and again would leave all four ops; the cheapest cut is after a: two ops."""
    ops = [aff("a", "x", dense(1, 16, 2)), aff("b", "a", dense(2, 2, 16)), aff("bn1", "b", diag(16), label="bn"),
           aff("bn2", "bn1", diag(16), label="bn"), opaque("r", "bn2")]  # fmt: skip
    w = find_regions(ops, ["r"])
    assert [r.ops for r in w.regions] == [("b", "bn1", "bn2")] and _ops_after(ops, w) == 2
    assert w.rounds >= 2


def test_cheapest_cut_on_convs_keeps_depthwise_then_bn_then_pointwise_apart():
    """depthwise 3x3 → BN → 1x1 (8->2): one dense 3x3 would cost 144 MACs vs 72 + 8 + 16; BN folds into one."""
    g = torch.Generator().manual_seed(0)
    dw = Conv(torch.randn(8, 1, 3, 3, generator=g, dtype=F64), torch.zeros(8, dtype=F64), (1, 1),
              ((1, 1), (1, 1)), (1, 1), 8)  # fmt: skip
    pw = Conv(torch.randn(2, 8, 1, 1, generator=g, dtype=F64), torch.zeros(2, dtype=F64), (1, 1),
              ((0, 0), (0, 0)), (1, 1), 1)  # fmt: skip
    bn = Diagonal(torch.rand(8, dtype=F64) + 0.5, torch.randn(8, dtype=F64), -3)
    ops = [aff("dw", "x", dw, label="conv"), aff("bn", "dw", bn, label="bn"), aff("pw", "bn", pw, label="conv"),
           opaque("r", "pw")]  # fmt: skip
    w = find_regions(ops, ["r"])
    assert _ops_after(ops, w) == 2 and len(w.regions) == 1 and "bn" in w.regions[0].ops


class _InvertedResiduals(torch.nn.Module):
    """Two MBConv-style blocks without a residual between: ``project 1x1 (64->16) → BN → the next block's
    expand 1x1 (16->64) → BN → SiLU``. Folding project through expand would be one 64x64 conv, so that
    chain is refused; the hand-written deploy model keeps 4 convs (each with its BN folded) and 3 SiLUs."""

    def __init__(self, big: int = 64, small: int = 16) -> None:
        super().__init__()
        nn = torch.nn
        self.expand1, self.bn1 = nn.Conv2d(small, big, 1, bias=False), nn.BatchNorm2d(big)
        self.dw, self.bn2 = nn.Conv2d(big, big, 3, padding=1, groups=big, bias=False), nn.BatchNorm2d(big)
        self.project, self.bn3 = nn.Conv2d(big, small, 1, bias=False), nn.BatchNorm2d(small)
        self.drop = nn.Dropout(0.2)  # StochasticDepth/Dropout: the identity in eval
        self.expand2, self.bn4 = nn.Conv2d(small, big, 1, bias=False), nn.BatchNorm2d(big)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn1(self.expand1(x)))
        y = self.act(self.bn2(self.dw(y)))
        y = self.drop(self.bn3(self.project(y)))
        return self.act(self.bn4(self.expand2(y)))


def test_fold_keeps_every_conv_bn_pair_of_a_refused_inverted_residual_chain():
    import branchfold
    from tests.helpers import randomize_bn

    model, x = randomize_bn(_InvertedResiduals()).eval(), torch.randn(2, 16, 8, 8)
    for capture in ("export", "symbolic_trace"):
        result = branchfold.fold_with_report(model, (x,), capture=capture)
        assert result.report.verified and result.report.after.ops == 7  # 4 convs, 3 SiLUs: no BN left
        assert "cost" in result.report.skipped_by_reason()
        with torch.no_grad():
            assert torch.allclose(model(x), result.model(x), atol=1e-5, rtol=1e-5)


def lookup(seed: int, rows: int = 50, width: int = 8) -> Lookup:
    return Lookup(torch.randn(rows, width, generator=torch.Generator().manual_seed(seed), dtype=F64))


def lora_on_a_lookup(rank: int = 2) -> list[Op]:
    """``emb(idx, T) + B(emb(idx, A)) * s`` then a nonlinearity: LoRA on an embedding."""
    return [aff("t", "idx", lookup(1), label="embedding"), aff("a", "idx", lookup(2, width=rank), label="embedding"),
            aff("b", "a", dense(3, rank, 8)), aff("s", "b", diag(8), label="scale"), add("sum", "t", "s"),
            opaque("r", "sum")]  # fmt: skip


def test_a_low_rank_branch_summed_into_a_lookup_is_one_table():
    (r,) = find_regions(lora_on_a_lookup(), ["r"]).regions
    assert r.source == "idx" and isinstance(r.map, Lookup) and r.map.table.shape == (50, 8)
    assert r.cost_after == 8  # a lookup costs its width per position, not rows x width
    assert set(r.ops) == {"t", "a", "b", "s", "sum"}


def test_a_lone_low_rank_lookup_branch_is_not_widened_into_a_table():
    """Cheap per position but 50x8 stored values for 50x2 + 2x8: refused; the linear still takes the scale."""
    ops = [op for op in lora_on_a_lookup() if op.key not in ("t", "sum", "r")] + [opaque("r", "s")]
    w = find_regions(ops, ["r"])
    (r,) = w.regions
    assert set(r.ops) == {"b", "s"} and isinstance(r.map, Dense)
    assert any(n.category == "cost" and "parameters" in n.detail for n in w.not_folded)


def test_a_lookup_never_absorbs_its_indices_and_sums_only_with_lookups_of_them():
    ops = [aff("i2", "idx", diag(1), label="scale"), aff("t", "i2", lookup(1), label="embedding"),
           aff("u", "other", lookup(2), label="embedding"), add("sum", "t", "u"), opaque("r", "sum")]  # fmt: skip
    w = find_regions(ops, ["r"])
    assert w.regions == []  # idx * c is not a map of the table's rows; different indices do not sum
    ops = [aff("t", "idx", lookup(1), label="embedding"), opaque("r", "t")]
    assert find_regions(ops, ["r"]).regions == []  # a bare lookup stays as it is


def test_shared_weight_folds_with_private_ones_where_the_written_weight_fits_in_them():
    """An exporter that stores equal tensors once (PEFT's zero LoRA ``B`` of every layer) makes a private
    adapter branch read a shared weight: the sum with the layer's own base writes one weight that fits in
    the private ones it replaces, so it folds; a shared weight after a private norm would be copied per
    place (GroupedMLP), so it stays."""
    ops = [aff("base", "x", dense(1), shared=False), aff("a", "x", dense(2), shared=False),
           aff("b", "a", dense(3), shared=True), add("s", "base", "b"), opaque("t", "s")]  # fmt: skip
    w = find_regions(ops, ["t"])
    assert [r.value for r in w.regions] == ["s"] and "shared-weight" not in {n.category for n in w.not_folded}
    ops = [aff("ln", "x", diag(), split=True, label="layer_norm", shared=False),
           aff("w", "ln", dense(1), shared=True), aff("v", "x", dense(2), shared=False), add("s", "w", "v"),
           opaque("t", "s")]  # fmt: skip
    w = find_regions(ops, ["t"])
    assert [r.value for r in w.regions] == [] or all("ln" not in r.ops for r in w.regions)
    assert "shared-weight" in {n.category for n in w.not_folded}
