"""Batch-free folding: ``fold`` captures the batch (and the sequence length of integer token inputs) as free
sizes, checks at a second batch size, folds exactly what a static capture folds, and falls back to static
shapes, with a note, where the model's code does not allow a free batch."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import randomize_bn, rel_err, small_bert
from torch import nn

import branchfold
from branchfold.zoo import ZOO


def _regions(report) -> Counter:
    return Counter(tuple(f.ops) for f in report.folded)


def _run(model, *args, **kwargs):
    with torch.no_grad():
        return model(*args, **kwargs)


def _static_notes(report) -> list[str]:
    return [n for n in report.notes if n.startswith("captured with static shapes")]


# ---------------------------------------------------------------------------------------------
# every zoo model and the Hugging Face models: the same folds as a static capture, any batch


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_folds_like_static_capture_and_runs_at_any_batch(name):
    entry = ZOO[name]
    model = entry.build().eval()
    dynamic = branchfold.fold_with_report(model, entry.example_input(model, 2), random_checks=0)
    static = branchfold.fold_with_report(model, entry.example_input(model, 2), dynamic=False, verify=False)
    rep = dynamic.report
    assert rep.verified and rep.checked_batches == [2, 1] and not _static_notes(rep)
    assert (rep.before.ops, rep.after.ops) == (static.report.before.ops, static.report.after.ops)
    assert rep.counts_by_kind() == static.report.counts_by_kind() and _regions(rep) == _regions(static.report)
    for batch in (1, 5):
        x = entry.example_input(model, batch)
        assert rel_err(_run(model, *x), _run(dynamic.model, *x)) <= 1e-5
    with pytest.raises(Exception, match="Guard failed"):
        _run(static.model, *entry.example_input(model, 1))  # what the static capture does


@pytest.mark.parametrize("name", ["vit", "resnet", "convnext", "levit", "swin", "mobilevit"])
def test_hf_model_folds_as_pinned_for_static_capture_and_runs_at_any_batch(name):
    """The folds and op counts ``test_hf_models.py`` pins (static capture) hold with a free batch."""
    pytest.importorskip("transformers")
    from test_hf_models import MODELS, img, randomize

    build, size, expected, ops_before, ops_after = MODELS[name]
    torch.manual_seed(0)
    model = randomize(build())
    rep = (r := branchfold.fold_with_report(model, (img(size),), horizontal="off", random_checks=0)).report
    assert rep.verified and rep.max_error <= 1e-5 and rep.checked_batches == [2, 1] and not _static_notes(rep)
    # LeViT's ("linear", "batch_norm") regions need linear → flatten → BN1d → reshape read under a free
    # batch (adapters/fx.py's ``_through_views``, sizes as expressions of the batch).
    assert _regions(rep) == expected
    assert (rep.before.ops, rep.after.ops) == (ops_before, ops_after)
    for batch in (1, 5):
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))
        assert rel_err(_run(model, x), _run(r.model, x)) <= 1e-5


def test_bert_folds_with_free_batch_and_sequence_length():
    model = small_bert()
    ids, mask = torch.randint(0, 64, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    dynamic = branchfold.fold_with_report(model, (), inputs, horizontal="off")
    static = branchfold.fold_with_report(model, (), inputs, horizontal="off", dynamic=False, verify=False)
    rep = dynamic.report
    assert rep.verified and rep.checked_batches == [2, 1] and not _static_notes(rep)
    assert _regions(rep) == _regions(static.report) and rep.folded
    for batch, length in ((1, 8), (5, 8), (3, 5), (1, 12)):
        ids = torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length // 2 :] = 0
        ref = _run(model, input_ids=ids, attention_mask=mask)
        assert rel_err(ref, _run(dynamic.model, input_ids=ids, attention_mask=mask)) <= 1e-5


# ---------------------------------------------------------------------------------------------
# input conventions


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def pair(self, x):
        return self.c(torch.relu(self.a(x) + self.b(x)))


class Plain(Branches):
    def forward(self, x):
        return self.pair(x)


class KeywordInput(Branches):
    def forward(self, x, *, scale, shift=None):
        return self.pair(x) * scale + (0 if shift is None else shift)


class DictInput(Branches):
    def forward(self, inputs):
        return {"y": self.pair(inputs["x"]) + inputs["extra"][0], "n": inputs["extra"][1].sum(-1)}


def test_a_batch_free_module_drops_the_pytree_wrapper_and_keeps_its_other_guards():
    folded = branchfold.fold(Plain().eval(), (torch.randn(2, 8),))
    assert "tree_flatten_spec" not in folded.code and "_guards_fn" in folded.code
    assert _run(folded, torch.randn(7, 8)).shape == (7, 4)
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[1\] == 8"):
        _run(folded, torch.randn(3, 7))


def test_keyword_inputs_are_batch_free():
    m = KeywordInput().eval()
    r = branchfold.fold_with_report(m, (torch.randn(2, 8),), {"scale": torch.tensor(2.0), "shift": torch.randn(2, 4)})
    assert r.report.counts_by_kind() == {"parallel-sum": 1} and r.report.checked_batches == [2, 1]
    for batch in (1, 5):
        x, shift = torch.randn(batch, 8), torch.randn(batch, 4)
        ref = _run(m, x, scale=torch.tensor(3.0), shift=shift)
        assert rel_err(ref, _run(r.model, x, scale=torch.tensor(3.0), shift=shift)) <= 1e-5


def test_nested_dict_inputs_are_batch_free():
    m = DictInput().eval()

    def inputs(batch):
        return {"x": torch.randn(batch, 8), "extra": (torch.randn(batch, 4), torch.randint(0, 9, (batch, 3)))}

    r = branchfold.fold_with_report(m, (inputs(2),))
    assert r.report.counts_by_kind() == {"parallel-sum": 1} and r.report.checked_batches == [2, 1]
    for batch in (1, 5):
        x = inputs(batch)
        assert rel_err(_run(m, x), _run(r.model, x)) <= 1e-5


def test_an_example_batch_of_1_is_traced_at_2_and_checked_at_3():
    m = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))).eval()
    r = branchfold.fold_with_report(m, (torch.randn(1, 3, 8, 8),))
    assert r.report.counts_by_kind() == {"chain": 1} and r.report.checked_batches == [1, 3]
    assert not r.report.notes
    for batch in (1, 2, 5):
        x = torch.randn(batch, 3, 8, 8)
        assert rel_err(_run(m, x), _run(r.model, x)) <= 1e-5


def test_symbolic_trace_is_checked_at_a_second_batch_too():
    m = Plain().eval()
    r = branchfold.fold_with_report(m, (torch.randn(4, 8),), capture="symbolic_trace")
    assert r.report.checked_batches == [4, 1] and r.report.counts_by_kind() == {"parallel-sum": 1}


def test_a_full_slice_of_the_free_batch_costs_no_op():
    """``x[:, 0]`` slices the batch in full: export writes that op for a free batch only; it is dropped."""

    class Pooled(Branches):
        def forward(self, x):
            return self.pair(x)[:, 0]

    m, x = Pooled().eval(), torch.randn(2, 5, 8)
    dynamic = branchfold.fold_with_report(m, (x,))
    static = branchfold.fold_with_report(m, (x,), dynamic=False)
    assert (dynamic.report.before.ops, dynamic.report.after.ops) == (static.report.before.ops, static.report.after.ops)
    assert "slice" not in dynamic.model.code
    assert rel_err(_run(m, x[:1]), _run(dynamic.model, x[:1])) <= 1e-5


# ---------------------------------------------------------------------------------------------
# where the batch cannot be free: static shapes, a note, and the fold still happens


class SetOfBatches(Branches):
    def forward(self, x):
        if x.shape[0] in {2, 4}:  # hashing a free size raises under dynamic capture
            x = x * 2
        return self.pair(x)


class FixedBatch(Branches):
    def forward(self, x):
        return self.pair(x).view(2, -1) if x.shape[0] == 2 else self.pair(x)


class BatchStatistics(Branches):
    def forward(self, x):
        if x.shape[0] > 1:  # a free batch is traced as "at least 2": wrong at batch 1
            x = x - x.mean(0)
        return self.pair(x)


class RejectsBatch1(Branches):
    def forward(self, x):
        if x.shape[0] < 2:
            raise ValueError("needs a batch of at least 2")
        return self.pair(x)


@pytest.mark.parametrize(
    ("cls", "why"),
    [
        (SetOfBatches, "dynamic capture failed: unhashable type"),
        (FixedBatch, "the model's code fixes the batch size"),
        (BatchStatistics, "differs from the original at batch 1"),
    ],
)
def test_a_model_that_fixes_its_batch_falls_back_to_static_shapes(cls, why):
    m, x = cls().eval(), torch.randn(2, 8)
    r = branchfold.fold_with_report(m, (x,))
    (note,) = _static_notes(r.report)
    assert "runs only at batch 2" in note and why in note
    assert r.report.verified and r.report.counts_by_kind() == {"parallel-sum": 1}
    assert r.report.checked_batches == [2]
    assert rel_err(_run(m, x), _run(r.model, x)) <= 1e-5
    with pytest.raises(Exception, match="Guard failed"):
        _run(r.model, torch.randn(1, 8))  # refused loudly, never a wrong result
    assert not any(k.startswith("_dynamo") for k in vars(x))  # a failed export marks its inputs: not the user's


def test_an_unverified_fold_still_checks_its_free_batch():
    r = branchfold.fold_with_report(BatchStatistics().eval(), (torch.randn(2, 8),), verify=False)
    (note,) = _static_notes(r.report)
    assert "differs from the original at batch 1" in note and r.report.checked_batches == []
    with pytest.raises(Exception, match="Guard failed"):
        _run(r.model, torch.randn(1, 8))


def test_a_second_batch_the_original_rejects_is_skipped_and_said():
    m, x = RejectsBatch1().eval(), torch.randn(2, 8)
    r = branchfold.fold_with_report(m, (x,))
    assert r.report.verified and r.report.checked_batches == [2]
    assert any("does not run at batch 1" in n for n in r.report.notes)
    x5 = torch.randn(5, 8)
    assert rel_err(_run(m, x5), _run(r.model, x5)) <= 1e-5


def test_dynamic_false_is_static_and_dynamic_true_makes_the_fallback_an_error():
    m, x = Plain().eval(), torch.randn(2, 8)
    static = branchfold.fold_with_report(m, (x,), dynamic=False)
    assert static.report.checked_batches == [2] and not static.report.notes
    with pytest.raises(Exception, match="Guard failed"):
        _run(static.model, torch.randn(1, 8))
    with pytest.raises(branchfold.CaptureError, match="unhashable"):
        branchfold.fold(SetOfBatches().eval(), (x,), dynamic=True)
    with pytest.raises(branchfold.CaptureError, match="differs from the original at batch 1"):
        branchfold.fold(BatchStatistics().eval(), (x,), dynamic=True)


def test_a_verified_fold_runs_the_capture_on_its_own_only_when_a_check_fails(monkeypatch):
    """The folded candidate's check at the second batch covers the capture (the fold is exact with respect
    to it): the capture is run there on its own only after a failed check, to tell the two apart."""
    from branchfold.passes import pipeline

    calls = []
    real = pipeline._capture_mismatch
    monkeypatch.setattr(pipeline, "_capture_mismatch", lambda *a: calls.append(1) or real(*a))
    r = branchfold.fold_with_report(Plain().eval(), (torch.randn(2, 8),))
    assert r.report.verified and r.report.checked_batches == [2, 1] and calls == []
    branchfold.fold_with_report(Plain().eval(), (torch.randn(2, 8),), verify=False)
    assert len(calls) == 1  # unverified: the capture's own check is the only one
    calls.clear()
    r = branchfold.fold_with_report(BatchStatistics().eval(), (torch.randn(2, 8),))
    assert len(calls) == 2  # after the failed check, and again in the fold that checks the capture first
    assert "differs from the original at batch 1" in _static_notes(r.report)[0]
