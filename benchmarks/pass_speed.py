"""Pass speed and memory: how the fold scales with graph size, for FX and for ONNX.

The graphs are stacks of N identical branch blocks (K = 4 parallel linears on one input, summed, then a
nonlinearity), so every block is one region and the node count grows exactly with N: a linear pass has a
constant time per node. Capture and shape propagation happen once per size and are not timed; each timed
round folds a fresh copy. Peak memory is the Python-heap peak (``tracemalloc``) of one separate, untimed
fold: it counts the graph objects the pass creates, not tensor storage (C++ allocations are invisible to
tracemalloc). The ViT-B point times only the FX fold pass on a captured ViT-B-sized graph.
"""

from __future__ import annotations

import copy
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from benchmarks.deploy import quiet, reason
from benchmarks.timing import interleaved_fresh
from branchfold.passes.capture import capture
from branchfold.passes.fx import FoldBranchesPass, ShapePropPass

BRANCHES = 4
WIDTH = 16
LINEARITY_GOAL = 1.5  # time per node at the largest size / at the smallest
VIT_B_GOAL_S = 1.0


class Block(nn.Module):
    """K parallel linears on one input, summed, then GELU: one foldable region."""

    def __init__(self, width: int = WIDTH, branches: int = BRANCHES) -> None:
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(width, width) for _ in range(branches))
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return self.act(out)


def fx_stack(blocks: int) -> fx.GraphModule:
    """A symbolic_trace of ``blocks`` stacked blocks, with shapes recorded (the fold needs them)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[Block() for _ in range(blocks)]).eval()
    gm = fx.symbolic_trace(model)
    ShapePropPass([torch.randn(2, WIDTH)]).call(gm)
    return gm


def fx_copy(gm: fx.GraphModule) -> fx.GraphModule:
    return fx.GraphModule(gm, copy.deepcopy(gm.graph))


def fx_fold(gm: fx.GraphModule) -> int:
    fold = FoldBranchesPass()
    fold.call(gm)
    assert fold.result is not None
    return len(fold.result.regions)


def onnx_stack(blocks: int) -> Any:
    """The same stack as ONNX, written the way torch's exporter writes linears: MatMul by the transposed
    weight (an initializer) and Add of the bias; the sum is a chain of Adds, the nonlinearity a Relu."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits = [], []
    x = "input"
    for b in range(blocks):
        terms = []
        for k in range(BRANCHES):
            w, bias = f"b{b}.w{k}", f"b{b}.bias{k}"
            inits.append(numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32), w))
            inits.append(numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), bias))
            nodes.append(helper.make_node("MatMul", [x, w], [f"b{b}.mm{k}"]))
            nodes.append(helper.make_node("Add", [f"b{b}.mm{k}", bias], [f"b{b}.lin{k}"]))
            terms.append(f"b{b}.lin{k}")
        acc = terms[0]
        for k, term in enumerate(terms[1:], 1):
            nodes.append(helper.make_node("Add", [acc, term], [f"b{b}.sum{k}"]))
            acc = f"b{b}.sum{k}"
        x = "output" if b == blocks - 1 else f"b{b}.out"
        nodes.append(helper.make_node("Relu", [acc], [x]))
    graph = helper.make_graph(
        nodes, "stack",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4, WIDTH])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4, WIDTH])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def onnx_sides(proto: Any) -> dict[str, tuple[Callable[[], object], Callable[[object], object]]]:
    """branchfold's ONNX pass alone (on onnx_ir, as the pass runs in a pipeline), branchfold's public
    ``fold`` with ``verify=False`` (proto in, proto out, like the two other tools), onnxscript's optimizer
    and onnxslim, each on a fresh copy of the same model."""
    import onnx
    import onnx_ir as ir

    data = proto.SerializeToString()
    sides: dict[str, tuple[Callable[[], object], Callable[[object], object]]] = {}

    def fresh_proto() -> Any:
        return onnx.ModelProto.FromString(data)

    try:
        from branchfold.passes.onnx import fold_passes
        from branchfold.passes.onnx_pipeline import fold_onnx

        sides["branchfold pass"] = (lambda: ir.from_proto(fresh_proto()), lambda m: fold_passes()(m))
        sides["branchfold fold()"] = (fresh_proto, lambda m: fold_onnx(m, verify=False))
    except ImportError:
        pass
    try:
        import onnxscript.optimizer

        sides["onnxscript optimize"] = (fresh_proto, onnxscript.optimizer.optimize)
    except ImportError:
        pass
    try:
        import onnxslim

        sides["onnxslim"] = (fresh_proto, onnxslim.slim)
    except ImportError:
        pass
    return sides


def onnx_regions(proto: Any) -> int:
    import onnx_ir as ir

    from branchfold.passes.onnx import fold_passes

    passes = fold_passes()
    passes(ir.from_proto(proto))
    return len(passes.passes[0].result.regions)


def _keeping(name: str, work: Callable[[object], object], last: dict[str, Any]) -> Callable[[object], object]:
    """``work`` that also keeps the model it produced (the input, for passes that work in place), so that
    node counts come from a timed run instead of one more run of a slow tool."""

    def run(subject: object) -> None:
        out = work(subject)
        model = getattr(out, "model", out)
        last[name] = subject if model is None else model

    return run


def _count_nodes(model: Any) -> int:
    import onnx_ir as ir

    from benchmarks.deploy import count_onnx_nodes

    if isinstance(model, ir.Model):
        return len(list(model.graph))
    return count_onnx_nodes(model)


def _peak_mib(prepare: Callable[[], object], work: Callable[[object], object]) -> float:
    subject = prepare()
    tracemalloc.start()
    try:
        with quiet():
            work(subject)
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _speed_row(frontend: str, blocks: int, nodes: int, median: float, peak: float, regions: int | None) -> dict:
    return {
        "section": "pass_speed",
        "frontend": frontend,
        "blocks": blocks,
        "nodes": nodes,
        "median_s": median,
        "us_per_node": median / nodes * 1e6,
        "peak_mib": peak,
        "regions": regions,
    }


def fx_rows(sizes: list[int], rounds: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    for blocks in sizes:
        log(f"pass speed (fx): {blocks} blocks")
        gm = fx_stack(blocks)
        nodes = len(gm.graph.nodes)
        timing = interleaved_fresh({"fx": (lambda gm=gm: fx_copy(gm), fx_fold)}, rounds)["fx"]
        regions = fx_fold(fx_copy(gm))
        peak = _peak_mib(lambda gm=gm: fx_copy(gm), fx_fold)
        rows.append(_speed_row("fx", blocks, nodes, timing.median, peak, regions))
    return rows


def onnx_rows(sizes: list[int], rounds: int, log: Callable[[str], None], tools_up_to: int) -> list[dict]:
    """Pass-speed rows for branchfold's ONNX pass; tool-comparison rows up to ``tools_up_to`` blocks."""
    rows: list[dict] = []
    for blocks in sizes:
        log(f"pass speed (onnx): {blocks} blocks")
        proto = onnx_stack(blocks)
        nodes = len(proto.graph.node)
        sides = onnx_sides(proto)
        last: dict[str, Any] = {}
        if "branchfold pass" not in sides:
            rows.append({"section": "pass_speed", "frontend": "onnx", "blocks": blocks, "nodes": nodes,
                         "note": "not available (branchfold.passes.onnx missing)"})
        if blocks > tools_up_to:
            sides = {k: v for k, v in sides.items() if k == "branchfold pass"}
        try:
            with quiet():
                timings = interleaved_fresh({k: (prep, _keeping(k, work, last)) for k, (prep, work) in sides.items()},
                                            rounds)
        except Exception as e:  # a tool failing on this graph is a finding, not a crash
            rows.append({"section": "onnx_tools", "blocks": blocks, "nodes": nodes, "tool": "all",
                         "note": f"failed ({reason(e)})"})
            continue
        if "branchfold pass" in timings:
            peak = _peak_mib(*sides["branchfold pass"])
            regions = onnx_regions(proto)
            rows.append(_speed_row("onnx", blocks, nodes, timings["branchfold pass"].median, peak, regions))
        if blocks <= tools_up_to:
            for tool, timing in timings.items():
                try:
                    after: int | None = _count_nodes(last[tool])
                except Exception:  # counting is a courtesy; the timing stands without it
                    after = None
                rows.append({"section": "onnx_tools", "blocks": blocks, "nodes": nodes, "tool": tool,
                             "median_s": timing.median, "nodes_after": after})
    return rows


def _vit_b_models() -> list[tuple[str, Callable[[], nn.Module], Callable[[], tuple]]]:
    import transformers as tf

    from branchfold.zoo import seed_vit

    def hf() -> nn.Module:
        torch.manual_seed(0)
        return tf.ViTModel(tf.ViTConfig(), add_pooling_layer=False).eval()

    def seed() -> nn.Module:
        return seed_vit(depth=12, branches=4, dim=768, heads=12, image_size=224, patch=16).eval()

    def narrow() -> nn.Module:
        return seed_vit(depth=12, branches=4, dim=48, heads=12, image_size=224, patch=16).eval()

    images = lambda: (torch.randn(1, 3, 224, 224),)  # noqa: E731
    return [("HF ViTModel(ViTConfig()) (ViT-B/16)", hf, images),
            ("seed ViT-B/16, K = 4 (12 x 768, 4 x 86M params)", seed, images),
            ("the same seed ViT-B graph at width 48 (graph work without the weight arithmetic)", narrow, images)]


def vit_b_rows(rounds: int, log: Callable[[str], None]) -> list[dict]:
    """The FX fold pass alone on ViT-B-sized graphs captured with torch.export (capture not timed)."""
    import time

    rows = []
    for name, build, inputs in _vit_b_models():
        log(f"pass speed: {name}")
        try:
            model, args = build(), inputs()
            start = time.perf_counter()
            with quiet():
                gm = capture(model, args, {}, "export").module
            capture_s = time.perf_counter() - start
            timing = interleaved_fresh({"fx": (lambda gm=gm: fx_copy(gm), fx_fold)}, rounds)["fx"]
            regions = fx_fold(fx_copy(gm))
            rows.append({"section": "vit_b", "model": name, "nodes": len(gm.graph.nodes),
                         "capture_s": capture_s, "fold_s": timing.median, "regions": regions,
                         "goal_met": timing.median < VIT_B_GOAL_S})
            del model, gm
        except Exception as e:  # a model that cannot be built or captured is reported as such
            rows.append({"section": "vit_b", "model": name, "note": f"not available ({reason(e)})"})
    return rows


def run(quick: bool = False, log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Pass speed rows (FX, ONNX), ONNX tool comparison and the ViT-B point (skipped when ``quick``)."""
    if quick:
        sizes, rounds, tools_up_to = [2, 8], 2, 2
    else:
        sizes, rounds, tools_up_to = [10, 30, 100, 300, 1000, 2500], 5, 100
    rows = fx_rows(sizes, rounds, log) + onnx_rows(sizes, rounds, log, tools_up_to)
    if not quick:
        rows += vit_b_rows(rounds, log)
    return rows
