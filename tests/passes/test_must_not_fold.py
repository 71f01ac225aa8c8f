"""What must not fold, one test each: the graph keeps the ops, the report says why, and the
result still equals the original. Shared weights fold into new tensors and keep the shared one intact."""

from __future__ import annotations

import pytest
import torch
from helpers import DIALECTS, fold_in, randomize_bn, snapshot, unchanged
from torch import nn

import branchfold

ALL = pytest.mark.parametrize("dialect", DIALECTS)


class TwoConvs(nn.Module):
    def __init__(self, a: nn.Module, b: nn.Module) -> None:
        super().__init__()
        self.a, self.b = a, b

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


@ALL
def test_shared_module_folded_with_a_private_one_stays_intact_for_its_other_user(dialect):
    """A module called twice, summed at one call with a private module: the fold writes a new weight for
    that call (it fits in the private weight it replaces) and leaves the shared module as it was for its
    other call."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.other = nn.Linear(6, 6), nn.Linear(6, 6)

        def forward(self, x):
            inside = torch.relu(self.shared(x) + self.other(x))
            return inside + torch.tanh(self.shared(x))  # second, unrelated use of the same module

    m = M().eval()
    snap = snapshot(m)
    f = fold_in(dialect, m, (torch.randn(3, 6),))
    assert len(f.regions) == 1 and "shared-weight" not in f.reasons()
    assert f.count("linear") == 2  # the folded sum, and the shared module's other call
    assert unchanged(m, snap)  # and ``fold_in`` checked the folded graph against the model


@ALL
def test_shared_module_is_not_copied_into_a_private_chain(dialect):
    """A module called from two places, each after its own LayerNorm: folding either norm into it would
    write a copy of its weight per call site (GroupedMLP's memory, multiplied)."""

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2, self.shared = nn.LayerNorm(6), nn.LayerNorm(6), nn.Linear(6, 6)

        def forward(self, x):
            return torch.relu(self.shared(self.n1(x))) + torch.tanh(self.shared(self.n2(x)))

    m = M().eval()
    with torch.no_grad():
        for n in (m.n1, m.n2):
            n.weight.normal_(1.0, 0.2)
            n.bias.normal_(0.0, 0.2)
    snap = snapshot(m)
    f = fold_in(dialect, m, (torch.randn(3, 6),))
    assert f.regions == [] and "shared-weight" in f.reasons()
    assert f.count("linear") == 2
    assert unchanged(m, snap)


def test_grouped_mlp_module_reuse_keeps_working():
    from branchfold.zoo import ZOO

    e = ZOO["grouped-mlp"]
    m = e.build().eval()
    snap = snapshot(m)
    x = e.example_input(m, 2)
    r = branchfold.fold_with_report(m, x)
    assert unchanged(m, snap)
    assert r.report.verified and r.report.max_error <= 1e-5
    # the shared MLP's branches fold once per group (content-deduplicated), not once per call site
    assert r.report.counts_by_kind()["parallel-sum"] == 8
    assert r.report.skipped_by_reason()["shared-weight"] > 0  # LN→shared fc1 is refused, not un-shared
    single = e.single_path(m).eval()
    assert r.report.after.params <= branchfold.fold_with_report(single, x).report.after.params


@ALL
def test_batchnorm_in_training_mode_is_left_alone(dialect):
    m = TwoConvs(nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)), nn.Conv2d(3, 3, 1)).train()
    if dialect != "symbolic_trace":  # dynamo/export record the batch-statistics op itself
        m.a[1].eval()
        m.a[1].track_running_stats = False
        m.a[1].running_mean = m.a[1].running_var = None
    f = fold_in(dialect, m, (torch.randn(2, 3, 5, 5),), check=False)
    assert f.count("bn") == 1 and f.count("conv") == 2
    assert "training-mode" in f.reasons()


def test_dropout_in_training_mode_is_not_identity():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.drop = nn.Linear(6, 6), nn.Linear(6, 6), nn.Dropout(0.5)

        def forward(self, x):
            return torch.relu(self.a(x) + self.drop(self.b(x)))

    m = M().train()
    f = fold_in("symbolic_trace", m, (torch.randn(3, 6),), check=False)
    assert f.regions == [] and "training-mode" in f.reasons()
    f = fold_in("symbolic_trace", m.eval(), (torch.randn(3, 6),))  # and in eval it is the identity
    assert f.count("linear") == 1


GEOMETRY = {
    "stride": (nn.Conv2d(3, 3, 3, 2, 1), nn.Conv2d(3, 3, 5, 1, 0)),  # both 8x8 -> 4x4
    "dilation": (nn.Conv2d(3, 3, 3, 1, 2, dilation=2), nn.Conv2d(3, 3, 3, 1, 1)),
    "reflect-different-kernels": (nn.Conv2d(3, 3, 3, 1, 1, padding_mode="reflect"),
                                  nn.Conv2d(3, 3, 1, 1, 0, padding_mode="reflect")),
    "circular-vs-zeros": (nn.Conv2d(3, 3, 3, 1, 1, padding_mode="circular"), nn.Conv2d(3, 3, 3, 1, 1)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(GEOMETRY))
@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_geometry_mismatch_does_not_fold(dialect, case):
    """(Misaligned padding needs asymmetric pads, which FX convs cannot express: see test_affine.)"""
    a, b = GEOMETRY[case]
    f = fold_in(dialect, TwoConvs(a, b).eval(), (torch.randn(2, 3, 8, 8),))
    assert f.regions == [] and f.count("conv") == 2
    if dialect == "symbolic_trace" or case in ("stride", "dilation"):
        assert "geometry" in f.reasons()
    # export writes non-zero padding modes as an explicit pad op: the branches read different values


def test_reflect_padding_with_identical_geometry_does_fold():
    a, b = (nn.Conv2d(3, 3, 3, 1, 1, padding_mode="reflect") for _ in range(2))
    f = fold_in("symbolic_trace", TwoConvs(a, b).eval(), (torch.randn(2, 3, 8, 8),))
    assert f.count("conv") == 1


@ALL
def test_shift_before_zero_padded_conv_does_not_fold(dialect):
    m = randomize_bn(nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1))).eval()
    f = fold_in(dialect, m, (torch.randn(2, 3, 6, 6),))
    assert f.regions == [] and "padding-border" in f.reasons()
    assert f.count("bn") == 1


def test_bias_of_1x1_before_zero_padded_conv_does_not_fold():
    m = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1)).eval()
    f = fold_in("symbolic_trace", m, (torch.randn(2, 3, 6, 6),))
    assert f.regions == [] and "padding-border" in f.reasons()


def test_scale_only_before_padded_conv_does_fold():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.rand(1, 3, 1, 1) + 0.5)
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return self.conv(x * self.g)

    f = fold_in("symbolic_trace", M().eval(), (torch.randn(2, 3, 6, 6),))
    assert len(f.regions) == 1 and f.count("conv") == 1


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_non_constant_weights_do_not_fold(dialect):
    class M(nn.Module):
        def forward(self, x, w1, w2):
            return torch.relu(torch.nn.functional.linear(x, w1) + torch.nn.functional.linear(x, w2))

    xs = (torch.randn(3, 4), torch.randn(4, 4), torch.randn(4, 4))
    f = fold_in(dialect, M(), xs)
    assert f.regions == [] and "non-constant" in f.reasons()


@ALL
def test_low_rank_chain_is_not_grown(dialect):
    m = nn.Sequential(nn.Linear(64, 4), nn.Linear(4, 64)).eval()
    f = fold_in(dialect, m, (torch.randn(3, 64),))
    assert f.regions == [] and "cost" in f.reasons()
    assert f.count("linear") == 2


def test_branches_whose_union_kernel_costs_more_do_not_fold():
    m = TwoConvs(nn.Conv2d(4, 4, (1, 5), padding=(0, 2)), nn.Conv2d(4, 4, (5, 1), padding=(2, 0))).eval()
    f = fold_in("symbolic_trace", m, (torch.randn(2, 4, 7, 7),))
    assert f.regions == [] and "cost" in f.reasons()


def test_wrong_broadcast_axis_is_not_a_channel_scale():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.register_buffer("s", torch.rand(1, 1, 1, 6) + 0.5)  # varies along width, not channels

        def forward(self, x):
            return self.conv(x) * self.s

    f = fold_in("symbolic_trace", M().eval(), (torch.randn(2, 3, 6, 6),))
    assert f.regions == []


def test_residual_plus_nonlinear_branch_is_not_a_region():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return x + torch.relu(self.fc(x))

    f = fold_in("symbolic_trace", M().eval(), (torch.randn(3, 6),))
    assert f.regions == []


def test_size_arithmetic_is_not_mistaken_for_a_scale():
    """``x.size(0) * 4 * 2`` is integer arithmetic: recognizing it as two scales would rewrite it into tensors."""

    class SizeMath(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            rows = x.size(0) * 4 * 2
            return self.fc(x).reshape(rows, -1)

    m, x = SizeMath().eval(), torch.randn(4, 8)
    r = branchfold.fold_with_report(m, (x,), capture="symbolic_trace")
    assert r.report.verified and r.report.folded == []
    assert torch.equal(r.model(x), m(x))
