"""A captured GraphModule that ``torch.save`` can write and ``torch.load`` can read back.

``ExportedProgram.module()`` checks its inputs with a ``_guards_fn`` submodule whose ``forward`` is a
function torch writes at run time (``exec`` of generated source) and wraps for dynamo in a local
closure. Pickling any module that holds it fails with ``Can't pickle local object
'wrap_dunder_call_ctx_manager.<locals>.inner'``, so every module captured with torch.export, and so
everything ``fold`` returned, could not be saved. ``InputGuards`` runs the same generated function and
pickles it as its compiled code, so the folded module keeps its readable input checks ("Guard failed:
x.size()[1] == 8") through a save and load (in the same Python version, as marshal requires).

A GraphModule is loaded by tracing its saved code again with the tracer class it records; export
records its ``_ModuleStackTracer``, which cannot be built without the original model
(``missing 1 required positional argument: 'scope_root'``). The plain ``fx.Tracer`` reads the same code.
"""

from __future__ import annotations

import inspect
import marshal
import math
import types

from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import SYMPY_INTERP

from branchfold import compat

GUARDS = "_guards_fn"


def _namespace() -> dict:
    """The globals torch gives the generated guard function (``_convert_guards_code_to_fn``)."""
    return {**SYMPY_INTERP, "math": math, "inf": float("inf")}


class InputGuards(nn.Module):
    """Runs export's generated input checks; pickles them as code, not as a closure."""

    _is_impure = True  # a call with no users: dead-code elimination must keep it

    def __init__(self, fn: types.FunctionType) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args) -> None:
        self.fn(*args)

    def __reduce__(self):
        return (_rebuild, (marshal.dumps(self.fn.__code__),))


def _rebuild(code: bytes) -> InputGuards:
    return InputGuards(types.FunctionType(marshal.loads(code), _namespace(), "_"))


def _generated_function(guards: nn.Module) -> types.FunctionType | None:
    """The function torch generated, unwrapped from dynamo's closure (``None`` if torch changed its shape)."""
    forward = guards.__dict__.get("forward")
    for candidate in (forward, *inspect.getclosurevars(forward).nonlocals.values()) if callable(forward) else ():
        if isinstance(candidate, types.FunctionType) and candidate.__code__.co_filename == "<string>":
            return candidate
    return None


def make_picklable(gm: fx.GraphModule) -> None:
    """Plain tracer for loading, and ``InputGuards`` for export's guards (dropped where they cannot be read).

    Graph copies and GraphModules built from ``gm``'s graph inherit both."""
    compat.plain_tracer(gm)
    guards = getattr(gm, GUARDS, None)
    if guards is None or isinstance(guards, InputGuards):
        return
    fn = _generated_function(guards)
    if fn is not None:
        setattr(gm, GUARDS, InputGuards(fn))
        return
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == GUARDS:
            gm.graph.erase_node(node)
    delattr(gm, GUARDS)
    gm.recompile()
