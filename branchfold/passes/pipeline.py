"""``fold`` for torch modules: capture, fold, check against the original, undo what fails, report."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.func import functional_call
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from branchfold.adapters.fx import FxFoldResult
from branchfold.errors import CaptureError, InputError
from branchfold.passes import verify
from branchfold.passes.capture import (
    Capture,
    CaptureMethod,
    capture,
    drop_dead_size_arithmetic,
    example_batch,
    first_line,
    static_note,
)
from branchfold.passes.fx import FoldBranchesPass, PlainCallingConventionPass, ShapePropPass, has_shapes
from branchfold.passes.fx_constant_fold import ConstantFoldPass, constants_note
from branchfold.passes.fx_eager_calls import EagerCallsPass
from branchfold.passes.fx_guards import make_picklable
from branchfold.passes.fx_horizontal import HorizontalFusionPass
from branchfold.passes.settle import Selection, add_horizontal, settle, verification
from branchfold.patterns.horizontal import HorizontalMode, HorizontalResult, check_mode
from branchfold.report import FoldReport, Totals, region_report, skipped_report
from branchfold.report_data import op_strip
from branchfold.rewriter.region import Region
from branchfold.stages import stage

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class FoldResult:
    model: object
    report: FoldReport


@dataclass
class _Attempt:
    """One fold of a fresh copy of the captured graph, and what the two passes did."""

    model: fx.GraphModule
    result: FxFoldResult
    fusion: HorizontalResult

    @property
    def regions(self) -> list[Region]:
        return self.result.regions

    @property
    def speed_rewrites(self) -> bool:
        return bool(self.fusion.fused)

    def name(self, region: Region) -> str:
        return region_name(region.value)


def fold_module(
    model: nn.Module,
    args: Sequence = (),
    kwargs: dict | None = None,
    *,
    capture_method: CaptureMethod = "export",
    verify_result: bool = True,
    random_checks: int = 1,
    tolerance: float | None = None,
    seed: int = 0,
    horizontal: HorizontalMode = "auto",
    dynamic: bool | None = None,
) -> FoldResult:
    """Capture, fold, fuse Q/K/V-style siblings (``horizontal``: "auto", "on", "off"), check, report.

    ``dynamic`` (torch.export capture): ``None`` (default) captures the batch dimension of every input,
    and the sequence length of integer ``[B, T]`` inputs, as free sizes wherever the model allows it, so
    the folded module runs at any batch size the original accepts; where that capture raises, or its
    graph differs from the original at another batch size, it falls back to static shapes and the
    report's notes say so. ``True`` makes that fallback an error, ``False`` captures static shapes. With
    a free batch, the check also runs the original and the folded model at a second batch size (1, or 3
    where the example's batch is 1), unless the original itself does not run at it.
    """
    options = dict(capture_method=capture_method, verify_result=verify_result, random_checks=random_checks,
                   tolerance=tolerance, seed=seed, horizontal=horizontal, dynamic=dynamic)  # fmt: skip
    try:
        return _fold_module(model, args, kwargs, defer_capture_check=verify_result, **options)
    except _CaptureSuspect:  # a check failed where the capture itself may be wrong: check it first this time
        return _fold_module(model, args, kwargs, defer_capture_check=False, **options)


class _CaptureSuspect(Exception):
    """A verified fold failed a check, and the free-batch capture it started from is not the original."""


def _fold_module(
    model: nn.Module,
    args: Sequence,
    kwargs: dict | None,
    *,
    capture_method: CaptureMethod,
    verify_result: bool,
    random_checks: int,
    tolerance: float | None,
    seed: int,
    horizontal: HorizontalMode,
    dynamic: bool | None,
    defer_capture_check: bool,
) -> FoldResult:
    """``fold_module``. With ``defer_capture_check``, the free-batch capture is not run on its own at the
    second batch: the folded candidate is checked there against the same outputs of the original, and the
    fold is exact with respect to the capture, so a passing check covers the capture too (one forward call
    fewer). Where a check fails, the capture is run there on its own; if it is what differs,
    ``_CaptureSuspect`` asks for the fold again with the capture checked first (and replaced).
    """
    check_mode(horizontal)
    if not isinstance(model, nn.Module):
        raise InputError(f"expected an nn.Module, got {type(model).__name__}")
    args, kwargs = tuple(args), dict(kwargs or {})
    training = model.training
    # A training-mode module (the model, or a BatchNorm left in training inside an eval model) updates its
    # own buffers when run: work on copies so the user's stay as they were.
    updates_buffers = _any_training(model)
    source = copy.deepcopy(model) if updates_buffers else model
    with stage("capture"):
        if isinstance(source, fx.GraphModule):
            captured = Capture(fx.GraphModule(source, copy.deepcopy(source.graph), class_name=type(source).__name__))
        else:
            captured = capture(source, args, kwargs, capture_method, dynamic)

    reference = copy.deepcopy(model) if updates_buffers else model
    input_sets = [(args, kwargs)]
    generator = torch.Generator().manual_seed(seed)
    macs: dict[str, int] = {}  # counted on the runs the check makes anyway (a separate count costs a forward)
    ref_outputs = None
    if verify_result:
        with stage("verify"):
            ref_outputs = [counted_run(reference, args, kwargs, seed, macs)]
    second = None
    if captured.free:  # even unverified: a free batch must not be wrong where the example's is right
        example_ref = ref_outputs[0] if ref_outputs is not None else None
        with stage("second-batch"):
            captured, second = _second_batch(captured, source, reference, args, kwargs, example_ref, generator,
                                             seed, tolerance, capture_method, dynamic,
                                             check_capture=not defer_capture_check)  # fmt: skip
    # The second batch's set is random inputs too: it counts as one of the ``random_checks`` (each costs a
    # forward call of the original and one per folded candidate).
    for _ in range(random_checks - (second is not None and random_checks > 0)):
        input_sets.append((tuple(verify.random_inputs(args, generator)), kwargs))
    if ref_outputs is not None:
        with stage("verify"):
            ref_outputs += [seeded_run(reference, a, k, seed) for a, k in input_sets[1:]]
    if second is not None:
        input_sets.append(second[0])
        if ref_outputs is not None:
            ref_outputs.append(second[1])
    gm = captured.module
    make_picklable(gm)  # what fold returns must survive torch.save / torch.load
    if not has_shapes(gm):
        with stage("shapes"):
            ShapePropPass(_flat_inputs(gm, args, kwargs)).call(gm)
    # Weight-only subgraphs computed once (exact: the same ops, run now), on a copy: ``gm`` stays the
    # captured graph the report counts from, and every attempt below starts from the folded constants.
    with stage("constant-fold"):
        constants = fx.GraphModule(gm, copy.deepcopy(gm.graph), class_name=type(gm).__name__)
        constant_fold = ConstantFoldPass()
        constant_fold.call(constants)
        pristine = copy.deepcopy(constants.graph)

    def attempt(sel: Selection) -> _Attempt:
        with stage("cleanup"):
            candidate = fx.GraphModule(constants, copy.deepcopy(pristine), class_name=type(gm).__name__)
        with stage("walk"):  # the emitter's weight arithmetic inside it counts as "weights"
            fold = FoldBranchesPass(select=sel.select())
            fold.call(candidate)
        with stage("horizontal"):
            fuse = HorizontalFusionPass(horizontal if sel.horizontal else "off")
            fuse.call(candidate)
        with stage("cleanup"):
            drop_dead_size_arithmetic(candidate)  # a free batch's twin of what constant folding removed
            PlainCallingConventionPass().call(candidate)
            EagerCallsPass().call(candidate)  # aten overloads through torch's bindings: exact, faster eager
        return _Attempt(candidate, fold.result, fuse.result)

    # each checked candidate's output on the example and its multiply-adds, by candidate: the folded model's
    # output structure and its MACs come from the check's own run, not one more forward call
    example_outputs: dict[int, tuple[object, int]] = {}

    def check(candidate: _Attempt) -> verify.Check:
        def run(*a, **k):
            if id(candidate.model) in example_outputs:
                return seeded_run(candidate.model, a, k, seed)
            counted: dict[str, int] = {}
            out = counted_run(candidate.model, a, k, seed, counted)
            example_outputs[id(candidate.model)] = (out, counted["before"])
            return out

        with stage("verify"):
            return verify.check(reference, run, input_sets, tolerance, ref_outputs)

    checks = [verification(check)] if verify_result else []
    settled = settle(attempt, checks)
    folded, result, fused = settled.candidate.model, settled.candidate.result, settled.candidate.fusion
    outcome = settled.outcome(checks[0]).outcome if checks else None
    if defer_capture_check and second is not None and (settled.undone or settled.notes or not outcome.ok):
        own = [second] + ([((args, kwargs), ref_outputs[0])] if captured.traced_other_shapes else [])
        with stage("second-batch"):
            if _capture_mismatch(captured.module, own, seed, tolerance) is not None:
                raise _CaptureSuspect
    final = fx.GraphModule(folded, folded.graph, class_name=type(gm).__name__)  # drops unused weights
    final.training = training  # the top-level flag only: submodules keep their own modes (a BN left in training)
    seen = example_outputs.get(id(folded))
    if seen is not None:
        macs["after"] = seen[1]
    with stage("report"):
        report = build_report(gm, final, result, settled.undone, args, kwargs, outcome, training, macs)
    add_horizontal(report, fused)
    report.notes += constants_note(constant_fold.result)
    report.notes += captured.notes
    if outcome is not None:
        batches = (example_batch(a, k) for a, k in input_sets)
        report.checked_batches = list(dict.fromkeys(b for b in batches if b is not None))
        report.checked_inputs = f"{len(input_sets)} input sets: the example and random inputs of its shapes"
    if verify_result and _float_dtype(model) in LOW_PRECISION:
        _low_precision_errors(report, reference, final, input_sets)  # the copy where running updates buffers
    if ref_outputs is not None:
        example = seen[0] if seen is not None else seeded_run(final, args, kwargs, seed)
        return FoldResult(_keep_output_structure(final, ref_outputs[0], example), report)
    return FoldResult(final, report)


def _second_batch(
    captured: Capture, source, reference, args, kwargs, example_ref, generator, seed, tolerance, method, dynamic,
    check_capture: bool = True,
) -> tuple[Capture, tuple[tuple[tuple, dict], object] | None]:
    """A check set at another batch size (and, where free, another sequence length), with the original's
    outputs on it, for a capture that leaves the batch free.

    The captured graph itself must first reproduce the original there (and on the example, when it was
    traced on a repeated copy): export reasons about a free size as "at least 2", so a model that
    branches on ``x.shape[0] > 1`` is captured wrongly for batch 1. Such a capture is replaced by a static
    one (export) or keeps only the example's batch (symbolic_trace), and a note says so. This runs even
    when the fold itself is not verified; ``example_ref`` is then None and computed only if needed. Without
    ``check_capture`` only the set and the original's outputs are made (the caller's checks cover the rest).
    """
    batch = example_batch(args, kwargs)
    for batch_only in (False, True):
        resized = captured.other_size_inputs(args, kwargs, batch_only)
        if resized is None:
            return captured, None
        a, k = resized
        a = tuple(verify.random_inputs(a, generator))
        try:
            ref = seeded_run(reference, a, k, seed)
        except Exception:  # the original does not run there: no check at this size
            continue
        break
    else:
        captured.notes.append(f"the original model does not run at batch {example_batch(*resized)}, so the "
                              f"free batch size was checked at the example's batch {batch} only")  # fmt: skip
        return captured, None
    if not check_capture:
        return captured, ((a, k), ref)
    checks = [((a, k), ref)]
    if captured.traced_other_shapes:  # traced on a repeated copy: the example's own batch is a free size too
        example_ref = example_ref if example_ref is not None else seeded_run(reference, args, kwargs, seed)
        checks.append(((args, kwargs), example_ref))
    why = _capture_mismatch(captured.module, checks, seed, tolerance)
    if why is None:
        return captured, ((a, k), ref)
    why = f"with a free batch size the captured graph differs from the original at batch {example_batch(a, k)}: {why}"
    if method == "export" and not isinstance(source, fx.GraphModule):
        if dynamic:
            raise CaptureError(f"dynamic=True, but {why}")
        static = capture(source, args, kwargs, method, dynamic=False)
        static.notes.insert(0, static_note(batch, why))
        return static, None
    captured.notes.append(f"{why}; the folded model is right at batch {batch}: use it there, or capture='export'")
    return captured, None


def _capture_mismatch(gm: fx.GraphModule, checks, seed, tolerance) -> str | None:
    """Why the unfolded captured graph is not the original on ``checks`` ((args, kwargs), outputs), or None."""
    for (a, k), ref in checks:
        try:
            got = seeded_run(gm, a, k, seed)
        except Exception as e:  # a guard or shape error: the graph does not run there
            return first_line(e)
        tol = tolerance if tolerance is not None else verify.tolerance_for(verify.leading_dtype(ref))
        error = verify.relative_error(ref, got)
        if not error <= tol:
            return f"error {error:.2g}"
    return None


class OutputStructure(nn.Module):
    """Gives a folded graph's outputs the original's pytree type back.

    symbolic_trace writes a ``ModelOutput`` (a dict subclass) as a plain dict; the leaves are the same
    and in the same order, only the container type is lost. ``graph_module`` is the folded graph.
    """

    def __init__(self, graph_module: fx.GraphModule, spec: pytree.TreeSpec) -> None:
        super().__init__()
        self.graph_module, self.spec = graph_module, spec

    def forward(self, *args, **kwargs):
        return pytree.tree_unflatten(pytree.tree_leaves(self.graph_module(*args, **kwargs)), self.spec)


def _keep_output_structure(gm: fx.GraphModule, reference, got) -> nn.Module:
    spec, got_spec = pytree.tree_structure(reference), pytree.tree_structure(got)
    if spec == got_spec or spec.num_leaves != got_spec.num_leaves:
        return gm
    return OutputStructure(gm, spec)


def _flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args)
    for n in placeholders[len(args) :]:
        flat.append(kwargs.get(n.target, n.args[0] if n.args else None))
    return flat


@contextlib.contextmanager
def _fixed_rng(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def counted_run(fn, args, kwargs, seed, macs: dict[str, int], key: str = "before"):
    """``seeded_run`` that also counts the call's multiply-adds into ``macs[key]``."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = seeded_run(fn, args, kwargs, seed)
    macs[key] = counter.get_total_flops() // 2
    return out


def seeded_run(fn, args, kwargs, seed):
    """``fn`` on copies of the inputs: a model that writes its input (``x += 1``) must neither change the
    caller's tensors nor see inputs an earlier run already wrote."""
    args, kwargs = verify.fresh_copies(args, kwargs)
    with torch.no_grad(), _fixed_rng(seed):
        return fn(*args, **kwargs)


def _any_training(module: nn.Module) -> bool:
    return any(m.training for m in module.modules())


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _low_precision_errors(report: FoldReport, model: nn.Module, folded: nn.Module, input_sets) -> None:
    """fp16/bf16: both the original and the folded model against an fp32 copy of the original."""
    fp32 = copy.deepcopy(model).float()

    def up(x):
        return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

    orig_err = new_err = 0.0
    for args, kwargs in input_sets:
        ref = verify.run(fp32, [up(a) for a in args], {k: up(v) for k, v in kwargs.items()})
        orig_err = max(orig_err, verify.relative_error(ref, verify.run(model, args, kwargs)))
        new_err = max(new_err, verify.relative_error(ref, verify.run(folded, args, kwargs)))
    report.error_vs_fp32, report.original_error_vs_fp32 = new_err, orig_err


# ----------------------------------------------------------------------------------------------
# report


_BOOKKEEPING = {"getitem", "getattr", "_guards_fn", "size", "dim", "sym_size", "sym_numel", "sym_stride",
                "_log_api_usage_once"}


def _is_bookkeeping(n: fx.Node) -> bool:
    """Nodes that compute nothing on tensors: tuple indexing, shape queries and size arithmetic, export's
    guards and asserts.

    Counting them would make the same model count differently per capture method (symbolic_trace writes
    ``getattr(x, "shape")``, export writes ``_assert_tensor_metadata``)."""
    if isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return True  # size arithmetic of a free dimension: a static capture writes it as a constant
    name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
    return name in _BOOKKEEPING or name.startswith("_assert")


def count_ops(gm: fx.GraphModule) -> int:
    """Tensor ops in the graph (calls of functions, methods and modules, less the bookkeeping)."""
    return sum(
        1 for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module") and not _is_bookkeeping(n)
    )


def count_params(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point() and id(t) not in seen:
            seen.add(id(t))
            total += t.numel()
    return total


def count_macs(module: nn.Module, args: tuple, kwargs: dict) -> int:
    """Multiply-adds of one call, counted on fake tensors (shapes only, no arithmetic: a ViT-B/16 counts in
    a fraction of its forward time); by a real run where a fake one raises (a data-dependent op).

    A fake run writes only fake copies of the state, so a training-mode module is counted as it is; the
    real run works on a deep copy of such a module (it would update the running statistics we share)."""
    try:
        return _count_macs(module, args, kwargs, fake=True)
    except Exception:  # torch raises many types for ops fake tensors cannot run
        if _any_training(module):
            module = copy.deepcopy(module)
        return _count_macs(module, args, kwargs, fake=False)


def _count_macs(module: nn.Module, args: tuple, kwargs: dict, fake: bool) -> int:
    counter = FlopCounterMode(display=False)
    if not fake:
        args, kwargs = verify.fresh_copies(args, kwargs)
        with torch.no_grad(), counter:
            module(*args, **kwargs)
        return counter.get_total_flops() // 2
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    # Parameters and buffers made fake once, not converted again at every op that reads them (half the time).
    state = {name: mode.from_tensor(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
    args, kwargs = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (tuple(args), dict(kwargs)))
    with torch.no_grad(), mode, counter:
        functional_call(module, state, args, kwargs)
    return counter.get_total_flops() // 2


def region_name(key) -> str:
    """A region's or a skipped op's name in the report: the module path of a module call, else the node's name."""
    if isinstance(key, fx.Node):
        return str(key.target) if key.op == "call_module" else key.name
    return str(key)


def build_report(gm, final, result, undone, args, kwargs, outcome, training, macs=None) -> FoldReport:
    """The report; ``macs`` may hold the "before" and "after" multiply-adds already counted on the example."""
    macs = macs or {}
    before = macs["before"] if "before" in macs else _safe_macs(gm, args, kwargs)
    after = macs["after"] if "after" in macs else _safe_macs(final, args, kwargs)
    report = FoldReport(
        folded=[region_report(r, region_name(r.value)) for r in result.regions],
        not_folded=[skipped_report(n, region_name(n.where)) for n in result.not_folded],
        before=Totals(count_ops(gm), count_params(gm), before),
        after=Totals(count_ops(final), count_params(final), after),
        graph=op_strip(gm.graph.nodes),
    )
    report.not_folded += undone
    if outcome is not None:
        report.max_error, report.tolerance, report.verified = outcome.error, outcome.tolerance, outcome.ok
    if training:
        report.notes.append(
            "the model is in training mode: BatchNorm and Dropout were left alone; call model.eval() to fold them"
        )
    return report


def _safe_macs(module, args, kwargs) -> int:
    with _fixed_rng(0):
        return count_macs(module, args, kwargs)
