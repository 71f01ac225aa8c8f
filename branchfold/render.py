"""Text rendering of a fold report, from its plain data (what ``FoldReport.to_dict()`` gives).

This module knows nothing of the report's classes: the report calls it, never the reverse, and a report
read back from JSON (``branchfold fold --json``) renders the same as a live one.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.table import Table


def fmt(n: float | None) -> str:
    """A count for people: 1.23M, 86.40k, 512 (shared by the text table and the HTML page)."""
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:g}"


UNBOUNDED = 100_000  # a width no line reaches: rows are never wrapped or cut


def render_report(report: Mapping[str, Any], title: str, max_skipped: int = 12, width: int | None = 110) -> str:
    """The report as a table for people: totals before → after, regions, error, what was not folded.

    ``width``: the terminal's, where cells wrap within their row; None for a file or a pipe, where each row
    is one line as wide as its content (a reader's viewer or ``grep`` sees whole rows)."""
    buf = io.StringIO()
    console = Console(file=buf, width=width or UNBOUNDED, force_terminal=False, color_system=None)
    console.print(title)
    totals = Table(show_edge=False)
    for col in ("", "before", "after", "ratio"):
        totals.add_column(col, justify="right" if col else "left")
    before, after = report.get("before"), report.get("after")
    if before and after:
        for key in ("ops", "params", "macs"):
            b, a = before[key], after[key]
            totals.add_row(key, fmt(b), fmt(a), f"{a / b:.2f}x" if b else "-")
    console.print(totals)
    counts = report.get("counts_by_kind") or {}
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())) or "none"
    console.print(f"folded regions: {len(report.get('folded') or ())} ({kinds})")
    if report.get("max_error") is not None:
        verdict = "ok" if report.get("verified") else "FAILED"
        console.print(
            f"max relative error: {report['max_error']:.2e} (tolerance {report['tolerance']:.0e}) {verdict}"
        )
    if report.get("written"):
        checked = "read back byte for byte"
        if report.get("file_error") is not None:
            checked += f", error in onnxruntime {report['file_error']:.2e}"
        console.print(f"written: {', '.join(report['written'])} ({checked})")
    if report.get("error_vs_fp32") is not None:
        console.print(
            f"error vs fp32 reference: folded {report['error_vs_fp32']:.2e}, "
            f"original {report['original_error_vs_fp32']:.2e}"
        )
    not_folded = report.get("not_folded") or []
    if not_folded:
        console.print("not folded:")
        skipped = Table(show_edge=False)
        for col in ("where", "reason", "detail"):
            skipped.add_column(col)
        for s in not_folded[:max_skipped]:
            skipped.add_row(s["at"], s["reason"], s["detail"])
        console.print(skipped)
        if len(not_folded) > max_skipped:
            console.print(f"... and {len(not_folded) - max_skipped} more")
    for note in report.get("notes") or ():
        console.print(f"note: {note}")
    stages = dict(report.get("stages") or {})
    if "total" in stages:
        total = stages.pop("total")
        parts = ", ".join(f"{k} {v:.2f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))
        console.print(f"fold time: {total:.2f} s ({parts})")
    return buf.getvalue()
