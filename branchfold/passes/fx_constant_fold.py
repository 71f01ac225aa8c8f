"""Weight-only constant folding: compute once, at fold time, what depends only on weights.

Eager models often cache a weight-only tensor on their first eval-mode call (LeViT's and TinyViT's
attention-bias gather ``biases[:, idx]``, kept in a dict on the module); a captured graph recomputes it on
every call, so the folded model would be slower than the eager original on work the original skips. This
pass finds the maximal subgraphs whose inputs are only stored tensors (``get_attr``), Python constants and,
for dynamo graphs, placeholders given as constants; evaluates them once, under ``no_grad``, with the same
ops and dtypes the graph would run (so the stored result is bit-identical to what each call computed); and
replaces each value the rest of the graph reads with a new buffer of a fresh name.

Why not torch's own folders: ``torch.fx.experimental.const_fold.split_const_subgraphs`` splits the module
into submodules and folds lazily on the first call, and it knows only ``get_attr`` inputs;
``torch._inductor.constant_folding`` / ``torch._export.passes.constant_folding`` interpret ATen graphs and
know only ATen's randomness tags and mutable schemas (symbolic_trace's ``F.dropout``, ``x += c`` and
``call_method`` nodes, and dynamo's weight placeholders, are outside them). One static pass serves the three
FX dialects here.

What stays in the graph, and why:

- **Impure and random ops**, anything that reads a tensor an op of the graph mutates (``add_``, ``x[i] = v``,
  ``+=`` on a tensor, a BatchNorm in training mode updating its statistics, the buffers of a called
  submodule), and every ``call_module``: a constant must not change between calls.
- **Anything that reads an input**, including its sizes (``x.size(0)``, export's symbolic sizes).
- **Trailing views** (``t``, ``permute``, ``expand``, a no-op ``.to``): a view costs a dispatch, not memory
  or arithmetic. The tensor it views is stored instead, and a view of a user's tensor stays a view of it:
  no stored result ever aliases the user's tensors, and ``expand`` to a batch never turns into a
  batch-sized buffer. Views of one weight stay recognisable as that weight, so the branch fold's shared-weight
  check still counts its readers.
- **Dequantizations**: a cast to floating point of a weight stored quantized (an int8 matrix, see
  ``canonical.dequantizes``). Computing it once would store the weight in float, undoing the quantization;
  the branch fold then reports the linear that reads it as ``quantized``.
- **Results much larger than what they read**: a stored result may hold at most ``max_growth`` times the
  elements of the stored tensors it is computed from (or ``small`` elements, whichever is more). A gather
  of a ``[heads, N]`` bias by a ``[T, T]`` index grows by at most ``heads``; a ``repeat`` to a large batch
  does not fit and is recomputed per call rather than kept resident.

Identical computations of the same stored tensors (two call sites of one module computing ``w * s``) get
one buffer, so weights the model shares stay shared after the fold; equal results of different
computations are found by value (``adapters.fx_store``, the FX side's one de-duplication).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.utils import _pytree as pytree

from branchfold import compat
from branchfold.adapters.fx_store import StoredOnce
from branchfold.patterns.fx_alias import alias_parents, is_random, written
from branchfold.patterns.fx_ops import dequantizes

MAX_GROWTH = 16  # elements stored / elements of the stored tensors read
SMALL = 1 << 16  # elements a constant may always hold (256 KiB of fp32)

@dataclass
class FoldedConstant:
    """One stored result: the buffer's name, the graph value it replaced, and the ops it saves per call."""

    name: str
    replaced: str
    ops: list[str]
    shape: tuple[int, ...]


@dataclass
class ConstantFoldResult:
    folded: list[FoldedConstant] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (value, why it is recomputed per call)
    checks: int = 0  # export's metadata checks of weight-only values, run once at fold time and dropped

    @property
    def ops_saved(self) -> int:
        return sum(len(f.ops) for f in self.folded)


class ConstantFoldPass(PassBase):
    """Computes weight-only subgraphs once and stores their results as buffers (see the module docstring).

    ``constants`` names placeholders whose tensors are fixed (dynamo graphs pass weights as inputs), as
    for ``FoldBranchesPass``. The last result is kept on ``self.result``.
    """

    def __init__(
        self,
        constants: Mapping[str, torch.Tensor] | None = None,
        max_growth: int = MAX_GROWTH,
        small: int = SMALL,
    ) -> None:
        super().__init__()
        self.constants = dict(constants or {})
        self.max_growth, self.small = max_growth, small
        self.result: ConstantFoldResult | None = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.result = fold_constants(graph_module, self.constants, self.max_growth, self.small)
        modified = bool(self.result.folded or self.result.checks)
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified)


def fold_constants(
    gm: fx.GraphModule,
    constants: Mapping[str, torch.Tensor] | None = None,
    max_growth: int = MAX_GROWTH,
    small: int = SMALL,
) -> ConstantFoldResult:
    """Fold ``gm``'s weight-only subgraphs in place (its graph and new buffers); the user's tensors are
    only read."""
    return _ConstantFolder(gm, dict(constants or {}), max_growth, small).run()


def constants_note(result: ConstantFoldResult | None) -> list[str]:
    """The report's lines on weight-only subgraphs: how many were computed once, and which stayed per call."""
    if result is None:
        return []
    lines = []
    if result.folded:
        shown = ", ".join(f"{f.replaced} ({'+'.join(f.ops[:4])}{'...' if len(f.ops) > 4 else ''})"
                          for f in result.folded[:6])  # fmt: skip
        more = f" and {len(result.folded) - 6} more" if len(result.folded) > 6 else ""
        lines.append(f"constant subgraphs: {len(result.folded)} computed once at fold time instead of on every "
                     f"call ({result.ops_saved} ops): {shown}{more}")  # fmt: skip
    lines += [f"constant {value} is recomputed on every call: {why}" for value, why in result.kept]
    return lines


# ----------------------------------------------------------------------------------------------


def _target_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return str(node.target)
    if compat.is_overload(node.target):
        return compat.schema(node.target).name.split("::")[-1]
    return getattr(node.target, "__name__", str(node.target))


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _storages(value: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in _tensors(value) if t.numel() > 0}


class _ConstantFolder:
    def __init__(self, gm: fx.GraphModule, constants: dict, max_growth: int, small: int) -> None:
        self.gm, self.graph = gm, gm.graph
        self.constants = constants
        self.max_growth, self.small = max_growth, small
        self.values: dict[fx.Node, Any] = {}
        self.leaves: dict[fx.Node, torch.Tensor] = {}  # stored tensors the graph reads
        self.const: set[fx.Node] = set()
        self.keys: dict[fx.Node, str] = {}  # structural key: equal keys compute equal values
        self.equal = StoredOnce()  # equal values from different computations share one buffer too
        self.result = ConstantFoldResult()

    # -- which nodes are constant ------------------------------------------------------------------

    def _leaf(self, node: fx.Node) -> torch.Tensor | None:
        if node.op == "get_attr":
            obj: Any = self.gm
            try:
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
            except AttributeError:
                return None
            return obj if isinstance(obj, torch.Tensor) else None
        if node.op == "placeholder":
            return self.constants.get(node.name)
        return None

    def _tainted(self) -> tuple[set[fx.Node], set[int]]:
        """Nodes and stored tensors (by storage) that some op writes into, through any aliasing chain."""
        nodes: set[fx.Node] = set()
        stack: list[fx.Node] = []
        storages: set[int] = set()
        for node in self.graph.nodes:
            stack += written(node, self.gm)
            if node.op == "call_module":
                for b in self.gm.get_submodule(str(node.target)).buffers():
                    storages |= _storages(b)
        while stack:
            n = stack.pop()
            if n in nodes:
                continue
            nodes.add(n)
            if n.op in ("get_attr", "placeholder"):
                t = self._leaf(n)
                if t is not None:
                    storages |= _storages(t)
            else:
                stack += alias_parents(n, self.gm)
        return nodes, storages

    def _find_constants(self) -> None:
        tainted, tainted_storages = self._tainted()
        for node in self.graph.nodes:
            if node in tainted:
                continue
            if node.op in ("get_attr", "placeholder"):
                t = self._leaf(node)
                if t is not None and not (_storages(t) & tainted_storages):
                    self.leaves[node] = t
                    self.const.add(node)
                    self.keys[node] = f"tensor:{id(t)}"
            elif self._pure(node) and all(n in self.const for n in node.all_input_nodes):
                if dequantizes(node, self._value):
                    self.result.kept.append((node.name, "it dequantizes a quantized weight, which stays as stored"))
                    continue
                self.const.add(node)
                self.keys[node] = self._key(node)

    def _pure(self, node: fx.Node) -> bool:
        if node.op not in ("call_function", "call_method") or written(node, self.gm) or is_random(node):
            return False
        if node.op == "call_function" and node.is_impure():
            return False
        name = _target_name(node)
        return not (name.startswith("_assert") or name in ("_guards_fn", "_check", "print"))

    def _key(self, node: fx.Node) -> str:
        def canon(a: Any) -> Any:
            if isinstance(a, fx.Node):
                return f"%{{{self.keys[a]}}}"
            if isinstance(a, (list, tuple)):
                return type(a).__name__ + repr([canon(x) for x in a])
            if isinstance(a, dict):
                return repr({k: canon(v) for k, v in a.items()})
            if isinstance(a, slice):
                return f"slice({canon(a.start)}, {canon(a.stop)}, {canon(a.step)})"
            return repr(a)

        return f"{node.op}:{node.target!r}({canon(list(node.args))}, {canon(dict(node.kwargs))})"

    # -- evaluating -------------------------------------------------------------------------------

    def _value(self, node: fx.Node) -> Any:
        if node in self.values:
            return self.values[node]
        if node in self.leaves:
            value: Any = self.leaves[node]
        else:
            args = fx.node.map_arg(node.args, self._value)
            kwargs = fx.node.map_arg(node.kwargs, self._value)
            with torch.no_grad():
                if node.op == "call_function":
                    value = node.target(*args, **kwargs)  # type: ignore[operator]
                else:
                    value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
        self.values[node] = value
        return value

    def _view_parent(self, node: fx.Node) -> fx.Node | None:
        """The constant input whose memory ``node``'s value lies in (a view, or the input itself)."""
        mine = _storages(self._value(node))
        if not mine:
            return None
        for n in node.all_input_nodes:
            if mine <= _storages(self._value(n)):
                return n
        return None

    def _stored_point(self, boundary: fx.Node) -> fx.Node | None:
        """The node whose value to store for ``boundary``: below its trailing views, and never a view of a
        user's tensor (None then: the boundary is a view of a stored tensor, nothing to compute)."""
        chain = [boundary]
        while (parent := self._view_parent(chain[-1])) is not None:
            chain.append(parent)
        if chain[-1] in self.leaves:
            return None
        for n in reversed(chain):
            if isinstance(self._value(n), torch.Tensor):
                return n
        return None

    def _cone(self, node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
        """The computed ops and the stored tensors a constant value is made from."""
        ops, leaves, seen, stack = [], [], set(), [node]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in self.leaves:
                leaves.append(n)
            else:
                ops.append(n)
                stack += n.all_input_nodes
        return ops, leaves

    # -- rewriting --------------------------------------------------------------------------------

    def run(self) -> ConstantFoldResult:
        self._find_constants()
        self._run_constant_checks()
        boundaries = [
            n for n in self.graph.nodes
            if n in self.const and n not in self.leaves and any(u not in self.const for u in n.users)
        ]  # fmt: skip
        stored: dict[str, str] = {}  # structural key -> buffer name
        points: dict[fx.Node, None] = {}
        for b in boundaries:
            try:
                point = self._stored_point(b)
            except Exception as e:  # an op that cannot run outside its graph: recompute it per call
                self.result.kept.append((b.name, f"could not be evaluated at fold time ({type(e).__name__})"))
                continue
            if point is not None:
                points[point] = None
        for point in points:
            self._store(point, stored)
        if self.result.folded or self.result.checks:
            self._remove_dead()
        return self.result

    def _run_constant_checks(self) -> None:
        """Export writes ``_assert_tensor_metadata`` before each ``.to`` (PEFT's DoRA casts its weights):
        on a weight-only value the check is run once, here, and dropped when it passes; left in, it would
        keep the weights it reads computed and resident after the fold."""
        for node in list(self.graph.nodes):
            if _target_name(node) != "_assert_tensor_metadata" or node.users:
                continue
            if not node.all_input_nodes or not all(n in self.const for n in node.all_input_nodes):
                continue
            try:
                self._value(node)
            except Exception:  # noqa: BLE001 - a failing check stays in the graph, to fail where it did
                continue
            self.graph.erase_node(node)
            self.result.checks += 1

    def _store(self, point: fx.Node, stored: dict[str, str]) -> None:
        value: torch.Tensor = self._value(point)
        ops, leaves = self._cone(point)
        read = sum(self.leaves[n].numel() for n in leaves)
        if value.numel() > max(self.max_growth * read, self.small):
            why = f"{value.numel()} elements from {read} stored ones: kept per call rather than resident"
            self.result.kept.append((point.name, why))
            return
        key = self.keys[point]
        name = stored.get(key)  # the same computation of the same tensors: no need to compare values
        if name is None:
            user = {s for t in self.leaves.values() for s in _storages(t)}
            value = value.detach()
            if _storages(value) & user:
                value = value.clone()  # never alias a tensor the user may change
            name = self.equal.find(value)
            if name is None:
                name = self._fresh_name()
                self.gm.register_buffer(name, value)
                self.equal.add(value, name)
            stored[key] = name
        with self.graph.inserting_before(point):
            new = self.graph.get_attr(name)
        new.meta.update({k: v for k, v in point.meta.items() if k in ("val", "tensor_meta", "example_value")})
        point.replace_all_uses_with(new)
        labels = [_target_name(n) for n in sorted(ops, key=_order(self.graph))]
        self.result.folded.append(FoldedConstant(name, point.name, labels, tuple(value.shape)))

    def _fresh_name(self) -> str:
        i = len(self.result.folded)
        while True:
            i += 1
            name = f"branchfold_constant_{i}"
            if not hasattr(self.gm, name):
                return name

    def _remove_dead(self) -> None:
        """Erase the constant ops nothing reads any more (only those: other dead code is not ours, and
        ``Graph.eliminate_dead_code`` would also clean the user's GraphModules the graph calls)."""
        for node in reversed(list(self.graph.nodes)):
            if (
                node in self.const
                and not node.users
                and node.op in ("call_function", "call_method", "get_attr")
            ):
                self.graph.erase_node(node)
        self.graph.lint()


def _order(graph: fx.Graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return lambda n: index.get(n, -1)
