"""branchfold: fold parallel linear branches and linear chains into single ops, verified.

    import branchfold
    deploy = branchfold.fold(model.eval(), (x,))

    train_model = branchfold.expand(model, branches=4)   # the training side: branches summed, same function
    branchfold.merge(train_model, branches=2)             # fewer branches mid-training, same function

The public names are imported on first use (module ``__getattr__``): ``import branchfold`` and the
``branchfold`` command's ``--help`` do not pay for importing torch, which only a fold needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from branchfold.errors import BranchfoldError, CaptureError, InputError

if TYPE_CHECKING:
    from branchfold.api import export, fold, fold_with_report
    from branchfold.passes.fx import FoldBranchesPass, ShapePropPass
    from branchfold.passes.pipeline import FoldResult
    from branchfold.report import FoldReport
    from branchfold.training import MergeReport, expand, merge

_LAZY = {
    "export": "branchfold.api",
    "fold": "branchfold.api",
    "fold_with_report": "branchfold.api",
    "FoldBranchesPass": "branchfold.passes.fx",
    "ShapePropPass": "branchfold.passes.fx",
    "FoldResult": "branchfold.passes.pipeline",
    "FoldReport": "branchfold.report",
    "MergeReport": "branchfold.training",
    "expand": "branchfold.training",
    "merge": "branchfold.training",
}

__all__ = [
    "BranchfoldError",
    "CaptureError",
    "FoldBranchesPass",
    "FoldReport",
    "FoldResult",
    "InputError",
    "MergeReport",
    "ShapePropPass",
    "expand",
    "export",
    "fold",
    "fold_with_report",
    "merge",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'branchfold' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
