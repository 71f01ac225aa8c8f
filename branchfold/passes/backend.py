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

Before each call a guard (``backend_guard.WeightGuard``) checks every parameter a fold read: first a
flag that a global optimizer step post-hook sets when an optimizer steps one of them (it may have
written through ``p.data``), then three C-level passes over the watched tensors compared with the lists
taken at fold time: identity (a replaced parameter), ``_version`` counters (in-place updates:
``load_state_dict``, built-in optimizers, ``p.mul_(2)`` under no_grad) and data pointers
(``p.data = t``). The next call after any of these refolds in float64 and swaps the tensors, without
recompiling (only if the new weights change the folded graph's structure, such as a folded bias becoming
exactly zero, is the inner backend called again). No hook can stand in for the per-call read: an
in-place update under no_grad fires none, only its version counter records it, and torch has no batched
reader of version counters. Writes through ``p.data`` outside an optimizer step (``p.data.copy_(w)``)
bypass the version counter by design; for them, choose a check by its cost per call
(``benchmarks/bench_compile.py`` reports the default's per model):

- ``"metadata"`` (default, about 0.2 us per watched parameter measured in a loop, two to three times
  that right after the graph ran, whose activations have pushed the parameters' metadata out of the
  cache): the optimizer flag, identity, version counter, data pointer; ``.data`` writes outside an
  optimizer need ``invalidate()``.
- ``"sampled"`` (several times that): also compares a strided sample of each watched parameter (about
  8 elements, read through views of its storage) with its value at fold time, so new weights loaded
  through ``.data`` are seen; a write that changes only unsampled elements is not.
- ``"values"``: compares every value on every call (a full read of the weights).

Folded weights stay graph inputs rather than constants baked into the compiled code: measured on
MobileOne (CPU, batch 8), the compiled folded graph runs as fast as the one
``torch.compile(branchfold.fold(m))`` builds (whose weights dynamo also passes as inputs), and Inductor's
freezing (weights as constants) gained nothing there, so constants would give up the refold without a
recompile for no speed. What the backend cannot remove is
dynamo's: it guards and passes every parameter of the original module tree on each call (MobileOne: 330
inputs; about 0.3 ms per call more than over the folded module in a loop, and 0.6-0.8 ms inside real
calls, whose graph has evicted that metadata from the CPU caches); ``torch.compile(m)`` pays it too, and
it grows with the number of parameters. ``benchmarks/bench_compile.py`` measures that floor per model.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from branchfold import compat
from branchfold.errors import BranchfoldError, InputError
from branchfold.passes import verify
from branchfold.passes.backend_guard import WEIGHT_CHECKS, WeightGuard, invalidate, picker
from branchfold.passes.fx import FoldBranchesPass, lift_folded_weights
from branchfold.passes.fx_horizontal import HorizontalFusionPass
from branchfold.passes.settle import DIFFERED, FAILED_CHECK, Check, Selection, Verdict, settle
from branchfold.patterns.horizontal import HorizontalMode, check_mode
from branchfold.rewriter.region import Region

log = logging.getLogger(__name__)

Compiler = Callable[[fx.GraphModule, list], Callable]
DEFAULT_INNER = "inductor"
__all__ = ["FoldedGraph", "branchfold_backend", "invalidate", "make_backend"]


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
        source = compat.dynamo_source_name(node)
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

    @property
    def speed_rewrites(self) -> bool:
        return bool(self.fused)

    def name(self, region: Region) -> str:
        return region.value.name


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
        self.weight_check = weight_check
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
        if not self.guard.fresh(args):
            self._refold(args)
        return self.compiled(*self.select(args), *self.tensors)

    def fresh(self, args: Sequence) -> bool:
        """Whether every parameter the folds read is unchanged since the fold (``WeightGuard.fresh``)."""
        return self.guard.fresh(args)

    @property
    def watch(self) -> list[tuple[int, torch.Tensor, int, int]]:
        """``(input position, tensor, version, data pointer)`` per parameter the folds read."""
        return self.guard.watch

    # -- folding --------------------------------------------------------------------------------------

    def _fold(self, inputs: Sequence) -> _Fold:
        """Fold with ``inputs``' parameters as constants, settled against the original (``passes.settle``)."""
        consts = {name: inputs[i] for name, i in self.constants.items()}

        def attempt(sel: Selection) -> _Fold:
            gm = fx.GraphModule(self.original, copy.deepcopy(self.pristine), class_name="BranchfoldGraph")
            horizontal = self.horizontal if sel.horizontal else "off"
            fold, fuse = FoldBranchesPass(consts, sel.select()), HorizontalFusionPass(horizontal, consts)
            with torch.no_grad():
                fold.call(gm)
                fuse.call(gm)
            users = {n.name: len(n.users) for n in gm.graph.nodes if n.op == "placeholder"}
            read = [i for name, i in self.constants.items() if users[name] < self.users[name]]
            keep = drop_unread_constants(gm, self.constants)
            tensors = [t for _, _, t in lift_folded_weights(gm)]
            return _Fold(gm, tensors, fold.result.regions, len(fuse.result.fused), read, keep)

        def agrees(fold: _Fold) -> Verdict:
            return Verdict(self._agrees(fold, inputs), DIFFERED)

        checks = [Check(FAILED_CHECK, agrees)] if self.check else []
        settled = settle(attempt, checks)
        failed = [s for s in settled.undone if s.reason == FAILED_CHECK]
        if failed:
            total = len(failed) + len(settled.candidate.regions)
            log.warning("branchfold: %d of %d folds differed from the original and were undone", len(failed), total)
        return settled.candidate

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
        self.select = picker(fold.keep)
        self.guard = WeightGuard(inputs, fold.read, self.weight_check)

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
        return x.node.hint if x.node.has_hint() else compat.guarding_hint_or_throw(x)
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
