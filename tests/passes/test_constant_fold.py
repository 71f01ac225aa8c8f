"""Weight-only constant folding (``ConstantFoldPass``): what depends only on weights is computed once.

The LeViT-style attention caches its bias gather ``biases[:, idx]`` on the first eval call, as timm's LeViT
and TinyViT do; every capture recomputes it per call. After the pass the gather is a stored buffer, in every
FX dialect, and the graph has the op count of a hand-written model that stores the gathered bias.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import branchfold
from branchfold.passes.fx import FoldBranchesPass
from branchfold.passes.fx_constant_fold import ConstantFoldPass, fold_constants
from branchfold.passes.pipeline import count_ops, count_params
from branchfold.zoo import ZOO
from tests.helpers import DIALECTS, capture, rel_err, snapshot, unchanged

aten = torch.ops.aten


class LeViTAttention(nn.Module):
    """timm's LeViT attention, reduced: ``attention_biases[heads, offsets]`` gathered by a ``[T, T]`` index,
    cached per device in eval mode."""

    def __init__(self, dim: int = 32, heads: int = 4, resolution: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                offset = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(offset, len(offsets)))
        self.attention_biases = nn.Parameter(torch.randn(heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)),
            persistent=False,
        )  # fmt: skip
        self.attention_bias_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.attention_bias_cache:
            self.attention_bias_cache = {}
        return self

    def get_attention_biases(self, device: torch.device) -> torch.Tensor:
        if torch.jit.is_tracing() or self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def attention_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.get_attention_biases(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_bias(x)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class StoredBiasAttention(LeViTAttention):
    """The hand-written single path: the gathered bias is a buffer, computed once."""

    def __init__(self, source: LeViTAttention) -> None:
        nn.Module.__init__(self)
        self.heads, self.head_dim, self.scale = source.heads, source.head_dim, source.scale
        self.qkv, self.proj = copy.deepcopy(source.qkv), copy.deepcopy(source.proj)
        with torch.no_grad():
            self.register_buffer("bias", source.attention_biases[:, source.attention_bias_idxs].clone())

    def attention_bias(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias


def levit(seed: int = 0) -> LeViTAttention:
    torch.manual_seed(seed)
    return LeViTAttention().eval()


def fold_graph(model: nn.Module, x: torch.Tensor, dialect: str):
    """Capture (a copy: symbolic_trace would leave a Proxy in the model's cache), then fold constants and
    branches as ``fold`` does. Returns the graph, the constant result and a runner."""
    gm, constants, run = capture(copy.deepcopy(model), (x,), dialect)
    constant_pass = ConstantFoldPass(constants)
    constant_pass.call(gm)
    FoldBranchesPass(constants).call(gm)
    return gm, constant_pass.result, run


def first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def reads(gm: fx.GraphModule, name_part: str) -> list[fx.Node]:
    """Nodes that read a stored tensor or placeholder whose name contains ``name_part``."""
    sources = [n for n in gm.graph.nodes if n.op in ("get_attr", "placeholder") and name_part in str(n.target)]
    return [u for s in sources for u in s.users]


@pytest.mark.parametrize("dialect", DIALECTS)
def test_levit_bias_gather_is_computed_once(dialect: str) -> None:
    model, x = levit(), torch.randn(2, 16, 32)
    with torch.no_grad():
        reference = copy.deepcopy(model)(x)
    gm, result, run = fold_graph(model, x, dialect)
    assert len(result.folded) == 1 and result.folded[0].shape == (4, 16, 16)
    assert reads(gm, "attention_biases") == []  # no index / getitem of the bias any more
    gathers = [n for n in gm.graph.nodes if n.target in (aten.index.Tensor,) or "index" in str(n.target)]
    assert gathers == []
    with torch.no_grad():
        assert rel_err(reference, first(run(x))) == 0.0  # the same ops, run once: bit-identical
        assert rel_err(model(x * 2), first(run(x * 2))) <= 1e-6
    single, s_constants, _ = capture(StoredBiasAttention(model), (x,), dialect)
    FoldBranchesPass(s_constants).call(single)
    assert count_ops(gm) == count_ops(single)


def test_fold_reports_the_constant_and_never_touches_the_users_tensors() -> None:
    model, x = levit(), torch.randn(2, 16, 32)
    before = snapshot(model)
    result = branchfold.fold_with_report(model, (x,))
    assert unchanged(model, before)
    assert any(line.startswith("constant subgraphs: 1 computed once") for line in result.report.notes)
    stored = result.model.branchfold_constant_1
    assert stored.untyped_storage().data_ptr() != model.attention_biases.untyped_storage().data_ptr()
    with torch.no_grad():
        assert rel_err(model(x), result.model(x)) == 0.0


class RuntimeWeight(nn.Module):
    """A weight scaled by a statistic of the input: computed per call, never a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight * (self.scale * x.abs().mean())
        return F.linear(x, w)


class RandomWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + 0.1 * torch.randn_like(self.weight))


class MutatedBuffer(nn.Module):
    """A buffer written in place in forward (a counter), and an accumulator built from a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.count.add_(1)
        acc = torch.zeros(8)
        acc += x.sum(0)
        return x * (self.count * 2) + acc


@pytest.mark.parametrize("dialect", DIALECTS)
def test_weight_computed_from_the_input_stays(dialect: str) -> None:
    model, x = RuntimeWeight().eval(), torch.randn(3, 8)
    gm, result, run = fold_graph(model, x, dialect)
    assert result.folded == []
    with torch.no_grad():
        assert rel_err(model(x * 3), first(run(x * 3))) <= 1e-6


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_random_op_stays(dialect: str) -> None:
    model, x = RandomWeight().eval(), torch.randn(3, 8)
    gm, result, run = fold_graph(model, x, dialect)
    assert result.folded == []
    assert any("randn" in str(n.target) for n in gm.graph.nodes)
    with torch.no_grad():
        assert not torch.equal(first(run(x)), first(run(x)))  # still random on every call


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_mutated_tensors_are_not_constants(dialect: str) -> None:
    model, x = MutatedBuffer().eval(), torch.randn(3, 8)
    gm, _, _ = capture(copy.deepcopy(model), (x,), dialect)
    unfolded = copy.deepcopy(gm)
    result = fold_constants(gm)
    assert result.folded == []
    with torch.no_grad():
        for _ in range(3):  # the counter and the accumulator change from call to call
            assert torch.equal(unfolded(x), gm(x))


class WeightOps(nn.Module):
    """Transposes, concatenations and scales of weights in forward, as reparameterizable code writes them."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4, 8))
        self.b = nn.Parameter(torch.randn(4, 8))
        self.gamma = nn.Parameter(torch.rand(8) + 0.5)
        self.table = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.cat([self.a, self.b]) * self.gamma  # [8, 8], computed from weights alone
        y = x @ w.t()
        return y + self.table.t().reshape(-1)[:8] + self.table.repeat(64, 1).sum()


def test_weight_ops_fold_views_of_user_tensors_stay_and_growth_is_bounded() -> None:
    model, x = WeightOps().eval(), torch.randn(3, 8)
    gm = fx.symbolic_trace(model)
    result = fold_constants(gm, small=0)
    by_value = {f.replaced: f for f in result.folded}
    assert {"mul", "sum_1"} <= set(by_value) and by_value["mul"].ops == ["cat", "mul"]
    assert result.kept == []  # the repeat is summed at once: what is stored is one number
    methods = [n.target for n in gm.graph.nodes if n.op == "call_method"]
    assert "t" in methods  # w.t() of the stored product is a view: it stays, the product is stored
    assert not any(n.op == "get_attr" and n.target in ("a", "b") for n in gm.graph.nodes)
    with torch.no_grad():
        assert rel_err(model(x), gm(x)) == 0.0
    grown = fx.symbolic_trace(GrowingConstant())
    kept = fold_constants(grown, small=0)
    assert kept.folded == [] and len(kept.kept) == 1 and "kept per call" in kept.kept[0][1]


class GrowingConstant(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w.repeat(32, 1)[:, :1].t()


class SharedScaled(nn.Module):
    """One module called twice, scaling its weight in forward: the stored product stays shared."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.gain = nn.Parameter(torch.rand(8, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain)


class TwoCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = SharedScaled()
        self.norm1, self.norm2 = nn.LayerNorm(8), nn.LayerNorm(8)
        with torch.no_grad():
            for n in (self.norm1, self.norm2):
                n.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.norm1(x)).relu() + self.shared(self.norm2(x)).relu()


@pytest.mark.parametrize("dialect", DIALECTS)
def test_identical_computations_of_a_shared_weight_share_one_buffer(dialect: str) -> None:
    model, x = TwoCalls().eval(), torch.randn(3, 8)
    gm, constants, run = capture(model, (x,), dialect)
    result = fold_constants(gm, constants)
    assert len({f.name for f in result.folded}) == 1 and len(result.folded) == 2
    fold = FoldBranchesPass(constants)
    fold.call(gm)
    assert fold.result is not None and "shared-weight" in {n.category for n in fold.result.not_folded}
    with torch.no_grad():
        assert rel_err(model(x), first(run(x))) <= 1e-6


def test_grouped_mlp_keeps_its_sharing() -> None:
    """Each shared MLP stays one set of weights: un-sharing it would double the MLP parameters."""
    entry = ZOO["grouped-mlp"]
    model = entry.build().eval()
    x = entry.example_input(model, 2)
    report = branchfold.fold_with_report(model, x).report
    assert report.verified and report.after is not None
    assert report.after.params <= count_params(entry.single_path(model))
    assert "shared-weight" in report.skipped_by_reason()
