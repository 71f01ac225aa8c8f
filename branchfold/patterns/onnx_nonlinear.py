"""Decomposed nonlinearities in ONNX graphs, which the region walk must treat as one opaque op each.

Exporters write GELU, SiLU, Mish, hard-swish, LayerNorm and RMSNorm (and the scale of attention) as
chains of Div/Mul/Add/Erf/Tanh/Pow/ReduceMean nodes when the opset has no single op for them, and
runtimes (onnxruntime's optimizer and its transformer optimizer, OpenVINO) fuse those chains back into
``Gelu``/``BiasGelu``/``FastGelu``/``LayerNormalization``/``SimplifiedLayerNormalization``/``FusedMatMul``.
A constant ``Div``/``Mul``/``Add`` inside such a chain looks like a per-channel affine map, and folding it
into a neighbouring MatMul or Conv is exact, but the runtime then no longer recognizes the chain and the
"smaller" model runs slower. So every node of a recognized chain is kept as it is, and a norm keeps its γ
and β: they are part of what the runtime fuses.

Matching is by structure and by value, never by node names: element-wise activations are recognized by
evaluating the chain numerically (float64, on sample points) as a function of its input and comparing it
with the formula (which checks √2, 0.5, 0.044715, √(2/π), 3, 6 ... whatever order and operand order the
exporter chose); norms are matched structurally (mean and variance over the last axis, ε, a square root
or reciprocal, an optional Cast) with γ and β per channel of the last axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F


class ConstantReader(Protocol):
    """What the matchers read of a graph: ``patterns.onnx_ops.OnnxContext`` provides it (a protocol here,
    so that this module does not import the recognizer that imports it)."""

    graph: ir.Graph

    def const(self, v: ir.Value | None) -> np.ndarray | None: ...

    def is_const(self, v: ir.Value | None) -> bool: ...

    def dims(self, v: ir.Value | None) -> tuple[int | str | None, ...] | None: ...


_DOMAINS = ("", "ai.onnx")
_FLOAT_CASTS = {int(t) for t in (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)}


@dataclass(frozen=True)
class Nonlinearity:
    """One decomposed nonlinearity: its kind, its nodes (kept as they are), its input and output."""

    kind: str  # gelu, gelu_tanh, silu, quick_gelu, swish, mish, hardswish, hardsigmoid, layer_norm, ...
    nodes: tuple[ir.Node, ...]
    input: ir.Value
    output: ir.Value

    @property
    def label(self) -> str:
        return f"{self.kind} (decomposed)"


def find_nonlinearities(ctx: ConstantReader) -> list[Nonlinearity]:
    """Every decomposed nonlinearity of ``ctx.graph`` (main graph only), each node in at most one."""
    found: list[Nonlinearity] = []
    taken: set[ir.Node] = set()
    for node in ctx.graph:
        if node.domain not in _DOMAINS:
            continue
        matcher = _ANCHORS.get(node.op_type)
        got = matcher(ctx, node) if matcher is not None else None
        if got is not None and not taken.intersection(got.nodes):
            found.append(got)
            taken.update(got.nodes)
    return found


def protected_nodes(ctx: ConstantReader) -> dict[ir.Node, Nonlinearity]:
    """Node → the nonlinearity it belongs to, for the recognizers to make those nodes opaque."""
    return {n: nl for nl in find_nonlinearities(ctx) for n in nl.nodes}


# ----------------------------------------------------------------------------------------------
# small graph helpers


def _is(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in _DOMAINS and node.op_type in op_types


def _producer(v: ir.Value | None) -> ir.Node | None:
    return None if v is None else v.producer()


def _sole_consumer(v: ir.Value) -> ir.Node | None:
    """The one node reading ``v`` (None if several nodes read it or it is a graph output)."""
    users = list(v.consumers())
    return users[0] if len(users) == 1 and not v.is_graph_output() else None


def _scalar(ctx: ConstantReader, v: ir.Value | None) -> float | None:
    c = ctx.const(v)
    if c is None or c.size != 1 or not np.issubdtype(c.dtype, np.number):
        return None
    return float(c.reshape(-1)[0])


def _other(node: ir.Node, v: ir.Value) -> ir.Value | None:
    """The operand of a binary node that is not ``v`` (``v`` itself for ``v * v``)."""
    a, b = node.inputs[0], node.inputs[1]
    return b if a is v else a if b is v else None


def _uncast(v: ir.Value) -> ir.Value:
    """The value under float-to-float Casts (Llama's RMSNorm computes in float32 and casts back)."""
    while _is(v.producer(), "Cast") and int(v.producer().attributes.get_int("to", 0)) in _FLOAT_CASTS:
        v = v.producer().inputs[0]
    return v


def _attr_ints(node: ir.Node, name: str) -> list[int] | None:
    a = node.attributes.get(name)
    return None if a is None else [int(i) for i in a.value]


# ----------------------------------------------------------------------------------------------
# element-wise activations, checked numerically

_SAMPLES = torch.cat([torch.linspace(-6.0, 6.0, 61, dtype=torch.float64), torch.tensor([-0.3, 0.01, 0.7, 2.5])])
_BACK_STEPS = 6  # how far before an anchor (Erf, Tanh, ...) the activation's input may be
_FORWARD_STEPS = 4  # how far after it its output may be
_SQRT2, _TANH_K = math.sqrt(2.0), math.sqrt(2.0 / math.pi)

# the activations an anchor can be part of, as functions of their input
_ACTIVATIONS: dict[str, dict[str, Callable[[torch.Tensor], torch.Tensor]]] = {
    "Erf": {"gelu": lambda x: 0.5 * x * (1 + torch.erf(x / _SQRT2))},
    "Tanh": {
        "gelu_tanh": lambda x: 0.5 * x * (1 + torch.tanh(_TANH_K * (x + 0.044715 * x**3))),
        "mish": lambda x: x * torch.tanh(F.softplus(x)),
    },
    "Clip": {
        "hardswish": lambda x: x * torch.clamp(x + 3, 0, 6) / 6,
        "hardsigmoid": lambda x: torch.clamp(x + 3, 0, 6) / 6,
    },
}
_ACTIVATIONS["HardSigmoid"] = _ACTIVATIONS["Clip"]
# constants stored in 16 bits carry 3–4 significant digits (√(2/π) in bfloat16 is 0.797)
_TOLERANCE = {ir.DataType.FLOAT16: 2e-3, ir.DataType.BFLOAT16: 1e-2}


def _clip(node: ir.Node, args: list) -> torch.Tensor:
    x = args[0]
    lo = args[1] if len(args) > 1 and args[1] is not None else node.attributes.get_float("min", -math.inf)
    hi = args[2] if len(args) > 2 and args[2] is not None else node.attributes.get_float("max", math.inf)
    return torch.clamp(x, float(lo), float(hi))


def _hard_sigmoid(node: ir.Node, args: list) -> torch.Tensor:
    alpha, beta = node.attributes.get_float("alpha", 0.2), node.attributes.get_float("beta", 0.5)
    return torch.clamp(alpha * args[0] + beta, 0, 1)


def _cast(node: ir.Node, args: list) -> torch.Tensor:
    if int(node.attributes.get_int("to", 0)) not in _FLOAT_CASTS:
        raise _NoMatch
    return args[0]


_ELEMENTWISE: dict[str, Callable[[ir.Node, list], torch.Tensor]] = {
    "Add": lambda n, a: a[0] + a[1],
    "Sub": lambda n, a: a[0] - a[1],
    "Mul": lambda n, a: a[0] * a[1],
    "Div": lambda n, a: a[0] / a[1],
    "Pow": lambda n, a: torch.pow(a[0], a[1]),
    "Neg": lambda n, a: -a[0],
    "Erf": lambda n, a: torch.erf(a[0]),
    "Tanh": lambda n, a: torch.tanh(a[0]),
    "Sigmoid": lambda n, a: torch.sigmoid(a[0]),
    "Softplus": lambda n, a: F.softplus(a[0]),
    "Exp": lambda n, a: torch.exp(a[0]),
    "Log": lambda n, a: torch.log(a[0]),
    "Sqrt": lambda n, a: torch.sqrt(a[0]),
    "Reciprocal": lambda n, a: 1 / a[0],
    "Relu": lambda n, a: torch.relu(a[0]),
    "Clip": _clip,
    "HardSigmoid": _hard_sigmoid,
    "Identity": lambda n, a: a[0],
    "Cast": _cast,
}


class _NoMatch(Exception):
    """The chain is not a function of the chosen input alone (or has an op we do not evaluate)."""


class _Evaluator:
    """Evaluates values as element-wise functions of one value ``x`` on ``_SAMPLES``; records the
    nodes it went through (those are the activation's nodes)."""

    def __init__(self, ctx: ConstantReader, x: ir.Value) -> None:
        self.ctx, self.x = ctx, x
        self.memo: dict[ir.Value, torch.Tensor] = {x: _SAMPLES}
        self.nodes: dict[ir.Node, None] = {}

    def __call__(self, v: ir.Value | None, depth: int = 0) -> torch.Tensor | None:
        if v is None:
            return None  # an omitted optional input (Clip without min)
        if v in self.memo:
            return self.memo[v]
        c = _scalar(self.ctx, v)
        if c is not None:
            return torch.tensor(c, dtype=torch.float64)
        node = v.producer()
        if depth > _BACK_STEPS + _FORWARD_STEPS or not _is(node, *_ELEMENTWISE) or len(node.outputs) != 1:
            raise _NoMatch
        args = [self(i, depth + 1) for i in node.inputs]
        if args and args[0] is None:
            raise _NoMatch
        out = _ELEMENTWISE[node.op_type](node, args)
        self.memo[v] = out
        self.nodes[node] = None
        return out


def _close(got: torch.Tensor, want: torch.Tensor, tol: float) -> bool:
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=tol, atol=tol))


def _swish_kind(inner: torch.Tensor, tol: float) -> str | None:
    """``x·σ(βx)``: SiLU (β = 1), QuickGELU (β = 1.702), or another swish; None if not ``βx``."""
    beta = float(inner[-1] / _SAMPLES[-1])
    if beta <= 0 or not _close(inner, beta * _SAMPLES, tol):
        return None
    return "silu" if abs(beta - 1) <= tol else "quick_gelu" if abs(beta - 1.702) <= 2 * tol else "swish"


def _candidate_inputs(ctx: ConstantReader, anchor: ir.Node) -> list[ir.Value]:
    """Values an activation around ``anchor`` may start from: the anchor's input and the values before
    it through element-wise ops, nearest first."""
    found: dict[ir.Value, None] = {}
    frontier = [v for v in anchor.inputs[:1] if v is not None]
    for _ in range(_BACK_STEPS):
        nxt: list[ir.Value] = []
        for v in frontier:
            if v in found or ctx.is_const(v):
                continue
            found[v] = None
            p = v.producer()
            if _is(p, *_ELEMENTWISE):
                nxt += [i for i in p.inputs if i is not None]
        frontier = nxt
    return list(found)


def _activation(ctx: ConstantReader, anchor: ir.Node) -> Nonlinearity | None:
    """The activation around a transcendental/clip node: the longest chain after ``anchor`` that equals
    a known activation of one value before it."""
    for x in _candidate_inputs(ctx, anchor):
        ev = _Evaluator(ctx, x)
        try:
            inner = ev(anchor.inputs[0])
        except _NoMatch:
            continue
        if inner is None or inner.shape != _SAMPLES.shape:
            continue
        best: tuple[str, ir.Value, tuple[ir.Node, ...]] | None = None
        cur = anchor.outputs[0]
        for _ in range(_FORWARD_STEPS):
            nxt = _sole_consumer(cur)
            if not _is(nxt, *_ELEMENTWISE) or len(nxt.outputs) != 1:
                break
            cur = nxt.outputs[0]
            try:
                got = ev(cur)
            except _NoMatch:
                break
            kind = _which(anchor, inner, got, _TOLERANCE.get(x.dtype, 1e-5))
            if kind is not None:
                best = (kind, cur, tuple(ev.nodes))
        if best is not None:
            kind, out, nodes = best
            return Nonlinearity(kind, nodes, x, out)
    return None


def _which(anchor: ir.Node, inner: torch.Tensor, got: torch.Tensor, tol: float) -> str | None:
    """The activation ``got`` (the chain up to some node after ``anchor``) computes, if any."""
    if anchor.op_type == "Sigmoid":
        return _swish_kind(inner, tol) if _close(got, _SAMPLES * torch.sigmoid(inner), tol) else None
    for kind, f in _ACTIVATIONS[anchor.op_type].items():
        if _close(got, f(_SAMPLES), tol):
            return kind
    return None


# ----------------------------------------------------------------------------------------------
# LayerNorm and RMSNorm


def _reduces_last_axis(ctx: ConstantReader, node: ir.Node) -> bool:
    """A ReduceMean over the last axis only, keeping it (what LayerNorm fusions require)."""
    if not _is(node, "ReduceMean") or node.attributes.get_int("keepdims", 1) != 1:
        return False
    axes = _attr_ints(node, "axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        c = ctx.const(node.inputs[1])
        axes = None if c is None else [int(a) for a in np.reshape(c, -1)]
    dims = ctx.dims(node.inputs[0])
    if axes is None or len(axes) != 1 or dims is None:
        return False
    return axes[0] % len(dims) == len(dims) - 1


def _last_axis_vector(ctx: ConstantReader, v: ir.Value, rank: int) -> bool:
    """A constant that varies along the last axis only (γ, β of a norm)."""
    c = ctx.const(v)
    return c is not None and c.ndim <= rank and all(d == 1 for d in c.shape[:-1])


def _norm(ctx: ConstantReader, var_mean: ir.Node) -> Nonlinearity | None:
    """``mean(d²) → + ε → √ → d / · (or d · 1/·) → [Cast] → · γ → + β`` with ``d = x − mean(x)``
    (LayerNorm) or ``d = x`` (RMSNorm), each over the last axis."""
    if not _reduces_last_axis(ctx, var_mean):
        return None
    square = var_mean.inputs[0].producer()
    pow_2 = _is(square, "Pow") and _scalar(ctx, square.inputs[1]) == 2.0
    if not (pow_2 or (_is(square, "Mul") and square.inputs[0] is square.inputs[1])):
        return None
    d = square.inputs[0]
    nodes: list[ir.Node] = [square, var_mean]
    kind, x = "rms_norm", _uncast(d)
    sub = _uncast(d).producer()
    if _is(sub, "Sub") and _reduces_last_axis(ctx, sub.inputs[1].producer()):
        mean = sub.inputs[1].producer()
        if _uncast(mean.inputs[0]) is _uncast(sub.inputs[0]):
            kind, x = "layer_norm", sub.inputs[0]
            nodes += [mean, sub]
    rank = len(ctx.dims(d) or ())
    cur = var_mean.outputs[0]
    add = _sole_consumer(cur)
    eps = _scalar(ctx, _other(add, cur)) if _is(add, "Add") else None
    if eps is None or not 0 < eps < 1e-2:
        return None  # no ε: not a form runtimes fuse (folding its γ, β then only helps)
    nodes.append(add)
    normalized = _normalize(ctx, add.outputs[0], d, nodes)
    if normalized is None:
        return None
    cur = normalized
    while _is(_sole_consumer(cur), "Cast") and _uncast(_sole_consumer(cur).outputs[0]) is _uncast(cur):
        nodes.append(_sole_consumer(cur))
        cur = nodes[-1].outputs[0]
    for op_type in ("Mul", "Add") if kind == "layer_norm" else ("Mul",):
        nxt = _sole_consumer(cur)
        if not _is(nxt, op_type) or not _last_axis_vector(ctx, _other(nxt, cur), rank):
            break
        nodes.append(nxt)
        cur = nxt.outputs[0]
    return Nonlinearity(kind, tuple(nodes), x, cur)


def _normalize(ctx: ConstantReader, var_eps: ir.Value, d: ir.Value, nodes: list[ir.Node]) -> ir.Value | None:
    """``d / √v``, ``d · (1/√v)`` or ``d · v^-0.5``: the normalized value, appending the nodes."""
    step = _sole_consumer(var_eps)
    if _is(step, "Pow") and _scalar(ctx, step.inputs[1]) == -0.5:
        inv, taken = step.outputs[0], [step]
    elif _is(step, "Sqrt"):
        root = step.outputs[0]
        nxt = _sole_consumer(root)
        if _is(nxt, "Div") and nxt.inputs[1] is root and _uncast(nxt.inputs[0]) is _uncast(d):
            nodes += [step, nxt]
            return nxt.outputs[0]
        if _is(nxt, "Reciprocal") or (_is(nxt, "Div") and nxt.inputs[1] is root and _scalar(ctx, nxt.inputs[0]) == 1.0):
            inv, taken = nxt.outputs[0], [step, nxt]
        else:
            return None
    else:
        return None
    mul = _sole_consumer(inv)
    if not _is(mul, "Mul") or _uncast(_other(mul, inv) or inv) is not _uncast(d):
        return None
    nodes += [*taken, mul]
    return mul.outputs[0]


# ----------------------------------------------------------------------------------------------
# the scale of attention scores


def _is_scale(ctx: ConstantReader, node: ir.Node | None) -> ir.Value | None:
    """A Mul/Div of a value by a scalar (constant, or computed from shapes): the scaled value."""
    if not _is(node, "Mul", "Div"):
        return None
    for data, factor in ((node.inputs[0], node.inputs[1]), (node.inputs[1], node.inputs[0])):
        if node.op_type == "Div" and data is not node.inputs[0]:
            continue
        if ctx.is_const(data):
            continue
        dims = ctx.dims(factor)
        if _scalar(ctx, factor) is not None or (dims is not None and all(d == 1 for d in dims)):
            return data
    return None


def _attention_scale(ctx: ConstantReader, softmax: ir.Node) -> Nonlinearity | None:
    """``MatMul(q, kᵀ) → scale → [+ mask] → Softmax``, or q and kᵀ each scaled before the MatMul
    (the dynamo exporter's form): the scale Muls/Divs and constant mask Adds, which runtimes fuse
    into the attention (``FusedMatMul`` alpha, ``Attention``)."""
    nodes: list[ir.Node] = []
    v = softmax.inputs[0]
    matmul = None
    for _ in range(6):
        node = v.producer()
        if _is(node, "MatMul") and all(not ctx.is_const(i) for i in node.inputs):
            matmul = node
            break
        scaled = _is_scale(ctx, node)
        if scaled is not None:
            nodes.append(node)
            v = scaled
        elif _is(node, "Add", "Where", "Cast"):
            data = [i for i in node.inputs[1 if node.op_type == "Where" else 0 :] if not ctx.is_const(i)]
            if len(data) == 1 and node.op_type == "Add":
                nodes.append(node)  # a constant mask
            if not data:
                return None
            v = next((i for i in data if _reaches_matmul(ctx, i)), data[0])
        else:
            return None
    if matmul is None:
        return None
    for operand in matmul.inputs:
        if _is_scale(ctx, operand.producer()) is not None:
            nodes.append(operand.producer())
    if not any(_is(n, "Mul", "Div") for n in nodes):
        return None
    return Nonlinearity("attention_scale", tuple(nodes), matmul.inputs[0], softmax.inputs[0])


def _reaches_matmul(ctx: ConstantReader, v: ir.Value, steps: int = 4) -> bool:
    for _ in range(steps):
        node = v.producer()
        if _is(node, "MatMul"):
            return True
        if node is None or not node.inputs:
            return False
        v = next((i for i in node.inputs if i is not None and not ctx.is_const(i)), None)
        if v is None:
            return False
    return False


_ANCHORS: dict[str, Callable[[ConstantReader, ir.Node], Nonlinearity | None]] = {
    **{op: _activation for op in ("Erf", "Tanh", "Sigmoid", "Clip", "HardSigmoid")},
    "ReduceMean": _norm,
    "Softmax": _attention_scale,
}
