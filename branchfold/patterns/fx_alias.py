"""Which FX ops write their inputs in place, and which results may share memory with an input.

A fold moves reads: a region's fused op reads its source where the region's last op stood, and a
horizontal group reads it where its first member stood. Both are exact only if no op writes that
memory in between. So the FX side needs two facts about every node, in all three dialects:

- ``written(node)``: the tensors it writes (``add_``, ``operator.iadd``, ``aten.add_.Tensor``,
  ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``, ``out=``, ``setitem``, ...);
- ``alias_parents(node)``: the inputs its result may share memory with (views, ``detach``, eval-mode
  dropout and ``nn.Identity``, which return their input, in-place ops, which return ``self``, and any
  op we cannot see into);
- ``is_random(node)``: whether it draws from the random generator (ATen's ``nondeterministic_seeded``
  tag), so that running it once is not running it on every call.

The in-place pass, the recognizers and the constant folder all read these, so they agree on what an op
writes and what it aliases.

ATen overloads answer from their schemas (alias annotations); torch functions and tensor methods are
looked up by name among the ATen schemas; modules of ``torch.nn`` are known; anything else (a user's
function or module) may alias all of its inputs. Wrongly calling a fresh result an alias only costs a
fold; the reverse would cost correctness, so every doubt answers "may alias".
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterable
from functools import cache
from typing import Any

import torch
from torch import fx, nn

from branchfold import compat

aten = torch.ops.aten

_IN_PLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                       operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
                       operator.ixor, operator.ilshift, operator.irshift, operator.setitem}  # fmt: skip
_PURE_OPERATORS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                   operator.mod, operator.pow, operator.matmul, operator.neg, operator.pos, operator.abs,
                   operator.and_, operator.or_, operator.xor, operator.invert, operator.lshift,
                   operator.rshift, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                   operator.ge}  # fmt: skip
# Return their input (or may) although their schema shows no alias: eval-mode dropout, same-dtype casts.
_MAY_RETURN_INPUT = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "type_as", "to",
                     "contiguous", "float", "double", "half", "bfloat16", "type", "cpu", "cuda"}  # fmt: skip
_ALIAS_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, compat.DropoutBase)


def _name(target: Any) -> str | None:
    """The ATen op name a torch function or tensor method stands for (None for user code)."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None)
    if module is not None and not module.startswith("torch"):
        return None
    name = getattr(target, "__name__", None)
    return name if isinstance(name, str) else None


@cache
def _schema_says(name: str) -> str:
    """What the non-``out`` overloads of ``aten.<name>`` return: "fresh", "alias" or "unknown"."""
    packet = getattr(aten, name, None) if name.isidentifier() else None
    if packet is None or not isinstance(packet, compat.OpOverloadPacket):
        return "unknown"
    kinds = set()
    for overload in packet.overloads():
        schema = compat.schema(getattr(packet, overload))
        if schema.is_mutable and overload.endswith("out"):
            continue
        kinds.add("alias" if schema.is_mutable or any(r.alias_info for r in schema.returns) else "fresh")
    return "fresh" if kinds == {"fresh"} else ("alias" if kinds else "unknown")


def _bound(node: fx.Node) -> dict[str, Any] | None:
    """A Python function's arguments by name (for ``inplace=``), or None if it has no signature."""
    try:
        return inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments
    except (TypeError, ValueError):
        return None


def written(node: fx.Node, gm: fx.GraphModule | None = None) -> tuple[fx.Node, ...]:
    """The input nodes ``node`` writes in place (empty for a pure op); a normalization in training mode
    writes its running statistics."""
    found: list[Any] = []
    for k, v in node.kwargs.items():
        if k == "out":
            found.extend(v if isinstance(v, (tuple, list)) else (v,))
    t = node.target
    if node.op == "call_function" and compat.is_overload(t):
        names = [a.name for a in compat.schema(t).arguments]
        for i, arg in enumerate(compat.schema(t).arguments):
            if arg.alias_info is not None and arg.alias_info.is_write:
                found.append(node.args[i] if i < len(node.args) else node.kwargs.get(names[i]))
    elif node.args and _writes_first_argument(node, gm):
        found.append(node.args[0])
    if _updates_statistics(node):
        found += node.all_input_nodes[1:]
    return tuple(dict.fromkeys(a for a in found if isinstance(a, fx.Node)))


def _updates_statistics(node: fx.Node) -> bool:
    """``batch_norm``/``instance_norm`` called with a ``True`` flag (training): its schema declares no write
    (the composite op updates the running statistics inside), so the flag is what tells."""
    if node.op != "call_function":
        return False
    t = node.target
    name = compat.schema(t).name.split("::")[-1] if compat.is_overload(t) else (_name(t) or "")
    if "batch_norm" not in name and "instance_norm" not in name:
        return False
    return any(a is True for a in list(node.args) + list(node.kwargs.values()))


_IN_PLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__"}


def _writes_first_argument(node: fx.Node, gm: fx.GraphModule | None) -> bool:
    """``x.add_(y)``, ``x += y``, ``torch.relu_(x)``, ``F.relu(x, inplace=True)``, ``ReLU(inplace=True)``."""
    t = node.target
    if node.op == "call_method":
        return t in _IN_PLACE_DUNDERS or (t.endswith("_") and not t.startswith("_"))
    if node.op == "call_module":
        return gm is not None and getattr(gm.get_submodule(t), "inplace", False) is True
    if node.op != "call_function":
        return False
    name = _name(t) or ""
    if t in _IN_PLACE_OPERATORS or (name.endswith("_") and not name.startswith("_")):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    if (getattr(t, "__module__", "") or "").startswith("torch.nn.functional") and len(node.args) > 1:
        bound = _bound(node)
        return bool(bound and bound.get("inplace") is True)
    return False


def alias_parents(node: fx.Node, gm: fx.GraphModule | None = None) -> tuple[fx.Node, ...]:
    """The inputs whose memory the result of ``node`` may share (empty: a fresh tensor, or not a call)."""
    if node.op not in ("call_function", "call_method", "call_module"):
        return ()
    inputs = tuple(node.all_input_nodes)
    first = (node.args[0],) if node.args and isinstance(node.args[0], fx.Node) else inputs[:1]
    wrote = written(node, gm)
    if wrote:
        return wrote
    t = node.target
    if node.op == "call_module":
        mod = gm.get_submodule(t) if gm is not None else None
        if mod is None or isinstance(mod, _ALIAS_MODULES):
            return first
        return () if type(mod).__module__.startswith("torch.nn") else inputs
    if t is operator.getitem:
        return first  # a tuple's element, or an index/slice view of a tensor
    if t in _PURE_OPERATORS:
        return ()
    if compat.is_overload(t):
        if compat.schema(t).name.split("::")[-1] in _MAY_RETURN_INPUT:
            return first
        return first if any(r.alias_info for r in compat.schema(t).returns) else ()
    name = _name(t)
    if name is None or name in _MAY_RETURN_INPUT:
        return inputs if name is None else first
    return () if _schema_says(name) == "fresh" else inputs


@cache
def _seeded(name: str) -> bool | None:
    """Whether some overload of ``aten.<name>`` is tagged ``nondeterministic_seeded`` (None: no such op)."""
    packet = getattr(aten, name, None) if name.isidentifier() else None
    if packet is None or not isinstance(packet, compat.OpOverloadPacket):
        return None
    return any(torch.Tag.nondeterministic_seeded in getattr(packet, o).tags for o in packet.overloads())


def _calls_seeded(fn: Any, depth: int = 2) -> bool:
    """A Python function (``F.dropout2d``, a user's helper) that calls a seeded op by name, looked up in
    the names its code reads (``_VF.feature_dropout``) and, ``depth`` levels down, in the functions it calls."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return False
    scope = getattr(fn, "__globals__", {})
    for word in code.co_names:
        if _seeded(word):
            return True
        inner = scope.get(word)
        if depth > 0 and callable(inner) and inner is not fn and _calls_seeded(inner, depth - 1):
            return True
    return False


def is_random(node: fx.Node) -> bool:
    """Whether ``node`` draws random numbers: from ATen's tags for an overload or a torch function or
    method of that name, else from the ops a Python function calls (a ``call_module`` is never evaluated
    at fold time, so it is not asked)."""
    t = node.target
    if node.op == "call_function" and compat.is_overload(t):
        return torch.Tag.nondeterministic_seeded in t.tags
    if node.op not in ("call_function", "call_method"):
        return False
    name = _name(t)
    if name is not None and _seeded(name):
        return True
    return node.op == "call_function" and _calls_seeded(t)


def alias_class(value: fx.Node, gm: fx.GraphModule | None = None) -> set[fx.Node]:
    """Every node that may share memory with ``value``: up to its roots, then down to all their aliases."""
    roots, stack, seen = set(), [value], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        parents = alias_parents(n, gm)
        if parents:
            stack.extend(parents)
        else:
            roots.add(n)
    members, stack = set(), list(roots)
    while stack:
        n = stack.pop()
        if n in members:
            continue
        members.add(n)
        stack.extend(u for u in n.users if n in alias_parents(u, gm))
    return members


def mutating_nodes(nodes: Iterable[fx.Node], gm: fx.GraphModule | None = None) -> list[fx.Node]:
    return [n for n in nodes if written(n, gm)]
