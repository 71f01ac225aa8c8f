"""Every private torch API the package uses, in one place.

torch keeps these internals stable in practice but promises nothing: each shim here is what a new torch
release may break, and ``tests/test_compat.py`` runs each one with a message that names it. The rest of
the package imports these names instead of reaching into ``torch._*`` (``tests/test_layering.py``
forbids private attribute access outside this module). This module imports nothing of ours.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn
from torch._guards import detect_fake_mode as _detect_fake_mode
from torch._subclasses import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw
from torch.fx.graph import CodeGen, _PyTreeCodeGen

OpOverload = torch._ops.OpOverload
OpOverloadPacket = torch._ops.OpOverloadPacket
PyTreeCodeGen = _PyTreeCodeGen
# torch's C bindings of the ATen ops (what ``torch.conv2d`` and ``F.linear`` are)
VARIABLE_FUNCTIONS = torch._C._VariableFunctions
NN_BINDINGS = torch._C._nn
# the base classes of every BatchNorm and every Dropout module
BatchNormBase = nn.modules.batchnorm._BatchNorm
DropoutBase = nn.modules.dropout._DropoutNd

__all__ = [
    "NN_BINDINGS",
    "VARIABLE_FUNCTIONS",
    "BatchNormBase",
    "CodeGen",
    "DropoutBase",
    "FakeTensorMode",
    "OpOverload",
    "OpOverloadPacket",
    "PyTreeCodeGen",
    "child_modules",
    "codegen",
    "detect_fake_mode",
    "dynamo_source_name",
    "guarding_hint_or_throw",
    "in_spec",
    "is_overload",
    "overload_name",
    "plain_tracer",
    "schema",
    "set_codegen",
]


def is_overload(target: Any) -> bool:
    """Whether an FX node's target is an ATen overload (``aten.add.Tensor``), which carries a schema."""
    return isinstance(target, OpOverload)


def schema(op: OpOverload) -> torch.FunctionSchema:
    """An overload's schema: argument names, alias annotations (which inputs it writes or aliases)."""
    return op._schema


def overload_name(op: OpOverload) -> str:
    """``"Tensor"`` for ``aten.add.Tensor``."""
    return op._overloadname


def codegen(graph: fx.Graph) -> CodeGen:
    """The code generator of an FX graph (torch.export's wraps inputs and outputs in pytree calls)."""
    return graph._codegen


def set_codegen(graph: fx.Graph, generator: CodeGen) -> None:
    graph._codegen = generator


def in_spec(module: fx.GraphModule) -> Any:
    """The pytree spec of an exported module's inputs (``ep.module()``)."""
    return module._in_spec


def detect_fake_mode(values: list) -> FakeTensorMode | None:
    """The fake-tensor mode the ``val`` metadata of an exported graph lives in, if any."""
    return _detect_fake_mode(values)


def dynamo_source_name(node: fx.Node) -> str:
    """Where dynamo read a placeholder's value from (``L['self']._buffers['running_mean']``), or ""."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    return (getattr(source, "name", "") or "") if source is not None else ""


def plain_tracer(gm: fx.GraphModule) -> None:
    """Record no tracer class on ``gm`` and its graph: ``torch.load`` re-traces a pickled GraphModule with the
    recorded one, and export's tracer cannot be rebuilt outside an export (``missing 'scope_root'``)."""
    gm.graph._tracer_cls, gm.graph._tracer_extras = None, {}
    gm._tracer_cls, gm._tracer_extras = None, {}


def child_modules(parent: nn.Module) -> list[tuple[str, nn.Module | None]]:
    """A module's direct children by attribute name, repeats and ``None`` included (``named_children``
    skips a module registered under two names)."""
    return list(parent._modules.items())
