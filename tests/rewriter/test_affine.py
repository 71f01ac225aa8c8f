"""The affine algebra against torch itself: every ``add_maps`` / ``compose_maps`` result, run as one op,
must equal running its operands separately; every refusal must be for a real reason.

``run_map`` below only *applies* a map (pad, then conv / linear / scale) — it holds no folding math.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from branchfold.patterns import canonical
from branchfold.rewriter.affine import (
    F64,
    Conv,
    Dense,
    Diagonal,
    Lookup,
    Refusal,
    add_maps,
    compose_maps,
    identity,
    negate,
    value,
)

MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate", "circular": "circular"}


def run_map(m, x: torch.Tensor) -> torch.Tensor:
    """Apply one affine map to a float64 tensor (a lookup: to a tensor of indices), with torch's own ops."""
    if isinstance(m, Lookup):
        return F.embedding(x, value(m.table))
    if isinstance(m, Dense):
        return F.linear(x, value(m.weight), value(m.bias))
    if isinstance(m, Conv):
        flat = [p for lo_hi in reversed(m.padding) for p in lo_hi]
        x = F.pad(x, flat, mode=MODES[m.padding_mode]) if any(flat) else x
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[m.nd]
        return conv(x, value(m.weight), value(m.bias), m.stride, 0, m.dilation, m.groups)
    view = (-1,) + (1,) * (-m.axis - 1) if m.axis is not None else ()
    return x * m.scale.reshape(view) + m.shift.reshape(view)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def conv_map(c_in, c_out, kernel, stride=1, padding=0, dilation=1, groups=1, mode="zeros", seed=0, bias=True):
    nd = len(kernel)
    w = rand(c_out, c_in // groups, *kernel, seed=seed)
    b = rand(c_out, seed=seed + 1) if bias else None
    return canonical.conv(w, b, (stride,) * nd, padding, (dilation,) * nd, groups, mode)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-9, atol=1e-9))


# ----------------------------------------------------------------------------------------------
# dense and diagonal


def test_dense_sum_compose_and_identity():
    a, b = canonical.linear(rand(5, 5, seed=1), rand(5, seed=2)), canonical.linear(rand(5, 5, seed=3))
    x = rand(4, 5, seed=9)
    assert close(run_map(add_maps(a, b), x), run_map(a, x) + run_map(b, x))
    assert close(run_map(add_maps(a, negate(b)), x), run_map(a, x) - run_map(b, x))
    assert close(run_map(compose_maps(a, b), x), run_map(a, run_map(b, x)))
    assert close(run_map(add_maps(identity(), a), x), x + run_map(a, x))
    wide = canonical.linear(rand(3, 5, seed=4))
    with pytest.raises(Refusal) as r:
        add_maps(identity(), wide)
    assert r.value.category == "shape"


def test_diagonals_on_channel_axis():
    bn = canonical.batch_norm(rand(4).abs(), rand(4, seed=1).abs() + 0.1, rand(4, seed=2), rand(4, seed=3), 1e-5, 4)
    ls = canonical.channel_constant(rand(4, 1, 1, seed=5), (2, 4, 3, 3))
    conv = conv_map(4, 4, (3, 3), padding=1)
    x = rand(2, 4, 5, 5, seed=7)
    assert bn.axis == ls.axis == -3
    assert close(run_map(compose_maps(ls, compose_maps(bn, conv)), x), run_map(ls, run_map(bn, run_map(conv, x))))
    s = add_maps(conv, bn)  # identity branch with BN beside a 3x3
    assert close(run_map(s, x), run_map(conv, x) + run_map(bn, x))
    lin = canonical.linear(rand(6, 4))
    with pytest.raises(Refusal):  # a channel-axis diagonal cannot meet a last-axis dense map
        compose_maps(lin, bn)


def test_training_batch_norm_and_wrong_axis_constants_are_refused():
    with pytest.raises(Refusal) as r:
        canonical.batch_norm(torch.zeros(3), torch.ones(3), None, None, 1e-5, 4, training=True)
    assert r.value.category == "training-mode"
    with pytest.raises(Refusal) as r:
        canonical.channel_constant(torch.ones(1, 3, 1, 5), (2, 3, 4, 5))
    assert r.value.category == "broadcast"
    with pytest.raises(Refusal):  # would broadcast x from 1 to 3 along the last axis
        canonical.channel_constant(torch.ones(3), (2, 4, 1))


def test_misaligned_padding_is_refused():
    """Strided branches whose last outputs are centred differently (3-tap padded (1, 0) vs 1-tap)."""
    a = conv_map(3, 3, (3,), stride=2, padding=[(1, 0)])
    b = conv_map(3, 3, (1,), stride=2, padding=[(0, 0)])
    with pytest.raises(Refusal) as r:
        add_maps(a, b)
    assert r.value.category == "geometry" and "misaligned" in r.value.detail


def test_off_centre_unstrided_branches_fold_on_the_union_of_offsets():
    a = conv_map(3, 3, (3,), padding=[(2, 0)], seed=1)  # causal 3-tap
    b = conv_map(3, 3, (1,), seed=2)
    x = rand(1, 3, 7, seed=3)
    s = add_maps(a, b)
    assert s.padding == ((2, 0),) and close(run_map(s, x), run_map(a, x) + run_map(b, x))


def test_even_kernels_align_by_their_padding():
    a = conv_map(2, 2, (4,), padding=[(2, 1)], seed=1)  # union of offsets -2..1
    b = conv_map(2, 2, (2,), padding=[(1, 0)], seed=2)  # offsets -1..0
    x = rand(1, 2, 9, seed=3)
    assert close(run_map(add_maps(a, b), x), run_map(a, x) + run_map(b, x))


def test_shift_before_padded_conv_is_refused_but_scale_folds():
    conv = conv_map(3, 4, (3, 3), padding=1)
    shift = canonical.shift_constant(rand(3, 1, 1), (1, 3, 5, 5))
    scale = canonical.channel_constant(rand(3, 1, 1), (1, 3, 5, 5))
    with pytest.raises(Refusal) as r:
        compose_maps(conv, shift)
    assert r.value.category == "padding-border"
    x = rand(1, 3, 5, 5, seed=4)
    assert close(run_map(compose_maps(conv, scale), x), run_map(conv, run_map(scale, x)))
    unpadded = conv_map(3, 4, (3, 3))
    assert close(run_map(compose_maps(unpadded, shift), x), run_map(unpadded, run_map(shift, x)))


def test_avg_pool_is_a_depthwise_conv_and_refuses_inexact_modes():
    pool = canonical.avg_pool(3, 1, 1, 4, 2)
    x = rand(2, 4, 6, 6)
    assert close(run_map(pool, x), F.avg_pool2d(x, 3, 1, 1))
    with pytest.raises(Refusal):
        canonical.avg_pool(3, 1, 1, 4, 2, count_include_pad=False)
    with pytest.raises(Refusal):
        canonical.avg_pool(3, 2, 0, 4, 2, ceil_mode=True)


def test_results_are_float64_and_inputs_untouched():
    w = torch.randn(4, 4)
    before = w.clone()
    a = canonical.linear(w)
    s = add_maps(a, a)
    assert value(s.weight).dtype == F64 and torch.equal(w, before)
    assert value(s.weight).data_ptr() != w.data_ptr()


# ----------------------------------------------------------------------------------------------
# hypothesis: random conv geometries


@st.composite
def conv_pair(draw):
    """Two convs of one input whose outputs have the same size (b's high padding is solved for)."""
    nd = draw(st.integers(1, 2))
    groups_a, groups_b = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2, 4]))
    stride, dilation = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "zeros", "zeros", "reflect", "circular"]))
    ka = tuple(draw(st.integers(1, 5)) for _ in range(nd))
    kb = tuple(draw(st.integers(1, 5)) for _ in range(nd))
    pads_a = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(nd))
    pads_b = []
    for i in range(nd):
        lo = draw(st.integers(0, 3))
        hi = pads_a[i][0] + pads_a[i][1] - (ka[i] - 1) * dilation - lo + (kb[i] - 1) * dilation
        hi += draw(st.sampled_from([0, 0, 0, 1]))  # sometimes one more: equal sizes only under stride 2
        assume(0 <= hi <= 4)
        pads_b.append((lo, hi))
    a = conv_map(4, 4, ka, stride, pads_a, dilation, groups_a, mode, seed=0, bias=draw(st.booleans()))
    b = conv_map(4, 4, kb, stride, tuple(pads_b), dilation, groups_b, mode, seed=1, bias=draw(st.booleans()))
    return a, b


@settings(max_examples=80, deadline=None)
@given(conv_pair(), st.integers(6, 9))
def test_add_maps_equals_sum_of_convs(pair, size):
    a, b = pair
    x = rand(2, 4, *([size] * a.nd), seed=size)
    try:
        ya, yb = run_map(a, x), run_map(b, x)
    except RuntimeError:
        assume(False)  # padding larger than the input for reflect
    assume(ya.shape == yb.shape)
    try:
        s = add_maps(a, b)
    except Refusal as r:
        assert r.category in ("geometry", "shape")
        if a.padding_mode == b.padding_mode == "zeros" and a.dilation == b.dilation == (1,) * a.nd:
            # with equal output sizes and stride 1, zero-padded convs are always aligned: never refuse
            assert any(s != 1 for s in a.stride), r.detail
        return
    assert close(run_map(s, x), ya + yb)
    assert s.groups == math.gcd(a.groups, b.groups)


@st.composite
def conv_chain(draw):
    nd = draw(st.integers(1, 2))
    k = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    pad = draw(st.integers(0, 2))
    mode = draw(st.sampled_from(["zeros", "zeros", "replicate"]))
    big = conv_map(4, 5, k, draw(st.integers(1, 2)), pad, 1, draw(st.sampled_from([1])), mode, seed=3)
    point_in = conv_map(3, 4, (1,) * nd, seed=5, bias=draw(st.booleans()))
    point_out = conv_map(5, 2, (1,) * nd, seed=7, bias=draw(st.booleans()))
    return draw(st.sampled_from([(big, point_in), (point_out, big)]))


@settings(max_examples=80, deadline=None)
@given(conv_chain(), st.integers(5, 8))
def test_compose_maps_equals_chain_of_convs(chain, size):
    outer, inner = chain
    x = rand(2, inner.in_channels, *([size] * inner.nd), seed=size)
    try:
        m = compose_maps(outer, inner)
    except Refusal as r:
        assert r.category == "padding-border"
        assert bool((value(inner.bias) != 0).any()) and outer.has_padding and outer.padding_mode == "zeros"
        return
    assert close(run_map(m, x), run_map(outer, run_map(inner, x)))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.sampled_from([1, 2, 3]), st.booleans())
def test_diagonal_folds_into_grouped_conv_either_side(nd, groups, shift):
    c = 6
    conv = conv_map(c, c, (3,) * nd, 1, 0, 1, groups)
    d = Diagonal(rand(c, seed=2), rand(c, seed=3) if shift else torch.zeros(c, dtype=F64), -(nd + 1))
    x = rand(1, c, *([5] * nd), seed=4)
    assert close(run_map(compose_maps(conv, d), x), run_map(conv, run_map(d, x)))
    assert close(run_map(compose_maps(d, conv), x), run_map(d, run_map(conv, x)))


def test_weights_are_read_only_when_a_region_is_written(monkeypatch):
    """Recognizing and combining maps copies no weight; ``value`` computes the fold (fresh each time, so
    nothing float64 outlives the region it was written for)."""
    from branchfold.rewriter import affine

    reads = []
    real = affine.Lazy.get
    monkeypatch.setattr(affine.Lazy, "get", lambda self: reads.append(self) or real(self))
    w1, w2 = torch.randn(6, 6), torch.randn(6, 6)
    a, b = canonical.linear(w1), canonical.linear(w2, torch.randn(6))
    s = add_maps(add_maps(a, b), identity())
    c = compose_maps(Diagonal(torch.full((6,), 2.0, dtype=F64), torch.zeros(6, dtype=F64), -1), s)
    assert not reads and c.weight.shape == (6, 6) and c.macs() == 36
    expected = 2 * (w1.double() + w2.double() + torch.eye(6, dtype=F64))
    first, second = value(c.weight), value(c.weight)
    torch.testing.assert_close(first, expected)
    assert first.data_ptr() != second.data_ptr() and value(a.weight).data_ptr() != w1.data_ptr()
    assert torch.equal(value(a.weight), w1.double())  # the stored weight itself is never written


def test_a_weight_in_its_stored_layout_folds_the_same():
    """ONNX MatMul weights are [in, out]: the map reads a transposed view, in that memory order."""
    stored = torch.randn(5, 7)
    m = add_maps(canonical.linear(stored.t()), canonical.linear(stored.t() * 2))
    torch.testing.assert_close(value(m.weight), 3 * stored.t().double())


# ----------------------------------------------------------------------------------------------
# table lookups


def test_lookup_sums_and_maps_after_it_are_one_table():
    """``emb(idx, T1) + B(emb(idx, A)) * s + b`` (LoRA on an embedding) is one lookup of a folded table."""
    t1, a = canonical.lookup(rand(9, 6, seed=1)), canonical.lookup(rand(9, 2, seed=2))
    b = canonical.linear(rand(6, 2, seed=3), rand(6, seed=4))
    s = Diagonal(rand(6, seed=5), rand(6, seed=6), -1)
    idx = torch.tensor([[0, 8, 3], [3, 3, 1]])
    branch = compose_maps(s, compose_maps(b, a))
    folded = add_maps(t1, branch)
    assert isinstance(folded, Lookup) and folded.table.shape == (9, 6)
    assert close(run_map(folded, idx), run_map(t1, idx) + run_map(s, run_map(b, run_map(a, idx))))
    assert close(run_map(add_maps(t1, negate(t1)), idx), torch.zeros(2, 3, 6, dtype=F64))
    assert folded.macs() == 6 and folded.params() == 54  # a row copied per position; the table is memory


def test_lookups_combine_only_with_lookups_and_take_nothing_before_them():
    t = canonical.lookup(rand(9, 4))
    for other, category in ((identity(), "geometry"), (canonical.linear(rand(4, 4)), "geometry"),
                            (canonical.lookup(rand(8, 4)), "shape")):  # fmt: skip
        with pytest.raises(Refusal) as r:
            add_maps(t, other)
        assert r.value.category == category
    with pytest.raises(Refusal):
        compose_maps(t, canonical.linear(rand(4, 4)))  # indices are not the output of a linear map
    with pytest.raises(Refusal):
        compose_maps(conv_map(4, 4, (3,)), t)
    with pytest.raises(Refusal) as r:
        canonical.lookup(rand(9, 4), max_norm=1.0)
    assert r.value.category == "unsupported-args"


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from(["linear", "scale", "shift", "lookup", "neg"]), min_size=1, max_size=5),
       st.integers(0, 2**16))  # fmt: skip
def test_random_lookup_expressions_equal_running_them(steps, seed):
    """A random sequence of maps after a lookup and sums with other lookups of the same indices."""
    g = torch.Generator().manual_seed(seed)
    rows, width = 7, 3
    idx = torch.randint(0, rows, (2, 5), generator=g)
    m = canonical.lookup(torch.randn(rows, width, generator=g, dtype=F64))
    expected = run_map(m, idx)
    for step in steps:
        if step == "linear":
            out = int(torch.randint(1, 5, (), generator=g))
            op = canonical.linear(torch.randn(out, width, generator=g, dtype=F64), torch.randn(out, generator=g))
            m, expected, width = compose_maps(op, m), run_map(op, expected), out
        elif step in ("scale", "shift"):
            d = Diagonal(torch.randn(width, generator=g, dtype=F64) if step == "scale" else torch.ones(width, dtype=F64),
                         torch.randn(width, generator=g, dtype=F64), -1)  # fmt: skip
            m, expected = compose_maps(d, m), run_map(d, expected)
        elif step == "lookup":
            other = canonical.lookup(torch.randn(rows, width, generator=g, dtype=F64))
            m, expected = add_maps(m, other), expected + run_map(other, idx)
        else:
            m, expected = negate(m), -expected
    assert isinstance(m, Lookup) and close(run_map(m, idx), expected)
