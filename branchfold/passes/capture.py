"""Turning a user's nn.Module into an FX GraphModule, with one clear error when that fails."""

from __future__ import annotations

from typing import Literal

import torch
from torch import fx, nn

from branchfold.errors import CaptureError

CaptureMethod = Literal["export", "symbolic_trace"]

_OTHER = {"export": "symbolic_trace", "symbolic_trace": "export"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "from user code", "File ")):
            return line[:300]
    return type(e).__name__


def capture(model: nn.Module, args: tuple, kwargs: dict | None, method: CaptureMethod) -> fx.GraphModule:
    """A GraphModule computing ``model(*args, **kwargs)`` that shares no mutable state we write to.

    torch.export's unlifted module keeps the model's pytree calling convention (dicts, tuples,
    ModelOutput come back as they went in); symbolic_trace keeps the module's forward signature.
    """
    name = type(model).__name__
    if method not in _OTHER:
        raise CaptureError(f"unknown capture method {method!r}: use 'export' or 'symbolic_trace'")
    try:
        if method == "export":
            with torch.no_grad():
                ep = torch.export.export(model, tuple(args), kwargs=kwargs or None, strict=False)
            return ep.module()
        return fx.symbolic_trace(model)
    except Exception as e:  # torch raises many types here; all are the user's model not tracing
        raise CaptureError(
            f"{method} could not capture {name}: {_first_line(e)}. "
            f"Try capture={_OTHER[method]!r}, or pass an already traced torch.fx.GraphModule."
        ) from None
