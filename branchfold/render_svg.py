"""One folded region drawn as inline SVG: its original ops as boxes joined into their sum, then the op it became.

The drawing is a layered graph read off the region's ``steps`` (each step's inputs, ``-1`` for the source):
a step's column is one more than its inputs' deepest, and a tree of additions is one sum node ("+" with
every operand), as a person draws branches meeting. Plain data in, markup out; nothing of ours imported.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

BOX_H, ROW_GAP, COL_GAP, CHAR_W, PAD = 26, 10, 44, 7.0, 10
SUM_R = 13


def _collapse_sums(steps: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[int, str]]]:
    """Each sum step that no other sum reads -> its operands (step index or -1) with their sign."""
    is_sum = [s.get("op") in ("add", "sub") for s in steps]
    read_by_sum: set[int] = set()
    for s in steps:
        if s.get("op") in ("add", "sub"):
            read_by_sum.update(i for i in s.get("inputs", ()) if i >= 0 and is_sum[i])

    def operands(i: int, sign: str) -> list[tuple[int, str]]:
        out = []
        for k, j in enumerate(steps[i].get("inputs", ())):
            s = sign if k == 0 or steps[i].get("op") == "add" else ("−" if sign == "+" else "+")
            if j >= 0 and is_sum[j] and j in read_by_sum:
                out += operands(j, s)
            else:
                out.append((j, s))
        return out

    return {i: operands(i, "+") for i, s in enumerate(steps) if is_sum[i] and i not in read_by_sum}


def _with_identities(steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The steps with an ``identity`` box on each operand of a sum that is the source itself (``x + f(x)``):
    a shortcut drawn as a branch of its own, as people draw RepVGG's identity."""
    out: list[dict[str, Any]] = []
    new_index: dict[int, int] = {}
    for i, s in enumerate(steps):
        inputs = [new_index.get(j, j) for j in s.get("inputs") or ()]
        if s.get("op") in ("add", "sub"):
            for k, j in enumerate(inputs):
                if j == -1:
                    out.append({"label": "identity", "op": "affine", "inputs": [-1]})
                    inputs[k] = len(out) - 1
        out.append({**s, "inputs": inputs})
        new_index[i] = len(out) - 1
    return out


def _layout(steps: Sequence[Mapping[str, Any]]):
    """Nodes (id, label, kind) with columns, and edges (from, to, sign), the source being node -1."""
    sums = _collapse_sums(steps)
    hidden = {j for ops in sums.values() for j, _ in ops if j >= 0 and steps[j].get("op") in ("add", "sub")}
    hidden |= {i for i, s in enumerate(steps) if s.get("op") in ("add", "sub") and i not in sums}
    edges: list[tuple[int, int, str]] = []
    for i, s in enumerate(steps):
        if i in hidden:
            continue
        if i in sums:
            edges += [(j, i, sign) for j, sign in sums[i]]
        else:
            edges += [(j, i, "+") for j in s.get("inputs", ()) or (-1,)]
    col = {-1: 0}
    for i in range(len(steps)):  # steps are in graph order: inputs come first
        if i not in hidden:
            col[i] = 1 + max((col.get(a, 0) for a, b, _ in edges if b == i), default=0)
    for i in reversed(range(len(steps))):  # then as late as their readers allow: branches meet side by side
        readers = [col[b] for a, b, _ in edges if a == i]
        if i in col and readers:
            col[i] = min(readers) - 1
    return col, edges, sums


def region_svg(region: Mapping[str, Any]) -> str:
    """The region before → after as one ``<svg>``; a region without steps (horizontal) as its op list."""
    steps = list(region.get("steps") or ())
    if not steps:
        ops = list(region.get("ops") or ())
        steps = [{"label": o, "op": "affine", "inputs": [-1]} for o in ops]
        result = region.get("became") or f"one op + Split into {len(ops)}"
    else:
        steps = _with_identities(steps)
        result = region.get("became") or "one op"
    col, edges, sums = _layout(steps)
    last = max(col.values())
    columns: dict[int, list[int]] = {}
    for node, c in sorted(col.items(), key=lambda kv: kv[0]):
        columns.setdefault(c, []).append(node)
    label = {-1: "input"} | {i: ("+" if i in sums else str(s.get("label", ""))) for i, s in enumerate(steps)}
    widths = {c: max((len(label[n]) * CHAR_W + 2 * PAD for n in nodes), default=40) for c, nodes in columns.items()}
    x0: dict[int, float] = {}
    x = PAD
    for c in range(last + 1):
        x0[c] = x
        x += widths.get(c, 40) + COL_GAP
    rows = max(len(n) for n in columns.values())
    height = rows * (BOX_H + ROW_GAP) + ROW_GAP
    pos: dict[int, tuple[float, float, float]] = {}  # node -> (x, y centre, width)
    for c, nodes in columns.items():
        top = (height - len(nodes) * (BOX_H + ROW_GAP) + ROW_GAP) / 2
        for r, n in enumerate(nodes):
            w = 2 * SUM_R if n in sums else widths[c]
            left = x0[c] + (widths[c] - w) / 2
            pos[n] = (left, top + r * (BOX_H + ROW_GAP) + BOX_H / 2, w)
    read = {a for a, _, _ in edges}
    finals = [n for n in col if n >= 0 and n not in read]  # the region's value (a horizontal group: every member)
    arrow_x = x
    result_w = len(result) * CHAR_W + 2 * PAD
    width = arrow_x + 36 + result_w + PAD
    parts = [
        f"<svg class=\"region-svg\" viewBox=\"0 0 {width:.0f} {height:.0f}\" width=\"{width:.0f}\" "
        f"height=\"{height:.0f}\" role=\"img\" aria-label=\"{escape(' + '.join(str(s.get('label')) for s in steps))}"
        f" became {escape(result)}\">"
    ]
    for a, b, sign in edges:
        ax, ay, aw = pos[a]
        bx, by, _ = pos[b]
        sx, ex = ax + aw, bx
        mid = (sx + ex) / 2
        parts.append(f"<path class=\"edge\" d=\"M{sx:.1f},{ay:.1f} C{mid:.1f},{ay:.1f} {mid:.1f},{by:.1f} {ex:.1f},{by:.1f}\"/>")
        if sign == "−":
            parts.append(f"<text class=\"sign\" x=\"{ex - 8:.1f}\" y=\"{by - 4:.1f}\">−</text>")
    for n, (left, cy, w) in pos.items():
        if n in sums:
            parts.append(f"<circle class=\"sum\" cx=\"{left + SUM_R:.1f}\" cy=\"{cy:.1f}\" r=\"{SUM_R}\"/>"
                         f"<text class=\"sum-t\" x=\"{left + SUM_R:.1f}\" y=\"{cy + 5:.1f}\">+</text>")  # fmt: skip
            continue
        cls = "src" if n == -1 else "op"
        parts.append(
            f"<rect class=\"{cls}\" x=\"{left:.1f}\" y=\"{cy - BOX_H / 2:.1f}\" width=\"{w:.1f}\" height=\"{BOX_H}\" rx=\"5\"/>"
            f"<text class=\"box-t\" x=\"{left + w / 2:.1f}\" y=\"{cy + 4.5:.1f}\">{escape(label[n])}</text>"
        )
    cy = height / 2
    for f in finals:
        ox, oy, ow = pos[f]
        parts.append(f"<path class=\"edge\" d=\"M{ox + ow:.1f},{oy:.1f} L{arrow_x - COL_GAP + 8:.1f},{cy:.1f}\"/>")
    parts.append(
        f"<text class=\"arrow\" x=\"{arrow_x + 6:.1f}\" y=\"{cy + 6:.1f}\">⇒</text>"
        f"<rect class=\"result\" x=\"{arrow_x + 36:.1f}\" y=\"{cy - BOX_H / 2:.1f}\" width=\"{result_w:.1f}\" "
        f"height=\"{BOX_H}\" rx=\"5\"/><text class=\"box-t result-t\" x=\"{arrow_x + 36 + result_w / 2:.1f}\" "
        f"y=\"{cy + 4.5:.1f}\">{escape(result)}</text></svg>"
    )
    return "".join(parts)
