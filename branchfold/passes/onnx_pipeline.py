"""``fold`` for ONNX models: fold, check with onnxruntime against the original, undo what fails, report.

The reference is the *original* model run by onnxruntime with every graph optimization disabled, so
that onnxruntime's own fusions hide nothing; the folded model runs the same way on the same random
inputs (declared shapes, dynamic dims given small sizes). The caller's model object is never changed:
the fold works on a copy and returns the kind it was given (``onnx.ModelProto`` or ``onnx_ir.Model``).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch

from branchfold.errors import BranchfoldError, InputError
from branchfold.passes import verify as checks
from branchfold.passes.onnx import fold_passes
from branchfold.passes.onnx_horizontal import HorizontalFusionPass
from branchfold.passes.pipeline import FoldResult, add_horizontal
from branchfold.passes.undo import bisect_passing, only
from branchfold.patterns.horizontal import HorizontalMode, check_mode
from branchfold.report import FoldReport, Skipped, Totals, region_report, skipped_report
from branchfold.rewriter.region import Region

Progress = Callable[[str], None]
KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.preview.training"}
DYNAMIC_DIM = 2  # size given to symbolic / unknown dims when making random inputs
_LOW = {onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.BFLOAT16: torch.bfloat16}


def fold_onnx(
    model: onnx.ModelProto | ir.Model,
    verify: bool = True,
    tolerance: float | None = None,
    seed: int = 0,
    random_checks: int = 2,
    progress: Progress | None = None,
    horizontal: HorizontalMode = "auto",
) -> FoldResult:
    """Fold an ONNX model; ``FoldResult.model`` is the same kind as ``model``, which is left as it was.

    ``horizontal`` ("auto", "on", "off") fuses MatMul/Gemm/Conv siblings into one op + Split; "auto"
    follows the measured ONNX policy.
    """
    check_mode(horizontal)
    say = progress or (lambda _msg: None)
    if isinstance(model, ir.Model):
        proto = ir.to_proto(model)
        as_ir = True
    elif isinstance(model, onnx.ModelProto):
        proto, as_ir = model, False
    else:
        raise InputError(f"expected an onnx.ModelProto or onnx_ir.Model, got {type(model).__name__}")
    check_domains(proto)
    pristine = proto.SerializeToString() if not _large(proto) else None

    def fresh() -> ir.Model:
        if pristine is not None:
            return ir.from_proto(onnx.ModelProto.FromString(pristine))
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        return ir.from_proto(copy)

    fuse_mode = horizontal

    def attempt(select: Callable[[Region], bool] | None):
        candidate = fresh()
        passes = fold_passes(select)
        passes(candidate)
        fuse = HorizontalFusionPass(fuse_mode, infer_shapes=False)
        fuse(candidate)
        return candidate, passes.passes[0].result, fuse.result

    say("folding")
    folded, result, fused = attempt(None)
    undone: list[tuple[Region, str]] = []
    outcome = None
    if verify:
        say("verifying with onnxruntime")
        checker = _Checker(proto, seed, random_checks, tolerance)
        outcome = checker.check(folded)
        if not outcome.ok and fused.fused:
            say("undoing horizontal fusion")
            fuse_mode = "off"  # a speed rewrite is the first thing to give up
            folded, result, fused = attempt(None)
            outcome = checker.check(folded)
        if not outcome.ok and result.regions:
            say("undoing regions that failed the check")
            names = result.names
            good = bisect_passing(names, lambda keep: checker.check(attempt(only(keep))[0]).ok)
            undone = [(r, n) for r, n in zip(result.regions, names) if n not in good]
            folded, result, fused = attempt(only(good))
            outcome = checker.check(folded)
        if not outcome.ok and (result.regions or fused.fused):
            say("the remaining rewrites fail together: writing the model unfolded")
            undone += list(zip(result.regions, result.names))
            fuse_mode = "off"
            folded, result, fused = attempt(only([]))
            outcome = checker.check(folded)
    say("writing the report")
    folded_proto = ir.to_proto(folded)
    report = FoldReport(
        folded=[region_report(r, n) for r, n in zip(result.regions, result.names)],
        not_folded=[skipped_report(n, _where(n.where)) for n in result.not_folded],
        before=totals(proto),
        after=totals(folded_proto),
    )
    report.not_folded += [
        Skipped(n, "failed-check", "folded result differed from the original; undone", list(r.labels))
        for r, n in undone
    ]
    add_horizontal(report, fused)
    if outcome is not None:
        report.max_error, report.tolerance, report.verified = outcome.error, outcome.tolerance, outcome.ok
    return FoldResult(folded if as_ir else folded_proto, report)


def _where(key) -> str:
    if isinstance(key, ir.Node):
        return key.name or (key.outputs[0].name if key.outputs else key.op_type) or key.op_type
    return getattr(key, "name", None) or str(key)


def _large(proto: onnx.ModelProto) -> bool:
    from branchfold.onnx_io import needs_external_data

    return needs_external_data(proto)


def check_domains(proto: onnx.ModelProto) -> None:
    """Refuse ops of domains nothing here can run or check (custom ops without their library)."""
    local = {f.domain for f in proto.functions}
    for node in proto.graph.node:
        if node.domain not in KNOWN_DOMAINS and node.domain not in local:
            raise InputError(
                f"node {node.name or node.op_type!r} uses op {node.op_type!r} of unknown domain {node.domain!r}; "
                "branchfold folds standard ONNX graphs only"
            )


# ----------------------------------------------------------------------------------------------
# verification


def _session(proto: onnx.ModelProto, what: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        if not _large(proto):
            return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        from branchfold.onnx_io import save_model

        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            save_model(proto, path, external_data=True)
            return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BranchfoldError(
            f"onnxruntime cannot run the {what} model ({line}); fold without verification to skip the check"
        ) from None


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
    def __init__(self, proto: onnx.ModelProto, seed: int, count: int, tolerance: float | None) -> None:
        self.reference = _session(proto, "original")
        self.feeds = random_feeds(self.reference, seed, max(1, count + 1))
        self.expected = [_torch(self.reference.run(None, f)) for f in self.feeds]
        elem = proto.graph.output[0].type.tensor_type.elem_type if proto.graph.output else 0
        self.tolerance = tolerance if tolerance is not None else checks.tolerance_for(_LOW.get(elem))

    def check(self, candidate: ir.Model) -> checks.Check:
        session = _session(ir.to_proto(candidate), "folded")
        worst = 0.0
        for feed, ref in zip(self.feeds, self.expected):
            worst = max(worst, checks.relative_error(ref, _torch(session.run(None, feed))))
        return checks.Check(worst, self.tolerance, worst <= self.tolerance)


# ----------------------------------------------------------------------------------------------
# totals


def totals(proto: onnx.ModelProto) -> Totals:
    """Nodes (without Constant), floating-point parameters, and multiply-adds of Conv/MatMul/Gemm."""
    graph = proto.graph
    ops = sum(1 for n in graph.node if n.op_type != "Constant")
    params = sum(int(np.prod(t.dims)) for t in graph.initializer if t.data_type in _FLOATS)
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value" and a.t.data_type in _FLOATS:
                    params += int(np.prod(a.t.dims))
    return Totals(ops, params, count_macs(proto))


_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}


def count_macs(proto: onnx.ModelProto) -> int:
    """Multiply-adds of Conv, MatMul and Gemm from ONNX shape inference, with dynamic dims set to
    the same small size the random inputs use (0 where shapes cannot be inferred)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto) if not _large(proto) else m.CopyFrom(_without_weights(proto))
    del m.graph.value_info[:]
    for v in m.graph.input:
        for d in v.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = DYNAMIC_DIM
    try:
        m = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # shape inference is best effort here: the totals are for the report only
        return 0
    shapes = {}
    for v in list(m.graph.value_info) + list(m.graph.input) + list(m.graph.output):
        dims = v.type.tensor_type.shape.dim
        shapes[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for t in m.graph.initializer:
        shapes[t.name] = list(t.dims)
    total = 0
    for n in m.graph.node:
        out = shapes.get(n.output[0]) if n.output else None
        if not out or None in out:
            continue
        if n.op_type in ("MatMul", "Gemm"):
            w = shapes.get(n.input[1])
            if w and None not in w:
                trans_b = any(a.name == "transB" and a.i for a in n.attribute)
                k = w[-1] if (n.op_type == "Gemm" and trans_b) else w[-2] if len(w) > 1 else w[0]
                total += int(np.prod(out)) * k
        elif n.op_type == "Conv":
            w = shapes.get(n.input[1])
            if w and None not in w:
                total += int(np.prod(out)) * int(np.prod(w[1:]))
    return total


def _without_weights(proto: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    for t in m.graph.initializer:
        t.ClearField("raw_data")
        t.ClearField("float_data")
    return m
