"""In-place arithmetic, made foldable where that is provably exact, and a guard where it is not.

Reparameterizable code sums in place: ``out = scale_out + identity_out; for rc in branches: out += rc(x)``
(MobileOne, FastViT), ``x = conv_1x1(x) + conv_kxk(x); x += identity`` (RepVGG), ``y = a(x); y.add_(b(x))``.
Each dialect writes these differently: torch.export keeps ``aten.add_.Tensor`` and threads its result,
dynamo writes ``operator.iadd`` or ``call_method add_``, symbolic_trace ``call_method add_`` and later
code reads the mutated node itself.

``FunctionalizeInPlacePass`` rewrites ``r = a.op_(b)`` into ``r = op(a, b)`` and points every later
reader of ``a`` at ``r``. That is the same computation exactly when nothing else can see ``a``'s memory
change: ``a`` is not a graph input, parameter or buffer (mutating those is the caller's business), no
alias of ``a`` (a view, ``detach``, a dropout that returns its input, ...) taken before the op is read
after it, and the out-of-place result has ``a``'s dtype (in place keeps it; out of place may promote).
Everything else is left as it is and listed (category ``in-place``).

``torch.func.functionalize`` re-traces to ATen (it would turn a symbolic_trace or dynamo graph into
another dialect) and ``torch.fx.passes.reinplace`` goes the other way, so neither serves here.

``Mutations`` is the guard for the in-place ops that stay: a fold moves a region's read of its source
to the region's last op, and horizontal fusion moves its members' reads to the first member; neither
may move a read across a write of the same memory.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from branchfold import compat
from branchfold.patterns.fx_alias import alias_class, alias_parents, written
from branchfold.patterns.fx_ops import dtype_of, shape_of
from branchfold.rewriter.affine import Diagonal
from branchfold.rewriter.region import NotFolded, Region, SplitSource

aten = torch.ops.aten
CATEGORY = "in-place"

_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
              operator.itruediv: operator.truediv}  # fmt: skip
_ARITHMETIC = ("add", "sub", "mul", "div", "true_divide")


def functional_form(node: fx.Node) -> Any | None:
    """The out-of-place target computing what in-place arithmetic ``node`` writes (None: not one)."""
    t = node.target
    if node.op == "call_method":
        return t[:-1] if isinstance(t, str) and t.endswith("_") and t[:-1] in _ARITHMETIC else None
    if node.op != "call_function" or "out" in node.kwargs:
        return None
    if t in _OPERATORS:
        return _OPERATORS[t]
    if compat.is_overload(t):
        name = compat.schema(t).name.split("::")[-1]
        if not name.endswith("_") or name[:-1] not in _ARITHMETIC:
            return None
        packet = getattr(aten, name[:-1], None)
        overload = getattr(packet, compat.overload_name(t), None) if packet is not None else None
        same_arguments = overload is not None and [a.name for a in compat.schema(overload).arguments] == [
            a.name for a in compat.schema(t).arguments
        ]
        return overload if same_arguments else None
    name = getattr(t, "__name__", "")
    if t is getattr(torch.Tensor, name, None) and name.endswith("_") and name[:-1] in _ARITHMETIC:
        return getattr(torch, name[:-1])  # ``torch.add(a, b)`` takes ``torch.Tensor.add_(a, b)``'s arguments
    return None


class FunctionalizeInPlacePass(PassBase):
    """Rewrites provably private in-place arithmetic into its out-of-place form (see the module doc).

    ``refused`` lists, one per site, the in-place arithmetic left alone and why.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused: list[NotFolded] = []
        self.rewritten: list[fx.Node] = []

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.refused, self.rewritten = [], []
        order = {n: i for i, n in enumerate(graph_module.graph.nodes)}
        for node in list(graph_module.graph.nodes):
            functional = functional_form(node)
            if functional is None:
                continue
            why = self._why_not(graph_module, node, order)
            if why:
                self.refused.append(NotFolded(node, CATEGORY, why, (_label(node),)))
                continue
            a = node.args[0]
            node.target = functional
            for user in list(a.users):
                if user is not node and order[user] > order[node]:
                    user.replace_input_with(a, node)
            self.rewritten.append(node)
        if self.rewritten:
            graph_module.graph.lint()
            graph_module.recompile()
        return PassResult(graph_module, bool(self.rewritten))

    def _why_not(self, gm: fx.GraphModule, node: fx.Node, order: dict[fx.Node, int]) -> str:
        a = node.args[0] if node.args else None
        if not isinstance(a, fx.Node):
            return "the written value is not a graph value"
        members = alias_class(a, gm)
        roots = [m for m in members if not alias_parents(m, gm)]
        for r in roots:
            if r.op == "placeholder":
                return f"writes graph input {r.name!r} (or a value sharing its memory), which the caller sees"
            if r.op == "get_attr":
                return f"writes the stored tensor {r.target!r} (or a value sharing its memory)"
        if len(roots) != 1:
            return "the written value may share memory with several tensors"
        for m in members:
            if m is a or m is node or order.get(m, -1) > order[node]:
                continue
            late = [u for u in m.users if order.get(u, -1) > order[node]]
            if late:
                return (f"{m.name!r} shares memory with the written value {a.name!r} and is read after the "
                        f"in-place op (by {late[0].name!r})")  # fmt: skip
        return _dtype_problem(node, a)


def _dtype_problem(node: fx.Node, a: fx.Node) -> str:
    """Why ``op(a, b)`` might not have ``a``'s dtype ('' when it does)."""
    da = dtype_of(a)
    if da is None or shape_of(a) is None:
        return "the written value's dtype is unknown (record shapes first, e.g. ShapePropPass)"
    if not da.is_floating_point:
        return f"the written value is {da}: only floating-point arithmetic is rewritten"
    args = list(node.args[1:2]) + [v for k, v in node.kwargs.items() if k == "other"]
    if not args:
        return ""
    b = args[0]
    like_a = torch.empty((1,) * len(shape_of(a)), dtype=da, device="meta")
    if isinstance(b, fx.Node):
        db, sb = dtype_of(b), shape_of(b)
        if db is None or sb is None:
            return "the other operand's dtype is unknown"
        b = torch.empty((1,) * len(sb), dtype=db, device="meta")
    elif not isinstance(b, (int, float, bool)):
        return "the other operand is neither a tensor nor a number"
    if torch.result_type(like_a, b) != da:
        return f"the out-of-place result would be promoted from {da}"
    return ""


def _label(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


class Mutations:
    """The writes left in a graph, and the reads a rewrite must not move across them."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.writes: list[tuple[fx.Node, set[fx.Node]]] = []
        for node in gm.graph.nodes:
            targets = written(node, gm)
            if targets:
                clobbered: set[fx.Node] = set()
                for t in targets:
                    clobbered |= alias_class(t, gm)
                self.writes.append((node, clobbered))

    def __bool__(self) -> bool:
        return bool(self.writes)

    def between(self, values: Iterable[Hashable], lo: int, hi: int) -> fx.Node | None:
        """A write, strictly between positions ``lo`` and ``hi``, to the memory of one of ``values``."""
        values = set(values)
        for node, clobbered in self.writes:
            if lo < self.order[node] < hi and values & clobbered:
                return node
        return None

    def written_after(self, value: fx.Node, pos: int) -> fx.Node | None:
        for node, clobbered in self.writes:
            if self.order[node] > pos and value in clobbered:
                return node
        return None

    def epoch(self, value: fx.Node, pos: int) -> int:
        """How many writes to ``value``'s memory come before position ``pos`` (equal epochs: same content)."""
        return sum(1 for node, clobbered in self.writes if self.order[node] < pos and value in clobbered)

    def region_conflict(self, region: Region) -> str:
        """Why emitting ``region`` would move a read across a write ('' when it would not)."""
        if not self.writes:
            return ""
        keys = [k for k in region.ops if isinstance(k, fx.Node)]
        source = region.source.op if isinstance(region.source, SplitSource) else region.source
        if isinstance(region.source, SplitSource) and isinstance(source, fx.Node) and source.args:
            source = source.args[0]
        values = set(keys) | {region.value}
        values |= {u for k in keys for u in k.users if u.target is operator.getitem}
        if isinstance(source, fx.Node):
            values.add(source)
        lo = min((self.order[k] for k in keys), default=self.order[region.value])
        hi = self.order[region.value]
        hit = self.between(values, lo, hi + 1)
        if hit is not None:
            return f"the fold would move a read across {hit.name!r} ({_label(hit)}), which writes it"
        if isinstance(region.map, Diagonal) and region.map.is_identity:
            hit = self.written_after(region.value, hi)
            if hit is not None:
                return f"the region is the identity and {hit.name!r} writes it: it would write the source"
        return ""
