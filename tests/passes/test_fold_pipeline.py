"""``fold`` end to end: pytree outputs, the report, never touching the user's objects, training mode,
capture errors, GraphModule input, PassManager composition, low precision, and undoing a bad fold."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import randomize_bn, rel_err, snapshot, unchanged
from torch import fx, nn
from transformers.modeling_outputs import BaseModelOutput

import branchfold
from branchfold import CaptureError, FoldBranchesPass, ShapePropPass
from branchfold.passes.pipeline import count_ops

CAPTURES = ("export", "symbolic_trace")


class Block(nn.Module):
    """Two summed linears → GELU, then linear→BN1d; returns a configurable pytree."""

    def __init__(self, out: str = "tensor") -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 6)
        self.bn, self.out = nn.BatchNorm1d(6), out

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x) + self.b(x))
        y = torch.tanh(self.bn(self.c(h)))
        if self.out == "tuple":
            return y, (h, y * 2)
        if self.out == "dict":
            return {"y": y, "h": h, "rest": [y.sum()]}
        if self.out == "model_output":
            return BaseModelOutput(last_hidden_state=y, hidden_states=(h,))
        return y


def block(out="tensor") -> nn.Module:
    return randomize_bn(Block(out)).eval()


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("out", ["tensor", "tuple", "dict", "model_output"])
def test_pytree_outputs_keep_their_structure(capture, out):
    m, x = block(out), torch.randn(4, 8)
    r = branchfold.fold_with_report(m, (x,), capture=capture)
    with torch.no_grad():
        ref, got = m(x), r.model(x)
    assert type(got) is type(ref)
    if out == "model_output":
        assert list(got.keys()) == list(ref.keys())
    assert rel_err(ref, got) <= 1e-5
    assert r.report.counts_by_kind() == {"parallel-sum": 1, "chain": 1}


def test_report_contents():
    m, x = block(), torch.randn(4, 8)
    rep = branchfold.fold_with_report(m, (x,)).report
    assert rep.verified and 0 <= rep.max_error <= rep.tolerance == 1e-5
    assert rep.before.ops == 7 and rep.after.ops == 4  # a, b, add, gelu, c, bn, tanh -> linear, gelu, linear, tanh
    assert rep.after.params < rep.before.params and rep.after.macs < rep.before.macs
    (ps,) = [f for f in rep.folded if f.kind == "parallel-sum"]
    assert ps.ops == ["linear", "linear", "add"] and ps.macs_after < ps.macs_before
    d = rep.to_dict()
    assert d["counts_by_kind"] == {"parallel-sum": 1, "chain": 1}
    assert "parallel-sum" in rep.render()


def test_report_lists_every_refusal_with_its_reason():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.low = nn.Sequential(nn.Linear(32, 2), nn.Linear(2, 32))
            self.pre = nn.BatchNorm2d(3)
            self.conv = nn.Conv2d(3, 32, 3, padding=1)

        def forward(self, x):
            return self.low(self.conv(self.pre(x)).mean((2, 3)))

    rep = branchfold.fold_with_report(randomize_bn(M()).eval(), (torch.randn(2, 3, 5, 5),)).report
    assert rep.folded == [] and {"cost", "padding-border"} <= set(rep.skipped_by_reason())


@pytest.mark.parametrize("capture", CAPTURES)
@pytest.mark.parametrize("training", [False, True])
def test_user_model_parameters_buffers_and_inputs_are_not_modified(capture, training):
    m = block().train(training)
    x = torch.randn(4, 8)
    x_before, snap = x.clone(), snapshot(m)
    params = {k: v.data_ptr() for k, v in m.state_dict().items()}
    folded = branchfold.fold(m, (x,), capture=capture)
    assert unchanged(m, snap) and torch.equal(x, x_before) and m.training == training
    assert {k: v.data_ptr() for k, v in m.state_dict().items()} == params
    with torch.no_grad():
        folded(torch.randn(4, 8))  # running the result does not write to the user's tensors either
    assert unchanged(m, snap)


def test_training_mode_model_is_not_broken_and_the_report_says_so():
    m, x = block().train(), torch.randn(4, 8)
    r = branchfold.fold_with_report(m, (x,))
    assert r.report.verified and r.report.counts_by_kind() == {"parallel-sum": 1}  # BN stays
    assert "training-mode" in r.report.skipped_by_reason()
    assert any("training mode" in n for n in r.report.notes)
    ref = copy.deepcopy(m)(x)  # batch statistics: the folded model must compute the same thing
    assert rel_err(ref, r.model(x)) <= 1e-5


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return -x


def test_capture_error_names_the_construct_and_suggests_the_other_method():
    with pytest.raises(CaptureError) as e:
        branchfold.fold(Untraceable(), (torch.ones(2, 4),), capture="symbolic_trace")
    msg = str(e.value)
    assert "symbolic_trace could not capture Untraceable" in msg and "capture='export'" in msg
    assert "Traceback" not in msg and "\n" not in msg.strip()


def test_unknown_capture_method_and_non_module_are_user_errors():
    with pytest.raises(branchfold.BranchfoldError):
        branchfold.fold(block(), (torch.randn(2, 8),), capture="jit")
    with pytest.raises(branchfold.InputError):
        branchfold.fold(object(), ())


def test_graph_module_input_is_folded_and_left_untouched():
    m, x = block(), torch.randn(4, 8)
    gm = fx.symbolic_trace(m)
    code, snap = gm.code, snapshot(gm)
    r = branchfold.fold_with_report(gm, (x,))
    assert gm.code == code and unchanged(gm, snap)
    assert r.report.counts_by_kind() == {"parallel-sum": 1, "chain": 1}
    assert rel_err(m(x), r.model(x)) <= 1e-5


def test_passes_compose_in_a_pass_manager():
    from torch.fx.passes.infra.pass_manager import PassManager

    m, x = block(), torch.randn(4, 8)
    gm = fx.symbolic_trace(m)
    fold = FoldBranchesPass()
    result = PassManager([ShapePropPass([x]), fold])(gm)
    assert result.modified and len(fold.result.regions) == 2
    assert count_ops(result.graph_module) == 4
    assert rel_err(m(x), result.graph_module(x)) <= 1e-5
    again = FoldBranchesPass()(result.graph_module)  # a second run finds nothing more
    assert not again.modified


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_models_fold_with_error_against_fp32(dtype):
    m = block().to(dtype)
    x = torch.randn(4, 8).to(dtype)
    r = branchfold.fold_with_report(m, (x,))
    rep = r.report
    assert rep.verified and rep.counts_by_kind() == {"parallel-sum": 1, "chain": 1}
    assert rep.error_vs_fp32 is not None and rep.original_error_vs_fp32 is not None
    assert rep.error_vs_fp32 <= 2 * rep.original_error_vs_fp32 + rep.tolerance
    assert all(p.dtype == dtype for p in r.model.parameters())
    assert r.model(x).dtype == dtype


def test_a_fold_that_fails_its_check_is_undone_and_reported(monkeypatch):
    from branchfold.rewriter import region
    from branchfold.rewriter.affine import Dense

    real = region.add_maps

    def wrong(a, b):  # a broken sum, as a bug in the algebra would give
        m = real(a, b)
        return Dense(m.weight, m.bias + 1) if isinstance(m, Dense) else m

    monkeypatch.setattr(region, "add_maps", wrong)
    m, x = block(), torch.randn(4, 8)
    r = branchfold.fold_with_report(m, (x,), horizontal="off")
    assert r.report.counts_by_kind() == {"chain": 1}  # the good region stays folded
    assert r.report.skipped_by_reason().get("failed-check") == 1
    assert r.report.verified and rel_err(m(x), r.model(x)) <= 1e-5


def test_once_horizontal_fusion_is_given_up_the_bisection_keeps_it_off(monkeypatch):
    """A broken sibling fusion and a broken sum: fusion is dropped first and must stay dropped while the
    failing region is searched for, or every bisection attempt fails and the good fold is lost too."""
    from dataclasses import replace

    from branchfold.patterns import horizontal
    from branchfold.rewriter import region
    from branchfold.rewriter.affine import Dense

    real_sum, real_concat = region.add_maps, horizontal.concat

    def wrong_sum(a, b):
        m = real_sum(a, b)
        return Dense(m.weight, m.bias + 1) if isinstance(m, Dense) else m

    def wrong_concat(group):
        fused = real_concat(group)
        return replace(fused, map=replace(fused.map, bias=fused.map.bias + 1), has_bias=True)

    monkeypatch.setattr(region, "add_maps", wrong_sum)
    monkeypatch.setattr(horizontal, "concat", wrong_concat)

    class SiblingsAndBranches(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
            self.norm = nn.BatchNorm1d(8)

        def forward(self, x):
            y = torch.relu(self.norm(self.q(x)) * self.k(x))  # q→BN folds; q, k are siblings
            return torch.relu(self.a(y) + self.b(y))  # a broken sum

    m, x = SiblingsAndBranches().eval(), torch.randn(4, 8)
    randomize_bn(m)
    r = branchfold.fold_with_report(m, (x,), horizontal="on")
    assert r.report.verified and rel_err(m(x), r.model(x)) <= 1e-5
    assert "horizontal" not in r.report.counts_by_kind()
    assert r.report.counts_by_kind() == {"chain": 1}  # q→BN stays folded
    assert r.report.skipped_by_reason().get("failed-check") == 1


def test_regions_that_pass_alone_but_fail_together_are_all_undone(monkeypatch):
    """If the check still fails after bisection, the model is returned unfolded, never as it failed."""
    from branchfold.passes import settle
    from branchfold.rewriter import region
    from branchfold.rewriter.affine import Dense

    real = region.add_maps

    def wrong(a, b):
        m = real(a, b)
        return Dense(m.weight, m.bias + 1) if isinstance(m, Dense) else m

    monkeypatch.setattr(region, "add_maps", wrong)
    monkeypatch.setattr(settle, "bisect_passing", lambda items, ok: items)  # bisection finds nothing
    m, x = block(), torch.randn(4, 8)
    r = branchfold.fold_with_report(m, (x,), horizontal="off")
    assert r.report.verified and rel_err(m(x), r.model(x)) <= 1e-5
    assert r.report.folded == []
    assert r.report.skipped_by_reason().get("failed-check") == 2  # the broken sum and the good chain


def test_macs_of_a_training_module_are_counted_without_touching_its_buffers():
    """The count runs on fake tensors: a BatchNorm in training mode would update its running statistics
    in a real run, and must not in the count."""
    from branchfold.passes.pipeline import count_macs

    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 4)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, (torch.randn(5, 8),), {}) == 5 * (8 * 16 + 16 * 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_module_fake_tensors_cannot_run_is_counted_on_a_copy():
    """A data-dependent op sends the count to a real run; a training-mode module runs as a copy there."""
    from branchfold.passes.pipeline import count_macs

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.bn = nn.Linear(8, 8), nn.BatchNorm1d(8)

        def forward(self, x):
            y = self.bn(self.lin(x))
            return y[y.sum(dim=1) > 0].sum() + y.nonzero().shape[0]

    model = DataDependent().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_macs(model, (torch.randn(5, 8),), {}) == 5 * 8 * 8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
