"""ONNX horizontal fusion: MatMul/Gemm/Conv with constant weights reading one value → one op + ``Split``.

Ops are read with the ONNX folding recognizers (``patterns.onnx_ops``), so Gemm's alpha/beta/transB,
constant weights behind Transpose/Constant nodes and a zero Pad in front of a Conv mean what they mean
there. A MatMul followed by its bias ``Add`` (how both torch exporters write a Linear) is taken as one
member, so the biases are concatenated too. The weights are concatenated once, here, into new
initializers; the wide op is written by the folding adapter's emitter, followed by a ``Split`` whose
sizes are a constant: it works when the shared value is a graph input (where onnxoptimizer's
``fuse_qkv`` crashes) and with dynamic batch/sequence dims. Graph output names are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common
import torch

from branchfold.adapters.onnx import Emitter
from branchfold.passes.onnx_untouched import Liveness
from branchfold.patterns import horizontal
from branchfold.patterns.horizontal import (
    ONNX_POLICY,
    Fused,
    FusedGroup,
    HorizontalMode,
    HorizontalResult,
    Member,
    Policy,
)
from branchfold.patterns.onnx_ops import OnnxContext, recognize
from branchfold.rewriter.affine import Conv, Dense, Diagonal, Refusal, bias_if_any, compose_maps


@dataclass(frozen=True)
class _Site:
    """A member in the graph: its first node (reading the shared value) and the node giving its output."""

    first: ir.Node
    last: ir.Node


class HorizontalFusionPass(ir.passes.InPlacePass):
    """Fuses N ≥ 2 MatMul/Gemm (or Convs of identical geometry) reading one value into one op + Split.

    ``mode``: ``"auto"`` (where ``patterns.horizontal.pays`` under ``ONNX_POLICY``: measured not to pay on
    onnxruntime CPU, so nothing by default), ``"on"`` or ``"off"``. Shape inference
    runs first unless ``infer_shapes=False``. The last result is on ``self.result``.
    """

    def __init__(
        self, mode: HorizontalMode = "auto", policy: Policy = ONNX_POLICY, infer_shapes: bool = True
    ) -> None:
        super().__init__()
        self.mode = horizontal.check_mode(mode)
        self.policy = policy
        self.infer_shapes = infer_shapes
        self.result = HorizontalResult()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.result = HorizontalResult()
        if self.mode == "off":
            return ir.passes.PassResult(model, False)
        if self.infer_shapes:
            common.ShapeInferencePass(strict_mode=False)(model)
        graph = model.graph
        before = Liveness(graph)
        ctx = OnnxContext(graph)
        writer = _Writer(graph, _opset(model))
        for (source, _), members in _candidates(ctx, graph).items():
            members = horizontal.without_parallel_sums(members, _output, _users, _summed)
            for group in horizontal.groups(members):
                fused = horizontal.concat(group)
                go = self.mode == "on" or horizontal.pays(fused, self.policy)
                self.result.groups.append(
                    FusedGroup(
                        source.name or "", [m.key.first.name or m.key.first.op_type for m in group], fused.sizes,
                        "dense" if isinstance(fused.map, Dense) else "conv", go,
                        "" if go else "auto policy: measured not to pay for this size",
                    )
                )  # fmt: skip
                if go:
                    writer.write(source, group, fused)
        modified = bool(self.result.fused)
        if modified:
            before.sweep(graph)
            common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified)


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13)))


def _candidates(ctx: OnnxContext, graph: ir.Graph) -> dict[tuple, list[Member]]:
    """Members by the (value, dtype) they read, in graph order; a MatMul takes its bias Add along."""
    found: dict[tuple, list[Member]] = {}
    shared = _shared_reads(graph)
    for node in graph:
        if not shared.intersection(_reads(node)):
            continue  # no sibling: its weight is not read (a folded one would be computed whole)
        op = recognize(ctx, node)
        if op.kind != "affine" or op.split or not isinstance(op.map, (Dense, Conv)):
            continue
        (x,) = op.inputs
        if ctx.is_const(x):
            continue
        m, last = op.map, node
        out = node.outputs[0]
        if node.op_type == "MatMul" and len(out.uses()) == 1 and not out.is_graph_output():
            user = next(iter(out.uses())).node
            after = recognize(ctx, user)
            if after.kind == "affine" and isinstance(after.map, Diagonal) and after.inputs[0] is out:
                with contextlib.suppress(Refusal):  # a MatMul whose Add does not compose stays alone
                    m, last = compose_maps(after.map, m), user
        has_bias = bias_if_any(m) is not None
        found.setdefault((x, out.dtype), []).append(Member(_Site(node, last), m, has_bias))
    return found


_LINEAR_OPS = ("MatMul", "Gemm", "Conv")


def _reads(node: ir.Node) -> tuple[ir.Value, ...]:
    """The values a MatMul/Gemm/Conv may be recognized as reading: its first input, and for a Conv, the
    input of a Pad in front of it (which the recognizer folds into the Conv's own padding)."""
    if node.op_type not in _LINEAR_OPS or node.domain not in ("", "ai.onnx") or not node.inputs or node.inputs[0] is None:
        return ()
    x = node.inputs[0]
    pad = x.producer()
    if node.op_type == "Conv" and pad is not None and pad.op_type == "Pad" and pad.inputs and pad.inputs[0] is not None:
        return (x, pad.inputs[0])
    return (x,)


def _shared_reads(graph: ir.Graph) -> set[ir.Value]:
    """Values that two or more MatMul/Gemm/Conv nodes may read: the only places a group can form."""
    count: dict[ir.Value, int] = {}
    for node in graph:
        for v in _reads(node):
            count[v] = count.get(v, 0) + 1
    return {v for v, n in count.items() if n >= 2}


_GRAPH_OUTPUT = "graph output"  # a consumer that is not a sum


def _output(m: Member) -> ir.Value:
    return m.key.last.outputs[0]


def _users(v: ir.Value) -> list:
    found: list = [use.node for use in v.uses()]
    return found + [_GRAPH_OUTPUT] if v.is_graph_output() else found


def _summed(node) -> tuple[tuple[ir.Value, ...], ir.Value] | None:
    if not isinstance(node, ir.Node) or node.domain not in ("", "ai.onnx"):
        return None  # a graph output
    if node.op_type not in ("Add", "Sub"):
        return None
    if len(node.inputs) != 2 or any(v is None for v in node.inputs):
        return None
    return tuple(node.inputs), node.outputs[0]  # type: ignore[return-value]


class _Writer:
    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph, self.opset = graph, opset
        self.emitter = Emitter(graph)

    def write(self, source: ir.Value, group: Sequence[Member], fused: Fused) -> None:
        order = {n: i for i, n in enumerate(self.graph)}
        sites: list[_Site] = [m.key for m in group]
        first = min((s.first for s in sites), key=order.__getitem__)
        olds = [s.last.outputs[0] for s in sites]
        e = self.emitter
        wide = e.write(fused.map, source, olds[0])
        wide.shape = _wide_shape(olds, fused)
        sizes = e.initializer(torch.tensor(fused.sizes, dtype=torch.int64), ir.DataType.INT64, "split")
        axis = ir.AttrInt64("axis", fused.axis)
        if self.opset >= 13:
            split = ir.Node("", "Split", [wide, sizes], [axis], num_outputs=len(olds))
        else:
            split = ir.Node("", "Split", [wide], [axis, ir.AttrInt64s("split", list(fused.sizes))], num_outputs=len(olds))
        e.add(split)
        for new, old in zip(split.outputs, olds):
            new.name = e.fresh("split")
            new.dtype, new.shape = old.dtype, old.shape
        e.insert_before(first)
        for new, old in zip(split.outputs, olds):
            e.replace(old, new)


def _wide_shape(olds: Sequence[ir.Value], fused: Fused) -> ir.Shape | None:
    shape = olds[0].shape
    if shape is None or len(shape) < -fused.axis:
        return None
    dims = list(shape)
    dims[fused.axis] = sum(fused.sizes)
    return ir.Shape(dims)
