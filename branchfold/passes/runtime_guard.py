"""Do no harm in the runtime: a folded ONNX model must keep every fusion onnxruntime makes of the original.

A fold can be exact and still make a model slower. Below opset 20 the exporters write GELU as
``Div(x, √2) → Erf → Add 1 → Mul x → Mul 0.5`` (and norms as ``ReduceMean → Sub → Pow → …``);
onnxruntime's optimizer recognizes those subgraphs and replaces them with one fused kernel (``Gelu``,
``BiasGelu``, ``LayerNormalization``, ``SkipLayerNormalization``, …), and its NCHWc layout pass then
keeps whole conv stacks in its blocked layout. A fold that moves one of the pattern's constants into a
neighbouring MatMul or Conv lowers the multiply-adds, but the runtime no longer sees its pattern: the
pieces run one by one, and the layout pass has to reorder around them.

So the guard asks the runtime itself. It runs onnxruntime's optimizer (``ORT_ENABLE_ALL``, the level a
deployment uses) on the original once and on each candidate once, reads back the optimized graph
(``SessionOptions.optimized_model_filepath``) and compares a ``Profile`` of each:

- **fused kinds** — the nodes that stand for a fused subgraph: every op of the ``com.microsoft`` domain,
  and the ONNX-domain ops onnxruntime's fusions write (``Gelu`` from opset 20, ``LayerNormalization``,
  ``SimplifiedLayerNormalization``). No family of them may be less frequent after the fold (``FAMILY``:
  a ``BiasGelu`` whose bias moved into the GEMM before it becomes a ``Gelu``, and keeps the fusion).
- not the fused **linear** ops (``FusedConv``, ``FusedGemm``, ``FusedMatMul``, the NCHWc ``Conv``): fewer
  convs or GEMMs is what a fold is for (a RepVGG block's three NCHWc convs become one), and which form
  absorbs an activation follows the linear op's form (two MatMuls summed become a Gemm whose ``Relu`` is
  fused; the one folded MatMul keeps its ``Relu`` apart, and is still the faster model).
- **NCHWc reorders** (``ReorderInput`` / ``ReorderOutput``), which must not grow: more of them means a
  conv stack was cut by something the layout pass could not keep blocked.

One optimization level serves both: every fusion of ``ORT_ENABLE_EXTENDED`` is still in the
``ORT_ENABLE_ALL`` graph (the layout pass only moves convs and pools into the ``com.microsoft.nchwc``
domain, which is why the linear ops are not counted), so each model costs one session, never run.

The same comparison runs, on request, for onnxruntime's transformer optimizer
(``onnxruntime.transformers.optimizer.optimize_model``), the tool people run on BERT/GPT-2 exports; its
fused kinds are its own ``get_fused_operator_statistics()`` plus every ``com.microsoft`` op it writes.

``onnx_pipeline.fold_onnx`` uses the guard as a predicate next to verification: the regions whose
rewrite loses a fusion are found by the same bisection, undone, and reported as ``lost-fusion``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir

from branchfold.errors import InputError
from branchfold.storage.onnx_weights import StandInFile, WeightsMode, stand_in_file

CONTRIB = "com.microsoft"
NCHWC = "com.microsoft.nchwc"
REORDERS = ("ReorderInput", "ReorderOutput")
# ONNX-domain ops that onnxruntime's fusions write (GeluFusion at opset >= 20, LayerNormFusion,
# SimplifiedLayerNormFusion); tests/passes/test_runtime_guard.py checks each against the real optimizer.
ONNX_FUSED = frozenset({"Gelu", "LayerNormalization", "SimplifiedLayerNormalization"})
# Fused kinds that compute the same nonlinearity, one with a neighbouring add (or GEMM) absorbed, per the
# contrib ops' definitions: a fold that moves a bias into the preceding GEMM turns a BiasGelu into a Gelu,
# which keeps the fusion (the bias add is free either way).
FAMILY = {
    "BiasGelu": "Gelu",
    "GemmFastGelu": "FastGelu",
    "SkipLayerNormalization": "LayerNormalization",
    "SkipSimplifiedLayerNormalization": "SimplifiedLayerNormalization",
    "MultiHeadAttention": "Attention",
}
_LINEAR = re.compile(r"Conv|Gemm|MatMul")  # fused ops that carry a linear op (FusedConv, FusedGemm, ...)
RUNTIME = "onnxruntime"


@dataclass
class Profile:
    """What an optimizer made of a model: fused kinds (more is better) and NCHWc reorders (fewer is better)."""

    fused: Counter[str] = field(default_factory=Counter)
    reorders: int = 0
    # fused linear ops ("FusedConv + Relu", "Conv (NCHWc)"): shown in the report, never compared (fewer is the point)
    linear: Counter[str] = field(default_factory=Counter)

    def kernels(self) -> dict[str, int]:
        """Every fused kernel by kind, and the NCHWc reorders, as the report lists them."""
        found = {**self.linear, **self.fused}
        return found | ({"NCHWc reorders": self.reorders} if self.reorders else {})


@dataclass(frozen=True)
class Loss:
    """One fused kernel (or the layout) the fold cost: ``before`` in the original's optimized graph,
    ``after`` in the candidate's; ``as_before``/``as_after`` break a family's count down by op kind."""

    tool: str
    kind: str  # a family (FAMILY), "reorders", or "optimization" when the optimizer failed
    before: int
    after: int
    as_before: tuple[tuple[str, int], ...] = ()
    as_after: tuple[tuple[str, int], ...] = ()
    failure: str = ""  # the optimizer's error, when it could not take the candidate at all

    def __str__(self) -> str:
        if self.failure:
            return f"{self.tool} could not optimize the model after this fold ({self.failure})"
        if self.kind == "reorders":
            return (
                f"{self.tool}'s NCHWc layout needs {self.before} reorders in the original, "
                f"{self.after} after this fold"
            )
        return (
            f"{self.tool} fuses {_count(self.as_before) or self.before} in the original, "
            f"{_count(self.as_after) or self.after} after this fold"
        )


def _count(kinds: tuple[tuple[str, int], ...]) -> str:
    return " and ".join(f"{n} {k}" for k, n in kinds)


def family(kind: str) -> str:
    """The fused nonlinearity a kind computes (``BiasGelu`` is a ``Gelu`` with the bias add absorbed)."""
    return FAMILY.get(kind, kind)


def _by_family(profile: Profile) -> dict[str, Counter[str]]:
    grouped: dict[str, Counter[str]] = {}
    for kind, n in profile.fused.items():
        grouped.setdefault(family(kind), Counter())[kind] += n
    return grouped


def family_counts(profile: Profile) -> Counter[str]:
    """Fused kernels per family (what the guard compares): ``{"Gelu": 4}`` for 3 Gelu and 1 BiasGelu."""
    return Counter({name: kinds.total() for name, kinds in _by_family(profile).items()})


def losses(before: Profile, after: Profile, tool: str) -> list[Loss]:
    """Every family of fused kernels less frequent in ``after``, and the reorders if they grew."""
    was, now = _by_family(before), _by_family(after)
    found = []
    for name, kinds in sorted(was.items()):
        got = now.get(name, Counter())
        if got.total() < kinds.total():
            found.append(Loss(tool, name, kinds.total(), got.total(), tuple(sorted(kinds.items())),
                              tuple(sorted(got.items()))))  # fmt: skip
    if after.reorders > before.reorders:
        found.append(Loss(tool, "reorders", before.reorders, after.reorders))
    return found


def profile_of(nodes: Iterable[onnx.NodeProto], extra_kinds: Iterable[str] = ()) -> Profile:
    """The profile of an optimized graph's nodes (``extra_kinds``: ONNX-domain op types to count as fused)."""
    onnx_fused = ONNX_FUSED | set(extra_kinds)
    profile = Profile()
    for node in nodes:
        contrib = node.domain in (CONTRIB, NCHWC)
        if node.domain == NCHWC and node.op_type in REORDERS:
            profile.reorders += 1
        elif contrib and _LINEAR.search(node.op_type):
            # the linear ops a fold merges, with whatever activation the runtime absorbed into them
            act = next((a.s.decode() for a in node.attribute if a.name == "activation"), "")
            layout = " (NCHWc)" if node.domain == NCHWC else ""
            profile.linear[f"{node.op_type}{layout}{' + ' + act if act else ''}"] += 1
        elif node.domain == CONTRIB or (node.domain in ("", "ai.onnx") and node.op_type in onnx_fused):
            profile.fused[node.op_type] += 1
    return profile


# ----------------------------------------------------------------------------------------------
# the two optimizers


Model = onnx.ModelProto | ir.Model


def _as_ir(model: Model) -> ir.Model:
    return ir.from_proto(model) if isinstance(model, onnx.ModelProto) else model


@contextlib.contextmanager
def _model_file(model: Model) -> Iterator[str]:
    """``model`` written to a temporary file (weights streamed; external data when too large for one
    protobuf), for the tools that only take a path."""
    from branchfold.storage.onnx_weights import save

    with tempfile.TemporaryDirectory(prefix="branchfold-guard-") as folder:
        path = os.path.join(folder, "model.onnx")
        save(_as_ir(model), path)
        yield path


def runtime_profile(model: Model, weights: WeightsMode = "stand-ins", stand_in: StandInFile | None = None) -> Profile:
    """The profile of the graph onnxruntime's CPU session builds at ``ORT_ENABLE_ALL``. The session reads
    the weights where they lie and is never run, so the weights a fold wrote go in as stand-ins (regions of
    the model's own file: ``onnx_weights.ort_session``), not as copies; ``weights="initializers"`` passes
    their values (onnxruntime copies them), which the tests compare against. ``stand_in``: the file whose
    regions stand in (by default the model's own; the guard passes the original's)."""
    import onnxruntime as ort

    from branchfold.storage.onnx_weights import ort_session, return_freed_memory

    with tempfile.TemporaryDirectory(prefix="branchfold-ort-") as folder:
        optimized = os.path.join(folder, "optimized.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.intra_op_num_threads = options.inter_op_num_threads = 1  # the session is never run
        options.optimized_model_filepath = optimized
        # weights go to a side file that is never read back: only the nodes are compared
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "weights.bin"
        )
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_min_size_in_bytes", "1024"
        )
        # Prepacking copies every weight into the kernels' layouts after the graph is optimized: it
        # changes nothing the profile reads and takes 3/4 of the time (GPT-2 124M: 4.8 s, 1.2 s without)
        options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort_session(_as_ir(model), options, weights=weights, stand_in=stand_in)
        del session  # it is never run: only the graph it wrote is read
        return_freed_memory()
        return profile_of(onnx.load(optimized, load_external_data=False).graph.node)


def transformer_model_types() -> list[str]:
    """The ``model_type`` values onnxruntime's transformer optimizer knows."""
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    return sorted(MODEL_TYPES)


def check_transformer_type(model_type: str) -> None:
    """One clear error for a ``model_type`` the transformer optimizer does not know (it would only warn)."""
    known = transformer_model_types()
    if model_type not in known:
        raise InputError(
            f"unknown transformer model type {model_type!r}; onnxruntime's transformer optimizer knows "
            + ", ".join(known)
        )


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    """The transformer optimizer logs every fusion it tries, under its modules' bare names (``onnx_model``,
    ``fusion_attention``): while it runs, those loggers, and only those, keep their errors alone. Nothing
    else of the process's logging changes."""
    import onnxruntime.transformers as package

    folder = os.path.dirname(package.__file__)
    loggers = [
        logger
        for name, logger in list(logging.root.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and _module_file(name).startswith(folder)
    ]
    quiet = _ErrorsOnly()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _module_file(name: str) -> str:
    module = sys.modules.get(name)
    return getattr(module, "__file__", None) or ""


def transformer_profile(model: Model, model_type: str) -> Profile:
    """The profile of what ``optimize_model(model_type=...)`` (default options, heads and hidden size
    detected from the graph) makes of ``model``."""
    from onnxruntime.transformers.optimizer import optimize_model  # imports the modules whose loggers talk

    with _model_file(model) as path, _quiet_logging():
        optimizer = optimize_model(path, model_type=model_type, num_heads=0, hidden_size=0)
    nodes = list(optimizer.model.graph.node)
    stats = getattr(optimizer, "get_fused_operator_statistics", None)
    with _quiet_logging():
        named = set(stats()) if stats else set()
    return profile_of(nodes, extra_kinds=named)


# ----------------------------------------------------------------------------------------------
# the guard


class FusionGuard:
    """The original's profiles, computed once; ``losses(candidate)`` costs one optimization per tool.

    ``runtime``: compare onnxruntime's session optimizer; ``transformer``: also compare its transformer
    optimizer for this ``model_type`` ("bert", "gpt2", ...). A tool that cannot optimize the original
    is left out, with a note saying so (``notes``).
    """

    def __init__(self, original: Model, runtime: bool = True, transformer: str | None = None) -> None:
        tools: dict[str, Callable[[Model], Profile]] = {}
        if runtime:
            # a candidate's folded weights stand in as regions of the original's file, which a fold that
            # replaced every file-backed weight no longer names
            stand_in = stand_in_file(_as_ir(original))
            tools[RUNTIME] = lambda model: runtime_profile(model, stand_in=stand_in)
        if transformer is not None:
            check_transformer_type(transformer)
            tools[f"onnxruntime's transformer optimizer ({transformer})"] = lambda proto: transformer_profile(
                proto, transformer
            )
        self.notes: list[str] = []
        self.tools: dict[str, Callable[[Model], Profile]] = {}
        self.reference: dict[str, Profile] = {}
        self.last: tuple[Model | None, dict[str, Profile]] = (None, {})  # the last candidate's profiles
        for name, tool in tools.items():
            try:
                self.reference[name] = tool(original)
            except Exception as e:  # the runtimes raise their own types; the fold goes on unguarded by it
                self.notes.append(
                    f"{name} could not optimize the original ({_line(e)}): its fusions were not compared"
                )
                continue
            self.tools[name] = tool

    def __bool__(self) -> bool:
        return bool(self.tools)

    def losses(self, candidate: Model) -> list[Loss]:
        """The fusions ``candidate`` lost against the original, over every tool."""
        found: list[Loss] = []
        self.last = (candidate, {})
        for name, tool in self.tools.items():
            try:
                profile = tool(candidate)
            except Exception as e:  # a candidate the optimizer cannot take has lost every fusion it had
                found.append(Loss(name, "optimization", 1, 0, failure=_line(e)))
                continue
            self.last[1][name] = profile
            found += losses(self.reference[name], profile, name)
        return found

    def kernels(self, final: Model) -> dict[str, dict[str, int]]:
        """onnxruntime's fused kernels in the original and in ``final`` (for the report), ``{}`` when the
        runtime was not compared. The last candidate's profile is reused: usually ``final`` is that one."""
        tool = self.tools.get(RUNTIME)
        if tool is None:
            return {}
        last_model, profiles = self.last
        try:
            after = profiles[RUNTIME] if last_model is final and RUNTIME in profiles else tool(final)
        except Exception:  # the report goes without it; the guard has already judged this model
            return {}
        return {"before": self.reference[RUNTIME].kernels(), "after": after.kernels()}


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
