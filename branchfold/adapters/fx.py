"""Reads an FX graph into the neutral walk and writes each region back as one op.

The new ops are written in the graph's own dialect (ATen overloads for torch.export graphs,
torch functions otherwise) so the result stays valid for whatever consumes that dialect. Folded
weights are new parameters with fresh names on the GraphModule; the user's tensors and modules are
never written to, and a weight still used elsewhere stays for its other users.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from branchfold import compat
from branchfold.adapters.fx_store import StoredOnce
from branchfold.patterns import canonical, reshapes
from branchfold.patterns.fx_ops import FxContext, dtype_of, proven_assert, recognize
from branchfold.rewriter.affine import (
    Conv,
    Dense,
    Diagonal,
    Lookup,
    Tensorish,
    bias_if_any,
    out_channels,
    reads_indices,
)
from branchfold.rewriter.region import NotFolded, Op, Region, SplitSource, WalkResult, find_regions
from branchfold.rewriter.rounding import cast_tensor
from branchfold.stages import stage

aten = torch.ops.aten


@dataclass
class FxFoldResult:
    regions: list[Region]
    not_folded: list[NotFolded]
    walk: WalkResult


def uses_aten(graph: fx.Graph) -> bool:
    return any(compat.is_overload(n.target) for n in graph.nodes if n.op == "call_function")


def graph_ops(ctx: FxContext) -> tuple[list[Op], set[fx.Node]]:
    ops, outputs, taken = [], set(), set()
    for node in ctx.gm.graph.nodes:
        if node.op == "output":
            outputs.update(node.all_input_nodes)
        elif node in taken or proven_assert(node):
            continue
        elif node.op in ("call_function", "call_method", "call_module"):
            op = recognize(ctx, node)
            if op.kind != "opaque" and _returns_tuple(node):
                op = _first_output(op, node, taken)
            if op.kind == "affine" and not op.split and not reads_indices(op.map):
                op = _through_views(op, taken)
            ops.append(op)
    ops = [op for op in ops if op.key not in taken]  # an inner view is seen before the linear takes it
    _mark_shared(ctx, ops)
    return ops, outputs


_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, torch.reshape}
_VIEWS |= {"view", "reshape"}  # call_method targets
_FLATTENS = {aten.flatten.using_ints, torch.flatten, "flatten"}
_RESHAPE_AS = {aten.reshape_as.default, aten.view_as.default, "reshape_as", "view_as"}
_SIZE_QUERIES = {aten.sym_size.int, "size"}


def _through_views(op: Op, taken: set[fx.Node]) -> Op:
    """A last-axis map between a flatten of the leading dims and the reshape back, read as one map of
    the unflattened ``x``: decomposed export writes a linear on a 3-d ``x`` as ``view(addmm(b, view(x,
    [-1, in]), Wt), [..., out])`` and LeViT writes ``bn(y.flatten(0, 1)).reshape_as(y)``. Whether that
    is exact is decided by ``reshapes.read_through`` (shared with ONNX); leading sizes may be symbolic
    (a dynamic batch). Branches share their source again, and the region's new op writes the original
    shape back."""
    (inner,) = op.inputs
    users = list(op.output.users)
    if not isinstance(inner, fx.Node) or _reshape_kind(inner) not in ("flatten", "view"):
        return op
    if len(users) != 1 or _reshape_kind(users[0]) is None or users[0].args[0] is not op.output:
        return op
    x, outer = inner.args[0], users[0]
    if not isinstance(x, fx.Node) or op.output in outer.args[1:]:
        return op
    xs = _dims(x)
    flat, back = _result_dims(inner, xs), _result_dims(outer)
    if reshapes.read_through(op.map.axis, xs, flat, out_channels(op.map), back) != "exact":
        return op
    if len(inner.users) == 1:
        taken.add(inner)  # only the map reads it: it dies with the map
    taken.add(outer)
    taken.update(a for a in outer.all_input_nodes if _size_query(a) is not None and len(a.users) == 1)
    return Op(op.key, "affine", (x,), outer, op.map, label=op.label)


def _reshape_kind(node: fx.Node) -> str | None:
    if node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    if any(isinstance(a, torch.dtype) for a in (*node.args, *node.kwargs.values())):
        return None  # ``x.view(torch.int32)`` reinterprets the bits: not a reshape
    return "flatten" if t in _FLATTENS else "view" if t in _VIEWS else "as" if t in _RESHAPE_AS else None


def _result_dims(node: fx.Node, xs: reshapes.Shape | None = None) -> tuple[reshapes.Dim, ...] | None:
    """The shape a flatten / view / reshape(_as) produces, from its arguments and its recorded shape."""
    kind, args = _reshape_kind(node), node.args[1:]
    if kind == "as":
        target = _dims(args[0] if args else node.kwargs.get("other"))
    elif kind == "flatten":
        target = _flattened(xs, node)
    else:
        sizes = args[0] if len(args) == 1 else args or node.kwargs.get("shape", node.kwargs.get("size"))
        target = _sizes(sizes)
    return reshapes.merge_target(target, _dims(node))


def _flattened(xs: reshapes.Shape | None, node: fx.Node) -> tuple[reshapes.Dim, ...] | None:
    if xs is None or not xs:
        return None
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    start, end = start % len(xs), end % len(xs)
    return tuple(xs[:start]) + ((None,) if start < end else tuple(xs[start:end + 1])) + tuple(xs[end + 1:])


def _sizes(sizes) -> tuple[reshapes.Dim, ...] | None:
    """A reshape target: a list of sizes (ints, ``-1``, SymInt nodes), one size, or a node standing for
    a whole shape (``y.shape``, ``y.size()``)."""
    if isinstance(sizes, (list, tuple)):
        return tuple(_size(s) for s in sizes)
    query = _size_query(sizes, whole=True)
    if query is not None:
        return _dims(query[0])
    one = _size(sizes)
    return None if one is None else (one,)


def _size(a) -> reshapes.Dim:
    """One size argument as a neutral dim: ``-1`` is ``INFER``, a SymInt its symbolic expression."""
    if isinstance(a, fx.Node):
        val = a.meta.get("val", a.meta.get("example_value"))
        if isinstance(val, (int, torch.SymInt)) and not isinstance(val, bool):
            a = val
        else:
            query = _size_query(a)
            dims = _dims(query[0]) if query is not None else None
            i = query[1] if query is not None else None
            known = dims is not None and isinstance(i, int) and -len(dims) <= i < len(dims)
            return dims[i] if known else None
    if isinstance(a, bool) or not isinstance(a, (int, torch.SymInt)):
        return None
    d = _dim(a)
    return reshapes.INFER if d == -1 else d


def _size_query(n, whole: bool = False) -> tuple[fx.Node, int | None] | None:
    """``(t, i)`` where ``n`` is the size ``i`` of tensor ``t`` (``sym_size``, ``t.size(i)``,
    ``t.shape[i]``); with ``whole``, ``(t, None)`` where ``n`` is ``t.shape`` or ``t.size()``."""
    if not isinstance(n, fx.Node) or n.op not in ("call_function", "call_method") or not n.args:
        return None
    t, rest = n.args[0], n.args[1:]
    if n.target in _SIZE_QUERIES and isinstance(t, fx.Node) and len(rest) == int(not whole):
        return t, (rest[0] if rest else None)
    if whole and n.target is getattr and rest == ("shape",) and isinstance(t, fx.Node):
        return t, None
    if not whole and n.target is operator.getitem and len(rest) == 1 and isinstance(rest[0], int):
        whole_query = _size_query(t, whole=True)
        return (whole_query[0], rest[0]) if whole_query is not None else None
    return None


def _dim(d) -> reshapes.Dim:
    """A static size, or the symbolic expression of a SymInt (equal expressions are equal sizes)."""
    if isinstance(d, torch.SymInt):
        expr = getattr(getattr(d, "node", None), "expr", None)
        if expr is None:
            return None
        return int(expr) if getattr(expr, "is_number", False) else expr
    return int(d) if isinstance(d, int) else None


def _dims(n) -> tuple[reshapes.Dim, ...] | None:
    """A node's recorded shape with symbolic sizes kept (``shape_of`` turns them into None)."""
    if not isinstance(n, fx.Node):
        return None
    val = n.meta.get("val", n.meta.get("example_value"))
    shape = val.shape if isinstance(val, torch.Tensor) else getattr(n.meta.get("tensor_meta"), "shape", None)
    return None if shape is None else tuple(_dim(d) for d in shape)


def _returns_tuple(node: fx.Node) -> bool:
    if compat.is_overload(node.target) and len(compat.schema(node.target).returns) > 1:
        return True
    return isinstance(node.meta.get("val", node.meta.get("example_value")), (tuple, list))


def _first_output(op: Op, node: fx.Node, taken: set[fx.Node]) -> Op:
    """A tuple-returning op (decomposed ``_native_batch_norm_legit_no_training``) computes its map at
    ``getitem(node, 0)``: that is the value a region may replace, never the tuple itself."""
    import operator

    firsts = [u for u in node.users if u.target is operator.getitem and u.args[1] == 0]
    if len(firsts) != 1:
        return Op(node, "opaque", op.inputs, node, label=op.label)
    taken.add(firsts[0])
    op.output = firsts[0]
    return op


def _stored_tensors(ctx: FxContext, node: fx.Node) -> set[str]:
    """Names of the stored tensors (or the module) an op reads its constants from. A weight is also named
    by its storage, so that one tensor reached under two names (an embedding table tied to a head that
    reads it as a weight, or through a module and a ``get_attr``) counts as one."""
    if node.op == "call_module":
        params = ctx.module(node).parameters(recurse=False)
        return {f"module:{node.target}"} | {_storage(p) for p in params if _matrix(p)}
    found: set[str] = set()
    stack = [a for a in node.all_input_nodes if ctx.const(a) is not None]
    while stack:
        n = stack.pop()
        if n.op in ("get_attr", "placeholder") and not _matrix(ctx.const(n)):
            # a vector (bias, scale) folds into each of its readers at no cost: it is this op's own (private)
            found.add(f"vector:{n.target}@{node.name}")
        elif n.op in ("get_attr", "placeholder"):
            found |= {f"{'attr' if n.op == 'get_attr' else 'input'}:{n.target}", _storage(ctx.const(n))}
        else:
            stack.extend(n.all_input_nodes)
    return found


def _storage(t: torch.Tensor) -> str:
    return f"storage:{t.untyped_storage().data_ptr()}"


def _matrix(t: torch.Tensor | None) -> bool:
    """A weight whose sharing matters: at least two axes longer than one (a ``[1, C]`` scale is a vector)."""
    return t is None or sum(d > 1 for d in t.shape) >= 2


def _mark_shared(ctx: FxContext, ops: list[Op]) -> None:
    """Flag affine ops whose weights other affine ops read too (a module called from several places)."""
    canonical.mark_shared(ops, lambda op: _stored_tensors(ctx, op.key) if op.kind == "affine" else ())


def fold_graph(
    gm: fx.GraphModule,
    constants: Mapping[str, torch.Tensor] | None = None,
    select: Callable[[Region], bool] | None = None,
) -> FxFoldResult:
    """Fold the regions of ``gm`` (all, or those ``select`` keeps) in place: its graph and new attributes."""
    ctx = FxContext(gm, dict(constants or {}))
    ops, outputs = graph_ops(ctx)
    walk = find_regions(ops, outputs)
    for i, r in enumerate(walk.regions):
        r.id = i  # stable across fresh copies of the graph: undo selects regions by it
    if select is not None:
        walk.regions = [r for r in walk.regions if select(r)]
    if walk.regions:
        with stage("weights"):  # the folded weights are computed (float64, rounded once) as they are written
            Emitter(gm, ctx, walk).emit()
    return FxFoldResult(walk.regions, walk.not_folded, walk)


class Emitter:
    """Writes maps into an FX graph: the walk's regions (``emit``), or one map at a time for another pass
    (``write`` at the graph's insertion point, then ``replace``). Folded tensors become new parameters
    with fresh names; equal ones are stored once."""

    def __init__(self, gm: fx.GraphModule, ctx: FxContext, walk: WalkResult | None = None) -> None:
        self.gm, self.ctx, self.walk = gm, ctx, walk or WalkResult([], [])
        self.graph = gm.graph
        self.aten = uses_aten(gm.graph)
        self.replaced: dict[fx.Node, fx.Node] = {}
        self.plain: dict[fx.Node, fx.Node] = {}  # LayerNorm node -> the same LayerNorm without γ, β
        self.counter = 0
        self.stored = StoredOnce()

    def emit(self) -> None:
        for key, same in self.walk.meta_sources.items():  # shape queries of values about to vanish
            node: fx.Node = key
            node.replace_input_with(self.walk.ops_by_key[key].inputs[0], same)
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        for region in sorted(self.walk.regions, key=lambda r: order[r.value]):
            value: fx.Node = region.value
            with self.graph.inserting_before(value):
                dtype, device = self._dtype_device(region)
                if isinstance(region.source, SplitSource) and isinstance(region.map, Diagonal):
                    # LayerNorm then per-channel ops: one LayerNorm with the fused γ, β
                    new = self._layer_norm(region.source.op, region.map, dtype, device)
                else:
                    src = self._source(region.source)
                    new = self.write(region.map, src, dtype, device, value)
            self.replace(value, new)
        self._remove_dead()

    def replace(self, value: fx.Node, new: fx.Node) -> None:
        """Make every reader of ``value`` read ``new``."""
        value.replace_all_uses_with(new)
        self.replaced[value] = new

    def _source(self, source) -> fx.Node:
        if isinstance(source, SplitSource):
            ln: fx.Node = source.op
            if ln not in self.plain:
                self.plain[ln] = self._plain_layer_norm(ln)
            return self.plain[ln]
        return self.replaced.get(source, source)

    def _plain_layer_norm(self, ln: fx.Node, weight: fx.Node | None = None, bias: fx.Node | None = None) -> fx.Node:
        if ln.op == "call_module":
            mod = self.gm.get_submodule(ln.target)
            x, shape, eps = ln.args[0], list(mod.normalized_shape), mod.eps
        else:
            x = ln.args[0] if ln.args else ln.kwargs["input"]
            shape = ln.args[1] if len(ln.args) > 1 else ln.kwargs["normalized_shape"]
            eps = ln.args[4] if len(ln.args) > 4 else ln.kwargs.get("eps", 1e-5)
        x = self.replaced.get(x, x)
        fn = aten.layer_norm.default if self.aten else F.layer_norm
        return self.graph.call_function(fn, (x, list(shape), weight, bias, eps))

    def _layer_norm(self, ln: fx.Node, m: Diagonal, dtype, device) -> fx.Node:
        n = int(ln.meta["val"].shape[-1]) if "val" in ln.meta else None
        n = n or (self.gm.get_submodule(ln.target).normalized_shape[0] if ln.op == "call_module" else None)
        n = n or max(m.scale.numel(), m.shift.numel())
        weight = self._param(m.scale.expand(n), dtype, device, "weight")
        bias = self._param(m.shift.expand(n), dtype, device, "bias")
        return self._plain_layer_norm(ln, weight, bias)

    def _dtype_device(self, region: Region) -> tuple[torch.dtype, torch.device]:
        for key in reversed(region.ops):
            node: fx.Node = key
            for a in node.all_input_nodes:
                t = self.ctx.const(a)
                if t is not None and t.is_floating_point():
                    return t.dtype, t.device
            if node.op == "call_module":
                for p in self.gm.get_submodule(node.target).parameters():
                    return p.dtype, p.device
        dtype = dtype_of(region.value) or torch.float32
        return dtype, torch.device("cpu")

    # -- writing ops ------------------------------------------------------------------------------

    def _param(self, t: Tensorish, dtype, device, hint: str) -> fx.Node:
        """A fresh parameter for a folded tensor; equal tensors are stored once.

        A module called from several places (GroupedMLP) folds to the same weights at each call site:
        de-duplicating by content keeps the sharing instead of multiplying the parameters.
        """
        value = cast_tensor(t, dtype).to(device)
        same = self.stored.find(value)
        if same is not None:
            return self.graph.get_attr(same)
        while True:
            self.counter += 1
            name = f"branchfold_{self.counter}_{hint}"
            if not hasattr(self.gm, name):
                break
        self.gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
        self.stored.add(value, name)
        return self.graph.get_attr(name)

    def _call(self, torch_fn, aten_fn, args) -> fx.Node:
        return self.graph.call_function(aten_fn if self.aten else torch_fn, tuple(args))

    def write(self, m, src: fx.Node, dtype, device, like: fx.Node) -> fx.Node:
        """Nodes computing ``m(src)`` at the graph's insertion point, weights in ``dtype`` on ``device``;
        returns the last (``src`` itself for an identity)."""
        if isinstance(m, Dense):
            w = self._param(m.weight, dtype, device, "weight")
            return self._call(F.linear, aten.linear.default, (src, w, self._bias(m, dtype, device)))
        if isinstance(m, Conv):
            return self._conv(m, src, dtype, device)
        if isinstance(m, Lookup):
            table = self._param(m.table, dtype, device, "table")
            args = (table, src) if self.aten else (src, table)
            return self._call(F.embedding, aten.embedding.default, args)
        return self._diagonal(m, src, dtype, device, like)

    def _bias(self, m: Dense | Conv, dtype, device) -> fx.Node | None:
        bias = bias_if_any(m)
        return None if bias is None else self._param(bias, dtype, device, "bias")

    def _conv(self, m: Conv, src: fx.Node, dtype, device) -> fx.Node:
        pads = m.symmetric_padding
        if pads is None or m.padding_mode != "zeros":
            flat = [p for lo_hi in reversed(m.padding) for p in lo_hi]
            mode = {"zeros": "constant"}.get(m.padding_mode, m.padding_mode)
            if self.aten:
                src = self.graph.call_function(aten.pad.default, (src, flat, mode))
            else:
                src = self.graph.call_function(F.pad, (src, flat), {"mode": mode})
            pads = (0,) * m.nd
        w = self._param(m.weight, dtype, device, "weight")
        args = (src, w, self._bias(m, dtype, device), list(m.stride), list(pads), list(m.dilation), m.groups)
        fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[m.nd]
        afn = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[m.nd]
        return self._call(fn, afn, args)

    def _diagonal(self, m: Diagonal, src: fx.Node, dtype, device, like: fx.Node) -> fx.Node:
        if m.is_identity:
            return src
        view = (-1,) + (1,) * (-m.axis - 1) if m.axis is not None else ()
        scale = self._param(m.scale.reshape(view), dtype, device, "scale")
        if not m.has_shift:
            return self._call(torch.mul, aten.mul.Tensor, (src, scale))
        shift = self._param(m.shift.reshape(view), dtype, device, "shift")
        if bool((m.scale == 1).all()):
            return self._call(torch.add, aten.add.Tensor, (src, shift))
        return self._call(torch.addcmul, aten.addcmul.default, (shift, src, scale))

    def _remove_dead(self) -> None:
        """Erase the ops the regions replaced, and what only they used; nothing else is touched.

        Not ``Graph.eliminate_dead_code``: it also cleans the graphs of the GraphModules the graph calls,
        which are the user's own objects (a GraphModule copy shares its submodules)."""
        candidates = [k for r in self.walk.regions for k in r.ops] + list(self.replaced)  # users last
        folded = set(candidates)  # proven affine, so pure even where torch says not (eval-mode dropout)
        for node in list(self.graph.nodes):  # checks of a value that is no longer computed (they cannot fail)
            if proven_assert(node) and node.args[0] in folded:
                self.graph.erase_node(node)
        seen = set()
        while candidates:
            node = candidates.pop()
            if node in seen or node.graph is not self.graph:
                continue
            if node.users or node.op in ("placeholder", "output") or (node.is_impure() and node not in folded):
                continue
            seen.add(node)
            inputs = node.all_input_nodes
            self.graph.erase_node(node)
            candidates.extend(n for n in inputs if n.op in ("get_attr", "call_function", "call_method", "call_module"))
        for node in list(self.graph.nodes):  # a weight read by several folded regions dies with the last
            if node.op == "get_attr" and not node.users:
                self.graph.erase_node(node)
        self.graph.lint()
