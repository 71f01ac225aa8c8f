"""What a fold did, in a form for people (rich table) and for programs (``to_dict``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from branchfold.render import render_report
from branchfold.rewriter.region import NotFolded, Region


@dataclass
class FoldedRegion:
    kind: str  # "parallel-sum" or "chain" (or "horizontal")
    ops: list[str]  # labels of the original ops, in graph order
    at: str  # the value the fused op now computes
    macs_before: int  # multiply-adds per output position
    macs_after: int


@dataclass
class Skipped:
    at: str
    reason: str  # category: shared-weight, training-mode, geometry, padding-border, cost, failed-check, lost-fusion, ...
    detail: str
    ops: list[str] = field(default_factory=list)


@dataclass
class Totals:
    ops: int
    params: int
    macs: int


@dataclass
class FoldReport:
    folded: list[FoldedRegion] = field(default_factory=list)
    not_folded: list[Skipped] = field(default_factory=list)
    before: Totals | None = None
    after: Totals | None = None
    max_error: float | None = None  # against the original, over example and random inputs
    tolerance: float | None = None
    error_vs_fp32: float | None = None  # low-precision models: folded vs an fp32 reference
    original_error_vs_fp32: float | None = None
    verified: bool = False
    notes: list[str] = field(default_factory=list)
    checked_batches: list[int] = field(default_factory=list)  # batch sizes the check ran the folded model at
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage of the fold, and "total"

    def counts_by_kind(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.folded))

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.not_folded))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts_by_kind"] = self.counts_by_kind()
        d["skipped_by_reason"] = self.skipped_by_reason()
        return d

    def render(self, title: str = "branchfold") -> str:
        """The report as a text table (``render`` formats the plain data of ``to_dict``)."""
        return render_report(self.to_dict(), title)

    def __str__(self) -> str:
        return self.render()


def region_report(r: Region, at: str) -> FoldedRegion:
    """A walk's region as the report shows it (``at``: the frontend's name for the region's value)."""
    return FoldedRegion(r.kind, list(r.labels), at, r.cost_before, r.cost_after)


def skipped_report(n: NotFolded, at: str) -> Skipped:
    return Skipped(at, n.category, n.detail, list(n.labels))
