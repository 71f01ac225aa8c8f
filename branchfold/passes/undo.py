"""Halving a set of regions down to the ones whose rewrite passes a check.

Any subset of a walk's regions can be emitted on its own (a region's source is a value the graph
computes either way), so the failing ones can be found by halving and the rest kept.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from branchfold.rewriter.region import Region


def only(ids: Collection[int]) -> Callable[[Region], bool]:
    """A region filter keeping the regions whose adapter-given id is one of ``ids``."""
    keep = frozenset(ids)
    return lambda r: r.id in keep


def bisect_passing(items: list[int], ok: Callable[[list[int]], bool]) -> list[int]:
    """The items that pass ``ok``, found by halving (failures are rare and few)."""
    if not items or ok(items):
        return items
    if len(items) == 1:
        return []
    mid = len(items) // 2
    return bisect_passing(items[:mid], ok) + bisect_passing(items[mid:], ok)
