"""One fuzz case: fold a generated model through one path and compare it with the original.

Paths: FX ``symbolic_trace`` / ``export`` (``branchfold.fold``), ``dynamo-backend``
(``torch.compile(..., backend="branchfold")`` with the eager inner backend) and ``dynamo-pass``
(``FoldBranchesPass`` on the graph dynamo hands a backend, weights given as constants); ONNX
``onnx-legacy`` / ``onnx-dynamo`` (the two torch exporters writing files, the dynamo one with external data;
the fold reads the file and writes its output as ``branchfold fold`` does; both files are run by onnxruntime
at ``ORT_DISABLE_ALL``, each opened from its path).

Every case runs the original and the folded model at the spec's two batch sizes. An error over the
dtype's tolerance (``verify.tolerance_for``) is a mismatch unless it is rounding, not a wrong fold (see
``_within``): the folded model is as close to a float64 run of the original as the original itself is, or
as the original is once rounding-sized moves are applied to it, and then the fold of a float64
copy is exact. Other mismatches:
an exception from the fold (a ``BranchfoldError`` is fine only where the original cannot be captured
either), a user model or file changed by the fold, a block known to fold that does not reach one op.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import math
import random
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

import branchfold
from branchfold.errors import BranchfoldError
from branchfold.passes import verify
from branchfold.passes.onnx_pipeline import fold_onnx
from fuzz.dynamo import dynamo_graph
from fuzz.generator import Spec, build, example, foldable_blocks

FX_PATHS = ("symbolic_trace", "export", "dynamo-backend", "dynamo-pass")
ONNX_PATHS = ("onnx-legacy", "onnx-dynamo")
LINEAR_ONNX = {"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization"}
_LINEAR_NAMES = ("linear", "conv", "addmm", "batch_norm", "mm")


@dataclass(frozen=True)
class Case:
    """How one model is folded: a path, whether ``fold`` verifies itself, and the ONNX opset."""

    path: str
    verify: bool = False
    opset: int = 17
    count_ops: bool = True  # fold each block known to foldable alone and check it reaches one op

    @property
    def side(self) -> str:
        return "onnx" if self.path in ONNX_PATHS else "fx"


@dataclass
class Outcome:
    status: str  # "ok", "skipped" (the original or the exporter cannot run it), or the mismatch kind
    message: str = ""
    errors: list[float] = field(default_factory=list)

    @property
    def mismatch(self) -> bool:
        return self.status not in ("ok", "skipped")

    def to_dict(self) -> dict:
        return asdict(self)


def draw_cases(rng: random.Random, onnx_fraction: float, onnx_dynamo_fraction: float, verify_fraction: float) -> list[Case]:
    """The paths one model goes through: one FX dialect always, ONNX on ``onnx_fraction`` of models
    (the dynamo exporter on ``onnx_dynamo_fraction`` of those: it takes seconds per model)."""
    fx_path = rng.choices(FX_PATHS, weights=(0.5, 0.25, 0.15, 0.1))[0]
    cases = [Case(fx_path, verify=rng.random() < verify_fraction)]
    if rng.random() < onnx_fraction:
        path = "onnx-dynamo" if rng.random() < onnx_dynamo_fraction else "onnx-legacy"
        opset = rng.choice((13, 15, 17, 18)) if path == "onnx-legacy" else 18
        cases.append(Case(path, verify=rng.random() < verify_fraction, opset=opset))
    return cases


# ----------------------------------------------------------------------------------------------
# comparing


def _seeded(fn: Callable, x, seed: int = 0):
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(x)


ROUNDING_SAMPLES = 8  # rounding-sized moves of the original tried before a difference is called a wrong fold


def _within(
    ref,
    got,
    tol: float,
    exact_ref: Callable[[], object] | None,
    rounded_refs: Callable[[], list] | None = None,
    fold_is_exact: Callable[[], bool] | None = None,
) -> tuple[bool, float]:
    """Folded ``got`` against the original's ``ref``; over ``tol``, excused as rounding when ``got`` is as
    close to a float64 run of the original (``exact_ref``) as ``ref`` itself is.

    One rounded run is a single sample of the rounding noise. Where the model amplifies rounding (a norm
    over two channels of a near-cancelling sum, a training-mode BatchNorm of a near-constant channel), the
    original can be lucky and the folded model not, so the noise is also measured: ``rounded_refs`` are runs
    of the original with every weight and every module output moved by one ulp of its dtype, as far as an
    op computed in another order or a weight rounded once more can move. ``got`` within twice that spread
    is rounding at this dtype, which then cannot tell a wrong fold from rounding; so the fold must also be
    exact in float64 (``fold_is_exact``: a float64 copy folded by the same path), where no rounding hides a
    wrong fold. A well-conditioned model's spread is a few ulps, far under ``tol``: it excuses nothing."""
    err = verify.relative_error(ref, got)
    if err <= tol:
        return True, err
    if exact_ref is None or not math.isfinite(err):
        return False, err
    exact = exact_ref()
    off, own = verify.relative_error(exact, got), verify.relative_error(exact, ref)
    if off <= tol + 2 * own:
        return True, err
    if rounded_refs is None:
        return False, err
    spread = max((verify.relative_error(exact, r) for r in rounded_refs()), default=0.0)
    if off > tol + 2 * max(own, spread):
        return False, err
    return (fold_is_exact is None or fold_is_exact()), err


def _float64_run(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run():
        return _seeded(copy.deepcopy(model).double(), x.double())

    return run


def _one_ulp_off(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` whose floating weights, buffers and module outputs are each moved by one ulp
    (``finfo.eps`` relative, random sign): the original as another rounding of the same math computes it."""
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)

    def nudge(t: torch.Tensor) -> torch.Tensor:
        sign = torch.randint(0, 2, t.shape, generator=g, dtype=torch.float64) * 2 - 1
        return (t.double() * (1 + torch.finfo(t.dtype).eps * sign)).to(t.dtype)

    def hook(module, args, out):
        return nudge(out) if isinstance(out, torch.Tensor) and out.is_floating_point() else None

    with torch.no_grad():
        for t in [*moved.parameters(), *moved.buffers()]:
            if t.is_floating_point():
                t.copy_(nudge(t))
    for m in moved.modules():
        m.register_forward_hook(hook)
    return moved


def _rounded_runs(model: nn.Module, x: torch.Tensor) -> Callable[[], list]:
    """The original's outputs under ``ROUNDING_SAMPLES`` one-ulp moves; none where it cannot run so moved."""

    def runs() -> list:
        try:
            return [_seeded(_one_ulp_off(model, seed), x) for seed in range(ROUNDING_SAMPLES)]
        except Exception:
            return []

    return runs


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict(keep_vars=True)
    return now.keys() == before.keys() and all(torch.equal(now[k].detach(), v) for k, v in before.items())


def count_linear_ops(gm: nn.Module) -> int:
    """Linear / conv / BatchNorm ops a folded FX graph computes, whatever its dialect."""
    graph_module = getattr(gm, "graph_module", gm)  # OutputStructure wraps the folded graph
    n = 0
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            mod = graph_module.get_submodule(node.target)
            n += isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm))
        elif node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target)).lower()
            n += any(k in name for k in _LINEAR_NAMES)
    return n


def count_linear_onnx(proto) -> int:
    return sum(1 for n in proto.graph.node if n.op_type in LINEAR_ONNX)


# ----------------------------------------------------------------------------------------------
# FX


class _BackendFailures(logging.Handler):
    """Collects the backend's "folding failed" warnings: it compiles unfolded then, hiding the bug."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "folding failed" in record.getMessage():
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def _backend_failures(path: str) -> Iterator[_BackendFailures]:
    """The backend's "folding failed" warnings while a fold by ``path`` runs; dynamo's caches reset after."""
    handler = _BackendFailures()
    log = logging.getLogger("branchfold.passes.backend")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        if path.startswith("dynamo"):
            torch._dynamo.reset()


def _fold_fx(model: nn.Module, x: torch.Tensor, case: Case) -> tuple[Callable, Callable | None, list[str]]:
    """(folded runner, op counter or None, notes); raises what folding raises."""
    if case.path in ("symbolic_trace", "export"):
        result = branchfold.fold_with_report(model, (x,), capture=case.path, verify=case.verify)
        return result.model, (lambda: count_linear_ops(result.model)), result.report.notes
    if case.path == "dynamo-pass":
        gm, constants, run = dynamo_graph(model, (x,))
        from branchfold.passes.fx import FoldBranchesPass, ShapePropPass, has_shapes

        if not has_shapes(gm):
            ShapePropPass([constants.get(p.name, x) for p in gm.graph.nodes if p.op == "placeholder"]).call(gm)
        FoldBranchesPass(constants=constants).call(gm)
        return run, (lambda: count_linear_ops(gm)), []
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="branchfold", options={"backend": "eager", "verify": case.verify})
    return compiled, None, []


def _capturable(model: nn.Module, x: torch.Tensor, path: str) -> bool:
    try:
        if path == "symbolic_trace":
            fx.symbolic_trace(model)
        else:
            torch.export.export(model, (x,), strict=False)
    except Exception:
        return False
    return True


def run_fx(spec: Spec, case: Case) -> Outcome:
    model = build(spec)
    xs = [example(spec, b, spec["seed"] + i) for i, b in enumerate(spec["batches"])]
    before = _state(model)
    with _backend_failures(case.path) as handler:
        try:
            folded, counter, notes = _fold_fx(model, xs[0], case)
            if case.path == "dynamo-backend":
                outs = [_seeded(folded, x) for x in xs]
        except BranchfoldError as e:
            if case.path in ("symbolic_trace", "export") and not _capturable(model, xs[0], case.path):
                return Outcome("skipped", f"not capturable: {e}")
            return Outcome("exception", f"{type(e).__name__}: {e}")
        except Exception as e:
            return Outcome("exception", f"{type(e).__name__}: {e}")
    if handler.messages:
        return Outcome("exception", handler.messages[0])
    if not case.path.startswith("dynamo") and not _same_state(model, before):  # dynamo runs the model itself
        return Outcome("mutated", "the fold changed the user's parameters or buffers")
    errors = []
    for i, x in enumerate(xs):
        ref = _seeded(model, x)
        try:
            got = outs[i] if case.path == "dynamo-backend" else _seeded(folded, x)
        except Exception as e:
            if i and (any("batch" in n for n in notes) or case.path == "dynamo-pass"):
                continue  # a static capture (export said so; dynamo-pass captures static) refuses another batch
            return Outcome("exception", f"folded model raised at batch {x.shape[0]}: {type(e).__name__}: {e}")
        checks = _float64_run(model, x), _rounded_runs(model, x), _folds_exactly_in_float64(model, x, case)
        ok, err = _within(ref, got, verify.tolerance_for(x.dtype), *checks)
        errors.append(err)
        if not ok:
            return Outcome("wrong-result", f"error {err:.3g} at batch {x.shape[0]} (tolerance {verify.tolerance_for(x.dtype)})",
                           errors)  # fmt: skip
    if case.count_ops and counter is not None and not spec.get("train"):
        for sub in foldable_blocks(spec)[:1]:
            bad = _single_block_fx(sub, case)
            if bad:
                return Outcome("op-count", bad, errors)
    return Outcome("ok", "", errors)


def _folds_exactly_in_float64(model: nn.Module, x: torch.Tensor, case: Case) -> Callable[[], bool]:
    """Whether a float64 copy of ``model``, folded by ``case``'s path without fold's own check (which
    would undo a wrong region), equals the float64 original within ``tolerance_for(float64)``."""

    def check() -> bool:
        model64, x64 = copy.deepcopy(model).double(), x.double()
        with _backend_failures(case.path) as handler:
            try:
                folded, _, _ = _fold_fx(model64, x64, Case(case.path, verify=False, count_ops=False))
                err = verify.relative_error(_seeded(copy.deepcopy(model64), x64), _seeded(folded, x64))
            except Exception:
                return False
        return not handler.messages and err <= verify.tolerance_for(torch.float64)

    return check


def _single_block_fx(sub: Spec, case: Case) -> str | None:
    model = build(sub)
    x = example(sub, sub["batches"][0], sub["seed"])
    try:
        _, counter, _ = _fold_fx(model, x, Case(case.path, verify=False))
    except Exception as e:
        return f"folding the foldable block alone raised {type(e).__name__}: {e}"
    n = counter() if counter else 1
    return None if n == 1 else f"a block known to fold left {n} linear/conv/BatchNorm ops, not 1"


# ----------------------------------------------------------------------------------------------
# ONNX


def _export_onnx(model: nn.Module, x: torch.Tensor, case: Case):
    """The ONNX proto of ``model`` by the case's exporter, the batch dimension dynamic."""
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.path == "onnx-legacy":
            buf = io.BytesIO()
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=case.opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})  # fmt: skip
            return onnx.load_from_string(buf.getvalue())
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=case.opset, verbose=False,
                                    dynamic_shapes=({0: torch.export.Dim.AUTO},))  # fmt: skip
        return program.model_proto


def _export_onnx_file(model: nn.Module, x: torch.Tensor, case: Case, folder: Path) -> Path:
    """The case's exporter writing a file as users get it: the legacy exporter inline, the dynamo exporter with
    its weights in ``model.onnx.data`` beside it (its default), the batch dimension dynamic."""
    path = folder / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if case.path == "onnx-legacy":
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=case.opset, input_names=["x"],
                              output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})  # fmt: skip
            return path
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(model, (x,), path, dynamo=True, opset_version=case.opset, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim.AUTO},))  # fmt: skip
    return path


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: hashlib.sha256(p.read_bytes()).digest() for p in sorted(folder.iterdir())}


def _session(model):
    """An onnxruntime session with every optimization off: a proto, or a file opened from its path (its
    external data resolved from its own folder, as a user's session would)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _ort_run(session, x: torch.Tensor) -> list[torch.Tensor]:
    name = session.get_inputs()[0].name
    return [torch.from_numpy(np.asarray(o)) for o in session.run(None, {name: x.numpy()})]


def onnx_dtype(spec: Spec) -> torch.dtype:
    """onnxruntime's CPU provider lacks most bf16 kernels: bf16 specs run in fp32 on the ONNX side."""
    return torch.float16 if spec["dtype"] == "float16" else torch.float32


def run_onnx(spec: Spec, case: Case) -> Outcome:
    dtype = onnx_dtype(spec)
    model = build(spec).to(dtype).eval()
    xs = [example(spec, b, spec["seed"] + i, dtype) for i, b in enumerate(spec["batches"])]
    with tempfile.TemporaryDirectory(prefix="branchfold-fuzz-") as work:
        return _judge_onnx_files(spec, model, xs, case, Path(work))


def _judge_onnx_files(spec: Spec, model: nn.Module, xs: list[torch.Tensor], case: Case, work: Path) -> Outcome:
    """The ONNX path as the command line walks it: the exporter writes a file (external data included), the
    fold reads it and writes its output to another folder (``fold_onnx(path, output=...)``, what ``branchfold
    fold`` runs, the written file checked), and the judge opens that file from its path, not the model the fold
    held in memory."""
    dtype = onnx_dtype(spec)
    inputs, outputs = work / "in", work / "out"
    inputs.mkdir()
    outputs.mkdir()
    try:
        src = _export_onnx_file(model, xs[0], case, inputs)
        original = _session(src)
        refs = [_ort_run(original, x) for x in xs[:1]]
    except Exception as e:  # the exporter or onnxruntime cannot take this model: nothing to fold
        return Outcome("skipped", f"export/run of the original failed: {type(e).__name__}: {str(e)[:200]}")
    try:
        refs.append(_ort_run(original, xs[1]))
    except Exception:  # the exporter fixed the batch size
        xs = xs[:1]
    pristine = _files(inputs)
    out = outputs / "folded.onnx"
    try:
        fold_onnx(src, verify=case.verify, output=out)
    except Exception as e:
        return Outcome("exception", f"{type(e).__name__}: {e}")
    if _files(inputs) != pristine:
        return Outcome("mutated", "the fold changed the input's files")
    try:
        folded = _session(out)
    except Exception as e:
        return Outcome("exception", f"onnxruntime rejects the folded file: {type(e).__name__}: {e}")
    errors = []
    for x, ref in zip(xs, refs):
        try:
            got = _ort_run(folded, x)
        except Exception as e:
            return Outcome("exception", f"folded model raised at batch {x.shape[0]}: {type(e).__name__}: {e}")
        exact = lambda x=x: [_seeded(model_64(model), x.double())]  # noqa: E731
        rounded = lambda x=x: [[r] for r in _rounded_runs(model, x)()]  # noqa: E731
        exact_fold = _onnx_folds_exactly_in_float64(model, x, case)
        ok, err = _within(ref, got, verify.tolerance_for(dtype), exact, rounded, exact_fold)
        errors.append(err)
        if not ok:
            return Outcome("wrong-result", f"error {err:.3g} at batch {x.shape[0]} (tolerance {verify.tolerance_for(dtype)})",
                           errors)  # fmt: skip
    if case.count_ops and case.path == "onnx-legacy":
        for sub in foldable_blocks(spec)[:1]:
            bad = _single_block_onnx(sub, case)
            if bad:
                return Outcome("op-count", bad, errors)
    return Outcome("ok", "", errors)


def model_64(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).double()


def _reference_evaluator(proto):
    """onnx's reference evaluator, with BatchNormalization as the standard defines it.

    Up to opset 13 the standard says a BatchNormalization with one output is in inference mode (the
    running mean and variance), and the torch exporters write its ``momentum`` attribute; onnx's own
    ``BatchNormalization_9`` (onnx 1.23) takes any ``momentum`` for training mode and normalizes by the
    batch's statistics, 0.78 away from onnxruntime on fuzz model 8920 (seed 20261129). From opset 14
    the ``training_mode`` attribute decides, as there."""
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_batch_normalization import _batchnorm_test_mode, _batchnorm_training_mode

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x, scale, bias, mean, var, epsilon=1e-5, momentum=0.9, training_mode=None, **_):
            epsilon = 1e-5 if epsilon is None else epsilon
            if training_mode or (training_mode is None and len(self.onnx_node.output) > 1):
                y, _mean, _var, running_mean, running_var = _batchnorm_training_mode(
                    x, scale, bias, mean, var, 0.9 if momentum is None else momentum, epsilon)  # fmt: skip
                return (y, running_mean, running_var)[: len(self.onnx_node.output)]
            return (_batchnorm_test_mode(x, scale, bias, mean, var, epsilon=epsilon),)

    return ReferenceEvaluator(proto, new_ops=[BatchNormalization])


def _onnx_folds_exactly_in_float64(model: nn.Module, x: torch.Tensor, case: Case) -> Callable[[], bool]:
    """Whether the ONNX export of a float64 copy of ``model``, folded without fold's own check, computes
    what the export computes, within ``tolerance_for(float64)``. onnxruntime has no float64 Conv or
    AveragePool, so both run in onnx's reference evaluator (numpy, float64 throughout)."""

    def check() -> bool:
        x64 = x.double()
        try:
            proto = _export_onnx(model_64(model), x64, case)
            folded = branchfold.fold(proto, verify=False)
            feed = {proto.graph.input[0].name: x64.numpy()}
            outs = [_reference_evaluator(p).run(None, feed) for p in (proto, folded)]
        except Exception:
            return False
        ref, got = ([torch.from_numpy(np.asarray(o)) for o in out] for out in outs)
        return verify.relative_error(ref, got) <= verify.tolerance_for(torch.float64)

    return check


def _single_block_onnx(sub: Spec, case: Case) -> str | None:
    dtype = onnx_dtype(sub)
    model = build(sub).to(dtype).eval()
    x = example(sub, sub["batches"][0], sub["seed"], dtype)
    try:
        proto = _export_onnx(model, x, case)
    except Exception:
        return None
    try:
        result = branchfold.fold_with_report(proto, verify=False)
    except Exception as e:
        return f"folding the foldable block alone raised {type(e).__name__}: {e}"
    n = count_linear_onnx(result.model)
    if n == 1 or refused_on_cost(result.report):
        return None
    return f"a block known to fold left {n} Conv/Gemm/MatMul/BatchNormalization nodes, not 1"


def refused_on_cost(report) -> bool:
    """Whether the fold left a sum unfolded because the one op would cost more multiply-adds than its
    branches: a decision the report states, not a missed fold. The legacy exporter folds each branch's
    BatchNorm into its conv, so depthwise 1x3 + 3x1 + 5x1 branches (52 MACs a position with their adds)
    would become one 5x3 conv of 60, where the FX graph, BatchNorms included, counts 64 before."""
    return any(s.reason == "cost" for s in report.not_folded)


def run_case(spec: Spec, case: Case) -> Outcome:
    """Fold ``spec``'s model through ``case`` and say whether the result is what it must be."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_onnx(spec, case) if case.side == "onnx" else run_fx(spec, case)
