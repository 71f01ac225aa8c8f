"""The ONNX passes, as ``onnx_ir.passes`` classes so they compose in a PassManager (e.g. with onnxscript's
optimizer before or after them).

    import onnx_ir as ir
    from branchfold.passes.onnx import fold_passes
    model = ir.load("model.onnx")
    fold_passes()(model)
"""

from __future__ import annotations

from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common

from branchfold.adapters.onnx import OnnxFoldResult, fold_graph
from branchfold.rewriter.region import Region


class FoldBranchesPass(ir.passes.InPlacePass):
    """Folds parallel linear branches and linear chains of the main graph into single ops.

    Shapes are needed for BatchNorm ranks and broadcast checks, so ONNX shape inference runs first
    (``infer_shapes=False`` when a pass before this one already did it). Nodes left dead by the fold
    are removed; initializers are never modified. ``select`` can veto single regions (used to undo a
    region that failed its check). The last result is kept on ``self.result``.
    """

    def __init__(self, select: Callable[[Region], bool] | None = None, infer_shapes: bool = True) -> None:
        super().__init__()
        self.select = select
        self.infer_shapes = infer_shapes
        self.result: OnnxFoldResult | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.infer_shapes:
            common.ShapeInferencePass(strict_mode=False)(model)
        self.result = fold_graph(model.graph, self.select)
        modified = bool(self.result.regions)
        if modified:
            common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified)


def fold_passes(select: Callable[[Region], bool] | None = None) -> ir.passes.Sequential:
    """Fold, then store weights that ended up equal once (GroupedMLP weights the exporter duplicated)
    and restore a topological order."""
    return ir.passes.Sequential(
        FoldBranchesPass(select),
        common.DeduplicateHashedInitializersPass(),
        common.TopologicalSortPass(),
    )
