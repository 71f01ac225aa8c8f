"""FX nodes of all three torch dialects → the walk's neutral ``Op``.

symbolic_trace writes ``call_module`` to nn.Linear & co, dynamo writes functional calls
(``torch._C._nn.linear``, ``torch.conv2d``, ``F.batch_norm``) with weights as placeholders, and
torch.export writes ATen overloads. Each target is bound to its argument names here; the op's
meaning is decided once in ``canonical``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from branchfold import compat
from branchfold.patterns import canonical
from branchfold.patterns.fx_alias import alias_class, written
from branchfold.rewriter.affine import Refusal
from branchfold.rewriter.region import Op

aten = torch.ops.aten

# Pure ops that turn a constant into another constant (export writes ``t(weight)`` before addmm).
_CONST_FUNCS = {
    aten.t.default, aten.permute.default, aten.transpose.int, aten.view.default, aten.reshape.default,
    aten.unsqueeze.default, aten.squeeze.dim, aten.detach.default, aten.clone.default,
    aten._to_copy.default, aten.lift_fresh_copy.default, aten.alias.default, aten.expand.default,
    aten.numpy_T.default,
    torch.t, torch.transpose, torch.permute, torch.reshape, torch.unsqueeze, torch.squeeze,
}  # fmt: skip
_CONST_ATTRS = {"T", "mT"}
_CONST_METHODS = {"t", "transpose", "permute", "view", "reshape", "unsqueeze", "squeeze", "detach",
                  "clone", "contiguous", "to", "float", "half", "bfloat16", "expand"}  # fmt: skip

# Queries that read only a tensor's shape (symbolic_trace writes them for ``b, n, c = x.shape``).
_META_ATTRS = {"shape", "ndim", "device", "dtype"}
_META_METHODS = {"size", "dim"}

_IDENTITY_FUNCS = {aten.clone.default, aten.alias.default, aten.detach.default, torch.clone,
                   aten.contiguous.default}  # fmt: skip
_IDENTITY_METHODS = {"contiguous", "clone", "detach"}
# Casts: the identity where the recorded dtype and device of the result are those of the input (PEFT
# writes ``result.to(previous_dtype)`` after every adapter sum; export keeps it as ``aten.to.dtype``).
_CAST_FUNCS = {aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten._to_copy.default, torch.Tensor.to,
               torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as}  # fmt: skip
_CAST_METHODS = {"to", "float", "half", "bfloat16", "double", "type_as"}
_DEQUANTIZE = {aten.dequantize.self, torch.dequantize}
_DEQUANTIZE_METHODS = {"dequantize"}
_DEQUANTIZE_REACH = 32  # ops read upstream of a computed weight to find its dequantization


@dataclass
class FxContext:
    """What a recognizer may ask about the graph: constants, shapes, submodules."""

    gm: fx.GraphModule
    constants: Mapping[str, torch.Tensor] = field(default_factory=dict)  # placeholder name -> tensor
    _cache: dict[fx.Node, torch.Tensor | None] = field(default_factory=dict)
    _writes: set[fx.Node] | None = None

    def const(self, a: Any) -> torch.Tensor | None:
        """The constant tensor an argument stands for, or None if it is computed from inputs."""
        if not isinstance(a, fx.Node):
            return None
        if a in self._cache:
            return self._cache[a]
        self._cache[a] = value = self._const(a)
        return value

    def _const(self, n: fx.Node) -> torch.Tensor | None:
        if n.op in ("get_attr", "placeholder") and n in self._written():
            return None  # written in place by the graph itself (``self.s.mul_(...)`` in forward): not a constant
        if n.op == "get_attr":
            value = _get_attr(self.gm, n.target)
            return value if isinstance(value, torch.Tensor) else None
        if n.op == "placeholder":
            return self.constants.get(n.name)
        if n.op not in ("call_function", "call_method"):
            return None
        if self.dequantizes(n):
            return None  # a quantized weight stays as stored: see ``canonical.quantized``
        if n.target is getattr and len(n.args) == 2 and n.args[1] in _CONST_ATTRS:  # ``weight.T`` (PEFT)
            base = self.const(n.args[0])
            return None if base is None else getattr(base, n.args[1])
        pure = n.target in _CONST_FUNCS if n.op == "call_function" else n.target in _CONST_METHODS
        if not pure:
            return None
        if any(self.const(m) is None for m in n.all_input_nodes):
            return None
        args = fx.node.map_arg(n.args, self.const)
        kwargs = fx.node.map_arg(n.kwargs, self.const)
        with torch.no_grad():
            if n.op == "call_function":
                return n.target(*args, **kwargs)
            return getattr(args[0], n.target)(*args[1:], **kwargs)

    def dequantized(self, a: Any) -> bool:
        """Whether the weight ``a`` is computed from a quantized weight that the graph dequantizes (an int8
        matrix cast to float, then scaled): weight-only, but not ours to turn into a stored float weight.
        Only the few ops next to the weight are read (an unpacking and a dequantization are short)."""
        stack, seen = [a], set()
        while stack and len(seen) < _DEQUANTIZE_REACH:
            n = stack.pop()
            if not isinstance(n, fx.Node) or n in seen or n.op not in ("call_function", "call_method"):
                continue
            seen.add(n)
            if self.dequantizes(n):
                return True
            stack.extend(n.all_input_nodes)
        return False

    def dequantizes(self, n: fx.Node) -> bool:
        """``n`` casts a stored integer (or quantized) matrix to floating point (``canonical.dequantizes``)."""
        return dequantizes(n, self.const)

    def _written(self) -> set[fx.Node]:
        """Stored tensors and inputs that some op of the graph writes (or writes a view of)."""
        if self._writes is None:
            self._writes = set()
            for node in self.gm.graph.nodes:
                for t in written(node, self.gm):
                    self._writes |= {m for m in alias_class(t, self.gm) if m.op in ("get_attr", "placeholder")}
        return self._writes

    def module(self, n: fx.Node) -> nn.Module:
        return self.gm.get_submodule(n.target)


def dequantizes(n: fx.Node, const: Callable[[fx.Node], torch.Tensor | None]) -> bool:
    """``n`` casts a stored integer (or quantized) matrix to floating point (``canonical.dequantizes``);
    ``const`` gives the constant value of ``n``'s input (None where it is computed from inputs)."""
    casts = _CAST_FUNCS | _DEQUANTIZE if n.op == "call_function" else _CAST_METHODS | _DEQUANTIZE_METHODS
    x = n.args[0] if n.args else None
    if n.op not in ("call_function", "call_method") or n.target not in casts or not isinstance(x, fx.Node):
        return False
    recorded = dtype_of(x)
    if recorded is not None and (recorded.is_floating_point or recorded == torch.bool):
        return False  # known without computing the input
    source = const(x)
    if not isinstance(source, torch.Tensor) or source.is_floating_point() or source.dtype == torch.bool:
        return False
    after = dtype_of(n)
    to_float = after.is_floating_point if after is not None else _names_a_float(n)
    bits = None if source.is_quantized else source.element_size() * 8
    return canonical.dequantizes(bits, source.is_quantized, to_float, tuple(source.shape))


def _names_a_float(n: fx.Node) -> bool:
    """Where no dtype was recorded: a cast that names a floating dtype, or the dtype of another tensor."""
    if n.op == "call_method" and n.target in ("float", "half", "bfloat16", "double"):
        return True
    if n.target in _DEQUANTIZE or n.target in _DEQUANTIZE_METHODS:
        return True
    args = (*n.args[1:], *n.kwargs.values())
    return any((isinstance(a, torch.dtype) and a.is_floating_point) or _dtype_query(a) for a in args)


def _get_attr(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def shape_of(n: Any) -> tuple[int | None, ...] | None:
    """The static shape recorded on a node by export, dynamo or ShapeProp (None where unknown)."""
    if not isinstance(n, fx.Node):
        return None
    val = n.meta.get("val", n.meta.get("example_value"))
    shape = getattr(val, "shape", None)
    if shape is None and "tensor_meta" in n.meta:
        shape = getattr(n.meta["tensor_meta"], "shape", None)
    if shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in shape)


def symbolic_shape(n: Any) -> tuple[int | str, ...] | None:
    """The recorded shape with each free dim as its size expression (``s0``, ``2*s0``): two free dims
    are the same size only where export proved them so, and it then writes the same expression."""
    if not isinstance(n, fx.Node):
        return None
    val = n.meta.get("val", n.meta.get("example_value"))
    shape = getattr(val, "shape", None)
    if shape is None:
        return shape_of(n)
    return tuple(str(d.node.expr) if isinstance(d, torch.SymInt) else int(d) for d in shape)


def dtype_of(n: Any) -> torch.dtype | None:
    if not isinstance(n, fx.Node):
        return None
    val = n.meta.get("val", n.meta.get("example_value"))
    if isinstance(val, torch.Tensor):
        return val.dtype
    tm = n.meta.get("tensor_meta")
    return getattr(tm, "dtype", None)


def _rank(n: Any) -> int | None:
    s = shape_of(n)
    return len(s) if s is not None else None


def _channels(n: Any, axis: int = 1) -> int | None:
    s = shape_of(n)
    return s[axis] if s is not None and len(s) > axis else None


def _bind(node: fx.Node, names: tuple[str, ...], defaults: Mapping[str, Any] = {}) -> dict[str, Any]:
    args = node.args[1:] if node.op == "call_method" else node.args
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(node.kwargs)
    if node.op == "call_method":
        bound[names[0]] = node.args[0]
    return bound


# ----------------------------------------------------------------------------------------------
# one recognizer per op family; each returns (input node, map-builder) or raises Refusal


def _need(ctx: FxContext, a: Any, what: str, optional: bool = False) -> torch.Tensor | None:
    """A constant operand (a node, or a module's own tensor), or Refusal if it is computed."""
    if a is None and optional:
        return None
    t = a if isinstance(a, torch.Tensor) else ctx.const(a)
    if t is None and ctx.dequantized(a):
        raise canonical.quantized(what)
    if t is None:
        raise Refusal("non-constant", f"{what} is computed at run time, not a constant")
    return t


def _linear(ctx, node, names):
    b = _bind(node, names)
    w = _need(ctx, b["weight"], "linear weight")
    return b["input"], canonical.linear(w, _need(ctx, b.get("bias"), "linear bias", optional=True))


def _addmm(ctx, node, names):
    b = _bind(node, ("bias", "input", "weight_t"), {"beta": 1, "alpha": 1})
    if b["beta"] != 1 or b["alpha"] != 1:
        raise Refusal("geometry", "addmm with alpha/beta other than 1")
    w = _need(ctx, b["weight_t"], "matmul weight")
    return b["input"], canonical.linear(w.t(), _need(ctx, b["bias"], "addmm bias"))


def _matmul(ctx, node, names):
    b = _bind(node, ("input", "other"))
    w = ctx.const(b["other"])
    if w is None or ctx.const(b["input"]) is not None:
        return None
    if w.dim() != 2 or (_rank(b["input"]) or 0) < 1:
        raise Refusal("shape", "matmul with a constant that is not a matrix")
    return b["input"], canonical.linear(w.t())


def _conv(ctx, node, names):
    b = _bind(node, names, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False})
    transposed = bool(b.get("transposed") or any(b.get("output_padding") or ()))
    w = _need(ctx, b["weight"], "conv weight")
    return b["input"], canonical.conv(
        w, _need(ctx, b.get("bias"), "conv bias", True), b["stride"], b["padding"], b["dilation"], b["groups"],
        transposed=transposed,
    )  # fmt: skip


def _batch_norm(ctx, node, names):
    b = _bind(node, names, {"weight": None, "bias": None, "training": False, "eps": 1e-5})
    if b["training"]:  # before the constants: batch statistics make them irrelevant
        return b["input"], canonical.batch_norm(None, None, None, None, b["eps"], None, training=True)
    get = lambda k, what: _need(ctx, b.get(k), what, optional=True)  # noqa: E731
    return b["input"], canonical.batch_norm(
        get("running_mean", "BatchNorm mean"), get("running_var", "BatchNorm variance"),
        get("weight", "BatchNorm weight"), get("bias", "BatchNorm bias"), b["eps"], _rank(b["input"]),
    )  # fmt: skip


def _avg_pool(ctx, node, names):
    b = _bind(node, names, {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True,
                            "divisor_override": None})  # fmt: skip
    nd = int(str(node.target).split("avg_pool")[1][0])
    return b["input"], canonical.avg_pool(
        b["kernel_size"], b["stride"], b["padding"], _channels(b["input"]), nd,
        b["ceil_mode"], b["count_include_pad"], b["divisor_override"],
    )  # fmt: skip


def _dropout(ctx, node, names):
    b = _bind(node, names, {"training": True})
    if b["training"]:
        raise Refusal("training-mode", "Dropout in training mode is not the identity")
    return b["input"], canonical.channel_constant(1.0, None)


def _embedding(ctx, node, names):
    b = _bind(node, names, {"max_norm": None})
    return b["input"], canonical.lookup(_need(ctx, b["weight"], "embedding table"), b["max_norm"])


def _identity(ctx, node, names):
    return node.args[0], canonical.channel_constant(1.0, None)


_LINEAR = ("input", "weight", "bias")
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_ATEN_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed",
                     "output_padding", "groups")  # fmt: skip
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_T_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_POOL = ("input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
_F_DROPOUT = ("input", "p", "training")
_F_EMBEDDING = ("input", "weight", "padding_idx", "max_norm")
_ATEN_EMBEDDING = ("weight", "input", "padding_idx", "scale_grad_by_freq", "sparse")

UNARY: dict[Any, tuple[Callable, tuple[str, ...], str]] = {
    F.linear: (_linear, _LINEAR, "linear"),
    compat.NN_BINDINGS.linear: (_linear, _LINEAR, "linear"),
    aten.linear.default: (_linear, _LINEAR, "linear"),
    aten.addmm.default: (_addmm, (), "linear"),
    aten.mm.default: (_matmul, (), "linear"),
    aten.matmul.default: (_matmul, (), "linear"),
    torch.matmul: (_matmul, (), "linear"),
    operator.matmul: (_matmul, (), "linear"),
    F.batch_norm: (_batch_norm, _F_BN, "batch_norm"),
    torch.batch_norm: (_batch_norm, _T_BN, "batch_norm"),
    aten.batch_norm.default: (_batch_norm, _T_BN, "batch_norm"),
    aten._native_batch_norm_legit_no_training.default: (
        _batch_norm, ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps"), "batch_norm",
    ),  # fmt: skip
    F.dropout: (_dropout, _F_DROPOUT, "dropout"),
    torch.dropout: (_dropout, _F_DROPOUT, "dropout"),
    aten.dropout.default: (_dropout, _F_DROPOUT, "dropout"),
    F.embedding: (_embedding, _F_EMBEDDING, "embedding"),
    torch.embedding: (_embedding, _ATEN_EMBEDDING, "embedding"),
    aten.embedding.default: (_embedding, _ATEN_EMBEDDING, "embedding"),
    **{f: (_identity, (), "identity") for f in _IDENTITY_FUNCS},
}
for _nd in (1, 2, 3):
    for _f in (getattr(F, f"conv{_nd}d"), getattr(torch, f"conv{_nd}d"), getattr(aten, f"conv{_nd}d").default):
        UNARY[_f] = (_conv, _CONV, "conv")
    for _f in (getattr(F, f"avg_pool{_nd}d"), getattr(aten, f"avg_pool{_nd}d").default):
        UNARY[_f] = (_avg_pool, _POOL, "avg_pool")
    if hasattr(compat.NN_BINDINGS, f"avg_pool{_nd}d"):
        UNARY[getattr(compat.NN_BINDINGS, f"avg_pool{_nd}d")] = (_avg_pool, _POOL, "avg_pool")
UNARY[aten.convolution.default] = (_conv, _ATEN_CONVOLUTION, "conv")
UNARY[torch.avg_pool1d] = (_avg_pool, _POOL, "avg_pool")

_QUANTIZED_MODULES = ("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.nn.quantized")

_LAYER_NORM = {F.layer_norm, aten.layer_norm.default, aten.native_layer_norm.default}  # native: a tuple

# Out-of-place forms only: an in-place op (``+=``, ``add_``, ``aten.add_.Tensor``) also writes its input, which
# a fold would not; ``passes.fx_inplace`` rewrites the ones that are provably private into these forms.
ADD = {operator.add, torch.add, aten.add.Tensor, aten.add.Scalar, "add"}
SUB = {operator.sub, torch.sub, aten.sub.Tensor, aten.sub.Scalar, "sub"}
MUL = {operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar, "mul"}
DIV = {operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar, "div", "truediv"}
NEG = {operator.neg, torch.neg, aten.neg.default, "neg"}


# ----------------------------------------------------------------------------------------------


def recognize(ctx: FxContext, node: fx.Node) -> Op:
    """The neutral op for one FX node; anything unrecognized or refused is opaque."""
    inputs = tuple(node.all_input_nodes)
    opaque = Op(node, "opaque", inputs, node, label=_label(ctx, node))
    if _computes_a_number(node):
        return opaque  # size arithmetic (``x.size(0) * 4``) looks like a scale but is not a tensor op
    try:
        op = _recognize(ctx, node)
    except Refusal as r:
        opaque.refusal = r
        return opaque
    return op or opaque


_NUMBERS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _computes_a_number(node: fx.Node) -> bool:
    """True where the recorded metadata says the node computes a number (size arithmetic), not a tensor."""
    val = node.meta.get("val", node.meta.get("example_value"))
    if val is not None:
        return isinstance(val, _NUMBERS)
    recorded = node.meta.get("type")  # ShapeProp records the result's type for every node
    return recorded is not None and issubclass(recorded, _NUMBERS)


def _label(ctx: FxContext, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(ctx.module(node)).__name__
    return getattr(node.target, "__name__", str(node.target))


def _recognize(ctx: FxContext, node: fx.Node) -> Op | None:
    if node.op == "call_module":
        return _recognize_module(ctx, node)
    if node.op not in ("call_function", "call_method"):
        return None
    t = node.target
    if _is_meta(node):
        return Op(node, "meta", (node.args[0],), node, label="shape")
    if node.op == "call_function" and t in UNARY:
        fn, names, label = UNARY[t]
        got = fn(ctx, node, names)
        if got is None:
            return None
        x, m = got
        return Op(node, "affine", (x,), node, m, label=label)
    if node.op == "call_method" and t in _IDENTITY_METHODS:
        return Op(node, "affine", (node.args[0],), node, canonical.channel_constant(1.0, None), label="identity")
    if t in (_CAST_FUNCS if node.op == "call_function" else _CAST_METHODS) and _same_dtype_and_device(node):
        return Op(node, "affine", (node.args[0],), node, canonical.channel_constant(1.0, None), label="cast")
    if t in _LAYER_NORM:
        b = _bind(node, ("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None})
        return _layer_norm(ctx, node, b["input"], b["normalized_shape"], b["weight"], b["bias"])
    if t in ADD or t in SUB:
        return _add_sub(ctx, node, "sub" if t in SUB else "add")
    if t in MUL or t in DIV:
        return _mul_div(ctx, node, div=t in DIV)
    if t in NEG:
        x = node.args[0]
        return Op(node, "affine", (x,), node, canonical.channel_constant(-1.0, shape_of(x)), label="neg")
    return None


def _same_dtype_and_device(node: fx.Node) -> bool:
    """A cast that changes nothing: its input and result are recorded with the same dtype and device."""
    x = node.args[0] if node.args else None
    if not isinstance(x, fx.Node):
        return False
    before, after = dtype_of(x), dtype_of(node)
    if before is None or before != after:
        return False
    devices = _device_of(x), _device_of(node)
    if None not in devices:
        return devices[0] == devices[1]
    # ShapeProp records no device: only a cast whose arguments name nothing but a dtype is known to keep it
    rest = (*node.args[1:], *(v for k, v in node.kwargs.items() if k not in ("device", "other", "layout")))
    allowed = (torch.dtype, torch.memory_format, bool, type(None))
    if node.kwargs.get("layout") not in (None, torch.strided):
        return False
    names_a_dtype = all(isinstance(a, allowed) or _dtype_query(a) for a in rest)
    return names_a_dtype and not {"device", "other"} & set(node.kwargs)


def _dtype_query(a: Any) -> bool:
    """``t.dtype`` as symbolic_trace records it (``x.to(self.lora_A.weight.dtype)``)."""
    return isinstance(a, fx.Node) and a.op == "call_function" and a.target is getattr and a.args[1:] == ("dtype",)


def _device_of(n: fx.Node) -> tuple[torch.device, torch.layout] | None:
    """Where the recorded value lives, and its layout (a cast to a sparse layout is no identity)."""
    val = n.meta.get("val", n.meta.get("example_value"))
    return (val.device, val.layout) if isinstance(val, torch.Tensor) else None


def proven_assert(node: fx.Node) -> bool:
    """Export's ``_assert_tensor_metadata(x, dtype=, device=, layout=)`` (written before every ``.to``)
    where the recorded metadata of ``x`` already says the same: a check that cannot fail, so it neither
    reads ``x`` for the walk nor keeps ``x`` computed once a region absorbs it."""
    if node.op != "call_function" or node.target is not aten._assert_tensor_metadata.default:
        return False
    x = node.args[0] if node.args else None
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return False
    want = {"dtype": val.dtype, "device": val.device, "layout": val.layout}
    names = ("size", "stride", "dtype", "device", "layout")
    given = dict(zip(names, node.args[1:]), **node.kwargs)
    if given.get("size") is not None or given.get("stride") is not None:
        return False
    return all(given.get(k) in (None, v) for k, v in want.items())


def _is_meta(node: fx.Node) -> bool:
    if not node.args or not isinstance(node.args[0], fx.Node) or len(node.all_input_nodes) != 1:
        return False
    if node.op == "call_function":
        return node.target is getattr and len(node.args) == 2 and node.args[1] in _META_ATTRS
    return node.op == "call_method" and node.target in _META_METHODS


def _operands(node: fx.Node) -> tuple[Any, Any, dict]:
    a = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return a, b, dict(node.kwargs)


def _const_operand(ctx: FxContext, v: Any) -> torch.Tensor | float | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, fx.Node):
        return ctx.const(v)
    return None


def _add_sub(ctx: FxContext, node: fx.Node, kind: str) -> Op | None:
    a, b, kw = _operands(node)
    alpha = kw.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    if "out" in kw:
        raise Refusal("unsupported-args", f"{kind} with out= writes a given tensor")
    if alpha != 1:
        raise Refusal("unsupported-args", f"{kind} with alpha={alpha}")
    ca, cb = _const_operand(ctx, a), _const_operand(ctx, b)
    if ca is None and cb is None:
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            return None
        if shape_of(a) is not None and symbolic_shape(a) != symbolic_shape(b):
            raise Refusal("broadcast", f"sum of values of shapes {symbolic_shape(a)} and {symbolic_shape(b)}")
        return Op(node, kind, (a, b), node, label=kind)
    if ca is not None and cb is not None:
        return None
    x, c = (a, cb) if cb is not None else (b, ca)
    if not isinstance(x, fx.Node):
        return None
    m = canonical.arithmetic_constant(kind, c, shape_of(x), constant_first=cb is None)
    return Op(node, "affine", (x,), node, m, label="shift")


def _mul_div(ctx: FxContext, node: fx.Node, div: bool) -> Op | None:
    a, b, kw = _operands(node)
    if "rounding_mode" in kw and kw["rounding_mode"] is not None:
        return None
    if "out" in kw:
        raise Refusal("unsupported-args", f"{'div' if div else 'mul'} with out= writes a given tensor")
    ca, cb = _const_operand(ctx, a), _const_operand(ctx, b)
    if (ca is None) == (cb is None):
        return None
    x, c = (a, cb) if cb is not None else (b, ca)
    if not isinstance(x, fx.Node):
        return None
    m = canonical.arithmetic_constant("div" if div else "mul", c, shape_of(x), constant_first=cb is None)
    return None if m is None else Op(node, "affine", (x,), node, m, label="scale")


def _layer_norm(ctx, node, x, normalized_shape, weight, bias) -> Op | None:
    w = _need(ctx, weight, "LayerNorm weight", optional=True)
    bb = _need(ctx, bias, "LayerNorm bias", optional=True)
    m = canonical.layer_norm_affine(normalized_shape, w, bb)
    if m is None:
        return None
    return Op(node, "affine", (x,), node, m, split=True, label="layer_norm")


def _recognize_module(ctx: FxContext, node: fx.Node) -> Op | None:
    mod = ctx.module(node)
    x = node.args[0] if node.args else None
    label = type(mod).__name__
    if type(mod).__module__.startswith(_QUANTIZED_MODULES):
        raise canonical.quantized(f"{label}'s weight")  # torch.ao's quantized Linear / Conv: opaque kernels

    def affine(m):
        return Op(node, "affine", (x,), node, m, label=label)

    if isinstance(mod, nn.Linear):
        return affine(canonical.linear(mod.weight, mod.bias))
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return affine(canonical.conv(mod.weight, mod.bias, mod.stride, mod.padding, mod.dilation, mod.groups,
                                     mod.padding_mode))  # fmt: skip
    if isinstance(mod, compat.BatchNormBase):
        return affine(canonical.batch_norm(mod.running_mean, mod.running_var, mod.weight, mod.bias, mod.eps,
                                           _rank(x), training=mod.training))  # fmt: skip
    if isinstance(mod, nn.LayerNorm):
        if not mod.elementwise_affine:
            return None
        return _layer_norm(ctx, node, x, mod.normalized_shape, mod.weight, mod.bias)
    if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
        nd = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}[type(mod)]
        return affine(canonical.avg_pool(mod.kernel_size, mod.stride, mod.padding, _channels(x), nd,
                                         mod.ceil_mode, mod.count_include_pad,
                                         getattr(mod, "divisor_override", None)))  # fmt: skip
    if isinstance(mod, compat.DropoutBase):
        if mod.training and mod.p > 0:
            raise Refusal("training-mode", f"{label} in training mode is not the identity")
        return affine(canonical.channel_constant(1.0, None))
    if isinstance(mod, nn.Identity):
        return affine(canonical.channel_constant(1.0, None))
    if isinstance(mod, nn.Embedding):
        return affine(canonical.lookup(mod.weight, mod.max_norm))
    return None
