"""Settling a fold: which rewrites ship, decided one way for every front end.

A front end (``fold_module``, ``fold_exported_program``, ``fold_onnx``, the torch.compile backend) says
how to build a candidate from a ``Selection`` (the region ids to keep, horizontal fusion on or off) and
which ``Check``s a candidate must pass (numerical verification, onnxruntime's fusions). Any subset of a
walk's regions can be emitted on its own (a region's source is a value the graph computes either way),
so the kernel can search for the rewrites that pass. For each check in turn, from where the last one
left off:

1. the candidate passes: keep it;
2. give up horizontal fusion first (it is a speed rewrite, not a simplification);
3. bisect the kept region ids, keeping the halves that pass;
4. if what passed alone still fails together, ship the original.

The settled candidate must then pass every check (a later check's undo can change what an earlier one
saw); where it does not, the original ships. Each check runs once per selection (memoized), and only one
candidate exists at a time (an ONNX candidate can hold a model's worth of folded weights).

The kernel owns what the report says about the undo: one ``Skipped`` entry per undone region, under the
check's category (``failed-check``, ``lost-fusion``), and a note where horizontal fusion was given up for a
check that explains its failures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from branchfold.passes import verify
from branchfold.passes.undo import bisect_passing, only
from branchfold.patterns.horizontal import HorizontalResult
from branchfold.report import FoldReport, Skipped, horizontal_report
from branchfold.rewriter.region import Region

FAILED_CHECK = "failed-check"
DIFFERED = "folded result differed from the original; undone"


class Candidate(Protocol):
    """What the kernel reads of a built candidate; the front end keeps its own model beside it."""

    @property
    def regions(self) -> Sequence[Region]: ...

    @property
    def speed_rewrites(self) -> bool:
        """Whether a rewrite made for speed only (horizontal fusion) changed the graph."""
        ...

    def name(self, region: Region) -> str:
        """The region's name in the report."""
        ...


C = TypeVar("C", bound=Candidate)


@dataclass(frozen=True)
class Selection:
    """Which rewrites a candidate makes: the regions with these ids (``None``: every region), and
    horizontal fusion as the caller asked (``True``) or off."""

    keep: frozenset[int] | None = None
    horizontal: bool = True

    def select(self) -> Callable[[Region], bool] | None:
        """The region filter the fold passes take (``select=``)."""
        return None if self.keep is None else only(self.keep)


ORIGINAL = Selection(frozenset(), horizontal=False)


@dataclass(frozen=True)
class Verdict:
    """One check of one candidate: passed or not, a sentence for the report, and what the check measured."""

    ok: bool
    detail: str = ""
    outcome: object = None


@dataclass(eq=False)
class Check(Generic[C]):
    """A predicate every shipped candidate passes. ``category`` is the report's reason for the regions it
    undoes; ``failing`` completes "undoing regions that ..." in progress messages; ``explains``: its
    verdict's detail says what went wrong (it then also goes into a note when horizontal fusion is given up)."""

    category: str
    run: Callable[[C], Verdict]
    failing: str = "failed the check"
    explains: bool = False


def verification(run: Callable[[C], verify.Check]) -> Check[C]:
    """The numerical check (``verify.check`` of a candidate) as a ``Check``."""
    return Check(FAILED_CHECK, lambda c: _verdict(run(c)))


def _verdict(outcome: verify.Check) -> Verdict:
    return Verdict(outcome.ok, DIFFERED, outcome)


@dataclass
class Settled(Generic[C]):
    """The candidate that ships, how it was chosen, and what the report says about the undo."""

    candidate: C
    selection: Selection
    undone: list[Skipped] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _kernel: _Kernel[C] | None = field(default=None, repr=False)

    def outcome(self, check: Check[C]) -> Verdict:
        """``check`` of the shipped candidate, run now unless it already ran (even on the original)."""
        assert self._kernel is not None
        return self._kernel.verdict(check, self.selection)


class _Kernel(Generic[C]):
    def __init__(self, build: Callable[[Selection], C], checks: Sequence[Check[C]], say: Callable[[str], None]):
        self.build, self.checks, self.say = build, list(checks), say
        self.memo: dict[tuple[int, Selection], Verdict] = {}
        self.built: tuple[Selection, C] | None = None
        self.undone: list[Skipped] = []
        self.notes: list[str] = []
        self.labels: dict[int, tuple[str, tuple[str, ...]]] = {}
        self.order: list[int] = []

    def candidate(self, sel: Selection) -> C:
        if self.built is None or self.built[0] != sel:
            self.built = None  # one candidate at a time
            self.built = (sel, self.build(sel))
        return self.built[1]

    def verdict(self, check: Check[C], sel: Selection) -> Verdict:
        key = (self.checks.index(check), sel)
        if key not in self.memo:
            self.memo[key] = check.run(self.candidate(sel))
        return self.memo[key]

    def passes(self, check: Check[C], sel: Selection) -> bool:
        """A candidate that rewrites nothing is the original, and passes without being run."""
        c = self.candidate(sel)
        if not c.regions and not c.speed_rewrites:
            return True
        return self.verdict(check, sel).ok

    def kept(self, sel: Selection) -> list[int]:
        return [i for i in self.order if sel.keep is None or i in sel.keep]

    def undo(self, check: Check[C], ids: list[int], first: Verdict) -> None:
        """Report ``ids`` undone by ``check``; each with what it did alone where that was checked."""
        for i in sorted(ids, key=self.order.index):
            alone = self.memo.get((self.checks.index(check), Selection(frozenset([i]), False)))
            alone = alone or self.memo.get((self.checks.index(check), Selection(frozenset([i]), True)))
            detail = alone.detail if alone is not None and not alone.ok else first.detail
            name, labels = self.labels[i]
            self.undone.append(Skipped(name, check.category, detail, list(labels)))

    def ladder(self, check: Check[C], sel: Selection) -> Selection:
        if self.passes(check, sel):
            return sel
        first = self.verdict(check, sel)
        if sel.horizontal and self.candidate(sel).speed_rewrites:
            self.say(f"undoing horizontal fusion (it {check.failing})")
            if check.explains:
                self.notes.append(f"horizontal fusion undone: {first.detail}")
            sel = dataclasses.replace(sel, horizontal=False)
            if self.passes(check, sel):
                return sel
        kept = self.kept(sel)
        if kept:
            self.say(f"undoing regions that {check.failing}")
            horizontal = sel.horizontal
            good = bisect_passing(kept, lambda ids: self.passes(check, Selection(frozenset(ids), horizontal)))
            self.undo(check, [i for i in kept if i not in good], first)
            sel = Selection(frozenset(good), horizontal)
            if self.passes(check, sel):
                return sel
        return self.give_up(check, sel, first)

    def give_up(self, check: Check[C], sel: Selection, first: Verdict) -> Selection:
        """What passed alone fails together: ship the original, every remaining rewrite undone."""
        self.say("the remaining rewrites fail together: writing the model unfolded")
        self.undo(check, self.kept(sel), first)
        return ORIGINAL


def settle(
    build: Callable[[Selection], C], checks: Sequence[Check[C]], say: Callable[[str], None] | None = None
) -> Settled[C]:
    """The candidate to ship: every rewrite that passes ``checks``, found by the ladder above."""
    kernel = _Kernel(build, checks, say or (lambda _msg: None))
    sel = Selection()
    first = kernel.candidate(sel)
    kernel.order = [r.id for r in first.regions]
    kernel.labels = {r.id: (first.name(r), tuple(r.labels)) for r in first.regions}
    del first
    for check in kernel.checks:
        sel = kernel.ladder(check, sel)
        if sel == ORIGINAL:
            break
    else:
        failing = next((c for c in kernel.checks if not kernel.passes(c, sel)), None)
        if failing is not None:  # a later check's undo broke what an earlier one passed
            sel = kernel.give_up(failing, sel, kernel.verdict(failing, sel))
    candidate = kernel.candidate(sel)
    return Settled(candidate, sel, kernel.undone, kernel.notes, kernel)


def add_horizontal(report: FoldReport, result: HorizontalResult) -> None:
    """Fused sibling groups as ``horizontal`` regions; groups the policy left alone as skipped."""
    for g in result.groups:
        if g.fused:
            report.folded.append(horizontal_report(g.ops, g.source, g.sizes, g.kind))
        else:
            report.not_folded.append(Skipped(g.source, "horizontal-policy", g.reason, g.ops))
