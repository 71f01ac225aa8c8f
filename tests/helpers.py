"""Shared test helpers: capture a model in each FX dialect, fold it with the pass, compare, count ops.

The three dialects are the ones the FX side must read (docs/design.md §5): ``symbolic_trace`` (call_module),
``dynamo`` (functional calls, weights as placeholders given as constants), ``export`` (ATen, via
``ExportedProgram.module()``) and ``export-decomposed`` (``addmm``/``convolution``/``_native_batch_norm``).
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import fx, nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `fuzz` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from branchfold.passes.fx import FoldBranchesPass, ShapePropPass, has_shapes  # noqa: E402
from branchfold.passes.pipeline import count_ops  # noqa: E402
from branchfold.report import FoldedRegion, FoldReport, Skipped, Totals  # noqa: E402
from branchfold.report_data import Step  # noqa: E402
from branchfold.rewriter.region import NotFolded, Region  # noqa: E402
from fuzz.dynamo import dynamo_graph  # noqa: E402

aten = torch.ops.aten
DIALECTS = ("symbolic_trace", "dynamo", "export")

LINEAR_TARGETS = {torch._C._nn.linear, torch.nn.functional.linear, aten.linear.default, aten.addmm.default,
                  aten.mm.default}  # fmt: skip  (matmul of two activations is attention, not a linear)
CONV_TARGETS = {torch.conv1d, torch.conv2d, torch.conv3d, torch.nn.functional.conv1d, torch.nn.functional.conv2d,
                torch.nn.functional.conv3d, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                aten.convolution.default}  # fmt: skip
BN_TARGETS = {torch.nn.functional.batch_norm, torch.batch_norm, aten.batch_norm.default,
              aten._native_batch_norm_legit_no_training.default}  # fmt: skip
MODULES = {"linear": nn.Linear, "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "bn": nn.modules.batchnorm._BatchNorm}
TARGETS = {"linear": LINEAR_TARGETS, "conv": CONV_TARGETS, "bn": BN_TARGETS}


def rel_err(ref, out) -> float:
    """max |out - ref| / max |ref| over the leaves of two output pytrees."""
    from branchfold.passes.verify import relative_error

    return relative_error(ref, out)


def count_kind(gm: fx.GraphModule, kind: str) -> int:
    """How many linear / conv / bn ops a graph computes, whatever its dialect."""
    n = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            n += isinstance(gm.get_submodule(node.target), MODULES[kind])
        elif node.op == "call_function":
            n += node.target in TARGETS[kind]
    return n


@dataclass
class Folded:
    gm: fx.GraphModule
    run: Callable
    regions: list[Region]
    not_folded: list[NotFolded]
    ops_before: int
    ops_after: int
    before: dict[str, int]  # linear / conv / bn op counts before folding

    def count(self, kind: str) -> int:
        return count_kind(self.gm, kind)

    @property
    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.regions:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def reasons(self) -> set[str]:
        return {n.category for n in self.not_folded}


def capture(model: nn.Module, inputs: Sequence[torch.Tensor], dialect: str) -> tuple[fx.GraphModule, dict, Callable]:
    if dialect == "symbolic_trace":
        gm = fx.symbolic_trace(model)
        return gm, {}, gm
    if dialect == "dynamo":
        return dynamo_graph(model, inputs)
    with torch.no_grad():
        ep = torch.export.export(model, tuple(inputs), strict=False)
    if dialect == "export-decomposed":
        ep = ep.run_decompositions()
    gm = ep.module()
    return gm, {}, gm


def fold_in(dialect: str, model: nn.Module, inputs: Sequence[torch.Tensor], check: bool = True) -> Folded:
    """Capture ``model`` in ``dialect``, fold with ``FoldBranchesPass`` and (by default) check equality."""
    inputs = tuple(inputs)
    gm, constants, run = capture(model, inputs, dialect)
    if not has_shapes(gm):
        ShapePropPass(inputs).call(gm)
    before = {k: count_kind(gm, k) for k in MODULES}
    ops_before = count_ops(gm)
    with torch.no_grad():
        reference = model(*inputs)
    p = FoldBranchesPass(constants=constants)
    p.call(gm)
    assert p.result is not None
    folded = Folded(gm, run, p.result.regions, p.result.not_folded, ops_before, count_ops(gm), before)
    if check:
        assert_close(reference, run, inputs)
    return folded


def assert_close(reference, run: Callable, inputs: Sequence[torch.Tensor], tol: float = 1e-5) -> None:
    """The folded graph equals the original on ``inputs`` and on a fresh random input set."""
    with torch.no_grad():
        err = rel_err(reference, run(*inputs))
    assert err <= tol, f"relative error {err:.3g} > {tol}"


def fresh(inputs: Sequence[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(x.shape, generator=g, dtype=x.dtype) for x in inputs)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine parameters, so folding it is really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model


def small_bert():
    """A one-layer Hugging Face BERT with random weights and no dropout (transformers is a test dependency)."""
    import transformers

    config = transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of every parameter and buffer, to prove a model was not modified."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def unchanged(model: nn.Module, snap: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict(keep_vars=True)
    return now.keys() == snap.keys() and all(torch.equal(now[k].detach(), v) for k, v in snap.items())


__all__ = ["DIALECTS", "Folded", "assert_close", "capture", "copy", "count_kind", "dynamo_graph", "fold_in",
           "fresh", "randomize_bn", "rel_err", "small_bert", "snapshot", "unchanged"]  # fmt: skip


# ----------------------------------------------------------------------------------------------
# fold reports for the HTML page's tests


def _region(at: str, place: str, kind: str = "parallel-sum") -> FoldedRegion:
    steps = [Step("Linear 8→8", "affine", [-1]), Step("Linear 8→8", "affine", [-1]), Step("+", "add", [0, 1])]
    return FoldedRegion(kind, ["linear", "linear", "add"], at, 144, 64, steps, "Linear 8→8", place, [at])


def made_up_report() -> FoldReport:
    """Every kind of entry the page draws: repeated regions, a horizontal group, skipped and undone places."""
    folded = [_region(f"add_{i}", f"blocks.{i}.mlp") for i in range(12)]
    folded.append(FoldedRegion("horizontal", ["q", "k", "v"], "norm", 0, 0))
    chain = [Step("Conv 3x3 s1 8→8", "affine", [-1]), Step("BN 8", "affine", [0])]
    folded.append(FoldedRegion("chain", ["conv", "bn"], "bn_out", 576, 576, chain, "Conv 3x3 s1 8→8", "stem", []))
    skipped = [Skipped(f"mul_{i}", "broadcast", "constant varies along several axes", ["mul"], f"blocks.{i}")
               for i in range(5)]  # fmt: skip
    skipped += [
        Skipped("conv_9", "padding-border", "shift before a zero-padded conv", ["bn", "conv"], "head"),
        Skipped("add_13", "failed-check", "folded result differed from the original; undone", ["linear"]),
        Skipped("add_14", "lost-fusion", "onnxruntime fuses 4 BiasGelu in the original, 0 after", ["linear"]),
    ]
    graph = [[f"add_{i}", "add", f"blocks.{i}.mlp"] for i in range(12)] + [["mul_0", "mul", "blocks.0"]]
    graph.append(["node_13", "Add", "blocks.12", "add_13"])  # found by its output's name
    return FoldReport(
        folded, skipped, Totals(100, 5000, 90000), Totals(40, 2000, 30000), 3e-7, 1e-5, verified=True,
        notes=["a <note> & more"], checked_batches=[2, 1], graph=graph, stages={"folding": 0.5, "verifying": 1.5},
        fusions={"before": {"Gelu": 4, "FusedConv": 2}, "after": {"Gelu": 4, "FusedConv": 1}},
    )  # fmt: skip
