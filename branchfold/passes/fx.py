"""The FX passes, in the ``torch.fx.passes.infra`` convention so they compose in a user's PassManager."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from branchfold import compat
from branchfold.adapters.fx import FxFoldResult, fold_graph
from branchfold.passes.fx_inplace import CATEGORY as IN_PLACE
from branchfold.passes.fx_inplace import FunctionalizeInPlacePass, Mutations
from branchfold.rewriter.region import NotFolded, Region


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

    In-place arithmetic that provably writes a private value is first rewritten out of place
    (``passes.fx_inplace``), so ``out += branch(x)`` folds like ``out = out + branch(x)``; regions that
    would move a read across an in-place write that stays are not folded (category ``in-place``).
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
        functionalize = FunctionalizeInPlacePass()
        rewritten = functionalize.call(graph_module).modified  # ``out += branch(x)`` folds like ``+``
        mutations = Mutations(graph_module)
        vetoed: list[NotFolded] = []

        def select(region: Region) -> bool:
            if self.select is not None and not self.select(region):
                return False
            why = mutations.region_conflict(region)
            if why:
                vetoed.append(NotFolded(region.value, IN_PLACE, why, region.labels))
            return not why

        self.result = fold_graph(graph_module, self.constants, select if mutations else self.select)
        self.result.not_folded += functionalize.refused + vetoed
        modified = bool(self.result.regions)
        if modified:
            graph_module.recompile()
        return PassResult(graph_module, modified or rewritten)


class PlainCallingConventionPass(PassBase):
    """Drops torch.export's pytree wrapper where it only flattens and unflattens plain tensors.

    An exported module flattens its inputs and unflattens its outputs on every call (about 0.1 ms,
    as much as a small folded CNN's compute). When the inputs are positional tensors and the output
    is one tensor or a flat tuple, a plain forward computes exactly the same: the graph, its input
    guards and its output structure are unchanged. Anything else (dicts, nested or ``ModelOutput``
    outputs, keyword inputs) keeps the wrapper.
    """

    def call(self, graph_module: fx.GraphModule) -> PassResult:
        graph = graph_module.graph
        codegen = compat.codegen(graph)
        info = getattr(codegen, "pytree_info", None)
        if not isinstance(codegen, compat.PyTreeCodeGen) or info is None or info.out_spec is None:
            return PassResult(graph_module, False)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if info.in_spec != pytree.tree_structure((tuple(range(len(placeholders))), {})):
            return PassResult(graph_module, False)
        output = next(n for n in graph.nodes if n.op == "output")
        (returned,) = output.args
        if not isinstance(returned, (tuple, list)):
            return PassResult(graph_module, False)
        if info.out_spec.is_leaf() and len(returned) == 1:
            output.args = (returned[0],)
        elif info.out_spec != pytree.tree_structure(tuple(range(len(returned)))):
            return PassResult(graph_module, False)
        compat.set_codegen(graph, compat.CodeGen())
        graph_module.recompile()
        return PassResult(graph_module, True)


def lift_folded_weights(
    gm: fx.GraphModule, after: fx.Node | None = None, prefix: str = "", taken: Collection[str] = ()
) -> list[tuple[str, fx.Node, torch.Tensor]]:
    """Turn the folded weights (``get_attr`` of the new parameters) into placeholders.

    The placeholders go after ``after`` (default: after the last one); a weight name found in ``taken``
    is renamed. Returns ``(name, placeholder, tensor)`` per weight, in placeholder order. The
    torch.compile backend compiles graphs that take folded weights as inputs, so a refold only swaps
    tensors; an ExportedProgram lifts every weight by design.
    """
    graph = gm.graph
    anchor = after or [n for n in graph.nodes if n.op == "placeholder"][-1]
    lifted: dict[str, tuple[str, fx.Node, torch.Tensor]] = {}
    used = set(taken)
    for node in list(graph.nodes):
        if node.op != "get_attr" or not str(node.target).startswith("branchfold_"):
            continue
        target = str(node.target)
        if target not in lifted:
            value = getattr(gm, target).detach()
            delattr(gm, target)
            name, k = target, 0
            while name in used:
                k += 1
                name = f"{target}_{k}"
            used.add(name)
            with graph.inserting_after(anchor):
                anchor = graph.placeholder(prefix + name)
            anchor.meta["example_value"] = value
            lifted[target] = (name, anchor, value)
        node.replace_all_uses_with(lifted[target][1])
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return list(lifted.values())
