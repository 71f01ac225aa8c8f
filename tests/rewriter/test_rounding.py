"""``rounding``: a fold's weight rounded once to the model's dtype, whole or a block of rows at a time,
with the bits of the float64 fold cast once."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from branchfold.patterns import canonical
from branchfold.rewriter.affine import F64, Diagonal, add_maps, compose_maps, identity, value
from branchfold.rewriter.rounding import RoundedRows, rounded, rounded_rows

_EXTREMES = [0.0, -0.0, 1.0, -1.0, 3.0e38, -3.0e38, 1e-45, -1e-45, 1.1754942e-38, 6e-8, 65504.0, 1e-30, 1e30, 0.1]
_FORMS = ["sum", "sum+identity", "one+identity", "sum+scaled-identity"]


@st.composite
def weight_pair(draw):
    """Two weights of one shape and dtype, with values that make double rounding bite if it can: wide
    exponent gaps, subnormals, values near overflow, halfway cases; stored as they are or transposed."""
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    n = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scales = torch.tensor([10.0 ** draw(st.integers(-40, 38)) for _ in range(2)], dtype=F64)
    a = torch.randn(n, n, generator=g, dtype=F64) * scales[0]
    b = torch.randn(n, n, generator=g, dtype=F64) * scales[1]
    picks = draw(st.lists(st.sampled_from(_EXTREMES), min_size=2 * n * n, max_size=2 * n * n))
    mask = torch.rand(2, n, n, generator=g) < 0.3
    extremes = torch.tensor(picks, dtype=F64).reshape(2, n, n)
    a, b = torch.where(mask[0], extremes[0], a), torch.where(mask[1], extremes[1], b)
    a, b = a.to(dtype), b.to(dtype)  # out-of-range values become inf, as they would be stored
    layouts = draw(st.sampled_from(["as-is", "transposed", "mixed"]))
    if layouts != "as-is":
        a = a.t().contiguous().t()  # same values, column-major storage (an ONNX MatMul weight)
    if layouts == "transposed":
        b = b.t().contiguous().t()
    return a, b


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]
    return t.contiguous().view(view)


def _folded(a: torch.Tensor, b: torch.Tensor, form: str):
    n = a.shape[0]
    x, y = canonical.linear(a), canonical.linear(b)
    if form == "sum":
        return add_maps(x, y)
    if form == "sum+identity":
        return add_maps(add_maps(x, y), identity())
    if form == "one+identity":
        return add_maps(x, identity())
    scale = torch.linspace(-3.0, 5.0, n, dtype=F64)
    return add_maps(add_maps(x, y), Diagonal(scale, torch.zeros(n, dtype=F64), -1))


@settings(max_examples=200, deadline=None)
@given(weight_pair(), st.sampled_from(_FORMS))
def test_rounded_gives_the_bits_of_the_float64_fold(pair, form):
    """``rounded`` computes a two-weight sum in the weights' dtype: the bits must be those of the float64
    fold cast once (the same rule the adapters used before), on every value and layout drawn."""
    a, b = pair
    m = _folded(a, b, form)
    assert m.weight.terms is not None  # the fast path is what is under test
    want = value(m.weight).to(a.dtype)
    for transposed in (False, True):
        got = rounded(m.weight, a.dtype, transposed)
        assert got.dtype == a.dtype and torch.equal(_bits(got), _bits(want))
    assert torch.equal(a, pair[0]) and torch.equal(b, pair[1])  # the stored weights are not written


@settings(max_examples=150, deadline=None)
@given(weight_pair(), st.sampled_from(_FORMS), st.booleans(), st.integers(1, 4), st.data())
def test_blocks_and_elements_give_the_bits_of_the_whole(pair, form, transposed, rows_per_block, data):
    """A weight written a block of rows at a time (the diagonal crossing block boundaries), or sampled by
    element, has the bits of the whole weight: what a file written in blocks and a fingerprint promise."""
    a, b = pair
    rows = rounded_rows(_folded(a, b, form).weight, a.dtype, transposed)
    assert rows is not None
    whole = rows.full()
    assert whole.is_contiguous() and tuple(whole.shape) == tuple(a.shape)
    expected = value(_folded(a, b, form).weight).to(a.dtype)
    assert torch.equal(_bits(whole), _bits(expected.t() if transposed else expected))
    row_bytes = a.shape[1] * a.element_size()
    blocks = [block.clone() for block in rows.blocks(block_bytes=rows_per_block * row_bytes)]
    assert all(len(block) <= rows_per_block for block in blocks)
    assert torch.equal(_bits(torch.cat(blocks)), _bits(whole))
    flat = torch.tensor(data.draw(st.lists(st.integers(0, whole.numel() - 1), min_size=1, max_size=20)))
    assert torch.equal(_bits(rows.elements(flat)), _bits(whole.reshape(-1)[flat]))


def test_rounded_lays_out_as_written_and_falls_back_beyond_two_terms():
    """``rounded`` gives a contiguous weight, or with ``transposed`` one whose transpose is contiguous (an
    ONNX MatMul weight, written as [in, out]); three branches, or a weight scaled by a BatchNorm, go
    through float64 and are not ``RoundedRows``."""
    w = [torch.randn(8, 8).t() for _ in range(3)]  # transposed views, as ONNX MatMul weights are read
    two = add_maps(canonical.linear(w[0]), canonical.linear(w[1]))
    assert rounded(two.weight, torch.float32).is_contiguous()
    laid_out = rounded(two.weight, torch.float32, transposed=True)
    assert laid_out.t().is_contiguous() and torch.equal(laid_out, value(two.weight).float())
    three = add_maps(two, canonical.linear(w[2]))
    scaled = compose_maps(Diagonal(torch.full((8,), 0.3, dtype=F64), torch.zeros(8, dtype=F64), -1), two)
    for m in (three, scaled):
        assert m.weight.terms is None and rounded_rows(m.weight, torch.float32) is None
        assert torch.equal(rounded(m.weight, torch.float32), value(m.weight).float())
        laid_out = rounded(m.weight, torch.float32, transposed=True)
        assert laid_out.t().is_contiguous() and torch.equal(laid_out, value(m.weight).float())


def test_rows_only_for_stored_weights_of_the_written_dtype():
    """A float16 weight written as float32 (a Cast in front of it) is rounded through float64."""
    half = add_maps(canonical.linear(torch.randn(4, 4).half()), canonical.linear(torch.randn(4, 4).half()))
    assert rounded_rows(half.weight, torch.float16) is not None
    assert rounded_rows(half.weight, torch.float32) is None
    assert torch.equal(rounded(half.weight, torch.float32), value(half.weight).float())


def test_blocks_read_the_stored_weights_without_writing_them():
    a, b = torch.randn(5, 3), torch.randn(3, 5).t()
    before = (a.clone(), b.clone())
    rows = RoundedRows((a, b))
    assert [len(block) for block in rows.blocks(block_bytes=2 * 3 * 4)] == [2, 2, 1]
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert rows.nbytes == 60 and torch.equal(rows.full(), a + b)


@settings(max_examples=200, deadline=None)
@given(weight_pair(), st.sampled_from(["outer", "inner"]), st.booleans())
def test_a_scaled_weight_rounded_in_its_dtype_has_the_bits_of_the_float64_product(pair, side, exact_factor):
    """A per-channel scale taken into a weight (``Lazy.product``) is multiplied in the weight's dtype when
    every factor is of that dtype: the bits must be those of the float64 product cast once. A factor the
    dtype cannot hold takes the float64 path (the same bits by definition, checked all the same)."""
    a, b = pair
    n = a.shape[0]
    factor = b[0].to(F64)  # values of the dtype, extremes and subnormals included
    if not exact_factor:
        factor = factor + torch.linspace(1e-3, 2e-3, n, dtype=F64)
    factor = torch.where(torch.isfinite(factor), factor, torch.ones_like(factor))
    x = canonical.linear(a)
    diagonal = Diagonal(factor, torch.zeros(n, dtype=F64), -1)
    m = compose_maps(diagonal, x) if side == "outer" else compose_maps(x, diagonal)
    assert m.weight.product is not None
    want = value(m.weight).to(a.dtype)
    for transposed in (False, True):
        got = rounded(m.weight, a.dtype, transposed)
        assert got.dtype == a.dtype and torch.equal(_bits(got), _bits(want))
        assert (got.t() if transposed else got).is_contiguous()
    assert torch.equal(a, pair[0])  # the stored weight is not written


def test_a_scaled_weight_needs_no_float64_copy(monkeypatch):
    """The point of the product path: a LayerNorm's scale into a float32 linear reads the weight once."""
    w = torch.randn(64, 32)
    m = compose_maps(canonical.linear(w), Diagonal(torch.rand(32).to(F64), torch.zeros(32, dtype=F64), -1))
    monkeypatch.setattr(m.weight, "_compute", lambda: pytest.fail("computed in float64"))
    assert torch.equal(rounded(m.weight, torch.float32), w * m.weight.product[1].float())
