"""Horizontal fusion, frontend-neutral: parallel linears/convs reading one value → one wide op + a split.

Unlike the parallel-sum fold this is not an algebraic simplification (the MACs stay the same); it only
trades N small GEMMs/convs for one wide one. So it is decided in two steps: *can* the maps be stacked
along their output channels (``groups``), and *does it pay* (``pays``), a rule read off the measurements
of ``benchmarks/bench_horizontal.py`` and kept here as data so that it can be re-measured and changed.

Ops whose outputs only meet each other in sums (``a(x) + b(x)``, ``y = a(x); y.add_(b(x))``) are not a
group at all: they are a parallel sum, which the branch fold turns into one op (``without_parallel_sums``).

The adapters (``passes/fx_horizontal.py``, ``passes/onnx_horizontal.py``) recognize ops into
``Dense`` / ``Conv`` maps with the shared recognizers, call ``groups`` and ``concat``, and write the
fused op plus a split back in their own graph kind.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from branchfold.rewriter.affine import AffineMap, Conv, Dense, Refusal, lazy, value

HorizontalMode = Literal["auto", "on", "off"]
MODES: tuple[str, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class Member:
    """One candidate op: its key in the adapter's graph, its map, and whether it has a real bias."""

    key: Hashable
    map: Dense | Conv
    has_bias: bool = True


@dataclass(frozen=True)
class Fused:
    """The stacked map, the output widths in member order (for the split) and whether a bias is needed."""

    map: Dense | Conv
    sizes: tuple[int, ...]
    has_bias: bool

    @property
    def axis(self) -> int:
        return self.map.axis


def signature(m: AffineMap) -> tuple | None:
    """What must be equal for two maps to be stacked along their outputs (None: never stacked).

    Dense: the input width. Conv: everything but the output channels; grouped convs are left alone
    (stacking them would need a block layout that no longer reads as one conv).
    """
    if isinstance(m, Dense):
        return ("dense", m.in_features)
    if isinstance(m, Conv):
        if m.groups != 1:
            return None
        return ("conv", m.in_channels, m.kernel, m.stride, m.padding, m.dilation, m.padding_mode)
    return None


def check_pair(a: AffineMap, b: AffineMap) -> None:
    """Raise the Refusal that explains why ``a`` and ``b`` cannot share one op (for reports and tests)."""
    if type(a) is not type(b) or not isinstance(a, (Dense, Conv)):
        raise Refusal("geometry", f"{type(a).__name__} beside {type(b).__name__}")
    if isinstance(a, Conv) and (a.groups != 1 or b.groups != 1):  # type: ignore[union-attr]
        raise Refusal("geometry", "grouped convolution")
    if signature(a) != signature(b):
        raise Refusal("geometry", f"different geometry {signature(a)} vs {signature(b)}")


def groups(members: Sequence[Member]) -> list[list[Member]]:
    """Partition ``members`` (ops reading the same value) into stackable groups of two or more.

    Order is preserved inside each group so that the split's outputs follow the graph's order.
    """
    by_sig: dict[tuple, list[Member]] = {}
    for m in members:
        sig = signature(m.map)
        if sig is not None:
            by_sig.setdefault(sig, []).append(m)
    return [g for g in by_sig.values() if len(g) >= 2]


def without_parallel_sums(
    members: Sequence[Member],
    output: Callable[[Member], Hashable],
    users: Callable[[Hashable], Iterable[Hashable]],
    summed: Callable[[Hashable], tuple[tuple[Hashable, ...], Hashable] | None],
) -> list[Member]:
    """The members less those whose outputs meet only in sums with each other (``a(x) + b(x)``).

    Such ops are a parallel sum, which the branch fold turns into one op with the summed weights; a
    wide op + split + add would keep the add and the full output width. ``output(member)`` is the value a
    member computes, ``users(value)`` its consumers (a graph output counts as one that is not a sum),
    ``summed(consumer)`` the operands and result of an add/sub consumer (None for any other).
    """
    sums = {output(m) for m in members}  # values that are sums of members' outputs
    pending = list(sums)
    while pending:
        for consumer in users(pending.pop()):
            got = summed(consumer)
            if got is not None and got[1] not in sums and all(v in sums for v in got[0]):
                sums.add(got[1])
                pending.append(got[1])

    def only_summed(m: Member) -> bool:
        consumers = list(users(output(m)))
        return bool(consumers) and all((got := summed(c)) is not None and got[1] in sums for c in consumers)

    return [m for m in members if not only_summed(m)]


def concat(members: Sequence[Member]) -> Fused:
    """One map whose output channels are the members' outputs, one after the other.

    Weights are concatenated once, at fold time, when the fused op is written (the weight is lazy: a group
    the policy does not fuse, which on ONNX is every group by default, never reads its members' weights);
    members without a bias contribute zeros.
    """
    if len(members) < 2:
        raise Refusal("shape", "horizontal fusion needs at least two ops")
    first = members[0].map
    for m in members[1:]:
        check_pair(first, m.map)
    weights = [m.map.weight for m in members]
    sizes = tuple(int(w.shape[0]) for w in weights)
    weight = lazy((sum(sizes), *first.weight.shape[1:]), lambda: torch.cat([value(w) for w in weights], dim=0))
    bias = torch.cat([value(m.map.bias) for m in members], dim=0)
    has_bias = any(m.has_bias for m in members)
    if isinstance(first, Dense):
        return Fused(Dense(weight, bias), sizes, has_bias)
    fused = Conv(weight, bias, first.stride, first.padding, first.dilation, 1, first.padding_mode)
    return Fused(fused, sizes, has_bias)


# ----------------------------------------------------------------------------------------------
# does it pay: measured on CPU by benchmarks/bench_horizontal.py (see POLICY_NOTES)


@dataclass(frozen=True)
class Policy:
    """When ``mode="auto"`` fuses. Measured numbers, not theory; see ``POLICY_NOTES``.

    ``max_macs_per_row``: fuse Dense groups whose fused GEMM has at most this many multiply-adds per row
    (in_features × total out). Above it the single GEMM is already compute-bound on CPU and the split
    views cost the consumers a copy more often than the launch savings repay.
    ``conv``: whether convs are fused in auto mode.
    """

    max_macs_per_row: int = 512 * 1024
    conv: bool = True
    min_members: int = 2


DEFAULT_POLICY = Policy()  # eager torch (the FX pass)
ONNX_POLICY = Policy(max_macs_per_row=0, conv=False)  # onnxruntime CPU: auto leaves graphs alone

POLICY_NOTES = """\
CPU, 1 thread, fused/separate median time (benchmarks/bench_horizontal.py, 7 interleaved rounds):
eager torch  - Dense in x sum(out) <= 110k MACs/row (64->2x64, 192->3x192): 0.59-0.96 for 1..2048 rows
               (one outlier 1.11 at 64->2x64, 2048 rows, spread 1.3); 768->3x768 (1.8M): 0.95-1.08,
               768->3072+768 (2.9M): 0.91-1.21 -> no gain at that size, so auto stops at 512k.
               conv3x3 16->2x16: 0.69, 64->3x64: 0.88. seed ViT (folded): 0.97, HF ViT-Tiny-like: 0.99.
onnxruntime  - synthetic Dense 1.0-1.45 (its Split copies the outputs), convs 0.98-1.06, HF ViT 0.95:
               gains within noise, losses on synthetic cases -> auto does not fuse; mode="on" forces it.
"""


def pays(fused: Fused, policy: Policy = DEFAULT_POLICY) -> bool:
    """Whether ``mode="auto"`` should fuse this group (``mode="on"`` always does, ``"off"`` never)."""
    if len(fused.sizes) < policy.min_members:
        return False
    if isinstance(fused.map, Conv):
        return policy.conv
    return fused.map.weight.numel() <= policy.max_macs_per_row


def check_mode(mode: str) -> HorizontalMode:
    """Validate a user's ``mode`` string with one readable message."""
    from branchfold.errors import InputError

    if mode not in MODES:
        raise InputError(f"horizontal fusion mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass
class FusedGroup:
    """One group of ops that read the same value: fused, or left alone by the ``auto`` policy."""

    source: str
    ops: list[str]
    sizes: tuple[int, ...]
    kind: str  # "dense" or "conv"
    fused: bool
    reason: str = ""


@dataclass
class HorizontalResult:
    groups: list[FusedGroup] = field(default_factory=list)

    @property
    def fused(self) -> list[FusedGroup]:
        return [g for g in self.groups if g.fused]
