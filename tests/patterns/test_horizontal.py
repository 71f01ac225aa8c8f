"""The neutral part of horizontal fusion: which maps stack, the stacked map, the auto policy."""

from __future__ import annotations

import pytest
import torch

from branchfold.errors import InputError
from branchfold.patterns import canonical, horizontal
from branchfold.patterns.horizontal import Member, Policy
from branchfold.rewriter.affine import Conv, Dense, Refusal, value


def _dense(out: int, inp: int, bias: bool = True) -> Member:
    w = torch.randn(out, inp)
    b = torch.randn(out) if bias else None
    return Member(f"d{out}x{inp}{bias}", canonical.linear(w, b), bias)


def _conv(out: int, k: int = 3, stride: int = 1, padding: int = 1, groups: int = 1, mode: str = "zeros") -> Member:
    w = torch.randn(out, 4 // groups, k, k)
    return Member(f"c{out}", canonical.conv(w, torch.randn(out), stride, padding, 1, groups, mode))


def test_dense_concat_equals_each_output_with_partial_biases():
    members = [_dense(5, 8), _dense(3, 8, bias=False), _dense(7, 8)]
    fused = horizontal.concat(members)
    x = torch.randn(4, 8, dtype=torch.float64)
    y = x @ value(fused.map.weight).T + value(fused.map.bias)
    parts = y.split(list(fused.sizes), -1)
    assert fused.sizes == (5, 3, 7) and fused.has_bias
    for m, p in zip(members, parts):
        torch.testing.assert_close(p, x @ value(m.map.weight).T + value(m.map.bias))
    assert torch.count_nonzero(value(fused.map.bias)[5:8]) == 0


def test_conv_concat_equals_each_output():
    members = [_conv(6), _conv(2)]
    fused = horizontal.concat(members)
    assert isinstance(fused.map, Conv) and fused.sizes == (6, 2) and fused.axis == -3
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    y = torch.nn.functional.conv2d(x, value(fused.map.weight), value(fused.map.bias), padding=1)
    for m, p in zip(members, y.split([6, 2], 1)):
        torch.testing.assert_close(p, torch.nn.functional.conv2d(x, value(m.map.weight), value(m.map.bias), padding=1))


def test_groups_split_by_signature_and_keep_order():
    a, b, c, d = _dense(4, 8), _dense(4, 6), _dense(2, 8), _dense(9, 6)
    got = horizontal.groups([a, b, c, d])
    assert [[m.key for m in g] for g in got] == [[a.key, c.key], [b.key, d.key]]
    assert horizontal.groups([a, b]) == []  # no two read with the same width


@pytest.mark.parametrize(
    "other",
    [
        _conv(3, stride=2),
        _conv(3, k=1, padding=0),
        _conv(3, padding=0),
        _conv(4, groups=2),
        _conv(3, mode="reflect"),
    ],
    ids=["stride", "kernel", "padding", "groups", "padding-mode"],
)
def test_conv_geometry_differences_are_not_stacked(other):
    base = _conv(3)
    assert horizontal.groups([base, other]) == []
    with pytest.raises(Refusal):
        horizontal.concat([base, other])


def test_dense_and_conv_never_stack():
    with pytest.raises(Refusal):
        horizontal.check_pair(_dense(3, 4).map, _conv(3).map)
    with pytest.raises(Refusal):
        horizontal.concat([_dense(3, 4)])


def test_policy_is_data():
    fused = horizontal.concat([_dense(64, 64), _dense(64, 64)])
    assert horizontal.pays(fused, Policy(max_macs_per_row=64 * 128))
    assert not horizontal.pays(fused, Policy(max_macs_per_row=64 * 128 - 1))
    conv = horizontal.concat([_conv(3), _conv(3)])
    assert horizontal.pays(conv, Policy(conv=True)) and not horizontal.pays(conv, Policy(conv=False))
    assert isinstance(fused.map, Dense)


def test_mode_is_checked():
    assert horizontal.check_mode("on") == "on"
    with pytest.raises(InputError, match="auto, on, off"):
        horizontal.check_mode("yes")


def test_concat_reads_no_weight_until_the_fused_op_is_written():
    """The policy decides on shapes: a group it does not fuse (every ONNX group by default) never reads or
    concatenates its members' weights; the fused weight is computed when it is asked for."""
    from dataclasses import replace

    from branchfold.rewriter.affine import lazy

    reads = []

    def member(out: int) -> Member:
        w = torch.randn(out, 8, dtype=torch.float64)
        m = canonical.linear(w, torch.randn(out))
        return Member(f"d{out}", replace(m, weight=lazy(w.shape, lambda: reads.append(out) or w)), True)

    members = [member(4), member(6)]
    fused = horizontal.concat(members)
    assert tuple(fused.map.weight.shape) == (10, 8) and fused.map.weight.numel() == 80
    horizontal.pays(fused, Policy(max_macs_per_row=10))
    assert reads == []
    whole = value(fused.map.weight)
    assert reads == [4, 6] and whole.shape == (10, 8)
