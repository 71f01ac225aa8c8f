"""The FX passes, in the ``torch.fx.passes.infra`` convention so they compose in a user's PassManager."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp

from branchfold.rewriter.fx_adapter import FxFoldResult, fold_graph
from branchfold.rewriter.region import Region


def has_shapes(gm: fx.GraphModule) -> bool:
    return all(
        any(k in n.meta for k in ("val", "example_value", "tensor_meta"))
        for n in gm.graph.nodes
        if n.op == "placeholder"
    )


class ShapePropPass(PassBase):
    """Records static shapes on every node (needed for BatchNorm ranks and broadcast checks)."""

    def __init__(self, example_inputs: Sequence) -> None:
        super().__init__()
        self.example_inputs = list(example_inputs)

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(*self.example_inputs)
        return PassResult(graph_module, False)


class FoldBranchesPass(PassBase):
    """Folds parallel linear branches and linear chains into single ops.

    ``constants`` names placeholders whose tensors are fixed (dynamo graphs pass weights as inputs).
    ``select`` can veto individual regions (used to undo a region that failed its check).
    The last result (regions folded and not folded) is kept on ``self.result``.
    """

    def __init__(
        self,
        constants: Mapping[str, torch.Tensor] | None = None,
        select: Callable[[Region], bool] | None = None,
    ) -> None:
        super().__init__()
        self.constants = dict(constants or {})
        self.select = select
        self.result: FxFoldResult | None = None

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        self.result = fold_graph(graph_module, self.constants, self.select)
        modified = bool(self.result.regions)
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified)
