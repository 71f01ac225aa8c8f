"""The frontend-neutral region walk (docs/design.md §4, "finding regions by abstract interpretation").

Adapters describe their graph as a topologically ordered list of ``Op``s over hashable value ids.
The walk gives every value an expression "affine map M of source s" and returns the values where a
region ends (used by something that cannot absorb it, or a graph output) together with the fused
map. One walk covers parallel sums, chains, identity shortcuts and nesting.

Two decisions cannot be made locally, so the walk runs to a fixpoint over two sets of values. A region
whose fused map is costlier than the ops it replaces is cut into *boundaries* (values no consumer may
absorb; each piece still folds on its own): where it ends in a chain of affine ops, at the cuts that make
the pieces cheapest in total (a dynamic programme over the chain, so that in ``project conv → BN → expand
conv → BN`` both conv→BN pairs fold where the whole chain would cost a wide conv), otherwise at the
operands of its last op. A value read by several ops that was absorbed although its readers did not all
end in one region (a diamond that does not close) becomes a boundary too. A split source (LayerNorm's normalisation under its affine) that would be needed
both folded and unfolded makes its op *opaque*. Each round adds at least one value to a set (every cut
value was absorbed in the round that cut it), and in practice two or three rounds suffice.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from branchfold.rewriter.affine import (
    AffineMap,
    Diagonal,
    Refusal,
    add_maps,
    compose_maps,
    identity,
    negate,
    out_channels,
    reads_indices,
)

OpKind = Literal["affine", "add", "sub", "opaque", "meta"]


@dataclass(frozen=True)
class SplitSource:
    """The value an op produces *before* its trailing affine part (LayerNorm without γ, β)."""

    op: Hashable


Source = Hashable  # a value id, or a SplitSource


@dataclass
class Op:
    """One node of the adapter's graph, as the walk needs to see it.

    ``affine``: ``output = map(inputs[0])``; with ``split`` the map sits on top of the op's own
    opaque computation of ``inputs[0]`` (so the region's source is ``SplitSource(key)``).
    ``add`` / ``sub``: ``output = inputs[0] ± inputs[1]``. ``opaque``: anything else.
    ``meta``: reads only the shape of ``inputs[0]`` (``x.shape``, ``x.size()``); it does not keep an
    absorbed value alive when a same-shaped value can answer instead (see ``WalkResult.meta_sources``).
    ``refusal`` says why an op that looked foldable is opaque (for the report).
    """

    key: Hashable
    kind: OpKind
    inputs: tuple[Hashable, ...]
    output: Hashable | None
    map: AffineMap | None = None
    split: bool = False
    label: str = ""
    refusal: Refusal | None = None
    shared: bool | None = None  # its weights are also read by other ops (None: it has no weights)


@dataclass(frozen=True)
class Expr:
    source: Source
    map: AffineMap
    ops: tuple[Hashable, ...]  # keys of the original ops folded into this expression
    cost: int  # multiply-adds per output position of those ops, as they stand
    shared: bool | str | None = None  # see ``_sharing``
    mixes: frozenset = frozenset()  # where shared and private weights first met: the cuts if that is refused


MIXED = "mixed"  # ``Expr.shared``: weights read from several places folded with weights of this place alone


def _sharing(a: bool | str | None, b: bool | str | None) -> bool | str | None:
    """Whether the weights of two folded parts are shared with other call sites: all (True), none (False),
    both kinds (``MIXED``), or None where neither has weights.

    Folding a shared weight with a private one un-shares it: the fold writes a weight for this place
    alone. ``finish`` allows that only where the written weight fits in the private weights it replaces
    (a LoRA branch whose zero ``B`` an exporter stored once for every layer, summed into each layer's own
    base), and refuses it where it would store more (GroupedMLP: one MLP called from several blocks, each
    with its own LayerNorm, would become one MLP copy per block)."""
    if a is None or b is None or a == b:
        return b if a is None else a
    return MIXED


def _mixes(a: Expr, b_shared: bool | str | None, here: Iterable[Hashable], b_mixes: frozenset = frozenset()):
    """The mix points of an expression folding ``a`` with a part whose sharing is ``b_shared``: the
    operands ``here`` where a shared and a private part first meet, plus those each part already had."""
    first = a.shared in (True, False) and b_shared in (True, False) and a.shared != b_shared
    return a.mixes | b_mixes | (frozenset(here) if first else frozenset())


@dataclass
class Region:
    """A value to be recomputed as ``map(source)`` by one new op."""

    value: Hashable
    source: Source
    map: AffineMap
    ops: tuple[Hashable, ...]
    labels: tuple[str, ...]
    cost_before: int
    cost_after: int
    # the original ops themselves, in graph order (their maps and wiring draw the region in the report)
    parts: tuple[Op, ...] = field(default=(), repr=False, compare=False)
    # The adapter numbers a graph's regions in walk order: the walk is deterministic, so a fresh copy of
    # the same graph gives each region the same id, and undo can name regions across fold attempts.
    id: int = -1

    @property
    def kind(self) -> str:
        return "parallel-sum" if any(lbl in ("add", "sub") for lbl in self.labels) else "chain"


@dataclass
class NotFolded:
    where: Hashable
    category: str
    detail: str
    labels: tuple[str, ...] = ()


@dataclass
class WalkResult:
    regions: list[Region]
    not_folded: list[NotFolded]
    rounds: int = 1
    ops_by_key: dict[Hashable, Op] = field(default_factory=dict)
    # meta op key -> a value of the same shape to read instead of its input, which no longer exists
    meta_sources: dict[Hashable, Hashable] = field(default_factory=dict)


def find_regions(ops: Sequence[Op], outputs: Iterable[Hashable], max_rounds: int = 50) -> WalkResult:
    """Run the walk to its fixpoint and return the regions to emit."""
    outputs = set(outputs)
    users: dict[Hashable, list[Hashable]] = {}  # value -> keys of the ops that read it
    for op in ops:
        for v in set(op.inputs):
            users.setdefault(v, []).append(op.key)
    by_key = {op.key: op for op in ops}
    boundaries: set[Hashable] = set()
    opaque: set[Hashable] = set()
    refusals: list[NotFolded] = []  # regions refused as a whole (cost, shared-weight): kept across rounds
    for rounds in range(1, max_rounds + 1):
        walk = _Walk(ops, by_key, outputs, users, boundaries, opaque)
        walk.run()
        regions, new_boundaries, new_opaque, refused = walk.finish()
        refusals += refused
        if new_boundaries <= boundaries and new_opaque <= opaque:
            not_folded = walk.not_folded + refusals + _refusals(ops)
            return WalkResult(regions, not_folded, rounds, by_key, walk.meta_sources())
        boundaries |= new_boundaries
        opaque |= new_opaque
    raise RuntimeError("region walk did not converge")  # each round adds a value to a set: unreachable


def _refusals(ops: Sequence[Op]) -> list[NotFolded]:
    return [
        NotFolded(op.key, op.refusal.category, op.refusal.detail, (op.label,)) for op in ops if op.refusal
    ]


class _Walk:
    def __init__(self, ops, by_key, outputs, users, boundaries, opaque) -> None:
        self.ops = ops
        self.by_key = by_key
        self.outputs = outputs
        self.users = users
        self.boundaries = boundaries  # values no consumer may absorb
        self.opaque = opaque  # values whose op is not interpreted at all
        self.exprs: dict[Hashable, Expr] = {}
        self.defined_by: dict[Hashable, Op] = {}
        self.absorbed: dict[Hashable, list[Hashable]] = {}  # op key -> input values it absorbed
        self.materialized: set[Hashable] = set()
        self.absorbed_somewhere: set[Hashable] = set()
        self.not_folded: list[NotFolded] = []
        self.meta: dict[Hashable, tuple[Hashable, Hashable]] = {}  # meta op key -> (input, same-shaped value)
        self.own: dict[Hashable, int] = {}  # op key -> its own multiply-adds per position

    # -- the walk -------------------------------------------------------------------------------

    def _absorbable(self, v: Hashable) -> bool:
        """A value with several readers is absorbed tentatively: ``finish`` keeps that only where every
        reader lies in the same region (a diamond, such as DoRA's base output read by the sum and by the
        rescaling of its own bias), and otherwise makes it a boundary for the next round."""
        e = self.exprs.get(v)
        return e is not None and v not in self.boundaries and v not in self.outputs

    def _operand(self, v: Hashable) -> Expr | None:
        """The expression of input ``v`` if its consumer may absorb it, else None (``v`` is a source)."""
        if self._absorbable(v):
            return self.exprs[v]
        return None

    def _as_source(self, v: Hashable) -> None:
        self.materialized.add(v)

    def run(self) -> None:
        for op in self.ops:
            if op.output is not None:
                self.defined_by[op.output] = op
            if op.kind == "affine" and op.output not in self.opaque:
                self._affine(op)
            elif op.kind in ("add", "sub") and op.output not in self.opaque:
                self._sum(op)
            elif op.kind == "meta":
                self._meta(op)
            else:
                for v in op.inputs:
                    self._as_source(v)

    def _affine(self, op: Op) -> None:
        (x,) = op.inputs
        own_cost = self.own[op.key] = op.map.macs()
        if op.split:
            self._as_source(x)
            self.exprs[op.output] = Expr(SplitSource(op.key), op.map, (op.key,), own_cost, op.shared)
            return
        inner = None if reads_indices(op.map) else self._operand(x)  # a lookup's indices are its source
        if inner is not None:
            try:
                shared = _sharing(inner.shared, op.shared)
                fused = compose_maps(op.map, inner.map)
            except Refusal as r:
                self.not_folded.append(NotFolded(op.key, r.category, r.detail, (op.label,)))
            else:
                self.absorbed[op.key] = [x]
                self.absorbed_somewhere.add(x)
                ops = inner.ops + (op.key,)
                mixes = _mixes(inner, op.shared, (x,))
                self.exprs[op.output] = Expr(inner.source, fused, ops, inner.cost + own_cost, shared, mixes)
                return
        self._as_source(x)
        self.exprs[op.output] = Expr(x, op.map, (op.key,), own_cost, op.shared)

    def _sum(self, op: Op) -> None:
        a, b = op.inputs
        ea, eb = self._operand(a), self._operand(b)
        if ea is None and eb is None and a == b:  # ``x + x`` (export drops nn.Identity branches)
            ea = eb = Expr(a, identity(), (), 0)
        # ``x + f(x)``: the bare operand is the identity map of the other's source.
        ea = ea or (Expr(a, identity(), (), 0) if eb is not None and eb.source == a else None)
        eb = eb or (Expr(b, identity(), (), 0) if ea is not None and ea.source == b else None)
        if ea is not None and eb is not None and ea.source == eb.source:
            try:
                shared = _sharing(ea.shared, eb.shared)
                mb = negate(eb.map) if op.kind == "sub" else eb.map
                fused = add_maps(ea.map, mb)
            except Refusal as r:
                self.not_folded.append(NotFolded(op.key, r.category, r.detail, (op.label,)))
            else:
                taken = [v for v, e in ((a, ea), (b, eb)) if e.ops]
                for v in (a, b):
                    if v not in taken:
                        self._as_source(v)
                self.absorbed[op.key] = taken
                self.absorbed_somewhere.update(taken)
                ops = tuple(dict.fromkeys(ea.ops + eb.ops)) + (op.key,)
                add_cost = self.own[op.key] = out_channels(fused) or 1  # one add per element
                twice = sum(self.own[k] for k in set(ea.ops) & set(eb.ops))  # a diamond's common part
                mixes = _mixes(ea, eb.shared, (a, b), eb.mixes)
                cost = ea.cost + eb.cost - twice + add_cost
                self.exprs[op.output] = Expr(ea.source, fused, ops, cost, shared, mixes)
                return
        for v in op.inputs:
            self._as_source(v)

    def _meta(self, op: Op) -> None:
        """A shape query of a value that is ``Diagonal(source)``: the source (or, under a split, the
        split op's own input) has the same shape and stays alive, so the query need not pin the value."""
        (x,) = op.inputs
        e = self.exprs.get(x)
        if e is None or x in self.outputs or not isinstance(e.map, Diagonal):
            self._as_source(x)
            return
        same = self.by_key[e.source.op].inputs[0] if isinstance(e.source, SplitSource) else e.source
        self.meta[op.key] = (x, same)

    def meta_sources(self) -> dict[Hashable, Hashable]:
        """The shape queries whose input is absorbed and would otherwise have to stay computed."""
        return {k: same for k, (x, same) in self.meta.items() if x not in self.materialized}

    # -- regions ----------------------------------------------------------------------------------

    def finish(self) -> tuple[list[Region], set[Hashable], set[Hashable], list[NotFolded]]:
        regions: list[Region] = []
        boundaries: set[Hashable] = set()
        opaque: set[Hashable] = set()
        refusals: list[NotFolded] = []
        ends = [v for v in self.exprs if v in self.materialized or v in self.outputs]
        unshared = self._split_diamonds(ends)
        boundaries |= unshared
        for v in ends:
            e = self.exprs[v]
            if unshared and any(self.defined_by[u].key in e.ops for u in unshared):
                continue  # it read a value that must stay computed: judged again in the next round
            if isinstance(e.source, SplitSource) and v in self.absorbed_somewhere:
                opaque.add(v)  # needed both with and without its affine part: keep the op whole
                continue
            if len(e.ops) < 2:
                continue
            after = e.map.macs()
            unshares = self._unshares(e)
            if unshares:
                boundaries.update(e.mixes)  # where the shared and the private parts met: fold them apart
                labels = tuple(self._label(k) for k in e.ops)
                refusals.append(NotFolded(v, "shared-weight", unshares, labels))
                continue
            stores = self._stores_more(e.map, e.ops)
            if after > e.cost or stores:
                last = self.defined_by[v]
                cuts = self._cheapest_cuts(v)
                boundaries.update(cuts or self.absorbed.get(last.key, ()))
                if not cuts and not self.absorbed.get(last.key):
                    opaque.add(v)
                labels = tuple(self._label(k) for k in e.ops)
                detail = stores or f"fused map costs {after} MACs per position vs {e.cost}"
                refusals.append(NotFolded(v, "cost", detail, labels))
                continue
            labels = tuple(self._label(k) for k in e.ops)
            parts = tuple(self.by_key[k] for k in e.ops)
            regions.append(Region(v, e.source, e.map, e.ops, labels, e.cost, after, parts))
        return regions, boundaries, opaque, refusals

    def _split_diamonds(self, ends: list[Hashable]) -> set[Hashable]:
        """The values read by several ops that were absorbed but do not have all their readers inside one
        region (or are also needed as they are): absorbing them would compute them more than once.
        A per-channel map folds into each reader, as before: it costs next to nothing to repeat."""
        bad: set[Hashable] = set()
        for v in self.absorbed_somewhere:
            readers = self.users.get(v, ())
            if len(readers) < 2 or isinstance(self.exprs[v].map, Diagonal):
                continue
            if v in self.materialized or not any(set(readers) <= set(self.exprs[e].ops) for e in ends):
                bad.add(v)
        return bad

    def _unshares(self, e: Expr) -> str:
        """Why a region that folds shared weights with private ones is refused, or "": the weight it
        writes for this place holds more parameters than the private weights it replaces."""
        if e.shared != MIXED:
            return ""
        private = self._params(e.ops, private=True)
        if e.map.params() <= private:
            return ""
        return (f"weight is shared with other call sites; folding would un-share it "
                f"({e.map.params()} parameters for this place vs {private} of its own)")  # fmt: skip

    def _stores_more(self, m: AffineMap, keys: Iterable[Hashable]) -> str:
        """Why a fused lookup is refused although it is cheap per position, or "": its table holds more
        parameters than the ops it replaces. A lookup copies one row per position whatever the table's
        length, so its multiply-adds say nothing of its memory: a lone low-rank branch (``embedding(idx, A)
        @ B``) written as one ``[rows, width]`` table would store ``rows * width`` values for
        ``rank * (rows + width)``. Summed into the base table beside it, the branch costs nothing."""
        if not reads_indices(m):
            return ""
        before = self._params(keys)
        after = m.params()
        return f"fused table stores {after} parameters vs {before}" if after > before else ""

    def _params(self, keys: Iterable[Hashable], private: bool = False) -> int:
        """The parameters of the ops ``keys`` (only of those whose weights no other call site reads, with
        ``private``): what a fused map's weight would replace."""
        ops = (self.by_key[k] for k in keys)
        return sum(op.map.params() for op in ops if op.map is not None and (not private or op.shared is False))

    def _label(self, key: Hashable) -> str:
        return self.by_key[key].label

    def _chain_to(self, v: Hashable) -> list[Hashable]:
        """The values of the chain of single-input affine ops that ends at ``v``, first to last: each was
        absorbed by the next. The first one's expression may be anything (a sum, a split source)."""
        chain = [v]
        while True:
            op = self.defined_by[chain[-1]]
            taken = self.absorbed.get(op.key, [])
            if op.kind != "affine" or op.split or len(taken) != 1:
                break
            chain.append(taken[0])
        return chain[::-1]

    def _cheapest_cuts(self, v: Hashable) -> set[Hashable]:
        """The values to cut the chain ending at the refused ``v`` at, so that its pieces cost least.

        ``best[j]``: the cheapest cost of the chain's first ``j + 1`` values cut into pieces, each piece
        either one op or a fold that is not costlier than its ops. O(n²) compositions for a chain of n ops
        (chains are short). Empty when ``v`` does not end a chain of two or more ops."""
        chain = self._chain_to(v)
        if len(chain) < 2:
            return set()
        first = self.exprs[chain[0]]
        inf = float("inf")
        best: list[float] = [min(first.cost, first.map.macs()) if len(first.ops) > 1 else first.cost]
        start: list[int] = [0]
        for j in range(1, len(chain)):
            best.append(inf)
            start.append(j)
            for i in range(j + 1):
                piece = self._piece_cost(chain, i, j)
                before = best[i - 1] if i > 0 else 0
                if before + piece < best[j]:
                    best[j], start[j] = before + piece, i
        cuts, j = set(), len(chain) - 1
        while j >= 0:
            i = start[j]
            if i > 0:
                cuts.add(chain[i - 1])
            j = i - 1
        return cuts

    def _piece_cost(self, chain: list[Hashable], i: int, j: int) -> float:
        """Cost of values ``chain[i..j]`` computed as one op (inf where that fold is refused or costlier)."""
        ops = [self.defined_by[c] for c in chain[i : j + 1]]
        if i == 0:
            e = self.exprs[chain[0]]
            m, raw, shared, keys, ops = e.map, e.cost, e.shared, list(e.ops), ops[1:]
            if not ops:
                return float("inf")  # the first value alone is priced in ``best[0]``
        else:
            m, raw, shared, keys, ops = ops[0].map, ops[0].map.macs(), ops[0].shared, [ops[0].key], ops[1:]
            if not ops:
                return raw
        try:
            for op in ops:
                shared = _sharing(shared, op.shared)
                if shared == MIXED:
                    return float("inf")  # a cut never mixes the two kinds (``finish`` judges whole regions)
                m = compose_maps(op.map, m)
                raw += op.map.macs()
                keys.append(op.key)
        except Refusal:
            return float("inf")
        fused = m.macs()
        return fused if fused <= raw and not self._stores_more(m, keys) else float("inf")
