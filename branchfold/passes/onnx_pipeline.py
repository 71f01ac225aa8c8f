"""``fold`` for ONNX models: fold, check with onnxruntime against the original, undo what fails, report.

The reference is the *original* model run by onnxruntime with every graph optimization disabled, so
that onnxruntime's own fusions hide nothing; the folded model runs the same way on the same random
inputs (declared shapes, dynamic dims given small sizes). The caller's model object is never changed:
the fold works on a copy and returns the kind it was given (``onnx.ModelProto`` or ``onnx_ir.Model``).

Exact is not enough: a verified fold must also keep every fusion onnxruntime's optimizer makes of the
original (``runtime_guard``), or the "smaller" model runs slower. The guard is one more predicate next
to "this subset of regions verifies", and the same bisection undoes the regions that fail it.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import torch

from branchfold.adapters.onnx import OnnxFoldResult
from branchfold.errors import BranchfoldError, InputError
from branchfold.passes import verify as checks
from branchfold.passes.onnx import fold_passes
from branchfold.passes.onnx_horizontal import HorizontalFusionPass
from branchfold.passes.onnx_untouched import declared_value_info, restore_declared
from branchfold.passes.pipeline import FoldResult
from branchfold.passes.runtime_guard import FusionGuard, Loss, check_transformer_type
from branchfold.passes.settle import Check, Selection, Verdict, add_horizontal, settle, verification
from branchfold.patterns.horizontal import HorizontalMode, HorizontalResult, check_mode
from branchfold.report import FoldReport, Totals, region_report, skipped_report
from branchfold.report_data import op_strip
from branchfold.rewriter.region import Region
from branchfold.storage import onnx_io
from branchfold.storage.onnx_weights import (
    FLOATS,
    Snapshot,
    ort_session,
    return_freed_memory,
    weightless_proto,
)

Progress = Callable[[str], None]
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
WHOLE_FILE_SESSION_BYTES = 256 * 2**20  # larger .onnx files (inline weights) are not read whole to be checked
DYNAMIC_DIM = 2  # size given to symbolic / unknown dims when making random inputs
_LOW = {ir.DataType.FLOAT16: torch.float16, ir.DataType.BFLOAT16: torch.bfloat16}


@dataclass
class _Attempt:
    """One fold of a fresh copy of the original: the model and what the two passes did."""

    model: ir.Model
    result: OnnxFoldResult
    fused: HorizontalResult

    @property
    def regions(self) -> list[Region]:
        return self.result.regions

    @property
    def speed_rewrites(self) -> bool:
        return bool(self.fused.fused)

    def name(self, region: Region) -> str:
        return next(n for r, n in zip(self.result.regions, self.result.names) if r is region)


class _Folds:
    """Folds of fresh copies of the original, making the rewrites a ``Selection`` keeps.

    The copies come from one weightless ``Snapshot`` (graph serialized once without its big tensors,
    shapes inferred once), so a fold costs the graph, never the weights."""

    def __init__(self, snapshot: Snapshot, horizontal: HorizontalMode, declared: dict[str, onnx.ValueInfoProto]) -> None:
        self.snapshot = snapshot
        self.horizontal = horizontal
        self.declared = declared  # the input's own types: a candidate carries these and no inferred ones

    def original(self) -> ir.Model:
        """The input as given (its declared types only), to run and optimize as the reference."""
        model = self.snapshot.model()
        restore_declared(model, self.declared)
        return model

    def __call__(self, sel: Selection) -> _Attempt:
        candidate = self.snapshot.model()
        passes = fold_passes(sel.select(), infer_shapes=False)
        passes(candidate)
        fuse = HorizontalFusionPass(self.horizontal if sel.horizontal else "off", infer_shapes=False)
        fuse(candidate)
        restore_declared(candidate, self.declared)
        self.snapshot.release()
        return _Attempt(candidate, passes.passes[0].result, fuse.result)


class _FusionCheck:
    """The runtime guard as a ``Check``: built on first use (it optimizes the original once), and only
    when a candidate rewrites something."""

    def __init__(self, original: ir.Model, runtime: bool, transformer: str | None, say: Progress) -> None:
        self.original, self.runtime, self.transformer, self.say = original, runtime, transformer, say
        self.guard: FusionGuard | None = None

    def __call__(self, candidate: _Attempt) -> Verdict:
        if self.guard is None:
            self.say("comparing onnxruntime's fusions with the original's")
            self.guard = FusionGuard(self.original, runtime=self.runtime, transformer=self.transformer)
        if not self.guard:
            return Verdict(True)
        harm = self.guard.losses(candidate.model)
        return Verdict(not harm, _describe(harm), harm)

    @property
    def notes(self) -> list[str]:
        return self.guard.notes if self.guard is not None else []


def fold_onnx(
    model: onnx.ModelProto | ir.Model | str | os.PathLike,
    verify: bool = True,
    tolerance: float | None = None,
    seed: int = 0,
    random_checks: int = 2,
    progress: Progress | None = None,
    horizontal: HorizontalMode = "auto",
    runtime_guard: bool = True,
    transformer_guard: str | None = None,
    base_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    external_data: bool | None = None,
) -> FoldResult:
    """Fold an ONNX model; ``FoldResult.model`` is the same kind as ``model``, which is left as it was.

    ``horizontal`` ("auto", "on", "off") fuses MatMul/Gemm/Conv siblings into one op + Split; "auto"
    follows the measured ONNX policy. ``runtime_guard`` (with ``verify``): undo, as ``lost-fusion``, the
    regions whose rewrite makes onnxruntime's optimizer lose a fusion it makes of the original (see
    ``runtime_guard``). ``transformer_guard`` ("bert", "gpt2", ...): the same for onnxruntime's
    transformer optimizer with that ``model_type``; it runs whenever given, with or without ``verify``.

    ``model`` may be a path: the file is read with its weights left where they lie, external data resolved
    from the file's own folder, and the result is an ``onnx_ir.Model`` reading unchanged weights from there.
    A ``ModelProto`` whose tensors refer to external data files needs ``base_dir``, the folder its file was
    in (``onnx.load`` without ``load_external_data=False`` reads them in and needs none).

    ``output``: write the result there (atomically) and check the file, not only the model in memory: read
    back from its own folder, every tensor must hold the bytes that were checked, and with ``verify`` the
    file itself, opened by onnxruntime from its path, must match the original's outputs; if not, nothing is
    written and ``BranchfoldError`` is raised. Its weights go to a data file beside it (named after it, in the
    input file's convention) when the input had one or ``external_data`` is True, or when it exceeds 2 GB.
    """
    check_mode(horizontal)
    if transformer_guard is not None:
        check_transformer_type(transformer_guard)
    say = progress or (lambda _msg: None)
    path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    locations: list[str] = []  # the data files an input file names (its output's data file follows their name)
    if path is not None:
        say("reading the model")
        (source, header), as_ir = onnx_io.read(path), True
        declared = declared_value_info(header)
        locations = onnx_io.locations_in(header, path.name)
    elif isinstance(model, ir.Model):
        source, as_ir = model, True
        declared = declared_value_info(weightless_proto(model)[0])
    elif isinstance(model, onnx.ModelProto):
        source, as_ir = ir.from_proto(model), False  # wraps the proto's tensors, copies none
        onnx_io.set_base_dir(source, base_dir if base_dir is not None else os.getcwd())
        declared = declared_value_info(model)
    else:
        raise InputError(f"expected an onnx.ModelProto, onnx_ir.Model or a path, got {type(model).__name__}")
    if base_dir is not None and not isinstance(model, onnx.ModelProto):
        raise InputError("base_dir is for an onnx.ModelProto; a path or onnx_ir.Model knows its own folder")
    onnx_io.check_file_tensors(source)
    check_domains(source)
    say("inferring shapes")
    snapshot = Snapshot(source)
    folds = _Folds(snapshot, horizontal, declared)
    original = folds.original()
    totals_before = totals(original)
    checker = None
    if verify:
        say("running the original with onnxruntime")
        checker = _Checker(original, seed, random_checks, tolerance)

    say("folding")
    predicates: list[Check[_Attempt]] = []
    if checker is not None:
        said: list[bool] = []

        def verified(candidate: _Attempt) -> checks.Check:
            if not said:
                said.append(True)
                say("verifying with onnxruntime")
            return checker.check(candidate.model)

        predicates.append(verification(verified))
    fusions = None
    if (verify and runtime_guard) or transformer_guard is not None:
        fusions = _FusionCheck(original, verify and runtime_guard, transformer_guard, say)
        predicates.append(Check("lost-fusion", fusions, "cost an onnxruntime fusion", explains=True))
    settled = settle(folds, predicates, say)
    current = settled.candidate
    undone = settled.undone
    notes = (fusions.notes if fusions is not None else []) + settled.notes
    outcome = settled.outcome(predicates[0]).outcome if checker is not None else None
    say("writing the report")
    result = current.result
    report = FoldReport(
        folded=[region_report(r, n) for r, n in zip(result.regions, result.names)],
        not_folded=[skipped_report(n, _where(n.where)) for n in result.not_folded],
        before=totals_before,
        after=totals(current.model),
        notes=notes,
        graph=op_strip(original.graph),
        fusions=fusions.guard.kernels(current.model) if fusions is not None and fusions.guard else {},
    )
    report.not_folded[:0] = undone  # rewrites undone come first: the rendered table shows the first few
    add_horizontal(report, current.fused)
    if outcome is not None:
        report.max_error, report.tolerance, report.verified = outcome.error, outcome.tolerance, outcome.ok
        report.checked_inputs = f"{len(checker.feeds)} random input sets of the declared shapes (free sizes 2)"
    if output is not None:
        if outcome is not None and not outcome.ok:
            raise BranchfoldError(f"the folded model differs from the original (error {outcome.error:.2e}); nothing written")
        say("writing the folded model")
        _write(current.model, Path(output), path, locations, external_data, checker, report)
    return FoldResult(current.model if as_ir else ir.to_proto(current.model), report)


def _write(
    model: ir.Model, output: Path, source: Path | None, locations: list[str], external_data: bool | None, checker, report
) -> None:
    """Write ``model`` and check the file written (see ``fold_onnx``); the report says what was checked.
    ``locations``: the data files the input file (``source``) named, one entry per tensor."""
    if external_data is None and locations:
        external_data = True
    data_name = onnx_io.data_file_name(output, locations, source.name if source is not None else None)
    errors: list[float] = []

    def check(staged: Path) -> None:
        outcome = checker.check_file(staged)
        errors.append(outcome.error)
        if not outcome.ok:
            raise BranchfoldError(
                f"the file written differs from the model that was checked (error {outcome.error:.2e} against "
                f"tolerance {outcome.tolerance:.0e} in onnxruntime); nothing written"
            )

    written = onnx_io.save_model(
        model, output, external_data=external_data, data_name=data_name, check=check if checker is not None else None
    )
    report.written = [str(p) for p in written]
    report.file_error = errors[0] if errors else None


def _describe(losses: list[Loss]) -> str:
    return "; ".join(str(loss) for loss in losses)


def _where(key) -> str:
    if isinstance(key, ir.Node):
        return key.name or (key.outputs[0].name if key.outputs else key.op_type) or key.op_type
    return getattr(key, "name", None) or str(key)


def check_domains(model: ir.Model) -> None:
    """Refuse ops of domains nothing here can run or check (custom ops without their library)."""
    local = {f.domain for f in model.functions.values()}
    for node in model.graph:
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise InputError(
                f"node {node.name or node.op_type!r} uses op {node.op_type!r} of unknown domain {node.domain!r}; "
                "branchfold folds standard ONNX graphs only"
            )


# ----------------------------------------------------------------------------------------------
# verification


def _session(model: ir.Model, what: str):
    """A session at ``ORT_DISABLE_ALL`` (the reference hides no fusion), weights read where they lie and
    not prepacked (a few small runs do not pay for a second copy of every weight)."""
    try:
        return ort_session(model, _options(), weights="inputs", infer_shapes=True)
    except Exception as e:  # onnxruntime raises its own exception types
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BranchfoldError(
            f"onnxruntime cannot run the {what} model ({line}); fold without verification to skip the check"
        ) from None


def _options():
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False  # an arena keeps what a run allocated (GPT-2's transposed weights)
    options.enable_mem_pattern = False
    return options


def random_feeds(session, seed: int, count: int) -> list[dict[str, np.ndarray]]:
    """Random inputs of the declared shapes and types; symbolic dims get a small size."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for i in session.get_inputs():
            shape = [d if isinstance(d, int) and d >= 0 else DYNAMIC_DIM for d in i.shape]
            kind = i.type[len("tensor(") : -1] if i.type.startswith("tensor(") else "float"
            if kind in ("float", "double", "float16"):
                dtype = {"float": np.float32, "double": np.float64, "float16": np.float16}[kind]
                feed[i.name] = rng.standard_normal(shape).astype(dtype)
            elif kind == "bool":
                feed[i.name] = rng.integers(0, 2, shape).astype(bool)
            elif kind.startswith(("int", "uint")):
                feed[i.name] = rng.integers(0, 2, shape).astype(np.dtype(kind))
            else:
                raise BranchfoldError(f"cannot make random values for input {i.name!r} of type {i.type}")
        feeds.append(feed)
    return feeds


def _torch(outputs: list) -> list:
    return [torch.from_numpy(np.asarray(o)) if isinstance(o, np.ndarray) else o for o in outputs]


class _Checker:
    """The original's outputs on random inputs, computed once; its session is closed right after, so that
    the original and a candidate never hold their weights at the same time."""

    def __init__(self, original: ir.Model, seed: int, count: int, tolerance: float | None) -> None:
        reference = _session(original, "original")
        self.feeds = random_feeds(reference, seed, max(1, count + 1))
        self.expected = [_torch(reference.run(None, f)) for f in self.feeds]
        del reference
        gc.collect()
        return_freed_memory()
        outputs = original.graph.outputs
        elem = outputs[0].dtype if outputs and outputs[0].dtype is not None else None
        self.tolerance = tolerance if tolerance is not None else checks.tolerance_for(_LOW.get(elem))

    def check_file(self, path: Path) -> checks.Check:
        """The check, run on a written file, not on a model in memory: onnxruntime opens it from its path (its
        external data resolved from its own folder, as any user's session would). A file over
        ``WHOLE_FILE_SESSION_BYTES`` with inline weights would be read whole and parsed by the runtime (GPT-2:
        1.4 GB for a 652 MB file); its weights are handed to the runtime as regions of that same file instead,
        found by the same scan that the byte-for-byte read-back already checked."""
        import onnxruntime as ort

        if path.stat().st_size > WHOLE_FILE_SESSION_BYTES:
            return self._compare(_session(onnx_io.load(path), "written"))
        try:
            session = ort.InferenceSession(str(path), _options(), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BranchfoldError(f"onnxruntime cannot open the file written ({line}); nothing written") from None
        return self._compare(session)

    def check(self, candidate: ir.Model) -> checks.Check:
        return self._compare(_session(candidate, "folded"))

    def _compare(self, session) -> checks.Check:
        worst = 0.0
        for feed, ref in zip(self.feeds, self.expected):
            worst = max(worst, checks.relative_error(ref, _torch(session.run(None, feed))))
        del session
        gc.collect()
        return_freed_memory()
        return checks.Check(worst, self.tolerance, worst <= self.tolerance)


# ----------------------------------------------------------------------------------------------
# totals


def totals(model: ir.Model) -> Totals:
    """Nodes (without Constant), floating-point parameters, and multiply-adds of Conv/MatMul/Gemm, read
    from the shapes already on the graph (inferred once, on the weightless snapshot)."""
    graph = model.graph
    ops = sum(1 for n in graph if n.op_type != "Constant")
    params = sum(_size(v.const_value) for v in graph.initializers.values() if v.const_value is not None and v.const_value.dtype in FLOATS)
    for n in graph:
        if n.op_type == "Constant" and "value" in n.attributes:
            t = n.attributes["value"].value
            if isinstance(t, ir.TensorProtocol) and t.dtype in FLOATS:
                params += _size(t)
    return Totals(ops, params, count_macs(model))


def _size(t: ir.TensorProtocol) -> int:
    return int(np.prod(t.shape.numpy())) if t.shape is not None else 0


def count_macs(model: ir.Model) -> int:
    """Multiply-adds of Conv, MatMul and Gemm, from ONNX shape inference on the weightless graph with the
    dynamic input dims set to the size the random inputs use (0 for an op whose shapes stay unknown).
    Rows come from the data operand and sizes from the weight, so a wider fused op is counted right."""
    proto, _ = weightless_proto(model)
    del proto.graph.value_info[:]
    for v in proto.graph.input:
        for d in v.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = DYNAMIC_DIM
    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # shape inference is best effort here: the totals are for the report only
        return 0
    shapes: dict[str, list[int | None]] = {}
    for v in list(proto.graph.value_info) + list(proto.graph.input) + list(proto.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for t in proto.graph.initializer:
        shapes[t.name] = list(t.dims)
    stored = {t.name for t in proto.graph.initializer}
    total = 0
    for n in proto.graph.node:
        if n.op_type not in ("MatMul", "Gemm", "Conv") or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        a, w, out = shapes.get(n.input[0]), shapes.get(n.input[1]), shapes.get(n.output[0])
        if not a or not w or None in a or None in w:
            continue
        if n.op_type == "Conv":
            if out and None not in out and len(out) == len(w):
                total += out[0] * int(np.prod(out[2:])) * int(np.prod(w))
        elif n.op_type == "Gemm" or (len(w) == 2 and n.input[1] in stored):
            trans_a = n.op_type == "Gemm" and any(x.name == "transA" and x.i for x in n.attribute)
            rows = a[-1] if trans_a else int(np.prod(a[:-1]))
            total += rows * int(np.prod(w))
        elif out and None not in out:
            total += int(np.prod(out)) * a[-1]
    return total
