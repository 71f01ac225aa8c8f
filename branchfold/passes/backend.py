"""``torch.compile(model, backend="branchfold")``: fold the dynamo graph, then hand it to Inductor.

Dynamo passes a module's parameters and buffers as graph inputs, re-read from the module on every
call. The backend folds only inference graphs (grad disabled or inference mode; training-mode
BatchNorm/Dropout are refused by the recognizers), treating parameter and buffer inputs as constants;
a graph compiled with grad enabled goes to the inner backend as it is, so training outputs and
gradients are untouched.

Folded weights are not baked into the compiled code: they are *extra inputs* of the graph the inner
backend compiles, so a refold swaps tensors instead of recompiling. The parameters the folded graph no
longer reads are dropped from that graph (MobileOne: dynamo passes 330 inputs, the compiled graph takes
29), and the call picks the live ones out of dynamo's arguments with one ``itemgetter``. The folds also
fuse Q/K/V-style sibling linears and convs as ``branchfold.fold`` does (option ``horizontal``).

Before each call a guard checks every parameter a fold read, in three C-level passes over them compared
with the lists taken at fold time: ``_version`` counters, identity, data pointers. That sees optimizer
steps, ``load_state_dict``, in-place ops under no_grad, ``p.data = t`` and replaced parameters; the next
call refolds in float64 and swaps the tensors, without recompiling (only if the new weights change the
folded graph's structure, such as a folded bias becoming exactly zero, is the inner backend called
again). No hook can stand in for the per-call read: an in-place update under no_grad fires none, and
only its version counter records it. Writes through ``p.data`` (``p.data.copy_(w)``) bypass the version
counter by design. For them, choose a check by its cost per call (MobileOne, 327 watched parameters,
``benchmarks/bench_compile.py`` reports it per model):

- ``"metadata"`` (default, tens of microseconds for ~300 parameters): object, version counter, data
  pointer; ``.data`` writes need ``invalidate()``.
- ``"sampled"`` (several times that): also compares a strided sample of each watched parameter (about
  8 elements, read through views of its storage) with its value at fold time, so new weights loaded
  through ``.data`` are seen; a write that changes only unsampled elements is not.
- ``"values"``: compares every value on every call (a full read of the weights).

Dynamo itself guards and passes every parameter of the original module tree on each call; that cost is
dynamo's (``torch.compile(m)`` pays it too) and grows with the number of modules.

Options (``torch.compile(..., options={...})``): ``backend`` (the inner backend, a registered name
such as ``"eager"`` or ``"aot_eager"`` or a callable; default ``"inductor"``), ``verify`` (check the
folded graph against the original on the example and random inputs, default True), ``tolerance``,
``weight_check`` (``"metadata"``, ``"sampled"`` or ``"values"``, above), ``horizontal`` (``"auto"``,
``"on"`` or ``"off"``, as in ``branchfold.fold``); any other key is an Inductor option, and ``mode``
goes to Inductor. ``make_backend("eager", ...)`` binds the same options into a backend callable.
"""

from __future__ import annotations

import copy
import logging
import operator
import weakref
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw

from branchfold.errors import BranchfoldError, InputError
from branchfold.passes import verify
from branchfold.passes.fx import FoldBranchesPass
from branchfold.passes.fx_horizontal import HorizontalFusionPass
from branchfold.passes.undo import bisect_passing, only
from branchfold.patterns.horizontal import HorizontalMode, check_mode
from branchfold.rewriter.region import Region

log = logging.getLogger(__name__)

Compiler = Callable[[fx.GraphModule, list], Callable]
DEFAULT_INNER = "inductor"
WEIGHT_CHECKS = ("metadata", "sampled", "values")
SAMPLES_PER_TENSOR = 8
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr


def _picker(positions: Sequence[int]) -> Callable[[Sequence], tuple]:
    """``args -> tuple(args[i] for i in positions)`` in one C call (``itemgetter``), for any length."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return lambda args: ()


def _sample(t: torch.Tensor) -> torch.Tensor:
    """A flat strided view of about ``SAMPLES_PER_TENSOR`` elements of ``t``'s storage.

    A view, not a copy: writes through ``t.data`` land in the same storage and show in it. A tensor
    that cannot be viewed flat (non-contiguous) is sampled as a whole copy-free alias of its first row.
    """
    flat = t.detach().reshape(-1) if t.is_contiguous() else t.detach()[(0,) * (t.dim() - 1)]
    return flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)]


def branchfold_backend(
    gm: fx.GraphModule, example_inputs: Sequence, *, mode: str | None = None, options: dict | None = None
) -> Callable:
    """The ``torch_dynamo_backends`` entry point: fold ``gm`` if it is an inference graph, then compile."""
    opts = dict(options or {})
    inner = opts.pop("backend", DEFAULT_INNER)
    check = bool(opts.pop("verify", True))
    tolerance = opts.pop("tolerance", None)
    weight_check = opts.pop("weight_check", "metadata")
    if weight_check not in WEIGHT_CHECKS:
        raise InputError(f"weight_check must be one of {', '.join(WEIGHT_CHECKS)}, got {weight_check!r}")
    horizontal = check_mode(opts.pop("horizontal", "auto"))
    compile_inner = inner_compiler(inner, mode, opts)
    constants = constant_inputs(gm, example_inputs)
    if torch.is_grad_enabled() or not constants:
        return compile_inner(gm, list(example_inputs))
    try:
        folded = FoldedGraph(
            gm, list(example_inputs), constants, compile_inner, check, tolerance, weight_check, horizontal
        )
    except BranchfoldError:
        raise
    except Exception as e:  # a bug in folding must not break the user's compile: run unfolded, say why
        log.warning("branchfold: folding failed (%s: %s); compiling the graph unfolded", type(e).__name__, e)
        return compile_inner(gm, list(example_inputs))
    if not folded.active:
        return compile_inner(gm, list(example_inputs))
    return folded.compile(example_inputs)


_LIVE: weakref.WeakSet[FoldedGraph] = weakref.WeakSet()


def invalidate() -> None:
    """Make every folded graph refold on its next call.

    Writes through ``param.data`` (``p.data.copy_(w)``) bypass the version counter by design, so the
    default guard cannot see them: call this after such writes, or compile with
    ``options={"weight_check": "values"}`` (compares the folded parameters' values on every call).
    """
    for graph in list(_LIVE):
        graph.stale = True


def make_backend(inner: str | Compiler = DEFAULT_INNER, **options: Any) -> Callable:
    """A backend callable with its options bound: ``torch.compile(m, backend=make_backend("eager"))``."""

    def backend(gm: fx.GraphModule, example_inputs: Sequence) -> Callable:
        return branchfold_backend(gm, example_inputs, options={"backend": inner, **options})

    backend.__name__ = f"branchfold_{getattr(inner, '__name__', inner)}"
    return backend


def inner_compiler(inner: str | Compiler, mode: str | None, options: dict) -> Compiler:
    """The backend that compiles the folded graph; Inductor takes ``mode`` and extra options."""
    from torch._dynamo.backends.registry import list_backends, lookup_backend

    if inner in ("inductor", None):
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        patches = {**(list_mode_options(mode) if mode and mode != "default" else {}), **options}
        return lambda g, inputs: compile_fx(g, inputs, config_patches=patches or None)
    if options or (mode and mode != "default"):
        raise InputError(f"options {sorted(options)} and mode apply to Inductor only, not to backend {inner!r}")
    if isinstance(inner, str) and inner not in list_backends(exclude_tags=()):
        raise InputError(f"unknown inner backend {inner!r}: pick one of torch._dynamo.list_backends()")
    if inner == "branchfold":
        raise InputError("the inner backend of branchfold cannot be branchfold itself: use 'inductor' or 'eager'")
    return lookup_backend(inner)


def constant_inputs(gm: fx.GraphModule, example_inputs: Sequence) -> dict[str, int]:
    """Placeholders that carry a module's parameter or buffer: name -> position in the inputs.

    Dynamo re-reads these from the module on every call; they are constants for one call, and the
    guard in ``FoldedGraph`` notices when they change between calls. Inference tensors have no version
    counter to watch, so they are left unfolded.
    """
    found = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.Tensor) or value.is_inference():
            continue
        grapharg = node.meta.get("grapharg")
        source = grapharg.source.name if grapharg is not None and hasattr(grapharg, "source") else ""
        if isinstance(value, torch.nn.Parameter) or "_buffers_" in node.name or "._buffers[" in source:
            found[node.name] = i
    return found


@dataclass
class _Fold:
    gm: fx.GraphModule  # unread parameter inputs dropped, folded weights turned into trailing placeholders
    tensors: list[torch.Tensor]  # their values, in placeholder order
    regions: list[Region]
    fused: int  # sibling groups fused horizontally
    read: list[int]  # input positions of the parameters the folds read
    keep: list[int]  # input positions the folded graph still takes, in order

    @property
    def changed(self) -> bool:
        return bool(self.regions or self.fused)


class FoldedGraph:
    """The compiled callable: guards the folded parameters, refolds when they change, runs the graph."""

    def __init__(
        self,
        gm: fx.GraphModule,
        example_inputs: list,
        constants: dict[str, int],
        compile_inner: Compiler,
        check: bool,
        tolerance: float | None,
        weight_check: str = "metadata",
        horizontal: HorizontalMode = "auto",
    ) -> None:
        self.original, self.constants, self.compile_inner = gm, constants, compile_inner
        self.check, self.tolerance, self.horizontal = check, tolerance, horizontal
        self.constant_positions = frozenset(constants.values())
        self.by_value, self.sampled = weight_check == "values", weight_check == "sampled"
        self.stale = False
        self.pristine = copy.deepcopy(gm.graph)
        self.users = {n.name: len(n.users) for n in gm.graph.nodes if n.op == "placeholder"}
        self.static = not any(_symbolic(x) for x in example_inputs)
        # Inputs other than parameters are kept (cloned) to re-check a refold against the original.
        concrete = [_concrete(x) for x in example_inputs]
        self.examples = [x if i in self.constant_positions else _clone(x) for i, x in enumerate(concrete)]
        self.refolds = 0
        fold = self._fold(concrete)
        self.active = fold.changed
        if self.active:
            _LIVE.add(self)
            log.info(
                "branchfold: folded %d region(s) of a dynamo graph%s", len(fold.regions),
                f", fused {fold.fused} sibling group(s)" if fold.fused else "",
            )  # fmt: skip
            self._install(fold, example_inputs)
            self.folded_gm = fold.gm

    def compile(self, example_inputs: Sequence) -> FoldedGraph:
        """Compile the folded graph with the inner backend: the inputs it keeps, then the folded weights."""
        self.compiled = self.compile_inner(self.folded_gm, list(self.select(example_inputs)) + self.tensors)
        return self

    # -- the hot path ---------------------------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        if self.stale or not self.fresh(args):
            self._refold(args)
        return self.compiled(*self.select(args), *self.tensors)

    def fresh(self, args: Sequence) -> bool:
        """Whether every parameter the folds read is the same tensor, unmodified, as at fold time.

        One pass per property over the watched inputs, each a C-level ``map`` compared with the list
        taken at fold time: version counters first (optimizer steps, ``load_state_dict`` and in-place
        updates all bump them), then identity (a replaced parameter) and data pointers (``p.data = t``).
        """
        watched = self.pick(args)
        if (
            list(map(_VERSION, watched)) != self.versions
            or not all(map(operator.is_, watched, self.watched))
            or list(map(_DATA_PTR, watched)) != self.pointers
        ):
            return False
        if self.sampled and self.samples and not torch.equal(torch.cat(self.samples), self.sampled_at_fold):
            return False
        if self.by_value:
            return all(torch.equal(args[i], snapshot) for i, snapshot in self.snapshots)
        return True

    # -- folding --------------------------------------------------------------------------------------

    def _fold(self, inputs: Sequence) -> _Fold:
        """Fold with ``inputs``' parameters as constants; regions that fail the check are undone."""
        consts = {name: inputs[i] for name, i in self.constants.items()}

        def attempt(select: Callable[[Region], bool] | None, horizontal: HorizontalMode) -> _Fold:
            gm = fx.GraphModule(self.original, copy.deepcopy(self.pristine), class_name="BranchfoldGraph")
            fold, fuse = FoldBranchesPass(consts, select), HorizontalFusionPass(horizontal, consts)
            with torch.no_grad():
                fold.call(gm)
                fuse.call(gm)
            users = {n.name: len(n.users) for n in gm.graph.nodes if n.op == "placeholder"}
            read = [i for name, i in self.constants.items() if users[name] < self.users[name]]
            keep = drop_unread_constants(gm, self.constants)
            tensors = [t for _, _, t in lift_folded_weights(gm)]
            return _Fold(gm, tensors, fold.result.regions, len(fuse.result.fused), read, keep)

        horizontal = self.horizontal
        fold = attempt(None, horizontal)
        if not self.check or not fold.changed or self._agrees(fold, inputs):
            return fold
        if fold.fused:  # a speed rewrite is the first thing to give up
            horizontal = "off"
            fold = attempt(None, horizontal)
            if not fold.regions or self._agrees(fold, inputs):
                return fold
        names = [r.value.name for r in fold.regions]
        good = bisect_passing(names, lambda keep: self._agrees(attempt(only(keep), horizontal), inputs))
        fold = attempt(only(good), horizontal)
        if fold.regions and not self._agrees(fold, inputs):  # each part passed, together they do not
            good, fold = [], attempt(only([]), horizontal)
        log.warning("branchfold: %d of %d folds differed from the original and were undone", len(names) - len(good), len(names))
        return fold

    def _agrees(self, fold: _Fold, inputs: Sequence) -> bool:
        """The folded graph against the original on the example inputs and on random ones.

        Only non-scalar tensors that are not parameters are randomized: 0-d tensors are Python scalars
        dynamo lifted (a LayerNorm's eps), where random values mean nothing.
        """
        free = [i for i, x in enumerate(inputs) if i not in self.constant_positions and _randomizable(x)]
        fresh = dict(zip(free, verify.random_inputs([inputs[i] for i in free], torch.Generator().manual_seed(0))))
        sets = [list(inputs), [fresh.get(i, x) for i, x in enumerate(inputs)]]
        outcome = verify.check(
            lambda *a: self.original(*a),
            lambda *a: fold.gm(*[a[i] for i in fold.keep], *fold.tensors),
            [(s, {}) for s in sets],
            self.tolerance,
        )
        return outcome.ok

    def _install(self, fold: _Fold, inputs: Sequence) -> None:
        self.code = fold.gm.code
        self.tensors = fold.tensors
        self.select = _picker(fold.keep)
        self.watch = [(i, inputs[i], inputs[i]._version, inputs[i].data_ptr()) for i in fold.read]
        self.pick = _picker(fold.read)
        self.watched = [t for _, t, _, _ in self.watch]
        self.versions = [v for _, _, v, _ in self.watch]
        self.pointers = [p for _, _, _, p in self.watch]
        self.snapshots = [(i, inputs[i].detach().clone()) for i in fold.read] if self.by_value else []
        self.samples = [_sample(inputs[i]) for i in fold.read] if self.sampled else []
        self.sampled_at_fold = torch.cat(self.samples).clone() if self.samples else None
        self.stale = False

    def _refold(self, args: Sequence) -> None:
        """The parameters changed: fold again from the live tensors; recompile only if the graph differs.

        A graph compiled for dynamic shapes cannot be compiled again outside dynamo (the real inputs
        would fix the shapes), so that rare case runs the new folded graph eagerly and says so.
        """
        self.refolds += 1
        live = [x if i in self.constant_positions else self.examples[i] for i, x in enumerate(args)]
        try:
            fold = self._fold(live)
        except Exception as e:  # never serve stale weights: the original graph reads the live ones
            log.warning("branchfold: refolding failed (%s: %s); running the graph unfolded", type(e).__name__, e)
            unfolded = _Fold(self.original, [], [], 0, [], list(range(len(args))))
            self._install(unfolded, args)
            self.compiled = self.original
            return
        self.folded_gm = fold.gm
        if fold.gm.code != self.code:
            if self.static:
                log.warning("branchfold: the new weights change the folded graph; compiling it again")
                self.compiled = self.compile_inner(fold.gm, [live[i] for i in fold.keep] + fold.tensors)
            else:
                log.warning(
                    "branchfold: the new weights change the folded graph of a dynamic-shape compile; it runs "
                    "eagerly now: call torch._dynamo.reset() to compile it again"
                )
                self.compiled = fold.gm
        self._install(fold, args)


def _symbolic(x: Any) -> bool:
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True
    return isinstance(x, torch.Tensor) and any(not isinstance(d, int) for d in x.shape)


def _randomizable(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0


def _concrete(x: Any) -> Any:
    """The example value of a symbolic size input (``dynamic=True``), to run the graph eagerly."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.hint if x.node.has_hint() else guarding_hint_or_throw(x)
    return x


def _clone(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def drop_unread_constants(gm: fx.GraphModule, constants: dict[str, int]) -> list[int]:
    """Remove the parameter placeholders the folded graph no longer reads; the input positions kept.

    Dynamo passes every parameter and buffer the module touched (330 on the MobileOne zoo model); once
    folded, most are dead. The inner backend's wrapper handles each input on every call, so the graph it
    compiles takes only the live ones and ``FoldedGraph`` picks them from dynamo's arguments.
    """
    keep = []
    for i, node in enumerate([n for n in gm.graph.nodes if n.op == "placeholder"]):
        if node.name in constants and not node.users:
            gm.graph.erase_node(node)
        else:
            keep.append(i)
    gm.recompile()
    return keep


def lift_folded_weights(
    gm: fx.GraphModule, after: fx.Node | None = None, prefix: str = "", taken: Collection[str] = ()
) -> list[tuple[str, fx.Node, torch.Tensor]]:
    """Turn the folded weights (``get_attr`` of the new parameters) into placeholders.

    The placeholders go after ``after`` (default: after the last one); a weight name found in ``taken``
    is renamed. Returns ``(name, placeholder, tensor)`` per weight, in placeholder order. The backend
    compiles graphs that take folded weights as inputs, so a refold only swaps tensors; an
    ExportedProgram lifts every weight by design.
    """
    graph = gm.graph
    anchor = after or [n for n in graph.nodes if n.op == "placeholder"][-1]
    lifted: dict[str, tuple[str, fx.Node, torch.Tensor]] = {}
    used = set(taken)
    for node in list(graph.nodes):
        if node.op != "get_attr" or not str(node.target).startswith("branchfold_"):
            continue
        target = str(node.target)
        if target not in lifted:
            value = getattr(gm, target).detach()
            delattr(gm, target)
            name, k = target, 0
            while name in used:
                k += 1
                name = f"{target}_{k}"
            used.add(name)
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(prefix + name)
            anchor.meta["example_value"] = value
            lifted[target] = (name, anchor, value)
        node.replace_all_uses_with(lifted[target][1])
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return list(lifted.values())
