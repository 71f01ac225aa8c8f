"""The fold report as one self-contained HTML page, from its plain data (what ``FoldReport.to_dict()`` gives).

Like ``render.py`` this module knows nothing of the report's classes, so a JSON report renders the same as
a live one. Everything is inline (styles, a small script, SVG drawings written here): the page opens
offline, from an e-mail attachment, and producing it needs neither a network nor a system binary.

What it shows, top to bottom: totals before → after with bars; the verification; each folded region drawn
as its branches joined into their sum and the single op they became, identical regions grouped ("× 12,
blocks 0–11"); a strip of the graph in execution order with the folded regions marked; what the check or
the runtime guard undid; what did not fold, grouped by reason; onnxruntime's fused kernels before and after.
The page checks itself when it loads (every region and reason of its data is on the page) and writes the
verdict into ``body[data-selfcheck]``, which the browser test reads.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

from branchfold.render import fmt
from branchfold.render_html_assets import CSS, SCRIPT
from branchfold.render_svg import region_svg

UNDONE = ("failed-check", "lost-fusion")  # reasons for rewrites made and then taken back
STATUS_COLOURS = {"folded": "#2e9d5b", "horizontal": "#3b7dd8", "undone": "#d64545", "skipped": "#e39b2d"}


def render_html(report: Mapping[str, Any], title: str = "branchfold") -> str:
    """The whole page: a pure function of the report's plain data."""
    folded = list(report.get("folded") or [])
    not_folded = list(report.get("not_folded") or [])
    undone = [s for s in not_folded if s.get("reason") in UNDONE]
    skipped = [s for s in not_folded if s.get("reason") not in UNDONE]
    groups = group_regions(folded)
    body = [
        _header(report, title),
        _summary(report),
        _verification(report),
        _strip(report, groups, skipped, undone),
        _regions(groups),
        _undone(undone),
        _skipped(skipped),
        _fusions(report.get("fusions") or {}),
        _notes(report.get("notes") or []),
    ]
    # markup characters as JSON escapes: no text in the data can end or open an element
    data = json.dumps(report, default=str).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body data-selfcheck=\"pending\">"
        f"<main>{''.join(body)}</main>"
        f"<script type=\"application/json\" id=\"report-data\">{data}</script>"
        f"<script>{SCRIPT}</script></body></html>\n"
    )


# ----------------------------------------------------------------------------------------------
# numbers and places


def _ranges(nums: Sequence[int]) -> str:
    """``[0, 1, 2, 3, 5]`` -> ``0–3, 5``."""
    out: list[str] = []
    nums = sorted(set(nums))
    start = prev = nums[0]
    for n in [*nums[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        out.append(f"{start}–{prev}" if prev > start + 1 else (f"{start}, {prev}" if prev > start else f"{start}"))
        if n is not None:
            start = prev = n
    return ", ".join(out)


def span(places: Iterable[str]) -> str:
    """Where a group of regions sits, in words: ``blocks 0–11 · attn`` (one numbered index varies)."""
    found = [p for p in places if p]
    unique = sorted(set(found))
    if not unique:
        return ""
    if len(unique) == 1:
        return unique[0]
    parts = [p.split(".") for p in unique]
    i = 0
    while all(len(p) > i for p in parts) and len({p[i] for p in parts}) == 1:
        i += 1
    if all(len(p) > i and p[i].isdigit() for p in parts):
        head = ".".join(parts[0][:i]) or "#"
        tails = sorted({".".join(p[i + 1 :]) for p in parts} - {""})
        where = f"{head} {_ranges([int(p[i]) for p in parts])}"
        if not tails:
            return where
        return f"{where} · {', '.join(tails[:6])}{' …' if len(tails) > 6 else ''}"
    return f"{len(unique)} places"


def block_of(place: str) -> str:
    """The repeated unit a place belongs to: ``blocks.3`` for ``blocks.3.attn.qkv``, else its first name."""
    parts = place.split(".") if place else []
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if parts else ""


# ----------------------------------------------------------------------------------------------
# grouping


def region_key(r: Mapping[str, Any]) -> tuple:
    steps = tuple(s.get("label", "") for s in r.get("steps") or ())
    if r.get("kind") == "horizontal" or not steps:
        return (r.get("kind"), len(r.get("ops") or ()), r.get("became", ""))
    return (r.get("kind"), steps, r.get("became", ""))


def group_regions(folded: Sequence[Mapping[str, Any]]) -> list[list[tuple[int, Mapping[str, Any]]]]:
    """Identical regions (same kind, same ops as drawn, same result) together, in order of first appearance."""
    groups: dict[tuple, list[tuple[int, Mapping[str, Any]]]] = {}
    for i, r in enumerate(folded):
        groups.setdefault(region_key(r), []).append((i, r))
    return list(groups.values())


def _region_names(r: Mapping[str, Any]) -> list[str]:
    return [*(r.get("nodes") or ()), *(r.get("ops") or ()), r.get("at", "")]


# ----------------------------------------------------------------------------------------------
# sections


def _section(ident: str, heading: str, inner: str, extra: str = "") -> str:
    return f"<section id=\"{ident}\"{extra}><h2>{escape(heading)}</h2>{inner}</section>"


def _header(report: Mapping[str, Any], title: str) -> str:
    if report.get("max_error") is None:
        badge = "<span class=\"badge neutral\">not verified</span>"
    elif report.get("verified"):
        badge = "<span class=\"badge ok\">verified</span>"
    else:
        badge = "<span class=\"badge bad\">verification failed</span>"
    counts = report.get("counts_by_kind") or {}
    kinds = ", ".join(f"{v} {escape(k)}" for k, v in sorted(counts.items())) or "nothing"
    n = len(report.get("folded") or ())
    return (
        f"<header><h1>{escape(title)} {badge}</h1>"
        f"<p class=\"lead\">{n} region{'s' if n != 1 else ''} folded ({kinds}); "
        f"{len(report.get('not_folded') or ())} place(s) left as they were or undone.</p></header>"
    )


def _summary(report: Mapping[str, Any]) -> str:
    before, after = report.get("before"), report.get("after")
    if not (before and after):
        return _section("summary", "Summary", "<p>no totals in this report</p>")
    rows = []
    for key, word in (("ops", "ops"), ("params", "parameters"), ("macs", "multiply-adds")):
        b, a = before.get(key), after.get(key)
        if b is None or a is None:
            continue
        top = max(b, a, 1)
        ratio = f"{a / b:.2f}×" if b else "–"
        rows.append(
            f"<div class=\"bar-row\"><div class=\"bar-label\">{word}</div><div class=\"bars\">"
            f"<div class=\"bar before\" style=\"width:{100 * b / top:.1f}%\"><span>before {fmt(b)}</span></div>"
            f"<div class=\"bar after\" style=\"width:{100 * a / top:.1f}%\"><span>after {fmt(a)}</span></div>"
            f"</div><div class=\"ratio\">{ratio}</div></div>"
        )
    return _section("summary", "Summary", "".join(rows))


def _verification(report: Mapping[str, Any]) -> str:
    parts = []
    err, tol = report.get("max_error"), report.get("tolerance")
    if err is None:
        parts.append("<p>The folded model was <b>not checked</b> against the original.</p>")
    else:
        verdict = "within" if report.get("verified") else "<b>above</b>"
        parts.append(
            f"<p>Largest relative error against the original: <b>{err:.2e}</b>, {verdict} the tolerance "
            f"{tol if tol is None else format(tol, '.0e')}.</p>{_error_gauge(err, tol)}"
        )
        batches = report.get("checked_batches") or []
        sets = report.get("checked_inputs") or "the example inputs and random inputs of the same shapes"
        if batches:
            sets += f", at batch size{'s' if len(batches) > 1 else ''} {', '.join(str(b) for b in batches)}"
        parts.append(f"<p>Checked on {sets}.</p>")
    if report.get("error_vs_fp32") is not None:
        parts.append(
            f"<p>Against an fp32 reference: folded {report['error_vs_fp32']:.2e}, "
            f"original {report.get('original_error_vs_fp32') or 0.0:.2e}.</p>"
        )
    stages = report.get("stages") or {}
    if stages:
        top = max(stages.values()) or 1
        rows = "".join(
            f"<tr><td>{escape(k)}</td><td class=\"num\">{v:.2f} s</td>"
            f"<td><div class=\"mini\" style=\"width:{100 * v / top:.0f}%\"></div></td></tr>"
            for k, v in stages.items()
        )
        parts.append(f"<table class=\"stages\"><tr><th>stage</th><th>time</th><th></th></tr>{rows}</table>")
    return _section("verification", "Verification", "".join(parts))


def _error_gauge(err: float, tol: float | None) -> str:
    """The error on a log scale from 1e-12 to 1, with the tolerance marked."""
    import math

    def pos(v: float) -> float:
        if not v or v != v or v <= 0:
            return 0.0
        return max(0.0, min(100.0, (math.log10(v) + 12) / 12 * 100))

    mark = f"<div class=\"tol\" style=\"left:{pos(tol):.1f}%\" title=\"tolerance\"></div>" if tol else ""
    return (
        f"<div class=\"gauge\"><div class=\"err\" style=\"width:{max(pos(err), 0.5):.1f}%\"></div>{mark}</div>"
        "<div class=\"gauge-scale\"><span>1e-12</span><span>1e-6</span><span>1</span></div>"
    )


def _strip(report, groups, skipped, undone) -> str:
    graph = report.get("graph") or []
    if not graph:
        return ""
    index = {entry[3]: i for i, entry in enumerate(graph) if len(entry) > 3 and entry[3]}  # outputs, targets
    index |= {entry[0]: i for i, entry in enumerate(graph)}
    status: dict[int, tuple[str, str, str]] = {}  # position -> (status, tooltip, anchor)

    def mark(names, state, tip, anchor):
        for name in names:
            i = index.get(name)
            if i is not None and i not in status:
                status[i] = (state, tip, anchor)

    for s in undone:
        mark([s.get("node", ""), s.get("at", "")], "undone", f"{s['reason']}: {s.get('at')}", "undone")
    for g, members in enumerate(groups):
        for _, r in members:
            state = "horizontal" if r.get("kind") == "horizontal" else "folded"
            mark(_region_names(r), state, f"{r.get('kind')} → {r.get('became') or r.get('at')}", f"group-{g}")
    for s in skipped:
        mark([s.get("node", ""), s.get("at", "")], "skipped", f"{s['reason']}: {s.get('at')}", f"reason-{_slug(s['reason'])}")
    n = len(graph)
    rects, run = [], None
    for i in [*range(n), n]:
        cur = status.get(i) if i < n else None
        key = (cur[0], cur[2]) if cur else None
        if run and (key != run[0]):
            (state, anchor), start, tip = run
            rects.append(
                f"<a href=\"#{anchor}\"><rect x=\"{start}\" y=\"0\" width=\"{i - start}\" height=\"20\" "
                f"fill=\"{STATUS_COLOURS[state]}\"><title>{escape(tip)} (ops {start}–{i - 1})</title></rect></a>"
            )
            run = None
        if key and not run:
            run = (key, i, cur[1])
    blocks: dict[str, list[int]] = {}
    for i, entry in enumerate(graph):
        b = block_of(entry[2] if len(entry) > 2 else "")
        blocks.setdefault(b, []).append(i)
    ticks, folded_blocks = [], set()
    for i, (state, _, _) in status.items():
        if state in ("folded", "horizontal"):
            folded_blocks.add(block_of(graph[i][2] if len(graph[i]) > 2 else ""))
    named = [(b, pos) for b, pos in blocks.items() if b]
    numbered = [(b, pos) for b, pos in named if b[-1:].isdigit()]
    step = max(1, len(numbered or named) // 24)
    for k, (b, pos) in enumerate(numbered or named):
        if k % step == 0:
            ticks.append(f"<span class=\"tick\" style=\"left:{100 * pos[0] / n:.2f}%\">{escape(b)}</span>")
    none = [b for b, _ in named if b not in folded_blocks]
    where = (
        f"<p>Every part of the model folded somewhere ({len(named)} parts).</p>" if named and not none
        else (f"<p>No fold in: {escape(', '.join(none[:40]))}{' …' if len(none) > 40 else ''}.</p>" if named else "")
    )  # fmt: skip
    legend = "".join(
        f"<span class=\"key\"><i style=\"background:{c}\"></i>{escape(k)}</span>" for k, c in STATUS_COLOURS.items()
    )
    svg = (
        f"<svg class=\"strip\" viewBox=\"0 0 {n} 20\" preserveAspectRatio=\"none\" role=\"img\" "
        f"aria-label=\"the model's {n} ops in execution order\"><rect x=\"0\" y=\"0\" width=\"{n}\" height=\"20\" "
        f"fill=\"#e4e7ec\"/>{''.join(rects)}</svg>"
    )
    inner = (
        f"<p>The original's {n} ops in execution order, left to right; coloured where something folded, "
        f"was left alone or was undone. Click a mark to jump to it.</p><div class=\"strip-box\">{svg}"
        f"<div class=\"ticks\">{''.join(ticks)}</div></div><div class=\"legend\">{legend}</div>{where}"
    )
    return _section("where", "Where in the model", inner)


def _regions(groups) -> str:
    if not groups:
        return _section("regions", "Folded regions", "<p>Nothing folded.</p>")
    cards = []
    for g, members in enumerate(groups):
        _, first = members[0]
        count = len(members)
        where = span(r.get("place", "") for _, r in members)
        heading = f"{escape(first.get('kind', ''))}"
        times = f" <span class=\"times\">× {count}</span>" if count > 1 else ""
        place = f" <span class=\"place\">{escape(where)}</span>" if where else ""
        macs = ""
        if first.get("macs_before"):
            macs = (
                f"<p class=\"macs\">multiply-adds per output position: {fmt(first['macs_before'])} → "
                f"{fmt(first['macs_after'])}</p>"
            )
        instances = "".join(
            f"<li data-region=\"{i}\"><code>{escape(r.get('at', ''))}</code> {escape(r.get('place', ''))}</li>"
            for i, r in members
        )
        search = " ".join([first.get("became", ""), first.get("kind", ""), where,
                           *(r.get("at", "") for _, r in members)]).lower()  # fmt: skip
        cards.append(
            f"<article class=\"card region\" id=\"group-{g}\" data-count=\"{count}\" data-search=\"{escape(search)}\">"
            f"<h3>{heading}{times}{place}</h3>{region_svg(first)}{macs}"
            f"<details><summary>{count} instance{'s' if count > 1 else ''}</summary><ul class=\"instances\">"
            f"{instances}</ul></details></article>"
        )
    intro = (f"<p>{sum(len(m) for m in groups)} regions in {len(groups)} distinct shapes: each is drawn once, "
             "its original ops on the left, the single op it became on the right.</p>")  # fmt: skip
    return _section("regions", "Folded regions", intro + _filter_box() + "".join(cards))


def _filter_box() -> str:
    return (
        "<div class=\"filter\"><input type=\"search\" id=\"filter\" placeholder=\"filter by name, place, op or reason\" "
        "aria-label=\"filter\"></div>"
    )


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "x"


def _instance_groups(items: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """Entries with the same reason, detail and ops together (a refusal repeated in every block)."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for s in items:
        detail = re.sub(r"\d+", "#", s.get("detail", ""))
        ops = tuple(re.sub(r"\d+", "#", o) for o in s.get("ops") or ())
        groups.setdefault((s.get("reason"), detail, ops), []).append(s)
    return list(groups.values())


def _reason_table(reason: str, items: Sequence[Mapping[str, Any]], section: str) -> str:
    rows = []
    for group in _instance_groups(items):
        s = group[0]
        where = span(x.get("place", "") for x in group) if len(group) > 1 else s.get("place", "")
        ats = ", ".join(x.get("at", "") for x in group[:60]) + (" …" if len(group) > 60 else "")
        search = " ".join([reason, s.get("detail", ""), where, ats, *(s.get("ops") or ())]).lower()
        count = f"× {len(group)}" if len(group) > 1 else ""
        rows.append(
            f"<tr class=\"row\" data-reason=\"{escape(reason)}\" data-search=\"{escape(search)}\">"
            f"<td class=\"num\">{count}</td><td>{escape(where)}<div class=\"ats\"><code>{escape(ats)}</code></div></td>"
            f"<td>{'e.g. ' if len({x.get('detail') for x in group}) > 1 else ''}{escape(s.get('detail', ''))}</td>"
            f"<td>{escape(' '.join(s.get('ops') or ()))}</td></tr>"
        )
    return (
        f"<details class=\"reason\" id=\"{section}-{_slug(reason)}\" data-reason=\"{escape(reason)}\" "
        f"data-count=\"{len(items)}\" open><summary><b>{escape(reason)}</b> <span class=\"times\">{len(items)}</span>"
        f"</summary><table><tr><th></th><th>where</th><th>why</th><th>ops</th></tr>{''.join(rows)}</table></details>"
    )


def _by_reason(items: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    out: dict[str, list[Mapping[str, Any]]] = {}
    for s in items:
        out.setdefault(s.get("reason", "?"), []).append(s)
    return dict(sorted(out.items(), key=lambda kv: -len(kv[1])))


def _undone(undone) -> str:
    if not undone:
        return ""
    words = {"failed-check": "verification failed: the folded result differed from the original",
             "lost-fusion": "onnxruntime's optimizer fused less after this rewrite"}  # fmt: skip
    tables = "".join(
        f"<p class=\"why\">{escape(words.get(r, r))}</p>{_reason_table(r, items, 'undone')}"
        for r, items in _by_reason(undone).items()
    )
    return _section("undone", "Undone", "<p>Rewrites that were made, checked and taken back.</p>" + tables)


def _skipped(skipped) -> str:
    if not skipped:
        return _section("skipped", "Not folded", "<p>Nothing was left out.</p>")
    reasons = _by_reason(skipped)
    chips = "".join(
        f"<button type=\"button\" class=\"chip\" data-reason=\"{escape(r)}\">{escape(r)} <b>{len(v)}</b></button>"
        for r, v in reasons.items()
    )
    tables = "".join(_reason_table(r, items, "reason") for r, items in reasons.items())
    n = len(skipped)
    intro = f"<p>{n} place{'s' if n != 1 else ''} where something looked foldable and was left as it was, by reason.</p>"
    return _section("skipped", "Not folded", f"{intro}<div class=\"chips\">{chips}</div>{tables}")


def _fusions(fusions: Mapping[str, Mapping[str, int]]) -> str:
    if not fusions:
        return ""
    before, after = fusions.get("before") or {}, fusions.get("after") or {}
    kinds = sorted(set(before) | set(after))
    rows = "".join(
        f"<tr><td>{escape(k)}</td><td class=\"num\">{before.get(k, 0)}</td><td class=\"num\">{after.get(k, 0)}</td>"
        f"<td class=\"num\">{_change(before.get(k, 0), after.get(k, 0))}</td></tr>"
        for k in kinds
    )
    table = f"<table><tr><th>kernel</th><th>before</th><th>after</th><th>change</th></tr>{rows}</table>"
    return _section("fusions", "onnxruntime fused kernels", "<p>What onnxruntime's optimizer (ORT_ENABLE_ALL) "
                    "fused in the original and in the folded model. Fewer linear kernels (Conv, Gemm) is what "
                    "folding does; the runtime guard keeps every other fused kernel.</p>"
                    f"{table}")  # fmt: skip


def _change(before: int, after: int) -> str:
    return "" if before == after else f"{after - before:+d}".replace("-", "−")


def _notes(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    return _section("notes", "Notes", "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
