"""FX horizontal fusion: linears/convs with constant weights reading one value → one wide op + a split.

Ops are recognized with the same recognizers as the folding pass (``patterns.fx_ops.recognize``), so
every dialect (symbolic_trace modules, dynamo functionals with weight placeholders, export ATen) is
read the same way, and written back in its own dialect by the folding adapter's emitter.

The split's outputs are views of the wide result. A view on the last axis is not contiguous, and
code that calls ``.view`` on it would crash (a serving stack shipped exactly that bug). So each
consumer is checked: a ``view`` becomes the equivalent ``reshape`` (a view whenever one exists, a copy
only otherwise), and a consumer whose use of memory we cannot see (a graph output, a user module or
function, ``as_strided``) reads a ``.contiguous()`` copy.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Mapping

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from branchfold import compat
from branchfold.adapters.fx import Emitter, uses_aten
from branchfold.passes.fx_inplace import FunctionalizeInPlacePass, Mutations
from branchfold.patterns import horizontal
from branchfold.patterns.fx_ops import FxContext, recognize
from branchfold.patterns.horizontal import (
    DEFAULT_POLICY,
    Fused,
    FusedGroup,
    HorizontalMode,
    HorizontalResult,
    Member,
    Policy,
)
from branchfold.rewriter.affine import Conv, Dense, bias_if_any

aten = torch.ops.aten

_VIEW_FUNCS = {aten.view.default, aten._unsafe_view.default, torch.Tensor.view}
_CONTIGUOUS_FUNCS = {aten.as_strided.default, aten.view.dtype, torch.as_strided, torch.Tensor.as_strided}
_CONTIGUOUS_METHODS = {"as_strided", "data_ptr", "numpy", "storage", "untyped_storage", "set_", "resize_"}


class HorizontalFusionPass(PassBase):
    """Fuses N ≥ 2 linears (or convs of identical geometry) reading one value into one op and a split.

    ``mode``: ``"auto"`` fuses where ``patterns.horizontal.pays`` says it is faster (measured),
    ``"on"`` fuses every stackable group, ``"off"`` does nothing. ``constants`` names placeholders
    holding fixed tensors (dynamo passes weights as inputs). The last result is on ``self.result``.
    """

    def __init__(
        self,
        mode: HorizontalMode = "auto",
        constants: Mapping[str, torch.Tensor] | None = None,
        policy: Policy = DEFAULT_POLICY,
    ) -> None:
        super().__init__()
        self.mode = horizontal.check_mode(mode)
        self.constants = dict(constants or {})
        self.policy = policy
        self.result = HorizontalResult()

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.result = HorizontalResult()
        if self.mode == "off":
            return PassResult(graph_module, False)
        # ``y = a(x); y.add_(b(x))`` is a sum, and must be seen as one
        rewritten = FunctionalizeInPlacePass().call(graph_module).modified
        ctx = FxContext(graph_module, self.constants)
        writer = _Writer(graph_module, ctx)
        for (source, *_), members in _candidates(ctx, Mutations(graph_module)).items():
            members = horizontal.without_parallel_sums(members, _output, _users, lambda n: _summed(ctx, n))
            for group in horizontal.groups(members):
                fused = horizontal.concat(group)
                kind = "dense" if isinstance(fused.map, Dense) else "conv"
                names = [m.key.name for m in group]
                go = self.mode == "on" or horizontal.pays(fused, self.policy)
                reason = "" if go else "auto policy: measured not to pay for this size"
                self.result.groups.append(FusedGroup(source.name, names, fused.sizes, kind, go, reason))
                if go:
                    writer.write(source, group, fused)
        modified = bool(self.result.fused)
        if modified:
            writer.finish()
            graph_module.recompile()
        return PassResult(graph_module, modified or rewritten)


def _weight_info(ctx: FxContext, node: fx.Node) -> tuple[torch.dtype, torch.device] | None:
    if node.op == "call_module":
        w = getattr(ctx.module(node), "weight", None)
        return (w.dtype, w.device) if isinstance(w, torch.Tensor) else None
    for a in node.all_input_nodes:
        t = ctx.const(a)
        if t is not None and t.is_floating_point():
            return t.dtype, t.device
    return None


def _output(m: Member) -> fx.Node:
    return m.key


def _users(v: fx.Node) -> list[fx.Node]:
    return list(v.users)


def _summed(ctx: FxContext, node: fx.Node) -> tuple[tuple[fx.Node, ...], fx.Node] | None:
    op = recognize(ctx, node) if node.op in ("call_function", "call_method") else None
    return (op.inputs, node) if op is not None and op.kind in ("add", "sub") else None


def _candidates(ctx: FxContext, mutations: Mutations) -> dict[tuple, list[Member]]:
    """Linears/convs with constant weights, by the (value, weight dtype, device) they read, in graph order.

    Where an in-place op writes the value between two readers, they read different contents: the key
    also holds how many writes precede the reader. A member whose own output is written in place stays
    alone (the write would land in a split view).
    """
    found: dict[tuple, list[Member]] = {}
    for node in ctx.gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        op = recognize(ctx, node)
        if op.kind != "affine" or op.split or not isinstance(op.map, (Dense, Conv)):
            continue
        (x,) = op.inputs
        info = _weight_info(ctx, node)
        if not isinstance(x, fx.Node) or ctx.const(x) is not None or info is None:
            continue
        pos = mutations.order[node]
        if mutations.written_after(node, pos) is not None:
            continue
        has_bias = bias_if_any(op.map) is not None
        found.setdefault((x, *info, mutations.epoch(x, pos)), []).append(Member(node, op.map, has_bias))
    return found


class _Writer:
    """Writes fused groups with the folding adapter's emitter (fresh names, content de-duplication)."""

    def __init__(self, gm: fx.GraphModule, ctx: FxContext) -> None:
        self.gm, self.ctx = gm, ctx
        self.graph = gm.graph
        self.aten = uses_aten(gm.graph)
        self.emitter = Emitter(gm, ctx)
        self.dead: list[fx.Node] = []

    def write(self, source: fx.Node, group: list[Member], fused: Fused) -> None:
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        nodes: list[fx.Node] = [m.key for m in group]
        first = min(nodes, key=order.__getitem__)
        dtype, device = _weight_info(self.ctx, first)  # type: ignore[misc]
        dim = fused.axis
        with self.graph.inserting_before(first):
            wide = self.emitter.write(fused.map, source, dtype, device, first)
            if self.aten:
                parts = self.graph.call_function(aten.split_with_sizes.default, (wide, list(fused.sizes), dim))
            else:
                parts = self.graph.call_function(torch.split, (wide, list(fused.sizes), dim))
            chunks = [self.graph.call_function(operator.getitem, (parts, i)) for i in range(len(nodes))]
        _copy_meta(nodes, chunks, wide, dim)
        for old, chunk in zip(nodes, chunks):
            self._reroute(old, chunk)
            self.dead.append(old)

    def _reroute(self, old: fx.Node, chunk: fx.Node) -> None:
        copy: fx.Node | None = None
        for user in list(old.users):
            if _is_view(user):
                self._as_reshape(user)
                user.replace_input_with(old, chunk)
            elif _needs_contiguous(self.gm, user):
                if copy is None:
                    with self.graph.inserting_after(chunk):
                        copy = self._contiguous(chunk)
                user.replace_input_with(old, copy)
            else:
                user.replace_input_with(old, chunk)

    def _contiguous(self, chunk: fx.Node) -> fx.Node:
        if self.aten:
            node = self.graph.call_function(
                aten.clone.default, (chunk,), {"memory_format": torch.contiguous_format}
            )
        else:
            node = self.graph.call_method("contiguous", (chunk,))
        node.meta.update({k: v for k, v in chunk.meta.items() if k in ("val", "tensor_meta")})
        return node

    def _as_reshape(self, user: fx.Node) -> None:
        """``view`` needs strides a split chunk may not have; ``reshape`` is the same where a view exists."""
        if user.op == "call_method":
            user.target = "reshape_as" if user.target == "view_as" else "reshape"
        else:
            user.target = aten.reshape.default if self.aten else torch.reshape

    def finish(self) -> None:
        """Erase the replaced ops and what only they read (weight reads, ``t(weight)``); nothing else."""
        candidates = list(self.dead)
        while candidates:
            node = candidates.pop()
            if node.graph is not self.graph or node.users or node.op in ("placeholder", "output"):
                continue
            if node.op != "call_module" and node.is_impure():
                continue
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            candidates.extend(n for n in inputs if n.op in ("get_attr", "call_function", "call_method"))
        self.graph.lint()


def _is_view(user: fx.Node) -> bool:
    if user.op == "call_method" and user.target in ("view", "view_as"):
        return not any(isinstance(a, torch.dtype) for a in user.args[1:])  # view(dtype) reinterprets bytes
    return user.op == "call_function" and user.target in _VIEW_FUNCS


def _needs_contiguous(gm: fx.GraphModule, user: fx.Node) -> bool:
    """Consumers that may depend on the memory layout: outputs, user code, raw-storage access."""
    if user.op == "output":
        return True
    if user.op == "call_module":
        return not type(gm.get_submodule(user.target)).__module__.startswith("torch.nn")
    if user.op == "call_method":
        return user.target in _CONTIGUOUS_METHODS or user.target in ("view", "view_as")
    if user.op == "call_function":
        t = user.target
        if t in _CONTIGUOUS_FUNCS or t in _VIEW_FUNCS:
            return True
        if isinstance(t, (compat.OpOverload, compat.OpOverloadPacket)):
            return False
        return not (getattr(t, "__module__", "") or "").startswith(("torch", "_operator", "operator", "math"))
    return True


def _copy_meta(olds: list[fx.Node], chunks: list[fx.Node], wide: fx.Node, dim: int) -> None:
    """Keep shape metadata on the new nodes so later passes (and ``shape_of``) still see shapes."""
    vals = [o.meta.get("val") for o in olds]
    for old, chunk in zip(olds, chunks):
        for k in ("val", "tensor_meta", "example_value"):
            if k in old.meta:
                chunk.meta[k] = old.meta[k]
    if all(isinstance(v, torch.Tensor) for v in vals):
        # fake tensors from different modes: leave the wide node without metadata
        with contextlib.suppress(Exception):
            wide.meta["val"] = torch.cat(vals, dim=dim)  # type: ignore[arg-type]

