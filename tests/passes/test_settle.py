"""``passes.settle``: one ladder decides which rewrites ship, for every front end.

The kernel is tested on stand-in candidates (which selections it builds, how often it checks each), and
each front end once with a check that fails, where the original must come back."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from helpers import randomize_bn, rel_err
from onnx import helper
from torch import nn

import branchfold
from branchfold.passes import settle
from branchfold.passes.backend import FoldedGraph, branchfold_backend
from branchfold.passes.export_pipeline import fold_exported_program
from branchfold.passes.onnx_pipeline import fold_onnx
from branchfold.passes.settle import ORIGINAL, Check, Selection, Verdict
from branchfold.rewriter import region as region_module
from branchfold.rewriter.affine import Dense
from branchfold.rewriter.region import Region

# ----------------------------------------------------------------------------------------------
# the kernel on stand-in candidates


def _region(i: int) -> Region:
    return Region(f"v{i}", "x", None, (), ("linear", "add"), 2, 1, id=i)


@dataclass
class _Fake:
    selection: Selection
    regions: list[Region]
    speed_rewrites: bool

    def name(self, region: Region) -> str:
        return str(region.value)


class _Graph:
    """``n`` regions, horizontal fusion that changes the graph, and a record of what was built."""

    def __init__(self, n: int) -> None:
        self.all = [_region(i) for i in range(n)]
        self.built: list[Selection] = []

    def __call__(self, sel: Selection) -> _Fake:
        self.built.append(sel)
        keep = [r for r in self.all if sel.keep is None or r.id in sel.keep]
        return _Fake(sel, keep, sel.horizontal)


def _check(bad: set[int], fusion_bad: bool = False, category: str = "failed-check", seen=None) -> Check:
    """Fails a candidate holding a region of ``bad`` (or horizontal fusion, with ``fusion_bad``)."""

    def run(c: _Fake) -> Verdict:
        if seen is not None:
            seen.append(c.selection)
        ids = {r.id for r in c.regions}
        wrong = sorted(ids & bad)
        ok = not wrong and not (fusion_bad and c.speed_rewrites)
        return Verdict(ok, f"bad {wrong}" if wrong else "bad fusion")

    return Check(category, run, explains=category != "failed-check")


def test_a_candidate_that_passes_ships_as_it_is():
    graph = _Graph(3)
    settled = settle.settle(graph, [_check(set())])
    assert settled.selection == Selection() and not settled.undone and graph.built == [Selection()]


def test_horizontal_fusion_is_given_up_before_any_region():
    graph = _Graph(3)
    settled = settle.settle(graph, [_check(set(), fusion_bad=True)])
    assert settled.selection == Selection(None, horizontal=False)
    assert not settled.undone and not settled.notes  # verification does not explain itself in a note


def test_bisection_undoes_the_failing_regions_and_checks_each_selection_once():
    seen: list[Selection] = []
    graph = _Graph(8)
    settled = settle.settle(graph, [_check({2, 5}, fusion_bad=True, seen=seen)])
    assert settled.selection == Selection(frozenset({0, 1, 3, 4, 6, 7}), horizontal=False)
    assert [(s.at, s.reason) for s in settled.undone] == [("v2", "failed-check"), ("v5", "failed-check")]
    assert len(seen) == len(set(seen))  # memoized: no selection checked twice


def test_regions_that_fail_only_together_ship_the_original(monkeypatch):
    monkeypatch.setattr(settle, "bisect_passing", lambda items, ok: items)  # bisection finds nothing
    graph = _Graph(3)
    settled = settle.settle(graph, [_check({1})])
    assert settled.selection == ORIGINAL and settled.candidate.regions == []
    assert sorted(s.at for s in settled.undone) == ["v0", "v1", "v2"]


def test_a_later_check_starts_where_the_earlier_left_off_and_the_result_passes_both():
    graph = _Graph(4)
    first, second = _check({0}), _check({3}, category="lost-fusion")
    settled = settle.settle(graph, [first, second])
    assert settled.selection == Selection(frozenset({1, 2}), horizontal=False)  # fusion goes first
    assert [(s.at, s.reason) for s in settled.undone] == [("v0", "failed-check"), ("v3", "lost-fusion")]
    assert settled.undone[1].detail == "bad [3]"  # what the region did alone
    assert settled.outcome(first).ok and settled.outcome(second).ok


def test_an_explaining_check_notes_why_horizontal_fusion_was_given_up():
    settled = settle.settle(_Graph(2), [_check(set(), fusion_bad=True, category="lost-fusion")])
    assert settled.notes == ["horizontal fusion undone: bad fusion"]


def test_a_candidate_that_rewrites_nothing_is_not_checked():
    seen: list[Selection] = []
    settled = settle.settle(lambda sel: _Fake(sel, [], False), [_check(set(), seen=seen)])
    assert seen == [] and settled.undone == []


# ----------------------------------------------------------------------------------------------
# every front end: a failing check gives the original back


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x):
        y = torch.relu(self.a(x) + self.b(x))
        return torch.relu(self.bn(self.c(y)))


def block() -> nn.Module:
    return randomize_bn(Block()).eval()


def _broken_sums(monkeypatch) -> None:
    """A wrong parallel sum, as a bug in the algebra would give; chains stay right."""
    real = region_module.add_maps

    def wrong(a, b):
        m = real(a, b)
        return Dense(m.weight, m.bias + 1) if isinstance(m, Dense) else m

    monkeypatch.setattr(region_module, "add_maps", wrong)


def test_module_with_a_failing_check_comes_back_unfolded():
    m, x = block(), torch.randn(4, 8)
    r = branchfold.fold_with_report(m, (x,), tolerance=-1.0)
    assert r.report.folded == [] and r.report.skipped_by_reason().get("failed-check") == 2
    assert not r.report.verified  # nothing passes a negative tolerance, the original included
    with torch.no_grad():
        assert rel_err(m(x), r.model(x)) == 0


def _linears(ep: torch.export.ExportedProgram) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and "linear" in str(n.target))


def test_exported_program_whose_regions_fail_together_comes_back_as_the_original(monkeypatch):
    _broken_sums(monkeypatch)
    monkeypatch.setattr(settle, "bisect_passing", lambda items, ok: items)  # bisection finds nothing
    m, x = block(), torch.randn(4, 8)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
    r = fold_exported_program(ep, (x,))
    assert r.report.verified and r.report.folded == []
    assert r.report.skipped_by_reason().get("failed-check") == 2
    assert _linears(r.model) == _linears(ep) == 3
    with torch.no_grad():
        assert rel_err(m(x), r.model.module()(x)) <= 1e-6


def test_exported_program_with_a_failing_check_comes_back_unfolded():
    m, x = block(), torch.randn(4, 8)
    with torch.no_grad():
        ep = torch.export.export(m, (x,))
    r = fold_exported_program(ep, (x,), tolerance=-1.0)
    assert r.report.folded == [] and _linears(r.model) == 3


def test_onnx_with_a_failing_check_comes_back_unfolded(make_onnx):
    rng = np.random.default_rng(0)
    inits = {n: rng.standard_normal((4, 4)).astype(np.float32) for n in ("w0", "w1")}
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["m0"]),
        helper.make_node("MatMul", ["x", "w1"], ["m1"]),
        helper.make_node("Add", ["m0", "m1"], ["y"]),
    ]
    proto = make_onnx(nodes, [("x", [2, 4])], [("y", None)], inits)
    r = fold_onnx(proto, tolerance=-1.0)
    assert r.report.folded == [] and r.report.skipped_by_reason().get("failed-check") == 1
    assert sum(n.op_type == "MatMul" for n in r.model.graph.node) == 2


def test_backend_whose_regions_fail_together_compiles_the_original(monkeypatch, caplog):
    _broken_sums(monkeypatch)
    monkeypatch.setattr(settle, "bisect_passing", lambda items, ok: items)  # bisection finds nothing
    torch._dynamo.reset()
    m, x = block(), torch.randn(4, 8)
    compiled: list = []

    def backend(gm, example_inputs):
        out = branchfold_backend(gm, example_inputs, options={"backend": "eager"})
        compiled.append(out)
        return out

    with caplog.at_level(logging.WARNING), torch.no_grad():
        out = torch.compile(m, backend=backend)(x)
        assert rel_err(m(x), out) <= 1e-6
    assert "differed from the original and were undone" in caplog.text
    assert compiled and not any(isinstance(c, FoldedGraph) for c in compiled)  # nothing folded ships
    torch._dynamo.reset()
