"""ONNX ``Reshape/Flatten → last-axis map → Reshape`` triples, read as one map of the unflattened value.

Both torch exporters write LeViT's ``bn(y.flatten(0, 1)).reshape_as(y)`` around a MatMul: the legacy
one as ``Flatten(axis=2) → BatchNormalization → Reshape(Shape(y))``, the dynamo one as constant-shape
``Reshape [N*T, C]`` (or ``[-1, C]``) ``→ BatchNormalization → Reshape [N, T, C]``; its optimizer may
merge the reshape back with the next ``view`` (``Reshape [N, T, 3, h, d]`` for LeViT's q/k/v). Whether
the map may be read on the unflattened value is decided once, in ``patterns.reshapes``; this module
only turns ONNX nodes and shape tensors (constants, ``Shape → Gather → Concat`` computations) into the
neutral shape descriptions it takes.

An ``"exact"`` triple becomes one ``Op`` from the unflattened value to the reshaped-back value. A
``"flat-order"`` one (the reshape back goes elsewhere, with a target that does not depend on its
input's shape) becomes an ``Op`` from the unflattened value to the map's own output, which a region
then writes at the unflattened shape (``UnflattenedOp.shape``): the reshape after it reads only the
row-major order, which is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from branchfold.patterns import reshapes
from branchfold.patterns.onnx_ops import ONNX_DOMAINS, OnnxContext
from branchfold.rewriter.affine import out_channels, reads_indices
from branchfold.rewriter.region import Op

Dims = list[reshapes.Dim]


@dataclass
class UnflattenedOp(Op):
    """An op whose output a region writes at ``shape`` (the unflattened one), not at its recorded one."""

    shape: ir.Shape | None = None


@dataclass(frozen=True)
class _DimOf:
    """Size ``index`` of ``value``, where the graph records no size: equal only to itself."""

    value: ir.Value
    index: int


def read_through_reshapes(ctx: OnnxContext, ops: Sequence[Op]) -> list[Op]:
    """``ops`` with each foldable triple read as one op, and the nodes only that triple used removed."""
    out: list[Op] = []
    taken: set[ir.Node] = set()
    for op in ops:
        if op.kind == "affine" and not op.split and op.map.axis in (-1, None) and not reads_indices(op.map):
            op = _through_reshapes(ctx, op, taken)
        out.append(op)
    return [op for op in out if op.key not in taken]


def _reshape_node(v: ir.Value | None) -> ir.Node | None:
    node = v.producer() if v is not None else None
    if node is None or node.domain not in ONNX_DOMAINS or node.op_type not in ("Reshape", "Flatten"):
        return None
    return node


def _through_reshapes(ctx: OnnxContext, op: Op, taken: set[ir.Node]) -> Op:
    (flat_v,) = op.inputs
    first, mapped = _reshape_node(flat_v), op.output
    if first is None or ctx.is_const(first.inputs[0]) or mapped.is_graph_output():
        return op
    uses = list(mapped.uses())
    if len(uses) != 1 or uses[0].node.op_type != "Reshape" or uses[0].idx != 0:
        return op
    back = uses[0].node
    if back.domain not in ONNX_DOMAINS or back in taken or first in taken:
        return op  # a reshape already read as part of another triple
    x = first.inputs[0]
    xs = _value_dims(ctx, x)
    flat = _result_dims(ctx, first, xs)
    out = out_channels(op.map)
    mapped_target = None if flat is None else (*flat[:-1], out if out is not None else flat[-1])
    mapped_dims = reshapes.merge_target(mapped_target, ctx.dims(mapped))
    back_dims = _result_dims(ctx, back, mapped_dims)
    reading = reshapes.read_through(op.map.axis, xs, flat, out, back_dims)
    if reading is None or (reading == "flat-order" and not _reads_only_the_order(ctx, back)):
        return op
    if len(flat_v.uses()) == 1 and not flat_v.is_graph_output():
        taken.add(first)
        taken.update(_private_cone(first))
    if reading == "exact":
        taken.add(back)
        taken.update(_private_cone(back))
        return Op(op.key, "affine", (x,), back.outputs[0], op.map, label=op.label, shared=op.shared)
    last = out if out is not None else (x.shape[-1] if x.shape is not None else None)
    shape = None if x.shape is None else ir.Shape([*x.shape.dims[:-1], last])
    return UnflattenedOp(op.key, "affine", (x,), mapped, op.map, label=op.label, shared=op.shared,
                         shape=shape)  # fmt: skip


def _reads_only_the_order(ctx: OnnxContext, back: ir.Node) -> bool:
    """A Reshape whose result does not depend on its input's shape: no ``0`` that copies an input dim."""
    if _attr(back, "allowzero", 0):
        return True
    target = _shape_tensor(ctx, back.inputs[1], set())
    return target is not None and not any(isinstance(d, int) and d == 0 for d in target)


def _private_cone(reshape: ir.Node) -> set[ir.Node]:
    """The nodes computing a Reshape's target that nothing else reads (``Shape(y) → Reshape``): they
    go with the Reshape, so ``y`` is not kept alive by its shape alone."""
    if reshape.op_type != "Reshape":
        return set()
    cone: set[ir.Node] = set()
    _shape_tensor_nodes(reshape.inputs[1], cone)
    while True:
        outside = {
            n for n in cone
            if any(u.node is not reshape and u.node not in cone for o in n.outputs for u in o.uses())
            or any(o.is_graph_output() for o in n.outputs)
        }  # fmt: skip
        if not outside:
            return cone
        cone -= outside


def _shape_tensor_nodes(v: ir.Value | None, found: set[ir.Node]) -> None:
    node = v.producer() if v is not None else None
    if node is None or node in found or node.op_type not in _SHAPE_OPS:
        return
    found.add(node)
    if node.op_type != "Shape":
        for i in node.inputs:
            _shape_tensor_nodes(i, found)


def _attr(node: ir.Node, name: str, default):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _value_dims(ctx: OnnxContext, v: ir.Value) -> tuple[reshapes.Dim, ...] | None:
    """A value's shape with an unrecorded size standing for itself (so ``Shape(v)[i]`` equals it)."""
    dims = ctx.dims(v)
    return None if dims is None else tuple(_DimOf(v, i) if d is None else d for i, d in enumerate(dims))


def _result_dims(ctx: OnnxContext, node: ir.Node, xs: Sequence[reshapes.Dim] | None) -> tuple | None:
    """The shape a Flatten / Reshape of a value of shape ``xs`` produces: from its target, with ``0``
    (copy) and ``-1`` (infer) read as ONNX defines them, and from its recorded output shape."""
    recorded = ctx.dims(node.outputs[0])
    if node.op_type == "Flatten":
        if xs is None or not xs:
            return reshapes.merge_target(None, recorded)
        axis = _attr(node, "axis", 1)
        axis = axis + len(xs) if axis < 0 else axis
        tail = xs[axis:]
        target = (_product(xs[:axis]), tail[0] if len(tail) == 1 else _product(tail))
        return reshapes.merge_target(target, recorded)
    raw = _shape_tensor(ctx, node.inputs[1], set())
    if raw is None:
        return reshapes.merge_target(None, recorded)
    copy = not _attr(node, "allowzero", 0)
    target: list[reshapes.Dim] = []
    for i, d in enumerate(raw):
        if isinstance(d, int) and d == -1:
            d = reshapes.INFER
        elif isinstance(d, int) and d == 0 and copy:
            d = xs[i] if xs is not None and i < len(xs) else None
        target.append(d)
    return reshapes.merge_target(target, recorded)


def _product(dims: Sequence[reshapes.Dim]) -> int | None:
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64)) if dims else 1


# Integer ops that shape computations are built from.
_SHAPE_OPS = {"Shape", "Concat", "Gather", "Unsqueeze", "Squeeze", "Slice", "Cast", "Identity", "Constant",
              "Mul", "Div", "Add", "Sub"}  # fmt: skip


def _shape_tensor(ctx: OnnxContext, v: ir.Value | None, seen: set[ir.Node]) -> Dims | None:
    """The elements of a 1-D (or scalar) integer tensor as neutral dims, or None if not followed."""
    if v is None:
        return None
    c = ctx.const(v)
    if c is not None:
        if c.ndim > 1 or not np.issubdtype(c.dtype, np.integer):
            return None
        return [int(e) for e in c.reshape(-1)]
    node = v.producer()
    if node is None or node.domain not in ONNX_DOMAINS or node in seen or node.op_type not in _SHAPE_OPS:
        return None
    seen.add(node)
    t = node.op_type
    if t == "Shape":
        dims = _value_dims(ctx, node.inputs[0])
        if dims is None:
            return None
        start, end = _attr(node, "start", 0), _attr(node, "end", None)
        return list(dims[start:end])
    args = [_shape_tensor(ctx, i, seen) if i is not None else None for i in node.inputs]
    if t == "Concat":
        return None if any(a is None for a in args) else [d for a in args for d in a]
    if t in ("Unsqueeze", "Squeeze", "Identity", "Cast"):
        return args[0] if t != "Cast" or _attr(node, "to", 0) in _INT_TYPES else None
    if t == "Gather":
        indices = ctx.const(node.inputs[1])
        if args[0] is None or indices is None or _attr(node, "axis", 0) != 0:
            return None
        n = len(args[0])
        picked = [int(i) for i in indices.reshape(-1)]
        return [args[0][i] for i in picked] if all(-n <= i < n for i in picked) else None
    if t == "Slice":
        return _slice(ctx, node, args[0])
    return _arithmetic(t, args)


_INT_TYPES = {int(ir.DataType.INT64), int(ir.DataType.INT32)}


def _slice(ctx: OnnxContext, node: ir.Node, data: Dims | None) -> Dims | None:
    """A 1-D Slice (inputs since opset 10, attributes before); Python's slicing clamps as ONNX does."""
    if len(node.inputs) > 1:
        bounds = [ctx.const(i) if i is not None else None for i in node.inputs[1:5]]
        bounds += [None] * (4 - len(bounds))
        if any(b is None for i, b in zip(node.inputs[1:5], bounds) if i is not None):
            return None
    else:
        bounds = [_attr(node, k, None) for k in ("starts", "ends", "axes")] + [None]
    starts, ends, axes, steps = (None if b is None else [int(e) for e in np.asarray(b).reshape(-1)]
                                 for b in bounds)  # fmt: skip
    if data is None or starts is None or ends is None or len(starts) != 1 or len(ends) != 1:
        return None
    if (axes is not None and axes not in ([0], [-1])) or (steps is not None and len(steps) != 1):
        return None
    return data[starts[0] : ends[0] : steps[0] if steps else 1]


def _arithmetic(op_type: str, args: list[Dims | None]) -> Dims | None:
    """Size arithmetic (``C // heads``); a symbolic operand makes the result unknown."""
    if len(args) != 2 or args[0] is None or args[1] is None:
        return None
    a, b = args
    if len(a) != len(b) and 1 not in (len(a), len(b)):
        return None
    n = max(len(a), len(b))
    a, b = (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)
    fn = {"Mul": lambda p, q: p * q, "Add": lambda p, q: p + q, "Sub": lambda p, q: p - q,
          "Div": lambda p, q: p // q if q else None}[op_type]  # fmt: skip
    return [fn(p, q) if isinstance(p, int) and isinstance(q, int) else None for p, q in zip(a, b)]
