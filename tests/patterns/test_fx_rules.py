"""Every folding rule, in every FX dialect: how many regions fold, how many ops remain, equality.

Each model here is tiny and built for one rule; ``fold_in`` (tests/helpers.py) captures it with
symbolic_trace, dynamo (weights as placeholder constants) or torch.export, runs ``FoldBranchesPass`` and
checks the folded graph against the original to 1e-5 relative error.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DIALECTS, fold_in, fresh, randomize_bn, rel_err
from torch import nn

torch.manual_seed(0)
ALL = pytest.mark.parametrize("dialect", DIALECTS)
# run_decompositions() writes addmm / convolution / _native_batch_norm_legit_no_training (a tuple + getitem)
WITH_DECOMPOSED = pytest.mark.parametrize("dialect", (*DIALECTS, "export-decomposed"))


class Parallel(nn.Module):
    """K linears on one input, summed in one of three spellings, before a nonlinearity."""

    def __init__(self, k: int, bias: bool, spelling: str, d: int = 12) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(d, d, bias=bias and i % 2 == 0) for i in range(k))
        self.spelling = spelling

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.spelling == "sum":
            y = sum(outs)
        elif self.spelling == "torch.add":
            y = outs[0]
            for o in outs[1:]:
                y = torch.add(y, o)
        else:
            y = outs[0]
            for o in outs[1:]:
                y = y + o
        return torch.nn.functional.gelu(y)


@WITH_DECOMPOSED
@pytest.mark.parametrize("k,bias,spelling", [(2, True, "+"), (3, False, "torch.add"), (5, True, "sum")])
def test_parallel_linears_fold_to_one(dialect, k, bias, spelling):
    m = Parallel(k, bias, spelling).eval()
    f = fold_in(dialect, m, (torch.randn(2, 5, 12),))
    assert f.kinds == {"parallel-sum": 1}
    assert f.before["linear"] == k and f.count("linear") == 1
    assert f.ops_after == 2  # linear + gelu


def bn(c: int, dim: int = 2) -> nn.Module:
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](c)


class ConvBranches(nn.Module):
    """Conv branches of different kernel shapes (each optionally + BN) and an optional identity(+BN)."""

    def __init__(self, c, kernels, dim=2, groups=1, with_bn=True, identity="bn", stride=1):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.branches = nn.ModuleList()
        for k in kernels:
            k = (k,) * dim if isinstance(k, int) else k
            pad = tuple(kk // 2 for kk in k)
            layers = [conv(c, c, k, stride, pad, groups=groups, bias=not with_bn)]
            if with_bn:
                layers.append(bn(c, dim))
            self.branches.append(nn.Sequential(*layers))
        self.identity = {"bn": bn(c, dim), "plain": nn.Identity(), None: None}[identity]

    def forward(self, x):
        y = sum(b(x) for b in self.branches)
        if self.identity is not None:
            y = y + self.identity(x)
        return torch.relu(y)


CONV_CASES = {
    "repvgg": dict(c=4, kernels=[3, 1]),
    "acnet": dict(c=4, kernels=[3, (1, 3), (3, 1)], identity=None),
    "5x5-3x3-1x1": dict(c=4, kernels=[5, 3, 1], identity="plain"),
    "5x5-1x5-5x1-no-bn": dict(c=4, kernels=[5, (1, 5), (5, 1)], with_bn=False, identity="plain"),
    "grouped": dict(c=8, kernels=[3, 1], groups=2),
    "depthwise": dict(c=6, kernels=[3, 1, 5], groups=6),
    "1d": dict(c=4, kernels=[5, 3, 1], dim=1),
    "3d": dict(c=3, kernels=[3, 1], dim=3),
    "strided": dict(c=4, kernels=[3, 1], stride=2, identity=None),
}


def conv_input(case: dict) -> torch.Tensor:
    dim = case.get("dim", 2)
    return torch.randn(2, case["c"], *([7] * dim if dim < 3 else [5] * dim))


@WITH_DECOMPOSED
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv_branches_fold_to_one_conv(dialect, case):
    spec = CONV_CASES[case]
    m = randomize_bn(ConvBranches(**spec)).eval()
    f = fold_in(dialect, m, (conv_input(spec),))
    assert f.kinds == {"parallel-sum": 1}
    assert f.count("conv") == 1 and f.count("bn") == 0
    assert f.ops_after == 2  # conv + relu


class Chain(nn.Module):
    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return torch.tanh(self.body(x))


class LayerScale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x):
        return x * self.gamma


class ChannelShift(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.register_buffer("shift", torch.randn(1, c, 1, 1))

    def forward(self, x):
        return x + self.shift


CHAINS = {  # name: (layers, input shape, {kind: count after})
    "conv-bn": (lambda: [nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)], (2, 3, 8, 8), {"conv": 1, "bn": 0}),
    "linear-bn1d": (lambda: [nn.Linear(6, 8), nn.BatchNorm1d(8)], (4, 6), {"linear": 1, "bn": 0}),
    "bn1d-linear": (lambda: [nn.BatchNorm1d(6), nn.Linear(6, 8)], (4, 6), {"linear": 1, "bn": 0}),
    "bn-conv-unpadded": (lambda: [nn.BatchNorm2d(3), nn.Conv2d(3, 5, 3)], (2, 3, 8, 8), {"conv": 1, "bn": 0}),
    "linear-layerscale": (lambda: [nn.Linear(6, 8), LayerScale(8)], (2, 3, 6), {"linear": 1}),
    "layerscale-linear": (lambda: [LayerScale(6), nn.Linear(6, 8)], (2, 3, 6), {"linear": 1}),
    "conv-shift": (lambda: [nn.Conv2d(3, 4, 3), ChannelShift(4)], (2, 3, 8, 8), {"conv": 1}),
    "1x1-3x3": (lambda: [nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3)], (2, 3, 8, 8), {"conv": 1}),
    "1x1-nobias-3x3-padded": (lambda: [nn.Conv2d(3, 8, 1, bias=False), nn.Conv2d(8, 8, 3, padding=1)],
                              (2, 3, 8, 8), {"conv": 1}),
    "3x3-1x1": (lambda: [nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)], (2, 3, 8, 8), {"conv": 1}),
    "dense-dense-narrowing": (lambda: [nn.Linear(16, 4), nn.Linear(4, 2)], (3, 16), {"linear": 1}),
}  # fmt: skip


@WITH_DECOMPOSED
@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chains_fold(dialect, name):
    layers, shape, after = CHAINS[name]
    m = randomize_bn(Chain(*layers())).eval()
    f = fold_in(dialect, m, (torch.randn(shape),))
    assert f.kinds == {"chain": 1}
    for kind, n in after.items():
        assert f.count(kind) == n, kind
    assert f.ops_after == 2


class LNQKV(nn.Module):
    """LayerNorm feeding three projections (and a shape query, as attention code does)."""

    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d, bias=False)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.normal_()

    def forward(self, x):
        h = self.norm(x)
        b, n, c = h.shape
        q, k, v = self.q(h), self.k(h), self.v(h)
        att = torch.softmax(q @ k.transpose(-2, -1), -1)
        return (att @ v).reshape(b, n, c)


@WITH_DECOMPOSED
def test_layer_norm_affine_folds_into_every_consumer(dialect):
    f = fold_in(dialect, LNQKV().eval(), (torch.randn(2, 5, 8),))
    assert f.kinds == {"chain": 3}
    assert all(r.labels[0] in ("layer_norm", "LayerNorm") for r in f.regions)
    lns = [n for n in f.gm.graph.nodes if "layer_norm" in str(n.target) or n.op == "call_module"]
    assert len([n for n in lns if "norm" in str(n.target)]) == 1  # one plain LayerNorm left, no γ/β
    assert f.count("linear") == 3


class AvgPoolBranch(nn.Module):
    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.pool = nn.AvgPool2d(3, 1, 1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(self.conv(x) + self.bn(self.pool(x)))


@ALL
def test_average_pool_branch_folds(dialect):
    f = fold_in(dialect, randomize_bn(AvgPoolBranch()).eval(), (torch.randn(2, 4, 6, 6),))
    assert f.kinds == {"parallel-sum": 1}
    assert f.count("conv") == 1 and f.ops_after == 2


class Nested(nn.Module):
    """A 1x1→3x3 branch inside a sum, BN in every branch, and a sum of two sums."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.b = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.c = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.Conv2d(c, c, 3, padding=1, bias=False),
                               nn.BatchNorm2d(c))  # fmt: skip
        self.d = nn.Sequential(nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(c))
        self.e = nn.BatchNorm2d(c)

    def forward(self, x):
        left = self.a(x) + self.b(x)
        right = self.c(x) + (self.d(x) + self.e(x))
        return torch.relu(left + right)


@ALL
def test_nested_sums_fold_to_one_conv(dialect):
    f = fold_in(dialect, randomize_bn(Nested()).eval(), (torch.randn(2, 4, 6, 6),))
    assert f.kinds == {"parallel-sum": 1}
    assert f.count("conv") == 1 and f.count("bn") == 0 and f.ops_after == 2
    assert len(f.regions[0].ops) == f.ops_before - 1  # everything but the ReLU


@ALL
def test_seed_vit_has_no_more_linears_than_plain_vit(dialect):
    from branchfold.zoo import ZOO, seed_vit

    m = seed_vit(depth=2, branches=3).eval()
    x = ZOO["seed-vit"].example_input(m, 2)
    plain = ZOO["seed-vit"].single_path(m).eval()
    f = fold_in(dialect, m, x)
    p = fold_in(dialect, plain, x)
    per_block = 6  # q, k, v, proj, fc1, fc2
    assert f.kinds.get("parallel-sum") == 2 * per_block
    assert f.count("linear") == p.before["linear"] == (f.before["linear"] - 1) // 3 + 1  # + the head
    assert f.ops_after <= p.ops_after
    with torch.no_grad():  # and the folded ViT equals the hand-written plain one
        xs = fresh(x)
        out = f.run(*xs)
        assert rel_err(plain(*xs), out[0] if isinstance(out, tuple) else out) <= 1e-5


class LinearFlatBN(nn.Module):
    """LeViT's MLPLayerWithBN: ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.linear, self.bn = nn.Linear(d, d, bias=False), nn.BatchNorm1d(d)

    def forward(self, x):
        y = self.linear(x)
        return torch.tanh(self.bn(y.flatten(0, 1)).reshape_as(y))


@pytest.mark.parametrize("dialect", ["export", "export-decomposed"])
def test_linear_then_bn_through_a_flatten_folds(dialect):
    f = fold_in(dialect, randomize_bn(LinearFlatBN()).eval(), (torch.randn(2, 5, 6),))
    assert f.kinds == {"chain": 1} and f.count("bn") == 0 and f.ops_after == 2
