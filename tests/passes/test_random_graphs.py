"""Property tests: random multi-branch conv / linear blocks (random K, kernels, strides, groups, BN,
identity, avg-pool and 1x1→KxK branches, random nesting of the sums) and sums of embedding lookups of one
index tensor (tables, scaled, chained, low-rank) fold to exactly what they equal,
and to a single op whenever the fused op is not costlier than the branches (the cost rule, recomputed
here from the drawn spec).
"""

from __future__ import annotations

import math

import torch
from helpers import fold_in, randomize_bn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn


class Tree(nn.Module):
    """Sums ``branches`` following a random binary ``shape`` (nested lists of branch indices)."""

    def __init__(self, branches: list[nn.Module], shape) -> None:
        super().__init__()
        self.branches, self.shape = nn.ModuleList(branches), shape

    def _sum(self, node, x):
        if isinstance(node, int):
            return self.branches[node](x)
        left, right = node
        return self._sum(left, x) + self._sum(right, x)

    def forward(self, x):
        return torch.relu(self._sum(self.shape, x))


@st.composite
def nesting(draw, n: int):
    """A random binary tree over the indices 0..n-1."""
    nodes: list = list(range(n))
    while len(nodes) > 1:
        i = draw(st.integers(0, len(nodes) - 2))
        nodes[i : i + 2] = [[nodes[i], nodes[i + 1]]]
    return nodes[0]


@st.composite
def conv_block(draw):
    c = draw(st.sampled_from([2, 4]))
    stride = draw(st.sampled_from([1, 1, 2]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if c % g == 0]))
    k = draw(st.integers(2, 4))
    branches, costs, kernel, common = [], 0, [1, 1], groups
    for i in range(k):
        kind = draw(st.sampled_from(["conv", "conv", "conv", "1x1-kxk", "pool", "identity"])) if i else "conv"
        if kind == "identity" and stride != 1:
            kind = "conv"
        bn = draw(st.booleans())
        if kind == "conv":
            kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (5, 5), (1, 3), (3, 1), (1, 5), (5, 1)]))
            layers = [nn.Conv2d(c, c, (kh, kw), stride, (kh // 2, kw // 2), groups=groups, bias=not bn)]
            costs += c * c // groups * kh * kw
        elif kind == "1x1-kxk":
            kk = draw(st.sampled_from([1, 3]))
            layers = [nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, kk, stride, kk // 2, bias=not bn)]
            kh = kw = kk
            costs += c * c + c * c * kk * kk
            common = 1
        elif kind == "pool":
            layers, (kh, kw) = [nn.AvgPool2d(3, stride, 1)], (3, 3)
            costs += c * 9
            common = math.gcd(common, c)
        else:
            layers, (kh, kw) = [], (1, 1)
            costs += c if bn else 0
            common = math.gcd(common, c)
        if bn:
            layers.append(nn.BatchNorm2d(c))
            costs += c
        kernel = [max(kernel[0], kh), max(kernel[1], kw)]
        branches.append(nn.Sequential(*layers) if layers else nn.Identity())
    costs += c * (k - 1)  # the adds
    after = c * c // common * kernel[0] * kernel[1]
    model = randomize_bn(Tree(branches, draw(nesting(k))), seed=draw(st.integers(0, 99))).eval()
    return model, c, after <= costs


@settings(max_examples=40, deadline=None)
@given(conv_block(), st.integers(5, 8), st.integers(0, 2**16))
def test_random_conv_blocks_fold_exactly(block, size, seed):
    model, c, cheaper = block
    x = torch.randn(2, c, size, size, generator=torch.Generator().manual_seed(seed))
    f = fold_in("symbolic_trace", model, (x,))
    if cheaper:
        assert len(f.regions) == 1 and f.count("conv") == 1 and f.count("bn") == 0
        assert f.ops_after == 2
    else:
        assert f.ops_after <= f.ops_before and {n.category for n in f.not_folded} <= {"cost"}


@st.composite
def linear_block(draw):
    d = draw(st.sampled_from([4, 8]))
    k = draw(st.integers(2, 6))
    branches = []
    for _ in range(k):
        kind = draw(st.sampled_from(["linear", "linear", "scaled", "chain", "identity"]))
        bias = draw(st.booleans())
        if kind == "linear":
            branches.append(nn.Linear(d, d, bias=bias))
        elif kind == "scaled":
            branches.append(nn.Sequential(nn.Linear(d, d, bias=bias), Scale(d)))
        elif kind == "chain":
            branches.append(nn.Sequential(nn.Linear(d, d, bias=bias), nn.Linear(d, d)))
        else:
            branches.append(nn.Identity())
    return Tree(branches, draw(nesting(k))).eval(), d


class Scale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.g


@settings(max_examples=30, deadline=None)
@given(linear_block(), st.sampled_from(["symbolic_trace", "symbolic_trace", "export"]), st.integers(0, 2**16))
def test_random_linear_blocks_fold_to_one_linear(block, dialect, seed):
    model, d = block
    f = fold_in(dialect, model, (torch.randn(3, 2, d, generator=torch.Generator().manual_seed(seed)),))
    if all(isinstance(b, nn.Identity) for b in model.branches):
        assert f.count("linear") == 0
        return
    assert len(f.regions) == 1 and f.count("linear") == 1 and f.ops_after == 2


@st.composite
def lookup_block(draw):
    """Summed branches that each start with a lookup of the same indices: a table, a scaled table, a table then
    a linear, a low-rank table then a linear (LoRA on an embedding). The first branch is a full table, so the
    folded table never stores more than the branches did."""
    rows, d, rank = draw(st.sampled_from([5, 20])), draw(st.sampled_from([4, 8])), 2
    k = draw(st.integers(2, 5))
    branches: list[nn.Module] = [nn.Embedding(rows, d)]
    for _ in range(k - 1):
        kind = draw(st.sampled_from(["table", "scaled", "chain", "low-rank"]))
        if kind == "table":
            branches.append(nn.Embedding(rows, d))
        elif kind == "scaled":
            branches.append(nn.Sequential(nn.Embedding(rows, d), Scale(d)))
        elif kind == "chain":
            branches.append(nn.Sequential(nn.Embedding(rows, d), nn.Linear(d, d, bias=draw(st.booleans()))))
        else:
            branches.append(nn.Sequential(nn.Embedding(rows, rank), nn.Linear(rank, d, bias=False)))
    return Tree(branches, draw(nesting(k))).eval(), rows


@settings(max_examples=20, deadline=None)
@given(lookup_block(), st.sampled_from(["symbolic_trace", "export"]), st.integers(0, 2**16))
def test_random_lookup_blocks_fold_to_one_lookup(block, dialect, seed):
    model, rows = block
    f = fold_in(dialect, model, (torch.randint(0, rows, (3, 4), generator=torch.Generator().manual_seed(seed)),))
    assert len(f.regions) == 1 and f.ops_after == 2  # one lookup of the folded table, and the relu
