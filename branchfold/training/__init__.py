"""The training side of reparameterization: ``expand`` a model into branches, ``merge`` them during
training, then ``branchfold.fold`` the result into a single path for deployment.

    train_model = branchfold.expand(model, branches=4)    # a new model, same function
    ...                                                    # train
    report = branchfold.merge(train_model, branches=2)     # in place, same function
    report.update_optimizer(optimizer)
    deploy = branchfold.fold(train_model.eval(), (x,))
"""

from .expand import ConvStyle, Selection, Selector, expand
from .merge import MergeReport, ReplacedParameters, merge
from .modules import BranchedConv, BranchedLinear

__all__ = [
    "BranchedConv",
    "BranchedLinear",
    "ConvStyle",
    "MergeReport",
    "ReplacedParameters",
    "Selection",
    "Selector",
    "expand",
    "merge",
]
