"""The ONNX passes, as ``onnx_ir.passes`` classes so they compose in a PassManager (e.g. with onnxscript's
optimizer before or after them).

    import onnx_ir as ir
    from branchfold.passes.onnx import fold_passes
    model = ir.load("model.onnx")
    fold_passes()(model)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import onnx_ir as ir
import onnx_ir.passes.common as common

from branchfold.adapters.onnx import OnnxFoldResult, fold_graph
from branchfold.passes.onnx_untouched import Liveness
from branchfold.rewriter.region import Region
from branchfold.storage.onnx_folded import fingerprint, same_bytes


class FoldBranchesPass(ir.passes.InPlacePass):
    """Folds parallel linear branches and linear chains of the main graph into single ops.

    Shapes are needed for BatchNorm ranks and broadcast checks, so ONNX shape inference runs first
    (``infer_shapes=False`` when a pass before this one already did it). Nodes left dead by the fold
    are removed (only those: what was dead in the input stays, ``onnx_untouched.Liveness``); initializers are
    never modified. ``select`` can veto single regions (used to undo a
    region that failed its check). The last result is kept on ``self.result``.

    Folded weights that came out equal are stored once (GroupedMLP: the exporter duplicated a module's
    weights at each call site, and each site folds to the same result). Only the weights this pass wrote
    are compared: hashing every weight of the model would read all of it from disk.
    """

    def __init__(self, select: Callable[[Region], bool] | None = None, infer_shapes: bool = True) -> None:
        super().__init__()
        self.select = select
        self.infer_shapes = infer_shapes
        self.result: OnnxFoldResult | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.infer_shapes:
            common.ShapeInferencePass(strict_mode=False)(model)
        stored = set(model.graph.initializers)
        before = Liveness(model.graph)
        self.result = fold_graph(model.graph, self.select)
        modified = bool(self.result.regions)
        if modified:
            before.sweep(model.graph)
            store_equal_once(model.graph, [v for name, v in model.graph.initializers.items() if name not in stored])
        return ir.passes.PassResult(model, modified)


def store_equal_once(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Point every reader of an initializer among ``values`` that equals an earlier one (dtype, shape and
    every byte) at the earlier one, and drop it. Candidates are matched on a sample of their elements
    first, so distinct weights are never read whole, and a folded weight is never computed whole."""
    candidates = [v for v in values if v.const_value is not None and not v.is_graph_output()]
    kinds = Counter((v.const_value.dtype, tuple(v.const_value.shape.numpy())) for v in candidates)
    seen: dict[tuple, list[ir.Value]] = {}
    for v in candidates:
        t = v.const_value
        kind = (t.dtype, tuple(t.shape.numpy()))
        if kinds[kind] < 2:
            continue  # nothing else of its dtype and shape: not read at all
        key = (*kind, fingerprint(t))
        same = next((u for u in seen.get(key, ()) if same_bytes(u.const_value, t)), None)
        if same is None:
            seen.setdefault(key, []).append(v)
            continue
        v.replace_all_uses_with(same)
        graph.initializers.pop(v.name)


def fold_passes(select: Callable[[Region], bool] | None = None, infer_shapes: bool = True) -> ir.passes.Sequential:
    """Fold (storing equal folded weights once), then restore a topological order.
    ``infer_shapes=False`` when the model already carries its shapes."""
    return ir.passes.Sequential(
        FoldBranchesPass(select, infer_shapes),
        common.TopologicalSortPass(),
    )
