"""Deploy speed and size: each model's original, folded and single-path ("limit") forms, side by side,
in eager PyTorch, under Inductor and under onnxruntime; parameters and multiply-adds before and after.

The limit is the zoo's hand-written single-path model: nothing can be faster than it, so folded / limit
says how much of the possible gain the fold delivers (goal: <= 1.02). HF models have no hand-written
limit; for them the table gives folded / original. A side that cannot be produced (a module that does
not exist yet, an exporter failure) is reported as "not available (reason)", never dropped silently.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import branchfold
from benchmarks.models import Case, cases
from benchmarks.timing import Timing, interleaved, ratio
from branchfold.passes.capture import capture
from branchfold.passes.pipeline import count_macs, count_params

GOAL = 1.02  # folded / limit


@contextlib.contextmanager
def quiet():
    """Exporters and compilers print progress and warnings; the benchmark's output is its tables."""
    loggers = [logging.getLogger(n) for n in ("torch", "torch.onnx", "torch._dynamo", "torch._inductor")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def reason(e: BaseException) -> str:
    """One short line for a table cell."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return f"{type(e).__name__}: {text[:140]}"


def _ms(t: Timing | None) -> float | None:
    return None if t is None else t.ms


def _row(case: Case, backend: str, times: dict[str, Timing | None], notes: list[str]) -> dict[str, Any]:
    original, folded, limit = (_ms(times.get(k)) for k in ("original", "folded", "limit"))
    over_limit = ratio(folded, limit)
    spread = max((t.spread for t in times.values() if t is not None), default=math.nan)
    return {
        "section": "deploy",
        "model": case.name,
        "backend": backend,
        "original_ms": original,
        "folded_ms": folded,
        "limit_ms": limit,
        "folded_over_limit": over_limit,
        "folded_over_original": ratio(folded, original),
        "goal_met": None if over_limit is None else over_limit <= GOAL,
        "spread": spread,
        "note": "; ".join(notes),
    }


def _time(sides: dict[str, Callable[[], object] | None], rounds: int, min_round_s: float) -> dict:
    present = {k: v for k, v in sides.items() if v is not None}
    with torch.no_grad():
        return interleaved(present, rounds=rounds, min_round_s=min_round_s)


def size_row(case: Case, report: branchfold.FoldReport, limit: nn.Module | None, args: tuple) -> dict:
    before, after = report.before, report.after
    assert before is not None and after is not None
    return {
        "section": "size",
        "model": case.name,
        "params_before": before.params,
        "params_after": after.params,
        "params_limit": count_params(limit) if limit is not None else None,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "macs_limit": count_macs(limit, args, {}) if limit is not None else None,
        "ops_before": before.ops,
        "ops_after": after.ops,
        "regions": len(report.folded),
        "verified": report.verified,
        "max_error": report.max_error,
    }


# ------------------------------------------------------------------------------------------------
# Inductor


def branchfold_backend() -> Callable:
    """The ``torch.compile(backend="branchfold")`` callable (raises when that module is not there yet)."""
    from branchfold.passes.backend import branchfold_backend as backend

    return backend


def _compiled(model: nn.Module, args: tuple, backend: Any = "inductor") -> Callable[[], object]:
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad(), quiet():
        compiled(*args)  # compile now, outside the timed rounds
    return lambda: compiled(*args)


def inductor_row(case: Case, model: nn.Module, limit: nn.Module | None, args: tuple, rounds: int,
                 min_round_s: float, folded: nn.Module | None = None) -> dict:
    """Inductor on the original, the branchfold backend, and (extra side) ``torch.compile`` of the model
    ``branchfold.fold`` returned, which separates the fold from the backend's per-call runtime."""
    torch._dynamo.reset()
    notes: list[str] = []
    sides: dict[str, Callable[[], object] | None] = {"original": _compiled(model, args)}
    try:
        sides["folded"] = _compiled(model, args, branchfold_backend())
    except Exception as e:  # report any failure of the backend as a missing side
        sides["folded"] = None
        notes.append(f"branchfold backend not available ({reason(e)})")
    sides["limit"] = _compiled(limit, args) if limit is not None else None
    sides["fold_then_compile"] = _compiled(folded, args) if folded is not None else None
    times = _time(sides, rounds, min_round_s)
    torch._dynamo.reset()
    row = _row(case, "inductor", times, ["original: torch.compile default", *notes])
    row["fold_then_compile_ms"] = _ms(times.get("fold_then_compile"))
    row["fold_then_compile_over_limit"] = ratio(row["fold_then_compile_ms"], row["limit_ms"])
    row["fold_then_compile_over_original"] = ratio(row["fold_then_compile_ms"], row["original_ms"])
    return row


# ------------------------------------------------------------------------------------------------
# onnxruntime


def export_onnx(model: nn.Module, args: tuple) -> Any:
    """The ONNX model a user gets from ``torch.onnx.export`` (dynamo exporter, its default optimizer)."""
    with quiet():
        return torch.onnx.export(model, args, dynamo=True, verbose=False).model_proto


def onnx_bytes(model: Any) -> bytes:
    """Serialized bytes of an ``onnx.ModelProto`` or ``onnx_ir.Model``."""
    if hasattr(model, "SerializeToString"):
        return model.SerializeToString()
    import onnx_ir as ir

    return ir.serde.serialize_model(model).SerializeToString()


def count_onnx_nodes(model: Any) -> int:
    import onnx

    return len(onnx.load_from_string(onnx_bytes(model)).graph.node)


def ort_runner(model: Any, args: tuple) -> Callable[[], object]:
    """An ``ORT_ENABLE_ALL`` CPU session, with as many threads as torch uses, bound to ``args``."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(onnx_bytes(model), opts, providers=["CPUExecutionProvider"])
    feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
    return lambda: session.run(None, feed)


def fold_onnx(model: Any) -> tuple[Any, str]:
    """branchfold's ONNX fold of ``model``, and a note on what it did."""
    with quiet():
        result = branchfold.fold_with_report(model)
    report = result.report
    return result.model, f"ONNX fold: {len(report.folded)} regions, verified={report.verified}"


def ort_row(case: Case, model: nn.Module, limit: nn.Module | None, args: tuple, rounds: int,
            min_round_s: float, export_limit: bool = True) -> dict:
    notes: list[str] = []
    exported = export_onnx(model, args)
    sides: dict[str, Callable[[], object] | None] = {"original": ort_runner(exported, args)}
    try:
        folded, note = fold_onnx(exported)
        notes.append(f"{note}; nodes {count_onnx_nodes(exported)} -> {count_onnx_nodes(folded)}")
        sides["folded"] = ort_runner(folded, args)
    except Exception as e:  # the ONNX path is optional: report why it is missing
        sides["folded"] = None
        notes.append(f"ONNX fold not available ({reason(e)})")
    if limit is not None and not export_limit:
        notes.append("limit not exported (--quick)")
    elif limit is not None:
        try:
            sides["limit"] = ort_runner(export_onnx(limit, args), args)
        except Exception as e:  # an export failure of the limit is reported, not fatal
            notes.append(f"limit export failed ({reason(e)})")
    times = _time(sides, rounds, min_round_s)
    return _row(case, "onnxruntime", times, ["ORT_ENABLE_ALL on every side", *notes])


# ------------------------------------------------------------------------------------------------


def measure(case: Case, *, batch: int, rounds: int, min_round_s: float, inductor: bool, ort: bool,
            quick: bool = False) -> list[dict]:
    """Size row and one deploy row per backend for ``case`` (``quick``: no ONNX export of the limit)."""
    model = case.build()
    args = case.inputs(model, batch)
    limit = case.limit(model).eval() if case.limit is not None else None
    with quiet():
        result = branchfold.fold_with_report(model, args)
    folded = result.model
    rows = [size_row(case, result.report, limit, args)]
    with quiet():
        captured = capture(model, args, {}, "export")  # what the fold starts from, unfolded
    captured = getattr(captured, "module", captured)  # a Capture record (graph + free dims) or the graph
    eager = {"original": lambda: model(*args), "captured": lambda: captured(*args), "folded": lambda: folded(*args)}
    if limit is not None:
        eager["limit"] = lambda: limit(*args)
    times = _time(eager, rounds, min_round_s)
    row = _row(case, "eager", times, [])
    row["captured_ms"] = times["captured"].ms
    row["folded_over_captured"] = ratio(row["folded_ms"], row["captured_ms"])
    rows.append(row)
    backends = (
        (inductor and case.inductor, "inductor", lambda: inductor_row(case, model, limit, args, rounds, min_round_s, folded)),
        (ort, "onnxruntime", lambda: ort_row(case, model, limit, args, rounds, min_round_s, not quick)),
    )
    if inductor and not case.inductor:
        rows.append(_row(case, "inductor", {}, ["not run: Inductor compiles cost ~30 s each on this machine; "
                                                "kept to the zoo models and one HF model to fit the run"]))
    for enabled, backend, measure_backend in backends:
        if not enabled:
            continue
        try:
            rows.append(measure_backend())
        except Exception as e:  # one backend failing must not lose the other rows
            rows.append(_row(case, backend, {}, [f"not available ({reason(e)})"]))
    return rows


def run(quick: bool = False, rounds: int | None = None, batch: int | None = None,
        log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """All deploy and size rows. ``quick``: one small model, eager + onnxruntime, 3 short rounds."""
    rows: list[dict] = []
    for case in cases(quick):
        log(f"deploy: {case.name}")
        try:
            rows += measure(
                case,
                batch=batch or (1 if quick else 8),
                rounds=rounds or (2 if quick else 7),
                min_round_s=0.01 if quick else 0.2,
                inductor=not quick,
                ort=True,
                quick=quick,
            )
        except Exception as e:  # a model that does not fold/build is a row saying so, not a crash
            rows.append({"section": "deploy", "model": case.name, "backend": "eager",
                         **dict.fromkeys(("original_ms", "folded_ms", "limit_ms", "folded_over_limit",
                                          "folded_over_original", "goal_met", "spread")),
                         "note": f"not available ({reason(e)})"})
    return rows
