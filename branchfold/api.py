"""The public entry points: one ``fold`` for every kind of model branchfold reads."""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from branchfold.errors import InputError
from branchfold.passes.pipeline import FoldResult, fold_module
from branchfold.stages import StageClock, recording


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
    import torch

    with quiet_torch(), recording() as seconds:
        result = _dispatch(torch, model, args, kwargs, options)
    result.report.stages = result.report.stages or seconds  # an ONNX fold's come from its progress messages
    return result


HOW_TO_PASS = (
    "pass example inputs as a tuple: fold(model, (x,)) for one input, fold(model, (x, mask)) for two, "
    "keyword inputs as fold(model, (x,), {'mask': mask})"
)


def _dispatch(torch, model: Any, args, kwargs, options: dict) -> FoldResult:
    if isinstance(args, torch.Tensor) or not isinstance(args, (tuple, list)):
        raise InputError(f"example inputs must be a tuple, not a {type(args).__name__}: {HOW_TO_PASS}")
    if isinstance(model, (str, os.PathLike)) or _is_onnx(model):
        from branchfold.passes.onnx_pipeline import fold_onnx

        if args or kwargs:
            raise InputError("an ONNX model takes no example inputs: its declared input shapes are used")
        clock = StageClock(options.get("progress"))
        result = fold_onnx(model, **_checked(fold_onnx, {**options, "progress": clock}, "an ONNX model"))
        result.report.stages = clock.finish()
        return result
    if isinstance(model, torch.export.ExportedProgram):
        from branchfold.passes.export_pipeline import fold_exported_program

        return fold_exported_program(
            model, args, kwargs, **_checked(fold_exported_program, options, "an ExportedProgram")
        )
    if isinstance(model, torch.nn.Module):
        _check_signature(model, args, kwargs)
        renamed = {"capture": "capture_method", "verify": "verify_result"}
        options = {renamed.get(k, k): v for k, v in options.items()}
        return fold_module(model, args, kwargs, **_checked(fold_module, options, "a torch module", renamed))
    raise InputError(
        f"branchfold cannot fold a {type(model).__name__}: pass a torch.nn.Module, torch.fx.GraphModule, "
        "torch.export.ExportedProgram, onnx.ModelProto or onnx_ir.Model"
    )


def _check_signature(model: Any, args: Sequence, kwargs: dict | None) -> None:
    """One message saying how to pass example inputs, before a capture fails on them with torch's words."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward Python cannot describe: let the capture try
        return
    try:
        signature.bind(*args, **(kwargs or {}))
    except TypeError as e:
        got = "no example inputs" if not args and not kwargs else f"{len(args)} positional input(s)"
        raise InputError(
            f"{type(model).__name__}.forward{signature} cannot be called with {got} ({e}): {HOW_TO_PASS}"
        ) from None


@contextlib.contextmanager
def quiet_torch() -> Iterator[None]:
    """Hides torch's own deprecation notices raised inside our calls (``isinstance(treespec, LeafSpec)``
    from torch's deepcopy of exported programs): the user can do nothing about them. Scoped, so the
    user's own code still sees every warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec\)` is deprecated", category=FutureWarning)
        yield


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
    """Fold ``model`` and return the folded model (the report is on ``fold_with_report``).

    A model in training mode folds no BatchNorm or Dropout; ``fold`` says so with a warning, since it
    returns no report to read it in.
    """
    result = fold_with_report(model, args, kwargs, **options)
    if _in_training(model):
        warnings.warn(
            f"{type(model).__name__} is in training mode: its BatchNorm and Dropout were left unfolded; "
            "call model.eval() before branchfold.fold",
            UserWarning,
            stacklevel=2,
        )
    return result.model


def _in_training(model: Any) -> bool:
    modules = getattr(model, "modules", None)
    return callable(modules) and hasattr(model, "training") and any(m.training for m in modules())


def export(model: Any, args: Sequence, kwargs: dict | None = None) -> Any:
    """``torch.export.export(model, args, kwargs)`` with the batch dimension of every tensor input, and the
    sequence length of integer ``[B, T]`` inputs, free wherever the model allows it.

    A folded module keeps the free dimensions of its capture, but ``torch.export.export`` records static
    shapes unless it is told which ones vary: this tells it the same ones ``fold`` asked for, so the
    program runs at any batch size (an example batch of 1 is traced at 2, as in ``fold``).
    """
    from branchfold.passes.capture import export_free

    with quiet_torch():
        return export_free(model, tuple(args), kwargs)


def _is_onnx(model: Any) -> bool:
    """An onnx.ModelProto or onnx_ir.Model, recognized without importing onnx for torch users."""
    return type(model).__module__.split(".")[0] in ("onnx", "onnx_ir") and type(model).__name__ in (
        "ModelProto",
        "Model",
    )
