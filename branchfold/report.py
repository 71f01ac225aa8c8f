"""What a fold did, in a form for people (a rich table, an HTML page) and for programs (``to_dict``)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from branchfold.render import render_report
from branchfold.report_data import Step, became, common_place, name_of, place_of, steps_of
from branchfold.rewriter.region import NotFolded, Region


@dataclass
class FoldedRegion:
    kind: str  # "parallel-sum" or "chain" (or "horizontal")
    ops: list[str]  # labels of the original ops, in graph order
    at: str  # the value the fused op now computes
    macs_before: int  # multiply-adds per output position
    macs_after: int
    # for the HTML page (empty where the pipeline does not know them)
    steps: list[Step] = field(default_factory=list)  # the original ops as a small graph, labelled for people
    became: str = ""  # the single op written instead ("Conv 3x3 s1 64→64")
    place: str = ""  # the module that computes the region's value ("blocks.3.attn.q")
    nodes: list[str] = field(default_factory=list)  # graph names of the original ops (``graph`` entries)


@dataclass
class Skipped:
    at: str
    reason: str  # category: shared-weight, training-mode, geometry, padding-border, cost, failed-check, lost-fusion, ...
    detail: str
    ops: list[str] = field(default_factory=list)
    place: str = ""  # the module it sits in, where the graph records it
    node: str = ""  # its graph name (a ``graph`` entry)


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
    written: list[str] = field(default_factory=list)  # the files written (ONNX with an output path)
    file_error: float | None = None  # the written file, opened by onnxruntime from its path, against the original
    checked_inputs: str = ""  # what the check ran on, in words ("3 input sets: the example and random ...")
    graph: list[list[str]] = field(default_factory=list)  # the original's ops in order: [name, type, place, alias]
    stages: dict[str, float] = field(default_factory=dict)  # seconds per stage of the fold
    fusions: dict[str, dict[str, int]] = field(default_factory=dict)  # ONNX: {"before"/"after": {kernel: n}}

    def counts_by_kind(self) -> dict[str, int]:
        return dict(Counter(r.kind for r in self.folded))

    def skipped_by_reason(self) -> dict[str, int]:
        return dict(Counter(s.reason for s in self.not_folded))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["counts_by_kind"] = self.counts_by_kind()
        d["skipped_by_reason"] = self.skipped_by_reason()
        return d

    def render(self, title: str = "branchfold", width: int | None = 110) -> str:
        """The report as a text table (``render`` formats the plain data of ``to_dict``); ``width`` None for
        rows that never wrap (a file or a pipe)."""
        return render_report(self.to_dict(), title, width=width)

    def __str__(self) -> str:
        return self.render()

    def to_html(self, title: str = "branchfold") -> str:
        """The report as one self-contained HTML page (``render_html`` draws the plain data of ``to_dict``)."""
        from branchfold.render_html import render_html

        return render_html(self.to_dict(), title)


def region_report(r: Region, at: str) -> FoldedRegion:
    """A walk's region as the report shows it (``at``: the frontend's name for the region's value)."""
    return FoldedRegion(
        r.kind, list(r.labels), at, r.cost_before, r.cost_after,
        steps=steps_of(r.parts), became=became(r.map, r.source),
        place=(place_of(r.parts[-1].key) if r.parts else "") or common_place(place_of(op.key) for op in r.parts),
        nodes=[name_of(op.key) for op in r.parts],
    )  # fmt: skip


def skipped_report(n: NotFolded, at: str) -> Skipped:
    return Skipped(at, n.category, n.detail, list(n.labels), place=place_of(n.where), node=name_of(n.where))


def horizontal_report(ops: list[str], source: str, sizes: tuple[int, ...], kind: str) -> FoldedRegion:
    """A fused sibling group as the report shows it: each member's output width, and the wide op + split."""
    word = "Conv" if kind == "conv" else "Linear"
    steps = [Step(f"{word} →{n}", "affine", [-1]) for n in sizes]
    became = f"{word} →{sum(sizes)} + Split {'/'.join(str(n) for n in sizes)}"
    return FoldedRegion("horizontal", list(ops), source, 0, 0, steps=steps, became=became, nodes=list(ops))

