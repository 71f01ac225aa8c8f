"""Rich rendering of a FoldReport (kept apart so the report itself stays a plain dataclass)."""

from __future__ import annotations

import io

from rich.console import Console
from rich.table import Table

from branchfold.report import FoldReport


def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render_report(report: FoldReport, title: str, max_skipped: int = 12) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=110, force_terminal=False, color_system=None)
    console.print(title)
    totals = Table(show_edge=False)
    for col in ("", "before", "after", "ratio"):
        totals.add_column(col, justify="right" if col else "left")
    if report.before and report.after:
        for key in ("ops", "params", "macs"):
            b, a = getattr(report.before, key), getattr(report.after, key)
            totals.add_row(key, _fmt(b), _fmt(a), f"{a / b:.2f}x" if b else "-")
    console.print(totals)
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(report.counts_by_kind().items())) or "none"
    console.print(f"folded regions: {len(report.folded)} ({kinds})")
    if report.max_error is not None:
        verdict = "ok" if report.verified else "FAILED"
        console.print(f"max relative error: {report.max_error:.2e} (tolerance {report.tolerance:.0e}) {verdict}")
    if report.error_vs_fp32 is not None:
        console.print(
            f"error vs fp32 reference: folded {report.error_vs_fp32:.2e}, "
            f"original {report.original_error_vs_fp32:.2e}"
        )
    if report.not_folded:
        console.print("not folded:")
        skipped = Table(show_edge=False)
        for col in ("where", "reason", "detail"):
            skipped.add_column(col)
        for s in report.not_folded[:max_skipped]:
            skipped.add_row(s.at, s.reason, s.detail)
        console.print(skipped)
        if len(report.not_folded) > max_skipped:
            console.print(f"... and {len(report.not_folded) - max_skipped} more")
    for note in report.notes:
        console.print(f"note: {note}")
    return buf.getvalue()
