"""branchfold: fold parallel linear branches and linear chains into single ops, verified.

    import branchfold
    deploy = branchfold.fold(model.eval(), (x,))
"""

from branchfold.api import fold, fold_with_report
from branchfold.errors import BranchfoldError, CaptureError, InputError
from branchfold.passes.fx import FoldBranchesPass, ShapePropPass
from branchfold.passes.pipeline import FoldResult
from branchfold.report import FoldReport

__all__ = [
    "BranchfoldError",
    "CaptureError",
    "FoldBranchesPass",
    "FoldReport",
    "FoldResult",
    "InputError",
    "ShapePropPass",
    "fold",
    "fold_with_report",
]
__version__ = "0.1.0"
