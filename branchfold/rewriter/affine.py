"""Affine maps ``y = W ⊛ x + b`` with constant ``W`` and ``b``, and the two operations on them.

This is the only place where folding math lives: the FX and ONNX adapters turn ops into these maps,
ask for ``add_maps`` / ``compose_maps``, and write the result back. Every map is held in float64 so that
a chain of folds loses nothing before the final cast to the model's dtype.

The weights of dense maps and convolutions are computed *lazily* (``Lazy``): recognizing an op keeps its
stored weight as it is (no copy, no float64), and combining maps records the computation with its shape.
The walk decides on shapes and costs alone, so a weight is converted to float64 and combined only when
the region it belongs to is written (``value``): a 650 MB model whose ops mostly fold nowhere costs no
float64 copies at all. Biases, scales and shifts stay small and eager where they do not need a weight.

A map acts along one *channel axis*, written as a negative index so that it does not depend on the
batch rank: a dense map on the last axis (-1), a d-dimensional convolution on axis -(d+1), a
per-channel scale/shift on whichever axis its constant varies along (or on none: a scalar).
Maps on different axes never combine.

A table lookup (``Lookup``: an embedding, an ONNX ``Gather`` of a constant table) is the dense map of the
one-hot encoding of its integer indices: ``table[idx] = onehot(idx) @ table``. Maps applied after it and
lookups of the same indices summed with it fold into one table, row by row, so a lookup stays a lookup
(never a dense map of the indices themselves, which are not values to be scaled or summed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

F64 = torch.float64


class Lazy:
    """A float64 tensor of known shape, computed from its operands each time it is read.

    Nothing is cached: a region's weight is read once, when the region is written, and then only the
    written tensor (in the model's dtype) stays alive. Caching would keep every folded region's float64
    weights for as long as the report holds the region (1.2 GB for GPT-2's 24 LayerNorm folds).

    ``terms`` and ``diagonal`` describe the commonest weights exactly, for ``rounded``: the value is the
    sum of one or two stored tensors (``terms``), plus a float64 vector on the diagonal when set. Or
    ``product``: the value is a stored tensor times a float64 factor broadcast over it (a LayerNorm's or
    a BatchNorm's per-channel scale taken into the weight beside it)."""

    __slots__ = ("shape", "_compute", "terms", "diagonal", "product")

    def __init__(
        self,
        shape: Sequence[int],
        compute: Callable[[], torch.Tensor],
        terms: tuple[torch.Tensor, ...] | None = None,
        diagonal: torch.Tensor | None = None,
        product: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        self.shape = torch.Size(shape)
        self._compute = compute
        self.terms = terms
        self.diagonal = diagonal
        self.product = product

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def get(self) -> torch.Tensor:
        value = self._compute()
        if tuple(value.shape) != tuple(self.shape):
            raise AssertionError(f"lazy tensor of shape {tuple(self.shape)} computed as {tuple(value.shape)}")
        return value


Tensorish = torch.Tensor | Lazy


def value(t: Tensorish) -> torch.Tensor:
    """The float64 value of a map's tensor (computing a lazy one now)."""
    if isinstance(t, Lazy):
        return t.get()
    return t if t.dtype == F64 else t.to(F64)


def stored(t: torch.Tensor) -> Lazy:
    """A stored weight (a parameter, an initializer, a memory-mapped tensor) as a lazy float64 tensor:
    nothing is copied until a fold reads it, and then into a fresh float64 tensor (never an alias)."""
    source = t.detach()

    def copy() -> torch.Tensor:
        # in the stored memory order (a MatMul weight is a transposed view): one sequential pass, and the
        # sums with other weights of the same layout stay sequential too
        return torch.empty_like(source, dtype=F64, device="cpu").copy_(source)

    return Lazy(source.shape, copy, terms=(source,))


def _operand(t: Tensorish) -> torch.Tensor:
    """``t`` to add into a float64 tensor: a stored weight as it is (torch converts each element exactly
    on the way, in one pass and without a float64 copy of it), anything else as its float64 value."""
    terms = _stored_terms(t)
    return terms[0] if len(terms) == 1 else value(t)


def _fresh(t: Tensorish) -> torch.Tensor:
    """A float64 tensor of ``t``'s value that the caller may write to (a lazy one is computed anew)."""
    return t.get() if isinstance(t, Lazy) else value(t).clone()


def lazy(shape: Sequence[int], compute: Callable[[], torch.Tensor]) -> Lazy:
    return Lazy(shape, compute)


class Refusal(Exception):
    """A fold that would not be exact (or would not pay off), with a category for the report."""

    def __init__(self, category: str, detail: str) -> None:
        super().__init__(f"{category}: {detail}")
        self.category = category
        self.detail = detail


@dataclass(frozen=True)
class Diagonal:
    """Per-channel ``scale * x + shift`` (BatchNorm in eval, LayerScale, constant mul/add, identity).

    ``axis`` is None for a scalar map, which is compatible with every axis.
    """

    scale: torch.Tensor  # [C] or [] (scalar)
    shift: torch.Tensor  # [C] or []
    axis: int | None = None

    @property
    def channels(self) -> int | None:
        n = max(self.scale.numel(), self.shift.numel())
        return n if self.axis is not None else None

    @property
    def is_identity(self) -> bool:
        return bool((self.scale == 1).all() and (self.shift == 0).all())

    @property
    def has_shift(self) -> bool:
        return bool((self.shift != 0).any())

    def macs(self) -> int:
        """Per output position: one multiply-add per channel, nothing for an identity."""
        if self.is_identity:
            return 0
        return self.channels or 1

    def params(self) -> int:
        return self.scale.numel() + self.shift.numel()


@dataclass(frozen=True)
class Dense:
    """``x @ W.T + b`` on the last axis."""

    weight: Tensorish  # [out, in]
    bias: Tensorish  # [out]
    axis: int = field(default=-1, init=False)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def macs(self) -> int:
        return self.weight.numel()

    def params(self) -> int:
        return self.weight.numel() + self.bias.numel()


@dataclass(frozen=True)
class Conv:
    """A d-dimensional cross-correlation (torch/ONNX Conv) with per-side padding.

    ``padding`` holds (low, high) per spatial dim so that the sum of convs whose kernels are
    centred differently can be written exactly. ``padding_mode`` other than "zeros" is only ever
    combined with identical geometry.
    """

    weight: Tensorish  # [out, in/groups, *k]
    bias: Tensorish  # [out]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @property
    def nd(self) -> int:
        return self.weight.dim() - 2

    @property
    def axis(self) -> int:
        return -(self.nd + 1)

    @property
    def kernel(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def has_padding(self) -> bool:
        return any(lo or hi for lo, hi in self.padding)

    @property
    def symmetric_padding(self) -> tuple[int, ...] | None:
        if all(lo == hi for lo, hi in self.padding):
            return tuple(lo for lo, _ in self.padding)
        return None

    def macs(self) -> int:
        return self.weight.numel()

    def params(self) -> int:
        return self.weight.numel() + self.bias.numel()


@dataclass(frozen=True)
class Lookup:
    """``table[idx]``: row ``idx`` of a constant ``[rows, width]`` table for each integer index.

    As a map it is ``onehot(idx) @ table``; it reads indices, so nothing composes *into* it, and it sums
    only with another lookup of the same indices. A bias or a per-channel map after it is added to every
    row, and a dense map after it multiplies the table (``table @ W.T + b``): the result is one lookup."""

    table: Tensorish  # [rows, width]
    axis: int = field(default=-1, init=False)

    @property
    def rows(self) -> int:
        return self.table.shape[0]

    @property
    def width(self) -> int:
        return self.table.shape[1]

    def macs(self) -> int:
        """Per output position one copy per element of a row: the width, never ``rows * width``."""
        return self.width

    def params(self) -> int:
        return self.table.numel()


AffineMap = Dense | Conv | Diagonal | Lookup


def identity() -> Diagonal:
    return Diagonal(torch.ones((), dtype=F64), torch.zeros((), dtype=F64), None)


def out_channels(m: AffineMap) -> int | None:
    if isinstance(m, Dense):
        return m.out_features
    if isinstance(m, Conv):
        return m.out_channels
    if isinstance(m, Lookup):
        return m.width
    return m.channels


def reads_indices(m: AffineMap | None) -> bool:
    """Whether ``m`` is a table lookup: its input is a tensor of indices, never an expression to absorb."""
    return isinstance(m, Lookup)


# ----------------------------------------------------------------------------------------------
# helpers


def _axes_compatible(a: int | None, b: int | None) -> bool:
    return a is None or b is None or a == b


def _common_axis(a: int | None, b: int | None) -> int | None:
    return a if a is not None else b


def _diag_vectors(d: Diagonal, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale and shift of ``d`` as length-``channels`` vectors."""
    if d.channels is not None and d.channels != channels:
        raise Refusal("shape", f"per-channel constant of size {d.channels} on {channels} channels")
    return d.scale.expand(channels).clone(), d.shift.expand(channels).clone()


def _diag_broadcast(a: Diagonal, b: Diagonal) -> tuple[torch.Tensor, ...]:
    if a.channels and b.channels and a.channels != b.channels:
        raise Refusal("shape", f"per-channel constants of sizes {a.channels} and {b.channels}")
    return torch.broadcast_tensors(a.scale, a.shift, b.scale, b.shift)


def _regroup(c: Conv, groups: int) -> Conv:
    """Rewrite ``c`` with fewer groups (a divisor of its own) by block-diagonal zero expansion."""
    if groups == c.groups:
        return c
    assert c.groups % groups == 0
    out_c, in_per_g = c.out_channels, c.weight.shape[1]
    in_per_new = c.in_channels // groups
    out_per_g, out_per_new = out_c // c.groups, out_c // groups

    def regrouped() -> torch.Tensor:
        weight = value(c.weight)
        w = torch.zeros((out_c, in_per_new, *c.kernel), dtype=F64)
        for o in range(0, out_c, out_per_g):
            g = o // out_per_g
            base = g * in_per_g - (o // out_per_new) * in_per_new
            w[o : o + out_per_g, base : base + in_per_g] = weight[o : o + out_per_g]
        return w

    return replace(c, weight=lazy((out_c, in_per_new, *c.kernel), regrouped), groups=groups)


def _diag_as_conv(d: Diagonal, like: Conv) -> Conv:
    """A per-channel map written as a conv that can be summed with ``like``.

    For zero padding this is a depthwise 1x1 conv (the union of offsets handles the alignment).
    For other padding modes the kernel must sit inside ``like``'s own geometry, at the tap that
    reads the output position itself, so that both convs pad identically.
    """
    if like.in_channels != like.out_channels:
        raise Refusal("shape", "identity branch needs as many input as output channels")
    if any(s != 1 for s in like.stride):
        raise Refusal("geometry", "identity branch beside a strided conv")
    scale, _ = _diag_vectors(d, like.out_channels)
    c = like.out_channels
    if like.padding_mode == "zeros":
        w = scale.reshape(c, 1, *([1] * like.nd))
        return Conv(w, torch.zeros(c, dtype=F64), like.stride, ((0, 0),) * like.nd, like.dilation, c)
    taps = []
    for k, (lo, hi), dil in zip(like.kernel, like.padding, like.dilation):
        if lo % dil or lo + hi != (k - 1) * dil:
            raise Refusal("geometry", "identity branch is not centred on the conv's padding")
        taps.append(lo // dil)
    w = torch.zeros((c, 1, *like.kernel), dtype=F64)
    w[(slice(None), 0, *taps)] = scale
    return replace(like, weight=w, bias=torch.zeros(c, dtype=F64), groups=c)


def _add_convs(a: Conv, b: Conv) -> Conv:
    if a.nd != b.nd:
        raise Refusal("geometry", "convs of different dimensionality")
    if a.stride != b.stride:
        raise Refusal("geometry", f"different strides {a.stride} and {b.stride}")
    if a.dilation != b.dilation:
        raise Refusal("geometry", f"different dilations {a.dilation} and {b.dilation}")
    if a.in_channels != b.in_channels or a.out_channels != b.out_channels:
        raise Refusal("shape", "convs with different channel counts")
    groups = math.gcd(a.groups, b.groups)
    a, b = _regroup(a, groups), _regroup(b, groups)
    if a.padding_mode != "zeros" or b.padding_mode != "zeros":
        if a.padding_mode != b.padding_mode or a.kernel != b.kernel or a.padding != b.padding:
            raise Refusal(
                "geometry", f"padding mode {a.padding_mode!r}/{b.padding_mode!r} needs identical geometry"
            )
        return replace(a, weight=_sum(a.weight, b.weight), bias=_sum(a.bias, b.bias))
    # Zero padding: place both kernels on the union of the input offsets each output reads.
    kernel, padding, slots_a, slots_b = [], [], [], []
    for ka, kb, (la, ha), (lb, hb), d in zip(a.kernel, b.kernel, a.padding, b.padding, a.dilation):
        end_a, end_b = -la + (ka - 1) * d, -lb + (kb - 1) * d
        if (la - lb) % d:
            raise Refusal("geometry", "kernels fall on different dilation grids")
        if ha - end_a != hb - end_b:
            raise Refusal("geometry", "misaligned padding: the branches' outputs are not centred alike")
        start, end = min(-la, -lb), max(end_a, end_b)
        kernel.append((end - start) // d + 1)
        padding.append((-start, ha - end_a + end))
        slots_a.append(slice((-la - start) // d, (-la - start) // d + ka))
        slots_b.append(slice((-lb - start) // d, (-lb - start) // d + kb))
    if any(lo < 0 or hi < 0 for lo, hi in padding):
        raise Refusal("geometry", "the summed conv would need negative padding")
    shape = (a.out_channels, a.weight.shape[1], *kernel)

    def placed() -> torch.Tensor:
        w = torch.zeros(shape, dtype=F64)
        w[(slice(None), slice(None), *slots_a)] += value(a.weight)
        w[(slice(None), slice(None), *slots_b)] += value(b.weight)
        return w

    return replace(a, weight=lazy(shape, placed), bias=_sum(a.bias, b.bias), padding=tuple(padding))


def _sum(a: Tensorish, b: Tensorish) -> Tensorish:
    """``a + b`` of two tensors of one shape; lazy when either side is."""
    if isinstance(a, Lazy) or isinstance(b, Lazy):
        ta, tb = _stored_terms(a), _stored_terms(b)
        terms = ta + tb if len(ta) == len(tb) == 1 else None  # each side one stored tensor, nothing else
        return Lazy(a.shape, lambda: _fresh(a).add_(_operand(b)), terms=terms)
    return value(a) + value(b)


def _stored_terms(t: Tensorish) -> tuple[torch.Tensor, ...]:
    """The stored tensors ``t`` is the plain sum of (none when it is anything else)."""
    return t.terms if isinstance(t, Lazy) and t.terms and t.diagonal is None else ()


# ----------------------------------------------------------------------------------------------
# sum


def add_maps(a: AffineMap, b: AffineMap) -> AffineMap:
    """``a(x) + b(x)`` as one map, or Refusal."""
    if not _axes_compatible(a.axis, b.axis):
        raise Refusal("geometry", f"maps on different axes ({a.axis} and {b.axis})")
    if isinstance(a, Lookup) or isinstance(b, Lookup):
        if not (isinstance(a, Lookup) and isinstance(b, Lookup)):
            raise Refusal("geometry", "a table lookup summed with a map of the indices themselves")
        if a.table.shape != b.table.shape:
            raise Refusal("shape", f"lookups of tables {tuple(a.table.shape)} and {tuple(b.table.shape)}")
        return Lookup(_sum(a.table, b.table))
    if isinstance(b, Diagonal) and not isinstance(a, Diagonal):
        a, b = b, a
    if isinstance(a, Diagonal):
        if isinstance(b, Diagonal):
            s1, t1, s2, t2 = _diag_broadcast(a, b)
            return Diagonal(s1 + s2, t1 + t2, _common_axis(a.axis, b.axis))
        if isinstance(b, Dense):
            if b.in_features != b.out_features:
                raise Refusal("shape", "identity branch beside a non-square linear")
            scale, shift = _diag_vectors(a, b.out_features)
            weight = b.weight  # the identity is added when the region is written, on the diagonal only

            def plus_identity() -> torch.Tensor:
                w = _fresh(weight)
                w.diagonal().add_(scale)
                return w

            terms = _stored_terms(weight)
            on_diagonal = Lazy(weight.shape, plus_identity, terms=terms or None, diagonal=scale if terms else None)
            return Dense(on_diagonal, _sum(b.bias, shift))
        _, shift = _diag_vectors(a, b.out_channels)
        conv = _add_convs(_diag_as_conv(a, b), b)
        return replace(conv, bias=_sum(conv.bias, shift))
    if isinstance(a, Dense) and isinstance(b, Dense):
        if a.weight.shape != b.weight.shape:
            raise Refusal("shape", f"linears of shapes {tuple(a.weight.shape)} and {tuple(b.weight.shape)}")
        return Dense(_sum(a.weight, b.weight), _sum(a.bias, b.bias))
    if isinstance(a, Conv) and isinstance(b, Conv):
        return _add_convs(a, b)
    raise Refusal("geometry", f"cannot add {type(a).__name__} and {type(b).__name__}")


def negate(m: AffineMap) -> AffineMap:
    if isinstance(m, Diagonal):
        return Diagonal(-m.scale, -m.shift, m.axis)
    if isinstance(m, Lookup):
        return Lookup(_elementwise(m.table, torch.neg))
    return replace(m, weight=_elementwise(m.weight, torch.neg), bias=_elementwise(m.bias, torch.neg))


def bias_if_any(m: Dense | Conv) -> torch.Tensor | None:
    """``m``'s bias as a float64 tensor, or None where it is all zeros (a fold writes no bias then).
    Computed once here: a lazy bias reads the weights it is composed from."""
    bias = value(m.bias)
    return bias if bool((bias != 0).any()) else None


def _scaled(t: Tensorish, factor: torch.Tensor) -> Tensorish:
    """``t * factor`` (a float64 factor broadcast over ``t``), lazy when ``t`` is; a stored weight keeps
    itself and the factor apart (``Lazy.product``), so that rounding can multiply in the weight's dtype."""
    if not isinstance(t, Lazy):
        return value(t) * factor
    terms = _stored_terms(t)
    product = (terms[0], factor) if len(terms) == 1 else None
    return Lazy(t.shape, lambda: value(t) * factor, product=product)


def _elementwise(t: Tensorish, fn: Callable[[torch.Tensor], torch.Tensor]) -> Tensorish:
    """``fn`` of ``t``'s float64 value (a negation, a broadcast with small eager factors): lazy when ``t``
    is, so a weight is still read only when its region is written."""
    return lazy(t.shape, lambda: fn(value(t))) if isinstance(t, Lazy) else fn(value(t))


# ----------------------------------------------------------------------------------------------
# compose


def compose_maps(outer: AffineMap, inner: AffineMap) -> AffineMap:
    """``outer(inner(x))`` as one map, or Refusal."""
    if not _axes_compatible(outer.axis, inner.axis):
        raise Refusal("geometry", f"maps on different axes ({inner.axis} then {outer.axis})")
    if isinstance(outer, Lookup):
        raise Refusal("geometry", "a table lookup reads indices, not the values of a map")
    if isinstance(inner, Lookup):
        return _compose_after_lookup(outer, inner)
    if isinstance(outer, Diagonal) and isinstance(inner, Diagonal):
        s1, t1, s2, t2 = _diag_broadcast(inner, outer)
        return Diagonal(s2 * s1, s2 * t1 + t2, _common_axis(outer.axis, inner.axis))
    if isinstance(outer, Diagonal):
        scale, shift = _diag_vectors(outer, out_channels(inner))
        view = scale.reshape(-1, *([1] * (inner.weight.dim() - 1)))
        return replace(inner, weight=_scaled(inner.weight, view),
                       bias=_elementwise(inner.bias, lambda b: b * scale + shift))
    if isinstance(inner, Diagonal):
        return _compose_after_diagonal(outer, inner)
    if isinstance(outer, Dense) and isinstance(inner, Dense):
        if outer.in_features != inner.out_features:
            raise Refusal("shape", "linear chain with mismatched widths")
        return Dense(
            lazy((outer.out_features, inner.in_features), lambda: value(outer.weight) @ value(inner.weight)),
            lazy((outer.out_features,), lambda: value(outer.weight) @ value(inner.bias) + value(outer.bias)),
        )
    if isinstance(outer, Conv) and isinstance(inner, Conv):
        return _compose_convs(outer, inner)
    raise Refusal("geometry", f"cannot chain {type(inner).__name__} into {type(outer).__name__}")


def _compose_after_lookup(outer: AffineMap, inner: Lookup) -> Lookup:
    """A map applied to every looked-up row is that map applied to the table, once."""
    table = inner.table
    if isinstance(outer, Diagonal):
        scale, shift = _diag_vectors(outer, inner.width)
        return Lookup(_elementwise(table, lambda t: t * scale + shift))
    if isinstance(outer, Dense):
        if outer.in_features != inner.width:
            raise Refusal("shape", "linear after a lookup of another width")
        shape = (inner.rows, outer.out_features)
        return Lookup(lazy(shape, lambda: value(table) @ value(outer.weight).t() + value(outer.bias)))
    raise Refusal("geometry", f"cannot apply {type(outer).__name__} to a table lookup")


def _compose_after_diagonal(outer: Dense | Conv, inner: Diagonal) -> AffineMap:
    if isinstance(outer, Dense):
        scale, shift = _diag_vectors(inner, outer.in_features)
        bias = outer.bias
        if inner.has_shift:
            bias = lazy(outer.bias.shape, lambda: value(outer.weight) @ shift + value(outer.bias))
        return Dense(_scaled(outer.weight, scale), bias)
    scale, shift = _diag_vectors(inner, outer.in_channels)
    g, in_per_g = outer.groups, outer.weight.shape[1]
    out_per_g = outer.out_channels // g
    spatial = [1] * outer.nd
    shape = outer.weight.shape

    def weight() -> torch.Tensor:
        w = value(outer.weight).reshape(g, out_per_g, in_per_g, *outer.kernel)
        return (w * scale.reshape(g, 1, in_per_g, *spatial)).reshape(shape)

    bias = outer.bias
    if inner.has_shift:
        if outer.padding_mode == "zeros" and outer.has_padding:
            raise Refusal("padding-border", "a shift before a zero-padded conv is wrong at the borders")

        def shifted() -> torch.Tensor:
            per_in = value(outer.weight).reshape(g, out_per_g, in_per_g, -1).sum(-1)
            return value(outer.bias) + (per_in * shift.reshape(g, 1, in_per_g)).sum(-1).reshape(-1)

        bias = lazy(outer.bias.shape, shifted)
    return replace(outer, weight=lazy(shape, weight), bias=bias)


def _is_pointwise(c: Conv) -> bool:
    return (
        all(k == 1 for k in c.kernel)
        and all(s == 1 for s in c.stride)
        and not c.has_padding
        and c.groups == 1
    )


def _compose_convs(outer: Conv, inner: Conv) -> Conv:
    if outer.in_channels != inner.out_channels:
        raise Refusal("shape", "conv chain with mismatched channels")
    if _is_pointwise(inner):
        # 1x1 then KxK: the 1x1 commutes with any padding mode; its bias only with no zero padding.
        # A grouped KxK (average pooling is depthwise) is widened to one group; the region's cost
        # check decides whether that pays.
        if bias_if_any(inner) is not None and outer.padding_mode == "zeros" and outer.has_padding:
            raise Refusal("padding-border", "a 1x1 conv's bias before a zero-padded conv")
        outer = _regroup(outer, 1)
        o = outer
        w = lazy((o.out_channels, inner.in_channels, *o.kernel),
                 lambda: torch.einsum("om...,mi->oi...", value(o.weight), value(inner.weight).flatten(1)))
        bias = lazy(o.bias.shape, lambda: value(o.bias) + torch.einsum("om...,m->o", value(o.weight), value(inner.bias)))
        return replace(o, weight=w, bias=bias)
    if _is_pointwise(outer) and inner.groups == 1 and outer.padding_mode == "zeros":
        w = lazy((outer.out_channels, *inner.weight.shape[1:]),
                 lambda: torch.einsum("om,mi...->oi...", value(outer.weight).flatten(1), value(inner.weight)))
        bias = lazy(outer.bias.shape, lambda: value(outer.weight).flatten(1) @ value(inner.bias) + value(outer.bias))
        return replace(inner, weight=w, bias=bias)
    raise Refusal("geometry", "only 1x1 convs (stride 1, no padding, no groups) chain into other convs")
