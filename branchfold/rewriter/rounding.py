"""A fold's weight rounded to the model's dtype, once, and where it can be, a block of rows at a time.

Every adapter writes a map's tensor through here: the float64 value cast once (``rounded``, and
``cast_tensor`` for a torch module's parameter). The commonest folded weight, the sum of one or two
stored weights of the model's dtype (two parallel linears, a branch and an identity), is computed in
that dtype instead (``RoundedRows``): the same bits, and it needs no float64 copy, so it can also be
computed a block of rows at a time straight into a file. An ONNX fold of a 2 GB model then never holds
its new weights in memory (``branchfold.storage.onnx_folded``).

Why the bits are the same: rounding an exact sum twice, to float64 and then to a format of p <= 24 bits,
gives the correctly rounded result (double rounding is innocuous when 53 >= 2p + 2: Figueroa, 1995),
which is what one IEEE addition in that format gives. A diagonal that also takes an identity's scale is
a sum of three, computed in float64 as before. ``tests/rewriter/test_rounding.py`` checks the bits on
random and extreme values, in whole and in blocks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from branchfold.rewriter.affine import F64, Lazy, Tensorish, value

BLOCK_BYTES = 4 << 20  # rows computed and written at a time (measured: 1-16 MiB within 10% on 64 MB weights)


def rows_per_block(shape: Sequence[int], itemsize: float, block_bytes: int = BLOCK_BYTES) -> int:
    """How many rows (of the first dim) of a tensor of ``shape`` fit in ``block_bytes`` (at least one)."""
    row = int(math.prod(shape[1:]) * itemsize)
    return max(1, block_bytes // max(row, 1))


@dataclass(frozen=True)
class RoundedRows:
    """A weight as it will be written (its final dtype and orientation) that is the sum of one or two
    stored tensors (``terms``, views in that orientation, never written to), plus a float64 vector on the
    main diagonal (``diagonal``), computed whenever rows of it are asked for."""

    terms: tuple[torch.Tensor, ...]
    diagonal: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.terms[0].shape

    @property
    def dtype(self) -> torch.dtype:
        return self.terms[0].dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``start:stop`` (of the first dim), contiguous; into ``out`` (rows at least) when given."""
        count = max(0, min(stop, self.shape[0]) - start)
        block = torch.empty((count, *self.shape[1:]), dtype=self.dtype) if out is None else out[:count]
        parts = [t[start : start + count] for t in self.terms]
        straight = [p for p in parts if not _transposed(p)]
        flipped = [p.t() for p in parts if _transposed(p)]  # as stored: rows of consecutive elements
        if flipped:  # summed as stored, then one blocked transpose (torch's copy_ of a transposed matrix)
            staged = flipped[0].contiguous() if len(flipped) == 1 else torch.add(*flipped)
            block.copy_(staged.t())
            if straight:
                block.add_(straight[0])  # one IEEE addition, whichever operand comes first
        elif len(straight) == 1:
            block.copy_(straight[0])
        else:
            torch.add(*straight, out=block)
        if self.diagonal is not None:
            on = torch.arange(start, max(start, min(start + count, self.shape[1])))
            if len(on):
                block[on - start, on] = self._exact_diagonal(on)
        return block

    def _exact_diagonal(self, at: torch.Tensor) -> torch.Tensor:
        exact = self.terms[0][at, at].to(F64)
        for term in self.terms[1:]:
            exact = exact + term[at, at]
        return (exact + self.diagonal[at]).to(self.dtype)

    def full(self) -> torch.Tensor:
        """The whole weight, a new contiguous tensor."""
        return self.rows(0, self.shape[0])

    def blocks(self, block_bytes: int = BLOCK_BYTES, buffers: int = 1) -> Iterator[torch.Tensor]:
        """The rows, in order, a block at a time, computed into ``buffers`` buffers in turn (so a block is
        valid until ``buffers`` more are asked for: two let a consumer write one while the next is
        computed): memory of a few blocks, whatever the weight's size."""
        step = rows_per_block(self.shape, self.dtype.itemsize, block_bytes)
        shape = (min(step, self.shape[0]), *self.shape[1:])
        ring = [torch.empty(shape, dtype=self.dtype) for _ in range(max(1, buffers))]
        for i, start in enumerate(range(0, self.shape[0], step)):
            yield self.rows(start, start + step, out=ring[i % len(ring)])

    def elements(self, flat: torch.Tensor) -> torch.Tensor:
        """The elements at row-major positions ``flat``, with the bits ``full()`` gives them, reading
        nothing else (a fingerprint of a weight without computing it)."""
        index = torch.unravel_index(flat, self.shape)
        picked = [t[index] for t in self.terms]
        got = picked[0] if len(picked) == 1 else torch.add(picked[0], picked[1])  # indexing copied them
        if self.diagonal is not None:
            on = index[0] == index[1]
            got[on] = self._exact_diagonal(index[0][on])
        return got


def _transposed(part: torch.Tensor) -> bool:
    """A matrix stored as its transpose (an ONNX MatMul weight written as a Gemm's, or the reverse): read
    row by row it would jump a whole stored row per element."""
    return part.dim() == 2 and not part.is_contiguous() and part.stride(0) == 1 and part.shape[0] > 1


def rounded_rows(t: Tensorish, dtype: torch.dtype, transposed: bool = False) -> RoundedRows | None:
    """``t`` rounded to ``dtype`` as ``RoundedRows`` (transposed, for a matrix written as its transpose),
    or None where it is not one or two stored tensors of ``dtype`` on the CPU."""
    if not (isinstance(t, Lazy) and t.terms and len(t.terms) <= 2 and len(t.shape) > 0):
        return None
    if not all(s.dtype == dtype and s.device.type == "cpu" for s in t.terms):
        return None
    terms = tuple(s.t() if transposed and s.dim() == 2 else s for s in t.terms)
    if t.diagonal is not None and len(t.shape) != 2:
        return None
    return RoundedRows(terms, t.diagonal)


def rounded(t: Tensorish, dtype: torch.dtype, transposed: bool = False) -> torch.Tensor:
    """``t``'s value rounded once to ``dtype``: a new tensor, contiguous, or with ``transposed`` (a matrix
    about to be written as its transpose) laid out so that ``.t()`` is contiguous.

    Through ``RoundedRows`` where it applies (for two 4096x4096 float32 weights this reads 128 MB and
    writes 64 MB, against about 900 MB through float64), else computed in float64 and cast."""
    rows = rounded_rows(t, dtype, transposed)
    if rows is not None:
        w = rows.full()
        return w.t() if transposed and w.dim() == 2 else w
    product = _rounded_product(t, dtype)
    if product is not None:  # a fresh tensor laid out as the stored weight is
        if transposed and product.dim() == 2:
            return product if product.t().is_contiguous() else product.t().contiguous().t()
        return product.contiguous()
    exact = value(t)
    if transposed and exact.dim() == 2:  # cast and lay out in one strided pass
        return torch.empty(exact.shape[::-1], dtype=dtype, device=exact.device).t().copy_(exact)
    # a copy even where the value is a float64 tensor of the caller's, and contiguous even where the value
    # kept a stored weight's column-major layout
    return exact.to(dtype, copy=True, memory_format=torch.contiguous_format)


def _rounded_product(t: Tensorish, dtype: torch.dtype) -> torch.Tensor | None:
    """A stored weight times a factor (``Lazy.product``), multiplied in ``dtype`` where that gives the
    bits of the float64 product rounded once, else None.

    It does when the weight is of ``dtype`` and every factor is too: the exact product of two p-bit
    significands has at most 2p <= 48 bits, so float64 holds it exactly, and rounding it to ``dtype`` is
    the correctly rounded product, which is what one IEEE multiplication in ``dtype`` gives (torch
    multiplies float16 and bfloat16 in float32, where their products are exact too). No float64 copy of
    the weight is made."""
    product = t.product if isinstance(t, Lazy) else None
    if product is None or dtype not in _NARROW:
        return None
    stored, factor = product
    if stored.dtype != dtype or stored.device.type != "cpu" or factor.dtype != F64:
        return None
    narrow = factor.to(dtype)
    if not (bool(torch.isfinite(factor).all()) and torch.equal(narrow.to(F64), factor)):
        return None
    return stored * narrow


_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def cast_tensor(t: Tensorish, dtype: torch.dtype) -> torch.Tensor:
    """A map's tensor in the model's dtype, always a fresh tensor (never an alias of a stored weight), with
    the strides of a new contiguous tensor. ``contiguous()`` is not enough: it keeps any stride of a size-1
    dim (a composed 1x1 conv's weight can come out ``[2, 4, 1]`` with strides ``(4, 1, 4)``), and torch picks
    a conv's output layout from its weight's strides, so the folded conv would write channels-last where the
    original writes contiguous, and a training-mode Dropout after it would draw a different mask from the
    same seed."""
    w = rounded(t, dtype).detach()
    return w if w.stride() == _contiguous_strides(w.shape) else w.clone(memory_format=torch.contiguous_format)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))
