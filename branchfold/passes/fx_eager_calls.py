"""Calls ATen ops of an exported graph through torch's own Python bindings, for eager speed.

``torch.ops.aten.conv2d.default(...)`` goes through ``OpOverload.__call__`` and the JIT's schema-driven
argument parsing; ``torch.conv2d(...)`` reaches the same ATen kernel through the generated binding. On a
small CNN run eagerly the difference is a few microseconds per op (measured ~5 µs per conv2d on this
project's CPU box), several percent of the model, and the one thing that kept a folded model slower than
the same network written by hand. The rewrite is exact: the binding dispatches to the same ATen operator
with the same arguments. Only nodes whose arguments the binding takes unchanged are rewritten: positional
arguments in schema order and keyword arguments that the schema marks keyword-only (same names in both).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from branchfold import compat

_BINDINGS = (compat.VARIABLE_FUNCTIONS, compat.NN_BINDINGS)


def binding_for(overload: compat.OpOverload) -> Callable | None:
    """torch's Python binding of an ``aten`` overload, or None where there is none."""
    if overload.namespace != "aten":
        return None
    name = compat.schema(overload).name.split("::")[-1]
    if name.startswith("_"):
        return None  # private and dunder bindings (``__and__``) have no importable name for FX's codegen
    for namespace in _BINDINGS:
        fn = getattr(namespace, name, None)
        if fn is not None:
            return fn
    return None


# ATen ops bound only as Tensor methods. A list, not a lookup by name: some methods share a name with a
# different ATen op (``Tensor.index`` is not ``aten.index.Tensor``).
_METHODS = {"view", "expand", "view_as", "expand_as", "unfold", "contiguous"}


def _method_for(overload: compat.OpOverload) -> str | None:
    """The Tensor method of an ``aten`` view op that has no function binding (``view``, ``expand``)."""
    name = compat.schema(overload).name.split("::")[-1]
    return name if overload.namespace == "aten" and name in _METHODS else None


class EagerCallsPass(PassBase):
    """Rewrites ``torch.ops.aten.X.overload`` call nodes to ``torch.X`` (or ``torch._C._nn.X``, or the
    Tensor method ``X`` where only a method binds it)."""

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        changed = 0
        for node in graph_module.graph.nodes:
            if node.op != "call_function" or not compat.is_overload(node.target):
                continue
            if not _same_arguments(node):
                continue
            fn = binding_for(node.target)
            method = _method_for(node.target)
            if fn is not None:
                node.target = fn
            elif method is not None:  # ``aten.view.default(x, size)`` is ``x.view(size)``
                node.op, node.target = "call_method", method
            else:
                continue
            changed += 1
        if changed:
            graph_module.recompile()
        return PassResult(graph_module, bool(changed))


def _same_arguments(node: fx.Node) -> bool:
    schema = compat.schema(node.target)
    if schema.is_mutable:
        return False  # in-place ops keep their exact overload
    keyword_only = {a.name for a in schema.arguments if a.kwarg_only}
    positional = [a for a in schema.arguments if not a.kwarg_only]
    return len(node.args) <= len(positional) and set(node.kwargs) <= keyword_only
