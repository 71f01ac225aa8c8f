"""Undoing the regions whose rewrite failed its check, shared by every fold pipeline and the backend.

Any subset of a walk's regions can be emitted on its own (a region's source is a value the graph
computes either way), so the failing ones can be found by halving and the rest kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from branchfold.rewriter.region import Region


def only(names: Sequence[str]) -> Callable[[Region], bool]:
    """A region filter keeping the regions whose value has one of ``names``."""
    keep = set(names)
    return lambda r: r.value.name in keep


def bisect_passing(items: list[str], ok: Callable[[list[str]], bool]) -> list[str]:
    """The items that pass ``ok``, found by halving (failures are rare and few)."""
    if not items or ok(items):
        return items
    if len(items) == 1:
        return []
    mid = len(items) // 2
    return bisect_passing(items[:mid], ok) + bisect_passing(items[mid:], ok)
