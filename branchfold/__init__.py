"""branchfold: fold parallel linear branches and linear chains into single ops, verified.

    import branchfold
    deploy = branchfold.fold(model.eval(), (x,))

    train_model = branchfold.expand(model, branches=4)   # the training side: branches summed, same function
    branchfold.merge(train_model, branches=2)             # fewer branches mid-training, same function
"""

from branchfold.api import fold, fold_with_report
from branchfold.errors import BranchfoldError, CaptureError, InputError
from branchfold.passes.fx import FoldBranchesPass, ShapePropPass
from branchfold.passes.pipeline import FoldResult
from branchfold.report import FoldReport
from branchfold.training import MergeReport, expand, merge

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
    "fold",
    "fold_with_report",
    "merge",
]
__version__ = "0.1.0"
