"""The graph dynamo hands a ``torch.compile`` backend, for running the FX passes on that dialect in the
tests and the fuzzer. It resets dynamo before and after, which a library call must never do to its
caller's compiled models; tests and the fuzzer own their process."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import fx, nn


def dynamo_graph(model: nn.Module, inputs: Sequence[torch.Tensor]) -> tuple[fx.GraphModule, dict, Callable]:
    """The graph dynamo hands a ``torch.compile`` backend, the placeholder constants, and a runner.

    For running ``FoldBranchesPass(constants=...)`` on the dialect the backend sees (tests, fuzzing).

    Parameters and buffers reach the backend as placeholders; the ones that are not user inputs are
    the constants ``FoldBranchesPass(constants=...)`` needs.
    """
    got: dict = {}

    def backend(gm, example_inputs):
        got["gm"], got["inputs"] = gm, list(example_inputs)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True, dynamic=False)(*inputs)
    torch._dynamo.reset()
    gm, example = got["gm"], got["inputs"]
    user = {id(t) for t in inputs}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    constants = {p.name: t for p, t in zip(placeholders, example) if id(t) not in user}
    order = [id(t) for t in example]

    def run(*xs):
        by_id = dict(zip([id(t) for t in inputs], xs))
        return gm(*[by_id.get(i, t) for i, t in zip(order, example)])

    return gm, constants, run
