"""Turning a user's nn.Module into an FX GraphModule, with one clear error when that fails.

torch.export records static shapes unless it is told which dimensions may vary, and its module then
refuses any other size. Nobody deploys at the batch size of the example they happened to pass, so
export capture asks for the batch dimension (dim 0) of every tensor input, and the sequence dimension of
integer ``[B, T]`` token inputs, as ``Dim.AUTO``: export keeps a dimension free where the model's code
allows it and fixes it where the code forces one size. An example batch of 1 is repeated to 2 for the
trace, since export fixes every dimension of size 0 or 1. Where dynamic capture raises, the capture is
retried with static shapes and a note says so.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import sympy
import torch
from torch import fx, nn
from torch.export import Dim, ShapesCollection
from torch.fx._pytree import tree_flatten_spec
from torch.utils import _pytree as pytree

from branchfold import compat
from branchfold.errors import CaptureError

CaptureMethod = Literal["export", "symbolic_trace"]

_OTHER = {"export": "symbolic_trace", "symbolic_trace": "export"}


def first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "from user code", "File ")):
            return line[:300]
    return type(e).__name__


@dataclass(frozen=True)
class FreeDim:
    """One input dimension the captured graph leaves free; its size is ``expr`` of the graph's symbols."""

    tensor: int  # id() of the user's input tensor
    dim: int
    expr: sympy.Expr


@dataclass
class Capture:
    """A captured graph, the input dimensions it leaves free, and what the user should know about it."""

    module: fx.GraphModule
    free: list[FreeDim] = field(default_factory=list)
    sizes: dict[sympy.Symbol, int] = field(default_factory=dict)  # each symbol's size in the user's example
    upper: dict[sympy.Symbol, int] = field(default_factory=dict)  # finite upper bounds export derived
    notes: list[str] = field(default_factory=list)
    traced_other_shapes: bool = False  # traced on a repeated copy of the example (an example batch of 1)

    @property
    def batch_free(self) -> bool:
        return any(f.dim == 0 for f in self.free)

    def other_size_inputs(self, args: tuple, kwargs: dict, batch_only: bool = False) -> tuple[tuple, dict] | None:
        """The example resized along every free dimension: batch 1 (3 where the example's batch is 1),
        other free dimensions one shorter (longer where they are 2 or less); ``None`` if nothing is free.

        Values are the example's own, cut or repeated, so integer inputs stay valid token ids.
        """
        new = self._other_sizes(batch_only)
        if not new:
            return None
        target: dict[int, dict[int, int]] = {}
        for f in self.free:
            size = f.expr.subs(new)
            if not size.is_Integer or int(size) < 1:
                return None
            target.setdefault(f.tensor, {})[f.dim] = int(size)

        def resize(t):
            if not isinstance(t, torch.Tensor) or id(t) not in target:
                return t
            for dim, size in target[id(t)].items():
                t = _resized(t, dim, size)
            return t

        out_args, out_kwargs = pytree.tree_map(resize, (tuple(args), dict(kwargs)))
        return out_args, out_kwargs

    def _other_sizes(self, batch_only: bool) -> dict[sympy.Symbol, int]:
        batch_symbols = {s for f in self.free if f.dim == 0 for s in f.expr.free_symbols}
        new, changed = dict(self.sizes), False
        for symbol, size in self.sizes.items():
            if symbol in batch_symbols:
                other = 1 if size >= 2 else 3
            elif batch_only:
                continue
            else:
                other = size - 1 if size > 2 else size + 1
            if other <= self.upper.get(symbol, other):
                new[symbol] = other
                changed |= symbol in batch_symbols
        return new if changed else {}


def _resized(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """A new tensor: ``t`` cut to, or repeated up to, ``size`` along ``dim``."""
    t, have = t.detach(), t.shape[dim]
    if size <= have:
        return t.narrow(dim, 0, size).clone()
    return t.index_select(dim, torch.arange(size, device=t.device) % have)


def requested_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The dims of an input tensor export is asked to leave free: the batch (dim 0), and the sequence
    length of an integer ``[B, T]`` input (token ids, attention masks); dims of size 1 stay out (export
    fixes them), except the batch, which is traced at 2."""
    if t.dim() == 0:
        return ()
    dims = [0]
    if t.dim() == 2 and not t.is_floating_point() and not t.is_complex() and t.shape[1] >= 2:
        dims.append(1)
    return tuple(dims)


def _traced_example(args: tuple, kwargs: dict) -> tuple[tuple, dict, bool]:
    """New tensor objects for the trace, each batch of 1 repeated to 2 so that export can leave it free.

    New objects, because export marks the tensors it is given (``_dynamo_dynamic_indices``) and leaves
    the marks behind where it raises: they would change the next capture of the user's own tensors.
    """
    repeated = False

    def grow(t):
        nonlocal repeated
        if not isinstance(t, torch.Tensor):
            return t
        if t.dim() >= 1 and t.shape[0] == 1:
            repeated = True
            return _resized(t, 0, 2).requires_grad_(t.requires_grad)
        return t.detach().requires_grad_(t.requires_grad)

    out_args, out_kwargs = pytree.tree_map(grow, (tuple(args), dict(kwargs)))
    return out_args, out_kwargs, repeated


def _dynamic_shapes(args: tuple, kwargs: dict) -> ShapesCollection:
    shapes = ShapesCollection()
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and requested_dims(t):
            shapes[t] = dict.fromkeys(requested_dims(t), Dim.AUTO)
    return shapes


def _export(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool):
    with torch.no_grad():
        return torch.export.export(
            model, args, kwargs=kwargs or None, dynamic_shapes=_dynamic_shapes(args, kwargs) if dynamic else None,
            strict=False,
        )  # fmt: skip


def export_free(model: nn.Module, args: tuple, kwargs: dict | None = None) -> torch.export.ExportedProgram:
    """``torch.export.export`` asking for the same free dimensions as ``fold``'s capture (``Dim.AUTO``).

    For re-exporting a folded module: export of a module records static shapes unless told otherwise,
    and the folded graph leaves free what the original's capture left free, so asking again finds them.
    """
    traced_args, traced_kwargs, _ = _traced_example(tuple(args), dict(kwargs or {}))
    return _export(model, traced_args, traced_kwargs, dynamic=True)


def _free_dims(ep, user_args: tuple, user_kwargs: dict) -> Capture:
    """Read which input dims the exported graph left symbolic, and map them to the user's tensors."""
    module = ep.module()
    spec = compat.in_spec(module)
    users = tree_flatten_spec((user_args, user_kwargs), spec)
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    captured = Capture(module)
    if len(placeholders) != len(users):
        return captured
    for node, user in zip(placeholders, users):
        val = node.meta.get("val")
        if not isinstance(user, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        for dim, size in enumerate(val.shape):
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is not None and expr.free_symbols:  # a SymInt can also stand for a size export fixed
                captured.free.append(FreeDim(id(user), dim, expr))
                if isinstance(expr, sympy.Symbol):
                    captured.sizes[expr] = int(user.shape[dim])
    for symbol, bounds in ep.range_constraints.items():
        if isinstance(symbol, sympy.Symbol) and isinstance(bounds.upper, sympy.Integer):
            captured.upper[symbol] = int(bounds.upper)
    if any(not f.expr.free_symbols <= set(captured.sizes) for f in captured.free):
        captured.free = []  # a size we cannot relate to the example: do not guess another one
    return captured


_SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)


def drop_full_slices(gm: fx.GraphModule) -> None:
    """``slice(x, d, 0, INT_MAX)`` is ``x``. Export drops it where the size is static but keeps it for a
    free one (``x[:, 0]`` slices dim 0 in full): dropped, both captures fold to the same ops."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.target is torch.ops.aten.slice.Tensor and _is_full_slice(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    gm.recompile()


def drop_dead_size_arithmetic(gm: fx.GraphModule) -> None:
    """Unused values computed from sizes and constants only (``arange(batch)`` of a mask nothing reads): with
    static sizes they are constants, which constant folding removes; with a free size they would be
    computed, for nothing, on every call."""
    graph = gm.graph
    size_only: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        size_only[node] = node.op == "get_attr" or isinstance(node.meta.get("val"), _SYMBOLIC) or (
            node.op == "call_function" and all(size_only[i] for i in node.all_input_nodes)
        )
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and not node.users and size_only[node] and not node.is_impure():
            graph.erase_node(node)
    gm.recompile()


def _is_full_slice(node: fx.Node) -> bool:
    names = ("input", "dim", "start", "end", "step")
    bound = {"dim": 0, "start": None, "end": None, "step": 1, **dict(zip(names, node.args)), **node.kwargs}
    end = bound["end"]
    return bound["start"] in (None, 0) and bound["step"] == 1 and (end is None or (isinstance(end, int) and end >= 2**63 - 1))


def static_note(batch: int | None, why: str) -> str:
    at = f"at batch {batch}" if batch is not None else "at the example's shapes"
    return f"captured with static shapes: the folded model runs only {at} ({why})"


def example_batch(args: tuple, kwargs: dict) -> int | None:
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return None


def capture(
    model: nn.Module,
    args: tuple,
    kwargs: dict | None,
    method: CaptureMethod,
    dynamic: bool | None = None,
) -> Capture:
    """A GraphModule computing ``model(*args, **kwargs)`` that shares no mutable state we write to.

    torch.export's unlifted module keeps the model's pytree calling convention (dicts, tuples,
    ModelOutput come back as they went in); symbolic_trace keeps the module's forward signature and
    records no shapes. ``dynamic`` (export only): ``None`` asks for a free batch and falls back to static
    shapes where that capture raises, ``True`` raises instead, ``False`` captures static shapes.
    """
    name = type(model).__name__
    if method not in _OTHER:
        raise CaptureError(f"unknown capture method {method!r}: use 'export' or 'symbolic_trace'")
    args, kwargs = tuple(args), dict(kwargs or {})
    notes = []
    try:
        if method == "symbolic_trace":
            return _symbolic_trace_capture(fx.symbolic_trace(model), args, kwargs)
        if dynamic is not False:
            traced_args, traced_kwargs, repeated = _traced_example(args, kwargs)
            try:
                ep = _export(model, traced_args, traced_kwargs, dynamic=True)
            except Exception as e:  # torch raises many types here; the static capture may still succeed
                if dynamic:
                    raise
                notes.append(static_note(example_batch(args, kwargs), f"dynamic capture failed: {first_line(e)}"))
            else:
                captured = _free_dims(ep, args, kwargs)
                drop_full_slices(captured.module)
                captured.traced_other_shapes = repeated
                batch = example_batch(args, kwargs)
                if captured.batch_free or batch is None:
                    return captured
                notes.append(static_note(batch, "the model's code fixes the batch size"))
                if not repeated:
                    captured.notes = notes
                    return captured
                # traced at batch 2 for a batch-1 example: the fixed size is the wrong one, trace again
        ep = _export(model, args, kwargs, dynamic=False)
        return Capture(ep.module(), notes=notes)
    except Exception as e:  # torch raises many types here; all are the user's model not tracing
        raise CaptureError(
            f"{method} could not capture {name}: {first_line(e)}. "
            f"Try capture={_OTHER[method]!r}, or pass an already traced torch.fx.GraphModule."
        ) from None


def _symbolic_trace_capture(gm: fx.GraphModule, args: tuple, kwargs: dict) -> Capture:
    """symbolic_trace records no shapes: the batch is as free as the model's code leaves it, one size per
    distinct example batch."""
    captured = Capture(gm)
    for t in pytree.tree_leaves((args, kwargs)):
        if isinstance(t, torch.Tensor) and t.dim() >= 1:
            symbol = sympy.Symbol(f"batch{t.shape[0]}", integer=True, positive=True)
            captured.free.append(FreeDim(id(t), 0, symbol))
            captured.sizes[symbol] = int(t.shape[0])
    return captured
