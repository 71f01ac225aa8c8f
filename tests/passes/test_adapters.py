"""Adapters are parallel linear branches: LoRA, DoRA and weight normalization fold with no adapter-specific
code, in the three FX dialects.

The hand-written modules below are the shapes PEFT writes, reduced: a low-rank pair summed into the base
linear (with the casts to the dtype a tensor already has and eval-mode dropout between), DoRA's base output
read twice (by the sum and by the rescaling of its own bias), weight normalization. Each folds to one linear;
what must not fold (a bare bottleneck, a cast that rounds, dropout in training) stays.
"""

from __future__ import annotations

import pytest
import torch
from helpers import DIALECTS, fold_in, rel_err
from torch import nn

import branchfold

D, R = 32, 4


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random (a fresh LoRA B is zero and a fresh bias may be: no fold exact by accident)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


class LoRA(nn.Module):
    """``base(x) + B(A(dropout(x))) * s`` as PEFT's LoRA layer computes it, casts included."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.base, self.a, self.b = nn.Linear(D, D), nn.Linear(D, R, bias=False), nn.Linear(R, D, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        dtype = x.dtype
        h = self.base(x)
        lora = x.to(self.a.weight.dtype)
        h = h + self.b(self.a(self.drop(lora))) * 2.0
        return torch.relu(h.to(dtype))


class DoRA(nn.Module):
    """DoRA's eval-mode form: ``m / ||W + s·B·A||`` is computed from weights only; the base output is
    read by the sum and by the rescaling of its bias-free part (a diamond)."""

    def __init__(self) -> None:
        super().__init__()
        self.base, self.a, self.b = nn.Linear(D, D), nn.Linear(D, R, bias=False), nn.Linear(R, D, bias=False)
        self.magnitude = nn.Parameter(torch.rand(D) + 0.5)

    def forward(self, x):
        h = self.base(x)
        w = self.base.weight + 2.0 * (self.b.weight @ self.a.weight)
        scale = (self.magnitude / torch.linalg.norm(w, dim=1).detach()).view(1, -1)
        lora = self.b(self.a(x))
        h = h + ((scale - 1) * (h - self.base.bias) + scale * lora * 2.0)
        return torch.relu(h)


class Bottleneck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, R), nn.Linear(R, D)

    def forward(self, x):
        return torch.relu(self.b(self.a(x)))


def x_in() -> torch.Tensor:
    return torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("dialect", DIALECTS)
def test_low_rank_pair_summed_into_the_base_linear_folds_through_casts_and_dropout(dialect):
    f = fold_in(dialect, randomized(LoRA()).eval(), (x_in(),))
    assert f.before["linear"] == 3 and f.count("linear") == 1
    assert "cost" not in f.reasons()
    assert f.ops_after == 2  # the linear and the relu: the casts and the dropout are gone with the sum


@pytest.mark.parametrize("dialect", DIALECTS)
def test_a_bare_bottleneck_stays_two_ops(dialect):
    f = fold_in(dialect, randomized(Bottleneck()).eval(), (x_in(),))
    assert f.count("linear") == 2 and f.regions == [] and "cost" in f.reasons()


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_a_cast_that_rounds_is_not_an_identity(dialect):
    class Rounded(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x.half().float()))

    f = fold_in(dialect, randomized(Rounded()).eval(), (x_in(),))
    assert f.count("linear") == 2 and f.regions == []


def test_dropout_in_training_leaves_the_adapter_and_says_why():
    f = fold_in("symbolic_trace", randomized(LoRA(dropout=0.5)).train(), (x_in(),), check=False)
    assert "training-mode" in f.reasons()
    assert f.count("linear") == 3  # the pair stays apart from the base linear (B may absorb the scale)


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_dora_diamond_folds_to_one_linear(dialect):
    """The pipeline computes the weight-only norm once; the base output read twice is then absorbed."""
    model = randomized(DoRA()).eval()
    with torch.no_grad():
        model.magnitude.abs_().add_(0.5)
    r = branchfold.fold_with_report(model, (x_in(),), capture=dialect, horizontal="off")
    assert r.report.verified and r.report.max_error <= 1e-5
    linears = [n for n in r.model.graph.nodes if "linear" in str(n.target)]
    assert len(linears) == 1
    assert r.report.after.params == D * D + D  # one weight and one bias: A, B and the magnitude are gone
    with torch.no_grad():
        assert torch.allclose(model(x_in() * 3), r.model(x_in() * 3), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("recipe", ["parametrizations", "legacy"])
def test_weight_norm_is_computed_once_and_folds_with_its_sum(recipe):
    class Normed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            wn = nn.utils.parametrizations.weight_norm if recipe == "parametrizations" else nn.utils.weight_norm
            self.a, self.b = wn(nn.Linear(D, D)), nn.Linear(D, D)

        def forward(self, x):
            return torch.relu(self.a(x) + self.b(x))

    model = Normed().eval()
    r = branchfold.fold_with_report(model, (x_in(),), horizontal="off")
    assert r.report.verified and r.report.max_error <= 1e-5
    assert sum("linear" in str(n.target) for n in r.model.graph.nodes) == 1
    assert r.report.after.params == D * D + D


V = 50


class EmbeddingLoRA(nn.Module):
    """PEFT's LoRA on an embedding, reduced: ``emb(idx, T) + (emb(idx, A.T) @ B.T) * s``, then a head."""

    def __init__(self, max_norm: float | None = None) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, max_norm=max_norm)
        self.a, self.b = nn.Parameter(torch.randn(R, V)), nn.Parameter(torch.randn(D, R))

    def forward(self, idx):
        return torch.relu(self.emb(idx) + (nn.functional.embedding(idx, self.a.T) @ self.b.T) * 2.0)


def idx_in(seed: int = 3) -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(seed))


def lookups(gm) -> int:
    """Embedding calls in any dialect: ``nn.Embedding`` modules, ``F.embedding``, ``aten.embedding``."""
    modules = sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.Embedding) for n in gm.graph.nodes)
    return modules + sum(n.op == "call_function" and "embedding" in str(n.target) for n in gm.graph.nodes)


@pytest.mark.parametrize("dialect", DIALECTS)
def test_lora_on_an_embedding_folds_into_one_table(dialect):
    model = randomized(EmbeddingLoRA()).eval()
    f = fold_in(dialect, model, (idx_in(),))
    (r,) = f.regions
    assert r.labels.count("add") == 1 and r.cost_after == D
    assert f.ops_after == 2 and lookups(f.gm) == 1  # one lookup of the folded table, and the relu
    (table,) = [p for n, p in f.gm.named_parameters() if n.startswith("branchfold_")]
    merged = model.emb.weight + 2.0 * model.a.T @ model.b.T  # what a merge computes, in float32
    assert table.shape == (V, D) and torch.allclose(table, merged, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert rel_err(model(idx_in(7)), f.run(idx_in(7))) <= 1e-6


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_what_cannot_fold_into_a_table_stays(dialect):
    """A bare embedding, a max_norm lookup (it renormalizes the rows it reads), lookups of different index
    tensors, a table another op reads too (tied with a head), a lone low-rank branch (a wider table)."""

    class Kept(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bare, self.normed = nn.Embedding(V, D), nn.Embedding(V, D, max_norm=1.0)
            self.other, self.tied = nn.Embedding(V, D), nn.Embedding(V, D)
            self.a, self.b = nn.Parameter(torch.randn(R, V)), nn.Parameter(torch.randn(D, R))
            self.c, self.d = nn.Parameter(torch.randn(R, V)), nn.Parameter(torch.randn(D, R))

        def forward(self, idx, jdx):
            bare = self.bare(idx)
            normed = self.normed(idx) + self.bare(idx)
            apart = self.bare(idx) + self.other(jdx)
            low_rank = nn.functional.embedding(idx, self.a.T) @ self.b.T
            tied = self.tied(idx) + nn.functional.embedding(idx, self.c.T) @ self.d.T
            head = nn.functional.linear(torch.relu(tied), self.tied.weight)  # reads the table as a weight
            return bare, torch.relu(normed), torch.relu(apart), torch.relu(low_rank), head

    model = randomized(Kept()).eval()
    with torch.no_grad():
        model.normed.weight.mul_(10)  # rows longer than max_norm: renormalized on lookup
    f = fold_in(dialect, model, (idx_in(), idx_in(4)), check=False)
    assert f.regions == []
    assert {"shared-weight", "cost"} <= f.reasons()
    # max_norm: refused where the call names it; export writes the renormalization into the table in place
    assert ("unsupported-args" if dialect == "symbolic_trace" else "non-constant") in f.reasons()
    with torch.no_grad():
        assert rel_err(model(idx_in(), idx_in(4)), f.run(idx_in(), idx_in(4))) == 0
