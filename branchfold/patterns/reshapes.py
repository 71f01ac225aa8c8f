"""When a last-axis map between two reshapes is a map of the unreshaped value (frontend-neutral).

Code and exporters often apply a linear or a BatchNorm1d to a flattened view: ``bn(y.flatten(0, 1))
.reshape_as(y)`` (LeViT), ``view(addmm(b, view(x, [-1, in]), Wt), [..., out])`` (decomposed export),
``MatMul → Reshape [N*T, C] → BatchNormalization → Reshape [N, T, C]`` (ONNX). Reading the map as
acting on the unflattened ``x`` lets it fold with its neighbours.

Why it is exact: a reshape keeps the row-major order of the elements. If the reshape before the map
keeps the size of the last axis, an element's last-axis index is unchanged by it (flat index
``= lead * C + c`` on both sides), so a map acting along the last axis gives the same elements, in
the same order, whether it is applied before or after the reshape. Only the last axis is proven;
the leading sizes may be symbolic or unknown.

Shapes are neutral tuples of ``Dim``: a static ``int``, a *symbol* (any other hashable naming a size:
an ONNX ``dim_param``, a sympy expression of a torch ``SymInt``, an adapter's "dim i of value v"
token), or ``None`` where nothing is known. Two dims are proven equal only when both are known and
compare equal. A reshape's target may also hold ``INFER`` (its ``-1``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Literal

Dim = Hashable | None  # an int, a symbol, or None (unknown)
Shape = Sequence[Dim]


class _Infer:
    """The ``-1`` entry of a reshape target: whatever size makes the element count match."""

    def __repr__(self) -> str:
        return "INFER"


INFER = _Infer()

Reading = Literal["exact", "flat-order"]


def same_dim(a: Dim, b: Dim) -> bool:
    """Proven equal: both known (not ``None``, not ``INFER``) and equal."""
    if a is None or b is None or a is INFER or b is INFER:
        return False
    if isinstance(a, bool) or isinstance(b, bool):
        return False
    return a == b


def merge_target(target: Shape | None, recorded: Shape | None) -> tuple[Dim, ...] | None:
    """A reshape's result shape from its target and the shape recorded for its output (either may be
    missing): each position takes whichever is known, the target first."""
    if target is None:
        return None if recorded is None else tuple(recorded)
    if recorded is None or len(recorded) != len(target):
        return tuple(target)
    return tuple(r if (t is None or t is INFER) and r is not None else t for t, r in zip(target, recorded))


def keeps_last_axis(before: Shape, after: Shape) -> bool:
    """A reshape from ``before`` to ``after`` leaves each element's last-axis index unchanged."""
    return len(before) > 0 and len(after) > 0 and same_dim(before[-1], after[-1])


def restores(x: Shape, out: Dim, back: Shape) -> bool:
    """``back`` (a reshape's result, ``INFER`` allowed once) is ``x``'s leading dims followed by ``out``.

    With equal ranks and every other position proven equal, an ``INFER`` can only be the remaining
    size, since a reshape keeps the element count.
    """
    want = tuple(x[:-1]) + (out,)
    if len(back) != len(want) or sum(d is INFER for d in back) > 1:
        return False
    return all(b is INFER or same_dim(b, w) for b, w in zip(back, want))


def read_through(
    axis: int | None, x: Shape | None, flat: Shape | None, out: Dim, back: Shape | None
) -> Reading | None:
    """How ``back-reshape(map(flatten(x)))`` may be read, for a map acting along ``axis`` that turns
    the flattened value's last axis into ``out`` channels:

    - ``"exact"``: it *is* ``map(x)`` (the reshape back restores ``x``'s leading dims);
    - ``"flat-order"``: ``map(flatten(x))`` has the elements of ``map(x)`` in the same row-major order,
      so a consumer that reads only that order (a reshape to a target independent of its input's
      shape) may read ``map(x)`` instead; the adapter decides whether its consumer is one;
    - ``None``: neither is proven (the flatten moves the last axis, the map acts on another axis,
      shapes are unknown).

    ``back`` is the shape the second reshape produces (``None`` if unknown).
    """
    if x is None or flat is None or len(x) == 0:
        return None
    if axis is not None and axis != -1:
        return None  # a map along another axis does not see the same channels after the flatten
    if axis is not None and not keeps_last_axis(x, flat):
        return None
    if out is None:
        out = x[-1]
    if back is not None and restores(x, out, back):
        return "exact"
    return "flat-order"
