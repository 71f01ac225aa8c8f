"""Reads an onnx_ir graph into the neutral walk and writes each region back as one op.

Dense maps become ``Gemm`` (2-D inputs) or ``MatMul`` + ``Add``, convs a ``Conv`` (with a ``Pad`` in
front for non-zero padding modes), channel maps ``Mul``/``Add``. Folded weights are computed in float64
and stored as new initializers, cast to the dtype of the value they replace, under fresh names: no
existing initializer is written to, and one still read elsewhere stays for its other readers. Graph
input and output names are kept. Dead nodes are left for the pass to sweep (``passes.onnx_untouched.Liveness``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from branchfold.adapters.onnx_reshapes import UnflattenedOp, read_through_reshapes
from branchfold.patterns.onnx_ops import OnnxContext, mark_shared, recognize
from branchfold.rewriter.affine import Conv, Dense, Diagonal, Lookup, Tensorish, bias_if_any, value
from branchfold.rewriter.region import NotFolded, Op, Region, SplitSource, WalkResult, find_regions
from branchfold.rewriter.rounding import rounded, rounded_rows
from branchfold.storage.onnx_folded import FoldedTensor
from branchfold.storage.onnx_weights import return_freed_memory
from branchfold.storage.onnx_wire import MIN_EXTERNAL_BYTES


@dataclass
class OnnxFoldResult:
    regions: list[Region]
    not_folded: list[NotFolded]
    walk: WalkResult
    names: list[str]  # the name each region's value had before the fold (graph outputs are renamed)


def _subgraph_reads(node: ir.Node, graph: ir.Graph) -> list[ir.Value]:
    """Values of ``graph`` that a node's subgraphs (If/Loop/Scan bodies) read from the outer scope."""
    found: list[ir.Value] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            subs = list(attr.value)
        else:
            continue
        for sub in subs:
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                found += [v for v in inner.inputs if v is not None and v.graph is graph]
    return found


def graph_ops(ctx: OnnxContext) -> tuple[list[Op], set[ir.Value]]:
    """The graph as the walk sees it: one ``Op`` per node in topological order, and the graph outputs."""
    ops: list[Op] = []
    for node in ctx.graph:
        op = recognize(ctx, node)
        extra = _subgraph_reads(node, ctx.graph)
        if extra:
            op = Op(node, "opaque", op.inputs + tuple(extra), op.output, label=op.label, refusal=op.refusal)
        ops.append(op)
    # A Pad folded into its Conv is not read by the walk: the Conv reads the Pad's input directly.
    absorbed = {
        op.inputs[0].producer()
        for op in ops
        if op.kind == "affine" and op.label == "conv" and op.inputs[0] is not op.key.inputs[0]
    }
    ops = [op for op in ops if op.key not in absorbed]
    ops = read_through_reshapes(ctx, ops)  # Reshape → last-axis map → Reshape: a map of the unflattened value
    mark_shared(ctx, ops)
    return ops, set(ctx.graph.outputs)


def fold_graph(graph: ir.Graph, select: Callable[[Region], bool] | None = None) -> OnnxFoldResult:
    """Fold the regions of ``graph`` (all, or those ``select`` keeps) in place."""
    ctx = OnnxContext(graph)
    ops, outputs = graph_ops(ctx)
    walk = find_regions(ops, outputs)
    walk.regions = [r for r in walk.regions if not _rewrites_to_itself(r)]
    for i, r in enumerate(walk.regions):
        r.id = i  # stable across fresh copies of the graph: undo selects regions by it
    if select is not None:
        walk.regions = [r for r in walk.regions if select(r)]
    names = [r.value.name for r in walk.regions]
    if walk.regions:
        Emitter(graph, walk, after_region=ctx.release_pages, pages_read=ctx.page_release).emit()
    return OnnxFoldResult(walk.regions, walk.not_folded, walk, names)


def _rewrites_to_itself(r: Region) -> bool:
    """A MatMul + bias Add would be written back as the same MatMul + Add: nothing to gain."""
    kinds = [k.op_type for k in r.ops]
    src = r.source if isinstance(r.source, ir.Value) else None
    rank = len(src.shape) if src is not None and src.shape is not None else None
    return kinds == ["MatMul", "Add"] and rank != 2


def existing_names(graph: ir.Graph) -> set[str]:
    names = {v.name for v in graph.inputs if v.name} | set(graph.initializers)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        names.update(v.name for v in node.outputs if v.name)
    return names


# glibc keeps freed blocks of tens of MB in the process (it raises its mmap threshold after freeing one),
# so a fold's float64 temporaries would pile up region after region: ViT-B/16's 12 LayerNorm folds left
# 330 MB in the heap before the check session started
TRIM_AFTER_BYTES = 16 << 20


def _nothing() -> None:
    return None


_TORCH_FLOATS = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16, ir.DataType.DOUBLE: torch.float64}


class Emitter:
    """Writes maps into an ONNX graph: the walk's regions (``emit``), or one map at a time for another pass
    (``write``, ``initializer``, ``add``, then ``insert_before`` and ``replace``). New nodes wait in a pending
    list until ``insert_before`` places them; new initializers and values get fresh names."""

    def __init__(
        self,
        graph: ir.Graph,
        walk: WalkResult | None = None,
        after_region: Callable[[], None] = _nothing,
        pages_read: Callable[[], Callable[[], None]] = lambda: _nothing,
    ) -> None:
        self.graph, self.walk = graph, walk or WalkResult([], [])
        self.pending: list[ir.Node] = []
        self.created: set[ir.Node] = set()  # every node this emitter wrote (its values may take replaced names)
        self.after_region = after_region  # called once a region is written (drop the weight pages it read)
        self.pages_read = pages_read  # what drops the pages read so far, to call once a FoldedTensor is written
        self.computed_bytes = 0  # weights computed now (not FoldedTensors) since the heap was last trimmed
        self.names = existing_names(graph)
        self.counter = 0
        self.replaced: dict[ir.Value, ir.Value] = {}
        self.plain: dict[ir.Node, ir.Value] = {}  # LayerNormalization node -> the same without γ, β
        # values a region writes at their unflattened shape (a reshape that reads only their order follows)
        ops = self.walk.ops_by_key.values()
        self.unflattened = {op.output: op.shape for op in ops if isinstance(op, UnflattenedOp)}

    def fresh(self, hint: str) -> str:
        while True:
            self.counter += 1
            name = f"branchfold_{self.counter}_{hint}"
            if name not in self.names:
                self.names.add(name)
                return name

    def emit(self) -> None:
        order = {node: i for i, node in enumerate(self.graph)}
        for region in sorted(self.walk.regions, key=lambda r: order[r.value.producer()]):
            value: ir.Value = region.value
            src = self._source(region.source, value.dtype)
            new = self.write(region.map, src, value)
            if value in self.unflattened and new is not src:
                new.shape = self.unflattened[value]
            self.insert_before(value.producer())
            self.replace(value, new)
            self.after_region()
            if self.computed_bytes >= TRIM_AFTER_BYTES:
                return_freed_memory()  # the float64 temporaries of the regions since the last trim
                self.computed_bytes = 0

    def add(self, node: ir.Node) -> None:
        """Append a node built by the caller to the pending ones."""
        self.pending.append(node)
        self.created.add(node)

    def insert_before(self, anchor: ir.Node) -> None:
        """Place the pending nodes, in order, before ``anchor``."""
        if self.pending:
            self.graph.insert_before(anchor, self.pending)
            self.pending = []

    def replace(self, value: ir.Value, new: ir.Value) -> None:
        """Make every reader of ``value`` read ``new``; a graph output keeps its name (``new`` takes it,
        through an ``Identity`` where ``new`` is itself an input, initializer or output)."""
        if value.is_graph_output():
            if new.is_graph_input() or new.is_graph_output() or new.is_initializer():
                new = self._node("Identity", [new], value)
                self.insert_before(value.producer())
            name = value.name
            value.name = self.fresh("replaced")
            new.name = name
            new.shape, new.type = value.shape, value.type
        elif new.producer() in self.created:
            # the new value takes the name of the one it replaces: its readers, outside the region, stay as
            # they were (the old value is left unread and removed with its producer)
            name = value.name
            value.name = self.fresh("replaced")
            new.name = name
        value.replace_all_uses_with(new, replace_graph_outputs=True)
        self.replaced[value] = new

    def _current(self, v: ir.Value) -> ir.Value:
        while v in self.replaced:
            v = self.replaced[v]
        return v

    def _source(self, source, dtype) -> ir.Value:
        if isinstance(source, SplitSource):
            ln: ir.Node = source.op
            if ln not in self.plain:
                self.plain[ln] = self._plain_layer_norm(ln)
            return self.plain[ln]
        return self._current(source)

    def _plain_layer_norm(self, ln: ir.Node) -> ir.Value:
        """LayerNormalization needs a Scale input: the plain normalisation is γ = 1, β = 0."""
        out = ln.outputs[0]
        c = out.shape[-1] if out.shape is not None else ln.inputs[1].shape[-1]
        ones = self.initializer(torch.ones(c, dtype=torch.float64), ln.inputs[1].dtype, "ln_ones")
        zeros = self.initializer(torch.zeros(c, dtype=torch.float64), ln.inputs[1].dtype, "ln_zeros")
        attrs = [a for a in ln.attributes.values() if a.name in ("axis", "epsilon", "stash_type")]
        node = ir.Node("", "LayerNormalization", [self._current(ln.inputs[0]), ones, zeros], attrs, num_outputs=1)
        node.outputs[0].name = self.fresh("layer_norm")
        node.outputs[0].dtype, node.outputs[0].shape = out.dtype, out.shape
        self.add(node)
        return node.outputs[0]

    # -- writing ops ------------------------------------------------------------------------------

    def initializer(self, t: Tensorish, dtype: ir.DataType | None, hint: str, transposed: bool = False) -> ir.Value:
        """``t`` (its transpose, with ``transposed``) as a new initializer of ``dtype``. A big weight that is
        one or two stored weights summed is a ``FoldedTensor``: computed as the model is written."""
        dtype = dtype or ir.DataType.FLOAT
        torch_dtype = _TORCH_FLOATS.get(dtype)
        rows = rounded_rows(t, torch_dtype, transposed) if torch_dtype else None
        if rows is not None and rows.nbytes >= MIN_EXTERNAL_BYTES:
            return self._register(FoldedTensor(rows, dtype, release=self.pages_read()), hint)
        if dtype.is_floating_point():
            w = rounded(t, torch_dtype, transposed).detach().cpu() if torch_dtype else value(t).detach().cpu()
            w = w.t() if transposed else w
            # one strided pass lays out a transposed weight (or casts it, for a dtype torch lacks)
            arr = w.contiguous().numpy() if torch_dtype else np.ascontiguousarray(w.numpy().astype(dtype.numpy()))
        else:
            arr = np.ascontiguousarray(t.numpy())
        return self._register(ir.tensor(arr, dtype=dtype if dtype.is_floating_point() else None), hint)

    def _register(self, tensor: ir.TensorProtocol, hint: str) -> ir.Value:
        if not isinstance(tensor, FoldedTensor):
            self.computed_bytes += tensor.nbytes
        name = self.fresh(hint)
        tensor.name = name
        v = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)
        self.graph.register_initializer(v)
        return v

    def _node(self, op_type: str, inputs, like: ir.Value, attrs=(), final: bool = True) -> ir.Value:
        node = ir.Node("", op_type, inputs, list(attrs), num_outputs=1)
        out = node.outputs[0]
        out.name = self.fresh(op_type.lower())
        out.dtype = like.dtype
        if final:
            out.shape = like.shape
        self.pending.append(node)
        self.created.add(node)
        return out

    def write(self, m, src: ir.Value, like: ir.Value) -> ir.Value:
        """The pending nodes computing ``m(src)``, typed like ``like``; returns the value they compute."""
        dtype = like.dtype
        if isinstance(m, Dense):
            w = self.initializer(m.weight, dtype, "weight", transposed=True)  # stored as [in, out] like the exporters
            bias = bias_if_any(m)
            if src.shape is not None and len(src.shape) == 2 and bias is not None:
                b = self.initializer(bias, dtype, "bias")
                return self._node("Gemm", [src, w, b], like)
            y = self._node("MatMul", [src, w], like, final=bias is None)
            if bias is None:
                return y
            return self._node("Add", [y, self.initializer(bias, dtype, "bias")], like)
        if isinstance(m, Conv):
            return self._conv(m, src, like)
        if isinstance(m, Lookup):
            table = self.initializer(m.table, dtype, "table")
            return self._node("Gather", [table, src], like, [ir.AttrInt64("axis", 0)])
        return self._diagonal(m, src, like)

    def _conv(self, m: Conv, src: ir.Value, like: ir.Value) -> ir.Value:
        pads = [lo for lo, _ in m.padding] + [hi for _, hi in m.padding]
        if m.padding_mode != "zeros":
            mode = {"reflect": "reflect", "replicate": "edge", "circular": "wrap"}[m.padding_mode]
            full = torch.tensor([0, 0, *pads[: m.nd], 0, 0, *pads[m.nd :]], dtype=torch.int64)
            pad_amounts = self.initializer(full, ir.DataType.INT64, "pads")
            src = self._node("Pad", [src, pad_amounts], like, [ir.AttrString("mode", mode)], final=False)
            pads = [0] * (2 * m.nd)
        inputs = [src, self.initializer(m.weight, like.dtype, "weight")]
        bias = bias_if_any(m)
        if bias is not None:
            inputs.append(self.initializer(bias, like.dtype, "bias"))
        attrs = [
            ir.AttrInt64s("kernel_shape", list(m.kernel)),
            ir.AttrInt64s("strides", list(m.stride)),
            ir.AttrInt64s("pads", pads),
            ir.AttrInt64s("dilations", list(m.dilation)),
            ir.AttrInt64("group", m.groups),
        ]
        return self._node("Conv", inputs, like, attrs)

    def _diagonal(self, m: Diagonal, src: ir.Value, like: ir.Value) -> ir.Value:
        if m.is_identity:
            return src
        view = (-1,) + (1,) * (-m.axis - 1) if m.axis is not None else ()
        only_shift = bool((m.scale == 1).all())
        y = src
        if not only_shift:
            scale = self.initializer(m.scale.reshape(view), like.dtype, "scale")
            y = self._node("Mul", [src, scale], like, final=not m.has_shift)
        if m.has_shift:
            shift = self.initializer(m.shift.reshape(view), like.dtype, "shift")
            y = self._node("Add", [y, shift], like)
        return y
