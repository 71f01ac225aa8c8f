"""ONNX nodes → the walk's neutral ``Op``.

Each recognizer reads a node's constant operands and attributes and calls one ``canonical``
constructor, so the meaning of a fold is decided once for every dialect. What is ONNX-specific lives
here: constants that come from initializers, ``Constant`` nodes or Transpose/Reshape/... of constants;
Gemm's ``alpha``/``beta``/``transA``/``transB``; BatchNormalization's training mode and extra outputs;
``auto_pad``; a zero ``Pad`` in front of a Conv; broadcast checks on shapes with symbolic dims.

Nodes of a decomposed nonlinearity that runtimes fuse (GELU, LayerNorm, RMSNorm, ..., found once per graph
by ``onnx_nonlinear``) are opaque, with the nonlinearity as their label: their constants stay where they are.

``OnnxContext`` is meant to be reused by other ONNX rewrites (horizontal fusion): it answers "is this
value a constant, and which stored tensors does it come from" and "what is this value's shape".
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from branchfold.patterns import canonical
from branchfold.patterns.onnx_nonlinear import Nonlinearity, protected_nodes
from branchfold.rewriter.affine import Refusal
from branchfold.rewriter.region import Op
from branchfold.storage.onnx_folded import FoldedTensor
from branchfold.storage.onnx_weights import drop_pages

ONNX_DOMAINS = ("", "ai.onnx")

Dim = int | str | None  # a static size, a symbolic dim's name, or unknown
FLOAT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}
INDEX_TYPES = {ir.DataType.INT32, ir.DataType.INT64}
QUANTIZED_OPS = {"QLinearMatMul", "QLinearConv", "MatMulInteger", "ConvInteger"}


def _attr(node: ir.Node, name: str, default=None):
    a = node.attributes.get(name)
    return default if a is None else a.value


def _to_numpy(t: ir.TensorProtocol) -> np.ndarray:
    """The stored values as they are: no float64 copy (``canonical`` converts what a fold reads, when it
    reads it), a view of the memory-mapped file for external data. bfloat16 (numpy has no such type)
    becomes float32, which holds it exactly."""
    arr = np.asarray(t.numpy())
    if t.dtype == ir.DataType.BFLOAT16:
        return arr.astype(np.float32)
    return arr


def _folded(v: ir.Value | None) -> FoldedTensor | None:
    """The weight a fold wrote that initializer ``v`` holds (a constant, as any initializer not listed
    among the graph inputs), if it holds one."""
    if v is None or not v.is_initializer() or v.is_graph_input():
        return None
    return v.const_value if isinstance(v.const_value, FoldedTensor) else None


def _dequantizes(source: np.ndarray, to_float: bool) -> bool:
    """A cast of a stored integer matrix to floating point: a quantized weight (``canonical.dequantizes``)."""
    integer = np.issubdtype(source.dtype, np.integer)
    return integer and canonical.dequantizes(source.dtype.itemsize * 8, False, to_float, source.shape)


def _cast(node: ir.Node, args: list[np.ndarray]) -> np.ndarray | None:
    """``Cast`` to a float type rounds to that type (float32 → float16 loses bits: fold what it stores). A
    quantized weight's dequantization is not computed: it stays as stored."""
    to = _attr(node, "to")
    if to not in {int(t) for t in FLOAT_TYPES}:
        return None
    if _dequantizes(np.asarray(args[0]), True):
        raise TypeError("a quantized weight's dequantization")
    target = ir.DataType(to)
    if target == ir.DataType.BFLOAT16:
        return np.asarray(args[0], dtype=np.float32).astype(target.numpy()).astype(np.float32)
    return np.asarray(args[0]).astype(target.numpy())


def _constant_attr(node: ir.Node) -> np.ndarray | None:
    for name, conv in (("value", None), ("value_float", np.float64), ("value_floats", np.float64),
                       ("value_int", np.int64), ("value_ints", np.int64)):  # fmt: skip
        a = node.attributes.get(name)
        if a is None:
            continue
        if conv is None:
            return _to_numpy(a.value)
        return np.asarray(a.value, dtype=conv)
    return None  # sparse_value, strings: not something we fold


def _reshape(data: np.ndarray, shape: np.ndarray, allowzero: int) -> np.ndarray:
    dims = [int(d) for d in shape]
    if not allowzero:
        dims = [data.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return data.reshape(dims)


def _axes(node: ir.Node, args: list[np.ndarray]) -> list[int] | None:
    if len(args) > 1:
        return [int(a) for a in args[1]]
    a = _attr(node, "axes")
    return [int(i) for i in a] if a is not None else None


def _unsqueeze(node, args):
    out = args[0]
    rank = out.ndim + len(_axes(node, args) or [])
    for ax in sorted(a % rank for a in _axes(node, args) or []):
        out = np.expand_dims(out, ax)
    return out


def _squeeze(node, args):
    axes = _axes(node, args)
    return np.squeeze(args[0], axis=tuple(axes) if axes is not None else None)


MAX_COMPUTED = 1 << 24  # elements a weight-only value computed at fold time may hold


def _computed(value: np.ndarray) -> np.ndarray:
    if value.size > MAX_COMPUTED:
        raise ValueError("weight-only value too large to compute at fold time")
    return value


def _float_math(fn: Callable[..., np.ndarray]) -> Callable[[ir.Node, list[np.ndarray]], np.ndarray]:
    """Weight-only float arithmetic (DoRA's ``magnitude / ‖W + s·B·A‖``, which the legacy exporter leaves
    unfolded), in the operands' dtype. Integer arithmetic is shape computation: never evaluated here."""

    def evaluate(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
        if not all(np.issubdtype(np.asarray(a).dtype, np.floating) for a in args):
            raise TypeError("integer arithmetic")
        out = np.asarray(fn(*args))
        return _computed(out.astype(np.result_type(*args), copy=False))

    return evaluate


def _constant_of_shape(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    value = _attr(node, "value")
    fill = _to_numpy(value).reshape(()) if value is not None else np.zeros((), np.float32)
    dims = [int(d) for d in args[0]]
    if int(np.prod(dims)) > MAX_COMPUTED:
        raise ValueError("too large")
    return np.full(dims, fill, dtype=fill.dtype)


def _eye_like(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    rows, cols = args[0].shape
    dtype = _attr(node, "dtype")
    dtype = ir.DataType(dtype).numpy() if dtype is not None else args[0].dtype
    return _computed(np.eye(rows, cols, k=int(_attr(node, "k", 0)), dtype=dtype))


def _reduce_l2(node: ir.Node, args: list[np.ndarray]) -> np.ndarray:
    axes = _axes(node, args)
    if axes is None and _attr(node, "noop_with_empty_axes", 0):
        return args[0]
    x = args[0]
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError("integer reduction")
    keep = bool(_attr(node, "keepdims", 1))
    out = np.sqrt(np.sum(np.square(x), axis=None if axes is None else tuple(axes), keepdims=keep))
    return out.astype(x.dtype)


# Pure ops evaluated on constants (numpy, in the constants' own dtype). The reshaping ops are exact in any
# dtype; the float arithmetic computes weight-only values once, as the graph would on every call.
_CONST_OPS: dict[str, Callable[[ir.Node, list[np.ndarray]], np.ndarray]] = {
    "ConstantOfShape": _constant_of_shape,
    "EyeLike": _eye_like,
    "MatMul": _float_math(np.matmul),
    "Add": _float_math(np.add),
    "Sub": _float_math(np.subtract),
    "Mul": _float_math(np.multiply),
    "Div": _float_math(np.divide),
    "Sqrt": _float_math(np.sqrt),
    "ReduceL2": _reduce_l2,
    "Identity": lambda n, a: a[0],
    "Transpose": lambda n, a: np.transpose(a[0], _attr(n, "perm")),
    "Reshape": lambda n, a: _reshape(a[0], a[1], _attr(n, "allowzero", 0)),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": lambda n, a: a[0].reshape(int(np.prod(a[0].shape[: _attr(n, "axis", 1)])), -1),
    "Cast": _cast,
    "Neg": lambda n, a: -a[0],
}


@dataclass
class OnnxContext:
    """What a recognizer may ask about the graph: constants (and where they are stored), shapes."""

    graph: ir.Graph
    _cache: dict[ir.Value, tuple[np.ndarray | None, frozenset[str]]] = field(default_factory=dict)
    _protected: dict[ir.Node, Nonlinearity] | None = field(default=None, repr=False)
    reported: set[Nonlinearity] = field(default_factory=set, repr=False)
    _mapped: list[ir.ExternalTensor] = field(default_factory=list, repr=False)

    def release_pages(self) -> None:
        """Drop from this process the file pages of the memory-mapped weights read so far (clean pages:
        read again from the page cache if needed), so that a fold holds one region's weights at a time."""
        drop_pages(self._mapped)

    def page_release(self) -> Callable[[], None]:
        """``release_pages`` for later, of the weights mapped so far (once a weight computed from them is
        written: a ``FoldedTensor`` reads them again then)."""
        return functools.partial(drop_pages, tuple(self._mapped))

    def nonlinearity(self, node: ir.Node) -> Nonlinearity | None:
        """The decomposed nonlinearity (GELU, LayerNorm, ...) ``node`` belongs to, found once per graph."""
        if self._protected is None:
            self._protected = protected_nodes(self)
        return self._protected.get(node)

    def const(self, v: ir.Value | None) -> np.ndarray | None:
        """The constant a value stands for (in its stored dtype, possibly a read-only view of the
        file), or None if computed from inputs."""
        return self._lookup(v)[0]

    def const_tensor(self, v: ir.Value | None) -> torch.Tensor | None:
        """The constant as a torch tensor sharing its memory (read-only views included: nothing here
        writes to it, and ``canonical`` copies what a fold reads into fresh float64 tensors)."""
        c = self.const(v)
        if c is None:
            return None
        if c.dtype.byteorder == ">" or any(stride < 0 for stride in c.strides):
            c = np.ascontiguousarray(c, dtype=c.dtype.newbyteorder("="))  # torch takes neither
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable"
            return torch.from_numpy(c)  # a transposed view stays a view: no copy of the weight

    def is_const(self, v: ir.Value | None) -> bool:
        """Whether ``const(v)`` is a constant, found without computing a weight a fold wrote (a
        ``FoldedTensor`` is computed only where a recognizer reads it as a weight)."""
        if _folded(v) is not None and v not in self._cache:
            return True
        return self.const(v) is not None

    def stored(self, v: ir.Value | None) -> frozenset[str]:
        """Names of the initializers a constant value is computed from (for the shared-weight check)."""
        return self._lookup(v)[1]

    def _lookup(self, v):
        if v is None:
            return None, frozenset()
        if v not in self._cache:
            self._cache[v] = self._evaluate(v)
        return self._cache[v]

    def _evaluate(self, v: ir.Value) -> tuple[np.ndarray | None, frozenset[str]]:
        if v.is_graph_input():
            return None, frozenset()  # an initializer listed as an input can be overridden at run time
        if v.is_initializer() or (v.producer() is None and v.const_value is not None):
            if v.const_value is None:
                return None, frozenset()
            if isinstance(v.const_value, ir.ExternalTensor):
                self._mapped.append(v.const_value)
            return _to_numpy(v.const_value), frozenset({f"init:{v.name}"})
        node = v.producer()
        if node is None or node.domain not in ONNX_DOMAINS or len(node.outputs) != 1:
            return None, frozenset()
        if node.op_type == "Constant":
            return _constant_attr(node), frozenset({f"node:{id(node)}"})
        fn = _CONST_OPS.get(node.op_type)
        if fn is None:
            return None, frozenset()
        looked = [self._lookup(i) for i in node.inputs if i is not None]
        if not looked or any(c is None for c, _ in looked):
            return None, frozenset()
        try:
            value = fn(node, [c for c, _ in looked])
        except (ValueError, TypeError, IndexError):
            return None, frozenset()
        return value, frozenset().union(*(s for _, s in looked))

    def dequantized(self, v: ir.Value | None) -> bool:
        """Whether ``v`` is computed from constants through a dequantization (``DequantizeLinear``, or a
        ``Cast`` of a stored integer matrix to float), with only constant arithmetic after it."""
        stack, seen = [v], set()
        while stack:
            value = stack.pop()
            node = value.producer() if value is not None else None
            if node is None or node in seen or node.domain not in ONNX_DOMAINS:
                continue
            seen.add(node)
            if node.op_type == "DequantizeLinear":
                return True
            source = self.const(node.inputs[0]) if node.op_type == "Cast" and node.inputs else None
            to_float = _attr(node, "to") in {int(t) for t in FLOAT_TYPES}
            if source is not None and _dequantizes(np.asarray(source), to_float):
                return True
            if node.op_type in _CONST_OPS:
                stack.extend(i for i in node.inputs if i is not None)
        return False

    def dims(self, v: ir.Value | None) -> tuple[Dim, ...] | None:
        """The value's shape: ints, symbolic names, or None per unknown dim; None if rank is unknown."""
        if v is None:
            return None
        folded = _folded(v)
        if folded is not None:
            return tuple(folded.shape.numpy())
        c = self.const(v)
        if c is not None:
            return tuple(c.shape)
        if v.shape is None:
            return None
        out: list[Dim] = []
        for d in v.shape:
            if isinstance(d, int):
                out.append(d)
            else:
                out.append(getattr(d, "value", None))
        return tuple(out)


def shape_of(ctx: OnnxContext, v: ir.Value | None) -> tuple[int | None, ...] | None:
    """Static shape with None for dynamic dims (the form ``canonical`` checks take)."""
    d = ctx.dims(v)
    return None if d is None else tuple(x if isinstance(x, int) else None for x in d)


def is_float(v: ir.Value | None) -> bool:
    return v is not None and v.dtype in FLOAT_TYPES


# ----------------------------------------------------------------------------------------------
# recognizers: each returns (input value, map) or None (opaque), or raises Refusal


def _need(ctx: OnnxContext, v: ir.Value | None, what: str, optional: bool = False) -> torch.Tensor | None:
    if v is None and optional:
        return None
    t = ctx.const_tensor(v)
    if t is None and ctx.dequantized(v):
        raise canonical.quantized(what)
    if t is None:
        raise Refusal("non-constant", f"{what} is computed at run time, not a constant")
    return t


def _input(node: ir.Node, i: int) -> ir.Value | None:
    return node.inputs[i] if len(node.inputs) > i else None


def _matmul(ctx, node):
    x, w = node.inputs[0], node.inputs[1]
    cw = ctx.const_tensor(w)
    if cw is None and not ctx.is_const(x) and ctx.dequantized(w):
        raise canonical.quantized("MatMul weight")
    if cw is None or ctx.is_const(x):
        return None
    if cw.dim() != 2:
        raise Refusal("shape", f"MatMul with a constant of rank {cw.dim()}")
    if (shape_of(ctx, x) or (None,))[-1] not in (None, cw.shape[0]) or len(shape_of(ctx, x) or (0, 0)) < 1:
        raise Refusal("shape", "MatMul operand does not match its constant")
    return x, canonical.linear(cw.t())


def _gemm(ctx, node):
    a, b, c = node.inputs[0], node.inputs[1], _input(node, 2)
    alpha, beta = float(_attr(node, "alpha", 1.0)), float(_attr(node, "beta", 1.0))
    if _attr(node, "transA", 0):
        raise Refusal("geometry", "Gemm with transA (the data operand is transposed)")
    w = _need(ctx, b, "Gemm weight")
    w = w if _attr(node, "transB", 0) else w.t()  # [out, in]
    bias = _need(ctx, c, "Gemm bias", optional=True)
    if bias is not None:
        n_out = w.shape[0]
        if bias.dim() > 2 or (bias.dim() == 2 and bias.shape[0] != 1) or bias.numel() not in (1, n_out):
            raise Refusal("broadcast", f"Gemm bias of shape {tuple(bias.shape)} is not per output feature")
        bias = beta * bias.double().reshape(-1).expand(n_out)
    return a, canonical.linear(w if alpha == 1.0 else alpha * w.double(), bias)


def _pads(node: ir.Node, nd: int, x_shape, kernel, strides, dilations) -> list[tuple[int, int]]:
    auto = _attr(node, "auto_pad", "NOTSET")
    if auto in ("NOTSET", "", None):
        p = list(_attr(node, "pads", [0] * 2 * nd))
        return [(int(p[i]), int(p[i + nd])) for i in range(nd)]
    if auto == "VALID":
        return [(0, 0)] * nd
    spatial = (x_shape or ())[2:] if x_shape else ()
    pads = []
    for i in range(nd):
        size = spatial[i] if len(spatial) == nd else None
        if strides[i] == 1:
            total = dilations[i] * (kernel[i] - 1)
        elif isinstance(size, int):
            total = max((-(-size // strides[i]) - 1) * strides[i] + dilations[i] * (kernel[i] - 1) + 1 - size, 0)
        else:
            raise Refusal("shape", f"{auto} with stride {strides[i]} on a dynamic spatial size")
        small, big = total // 2, total - total // 2
        pads.append((small, big) if auto == "SAME_UPPER" else (big, small))
    return pads


def _conv(ctx, node):
    x, w = node.inputs[0], node.inputs[1]
    weight = _need(ctx, w, "Conv weight")
    nd = weight.dim() - 2
    strides = [int(s) for s in _attr(node, "strides", [1] * nd)]
    dilations = [int(d) for d in _attr(node, "dilations", [1] * nd)]
    pads = _pads(node, nd, shape_of(ctx, x), weight.shape[2:], strides, dilations)
    mode = "zeros"
    pad_node = x.producer()
    if pad_node is not None and _foldable_pad(ctx, pad_node, nd) is not None and len(x.uses()) == 1:
        extra, mode = _foldable_pad(ctx, pad_node, nd)
        if mode != "zeros" and any(p for pair in pads for p in pair):
            mode = "mixed"
        if mode != "mixed":
            pads = [(lo + a, hi + b) for (lo, hi), (a, b) in zip(pads, extra)]
            x = pad_node.inputs[0]
    if mode == "mixed":
        x = node.inputs[0]
        mode = "zeros"
    bias = _need(ctx, _input(node, 2), "Conv bias", optional=True)
    return x, canonical.conv(weight, bias, strides, pads, dilations, int(_attr(node, "group", 1)), mode)


_PAD_MODES = {"constant": "zeros", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _foldable_pad(ctx: OnnxContext, node: ir.Node, nd: int) -> tuple[list[tuple[int, int]], str] | None:
    """A Pad that only pads the spatial dims by non-negative amounts, as (per-dim pads, torch mode)."""
    if node.op_type != "Pad" or node.domain not in ONNX_DOMAINS or node.outputs[0].is_graph_output():
        return None
    mode = _PAD_MODES.get(_attr(node, "mode", "constant"))
    pads = ctx.const(_input(node, 1))
    rank = len(shape_of(ctx, node.inputs[0]) or ())
    if mode is None or pads is None or rank != nd + 2:
        return None
    value = _input(node, 2)
    if value is not None and (not ctx.is_const(value) or np.any(ctx.const(value) != 0)):
        return None
    axes_v = _input(node, 3)
    axes = [int(a) % rank for a in ctx.const(axes_v)] if axes_v is not None else list(range(rank))
    if axes_v is not None and not ctx.is_const(axes_v):
        return None
    per_axis = {ax: (int(pads[i]), int(pads[i + len(axes)])) for i, ax in enumerate(axes)}
    if any(per_axis.get(a, (0, 0)) != (0, 0) for a in (0, 1)):
        return None
    extra = [per_axis.get(a, (0, 0)) for a in range(2, rank)]
    if any(p < 0 for pair in extra for p in pair):
        return None
    return extra, mode


def _batch_norm(ctx, node):
    x = node.inputs[0]
    if _attr(node, "training_mode", 0) or any(o.name and o.uses() for o in node.outputs[1:]):
        return x, canonical.batch_norm(None, None, None, None, 0.0, None, training=True)
    shape = shape_of(ctx, x)
    get = lambda i, what: _need(ctx, _input(node, i), what)  # noqa: E731
    return x, canonical.batch_norm(
        get(3, "BatchNorm mean"), get(4, "BatchNorm variance"), get(1, "BatchNorm scale"),
        get(2, "BatchNorm bias"), float(_attr(node, "epsilon", 1e-5)), len(shape) if shape else None,
    )  # fmt: skip


def _dropout(ctx, node):
    training = _input(node, 2)
    if training is not None:
        t = ctx.const(training)
        if t is None or bool(np.any(t)):
            raise Refusal("training-mode", "Dropout in training mode is not the identity")
    if len(node.outputs) > 1 and node.outputs[1].uses():
        return None  # the mask is used: keep the node
    return node.inputs[0], canonical.channel_constant(1.0, None)


def _identity(ctx, node):
    return node.inputs[0], canonical.channel_constant(1.0, None)


def _same_type_cast(ctx, node):
    """``Cast`` to the type its input already has (PEFT's ``result.to(previous_dtype)``, exported): the identity."""
    x = node.inputs[0]
    to = _attr(node, "to", None)
    if x is None or x.dtype is None or to is None or int(to) != x.dtype.value:
        return None
    if any(ctx.nonlinearity(use.node) is not None for use in node.outputs[0].uses()):
        return None  # the cast that opens a decomposed norm is part of what runtimes fuse: kept
    return x, canonical.channel_constant(1.0, None)


def _neg(ctx, node):
    return node.inputs[0], canonical.channel_constant(-1.0, shape_of(ctx, node.inputs[0]))


def _avg_pool(ctx, node):
    x = node.inputs[0]
    kernel = [int(k) for k in _attr(node, "kernel_shape")]
    nd = len(kernel)
    strides = [int(s) for s in _attr(node, "strides", [1] * nd)]
    dilations = [int(d) for d in _attr(node, "dilations", [1] * nd)]
    if any(d != 1 for d in dilations):
        raise Refusal("geometry", "dilated average pooling")
    pads = _pads(node, nd, shape_of(ctx, x), kernel, strides, dilations)
    shape = shape_of(ctx, x)
    return x, canonical.avg_pool(
        kernel, strides, pads, shape[1] if shape and len(shape) > 1 else None, nd,
        bool(_attr(node, "ceil_mode", 0)), bool(_attr(node, "count_include_pad", 0)),
    )  # fmt: skip


UNARY: dict[str, Callable] = {
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "BatchNormalization": _batch_norm,
    "Dropout": _dropout,
    "Identity": _identity,
    "Cast": _same_type_cast,
    "Neg": _neg,
    "AveragePool": _avg_pool,
}
LABELS = {"MatMul": "linear", "Gemm": "linear", "Conv": "conv", "BatchNormalization": "batch_norm",
          "Dropout": "dropout", "Identity": "identity", "Cast": "cast", "Neg": "neg", "AveragePool": "avg_pool"}  # fmt: skip


def recognize(ctx: OnnxContext, node: ir.Node) -> Op:
    """The neutral op for one ONNX node; anything unrecognized or refused is opaque."""
    inputs = tuple(v for v in node.inputs if v is not None)
    out = node.outputs[0] if node.outputs else None
    opaque = Op(node, "opaque", inputs, out, label=node.op_type)
    if node.domain in ONNX_DOMAINS and node.op_type in QUANTIZED_OPS:
        opaque.refusal = canonical.quantized(f"{node.op_type}'s weight")  # integer kernels: left as they are
        return opaque
    if node.domain not in ONNX_DOMAINS or not node.outputs or not is_float(out):
        return opaque
    if node.op_type == "Gather":
        return _gather(ctx, node, out, opaque)
    if not all(is_float(v) for v in inputs if not ctx.is_const(v)):
        return opaque  # integer arithmetic (shape computations) is not ours to fold
    if ctx.is_const(out):
        return opaque  # a constant computed from constants: nothing to fold
    try:
        op = _recognize(ctx, node, out)
    except Refusal as r:
        opaque.refusal = r
        return opaque
    nonlinearity = ctx.nonlinearity(node)
    if nonlinearity is not None:
        return _kept_whole(ctx, nonlinearity, opaque, op)
    return op or opaque


def _gather(ctx: OnnxContext, node: ir.Node, out: ir.Value, opaque: Op) -> Op:
    """``Gather`` of rows (axis 0) of a constant 2-D float table by computed integer indices: a lookup.
    ONNX counts negative indices from the end where torch's embedding refuses them; a folded table keeps
    every row where it was, so both read the same rows."""
    table, idx = node.inputs[0], _input(node, 1)
    if int(_attr(node, "axis", 0)) != 0 or idx is None or idx.dtype not in INDEX_TYPES or ctx.is_const(idx):
        return opaque
    t = ctx.const_tensor(table)
    if t is None and ctx.dequantized(table):
        opaque.refusal = canonical.quantized("Gather table")
    if t is None or t.dim() != 2:
        return opaque  # a gather from a computed value, or of sub-tensors: not a lookup of rows
    return Op(node, "affine", (idx,), out, canonical.lookup(t), label="embedding")


def _kept_whole(ctx: OnnxContext, nl: Nonlinearity, opaque: Op, would_be: Op | None) -> Op:
    """A node of a decomposed nonlinearity is opaque: its constants are not folded into or out of it,
    so runtimes still fuse the chain (Gelu, LayerNormalization, ...). Each such chain in which
    something looked foldable is reported once."""
    opaque.label = nl.label
    if would_be is not None and would_be.kind != "opaque" and nl not in ctx.reported:
        ctx.reported.add(nl)
        opaque.refusal = Refusal("fused-pattern", f"{nl.label} kept whole: runtimes fuse it into one op")
    return opaque


def _recognize(ctx: OnnxContext, node: ir.Node, out: ir.Value) -> Op | None:
    t = node.op_type
    if t in UNARY:
        if len(node.outputs) > 1 and t != "Dropout" and any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
            if t == "BatchNormalization":
                raise Refusal("training-mode", "BatchNormalization with its batch-statistics outputs in use")
            return None
        got = UNARY[t](ctx, node)
        if got is None:
            return None
        x, m = got
        return Op(node, "affine", (x,), out, m, label=LABELS[t])
    if t == "LayerNormalization":
        return _layer_norm(ctx, node, out)
    if t in ("Add", "Sub"):
        return _add_sub(ctx, node, out, t.lower())
    if t in ("Mul", "Div"):
        return _mul_div(ctx, node, out, div=t == "Div")
    return None


def _same_shape(a: tuple[Dim, ...] | None, b: tuple[Dim, ...] | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(x == y and x is not None for x, y in zip(a, b))


def _add_sub(ctx: OnnxContext, node: ir.Node, out: ir.Value, kind: str) -> Op | None:
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = ctx.const_tensor(a), ctx.const_tensor(b)
    if ca is None and cb is None:
        if not _same_shape(ctx.dims(a), ctx.dims(b)):
            raise Refusal("broadcast", f"sum of values of shapes {ctx.dims(a)} and {ctx.dims(b)}")
        return Op(node, kind, (a, b), out, label=kind)
    if ca is not None and cb is not None:
        return None
    x, c = (a, cb) if cb is not None else (b, ca)
    m = canonical.arithmetic_constant(kind, c, shape_of(ctx, x), constant_first=cb is None)
    return Op(node, "affine", (x,), out, m, label="shift")


def _mul_div(ctx: OnnxContext, node: ir.Node, out: ir.Value, div: bool) -> Op | None:
    a, b = node.inputs[0], node.inputs[1]
    ca, cb = ctx.const_tensor(a), ctx.const_tensor(b)
    if (ca is None) == (cb is None):
        return None
    x, c = (a, cb) if cb is not None else (b, ca)
    m = canonical.arithmetic_constant("div" if div else "mul", c, shape_of(ctx, x), constant_first=cb is None)
    return None if m is None else Op(node, "affine", (x,), out, m, label="scale")


def _layer_norm(ctx: OnnxContext, node: ir.Node, out: ir.Value) -> Op | None:
    x = node.inputs[0]
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        return None  # Mean / InvStdDev are used: keep the node whole
    shape = shape_of(ctx, x)
    axis = int(_attr(node, "axis", -1))
    if shape is None or axis % len(shape) != len(shape) - 1 or not isinstance(shape[-1], int):
        return None  # normalised over several axes (or unknown): γ, β are not a last-axis map
    scale = _need(ctx, node.inputs[1], "LayerNorm scale")
    bias = _need(ctx, _input(node, 2), "LayerNorm bias", optional=True)
    m = canonical.layer_norm_affine([shape[-1]], scale.reshape(-1).expand(shape[-1]),
                                    None if bias is None else bias.reshape(-1).expand(shape[-1]))  # fmt: skip
    return Op(node, "affine", (x,), out, m, split=True, label="layer_norm")


def _is_weight(c: np.ndarray | None) -> bool:
    """A matrix or kernel: two axes longer than one (a ``[1, C]`` scale is a vector)."""
    return c is not None and sum(d > 1 for d in np.shape(c)) >= 2


def mark_shared(ctx: OnnxContext, ops: list[Op]) -> None:
    """Flag affine ops whose initializers another node reads too (``canonical.mark_shared``). Every node
    counts as a reader, except the nodes of a constant's own computation (a Transpose of a weight). Only
    weights (rank >= 2) count: exporters store equal small constants (zero biases, unit LayerNorm scales of
    a fresh model) once, and un-sharing a vector costs nothing worth a refusal."""

    def reads(op: Op) -> frozenset[str]:
        node: ir.Node = op.key
        if op.output is not None and ctx.is_const(op.output):
            return frozenset()
        return frozenset().union(*(ctx.stored(v) for v in node.inputs if v is not None and _is_weight(ctx.const(v))))

    canonical.mark_shared(ops, reads)
