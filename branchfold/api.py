"""The public entry points: one ``fold`` for every kind of model branchfold reads."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Sequence
from typing import Any

from branchfold.errors import InputError
from branchfold.passes.pipeline import FoldResult, fold_module
from branchfold.stages import StageClock


def fold_with_report(model: Any, args: Sequence = (), kwargs: dict | None = None, **options) -> FoldResult:
    """Fold ``model`` and return ``FoldResult(model, report)``.

    ``model`` is an ``nn.Module`` (captured with torch.export by default, ``capture="symbolic_trace"``
    for the other way), an already traced ``torch.fx.GraphModule``, a ``torch.export.ExportedProgram``,
    or an ``onnx.ModelProto`` / ``onnx_ir.Model`` or the path of an ONNX file (the result is an
    ``onnx_ir.Model``; ``output=`` writes it and checks the file written); the result is of the same kind. ``args``/``kwargs``
    are example inputs (ONNX models need none): the result is checked against the original on them and
    on random inputs of the same shapes. Options: ``verify`` (default True), ``tolerance``,
    ``random_checks``, ``seed``; for modules also ``capture``, ``horizontal`` ("auto", "on", "off") and
    ``dynamic`` (default ``None``: a free batch size where the model allows it, see ``fold_module``);
    for ONNX ``horizontal``, ``progress``, ``output``, ``base_dir`` (a ``ModelProto``'s folder, for its
    external data) and ``external_data``.
    """
    start = time.perf_counter()
    if isinstance(model, (str, os.PathLike)) or _is_onnx(model):
        from branchfold.passes.onnx_pipeline import fold_onnx

        if args or kwargs:
            raise InputError("an ONNX model takes no example inputs: its declared input shapes are used")
        clock = StageClock(options.get("progress"))
        result = fold_onnx(model, **_checked(fold_onnx, {**options, "progress": clock}, "an ONNX model"))
        result.report.stages = clock.finish()
        return result
    result = _fold_torch(model, args, kwargs, options)
    result.report.stages = {"capture, fold and verify": time.perf_counter() - start}
    return result


def _fold_torch(model: Any, args: Sequence, kwargs: dict | None, options: dict) -> FoldResult:
    import torch

    if isinstance(model, torch.export.ExportedProgram):
        from branchfold.passes.export_pipeline import fold_exported_program

        return fold_exported_program(
            model, args, kwargs, **_checked(fold_exported_program, options, "an ExportedProgram")
        )
    if isinstance(model, torch.nn.Module):
        renamed = {"capture": "capture_method", "verify": "verify_result"}
        options = {renamed.get(k, k): v for k, v in options.items()}
        return fold_module(model, args, kwargs, **_checked(fold_module, options, "a torch module", renamed))
    raise InputError(
        f"branchfold cannot fold a {type(model).__name__}: pass a torch.nn.Module, torch.fx.GraphModule, "
        "torch.export.ExportedProgram, onnx.ModelProto or onnx_ir.Model"
    )


def _checked(fn, options: dict, what: str, renamed: dict[str, str] | None = None) -> dict:
    """The options ``fn`` takes, or one clear error naming those it does not (a typo must not pass silently)."""
    public = {v: k for k, v in (renamed or {}).items()}
    accepted = [p for p in inspect.signature(fn).parameters if p not in ("model", "ep", "args", "kwargs")]
    unknown = [public.get(k, k) for k in options if k not in accepted]
    if unknown:
        known = ", ".join(public.get(p, p) for p in accepted)
        raise InputError(f"unknown option(s) {', '.join(unknown)} for {what}; known options: {known}")
    return options


def fold(model: Any, args: Sequence = (), kwargs: dict | None = None, **options) -> Any:
    """Fold ``model`` and return the folded model (the report is on ``fold_with_report``)."""
    return fold_with_report(model, args, kwargs, **options).model


def _is_onnx(model: Any) -> bool:
    """An onnx.ModelProto or onnx_ir.Model, recognized without importing onnx for torch users."""
    return type(model).__module__.split(".")[0] in ("onnx", "onnx_ir") and type(model).__name__ in (
        "ModelProto",
        "Model",
    )
