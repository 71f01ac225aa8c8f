"""The public entry points: one ``fold`` for every kind of model branchfold reads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from branchfold.errors import InputError
from branchfold.passes.pipeline import FoldResult, fold_module


def fold_with_report(model: Any, args: Sequence = (), kwargs: dict | None = None, **options) -> FoldResult:
    """Fold ``model`` and return ``FoldResult(model, report)``.

    ``model`` is an ``nn.Module`` (captured with torch.export by default, ``capture="symbolic_trace"``
    for the other way) or an already traced ``torch.fx.GraphModule``. ``args``/``kwargs`` are example
    inputs: the result is checked against the original on them and on random inputs of the same shapes.
    Options: ``capture``, ``verify`` (default True), ``random_checks``, ``tolerance``, ``seed``.
    """
    import torch

    if _is_onnx(model):
        from branchfold.passes.onnx_pipeline import fold_onnx

        return fold_onnx(model, **options)
    if isinstance(model, torch.export.ExportedProgram):
        from branchfold.passes.export_pipeline import fold_exported_program

        return fold_exported_program(model, args, kwargs, **options)
    if isinstance(model, torch.nn.Module):
        return fold_module(
            model,
            args,
            kwargs,
            capture_method=options.pop("capture", "export"),
            verify_result=options.pop("verify", True),
            **options,
        )
    raise InputError(
        f"branchfold cannot fold a {type(model).__name__}: pass a torch.nn.Module or torch.fx.GraphModule"
    )


def fold(model: Any, args: Sequence = (), kwargs: dict | None = None, **options) -> Any:
    """Fold ``model`` and return the folded model (the report is on ``fold_with_report``)."""
    return fold_with_report(model, args, kwargs, **options).model


def _is_onnx(model: Any) -> bool:
    """An onnx.ModelProto or onnx_ir.Model, recognized without importing onnx for torch users."""
    return type(model).__module__.split(".")[0] in ("onnx", "onnx_ir") and type(model).__name__ in (
        "ModelProto",
        "Model",
    )
