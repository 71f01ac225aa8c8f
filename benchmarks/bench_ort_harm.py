"""onnxruntime, do no harm: a folded ONNX model must never run slower than what it replaces.

Hugging Face BERT, GPT-2 and Llama (small configs, random weights, no download), each exported by the
legacy exporter at opset 17 (GELU and RMSNorm decomposed, as most ONNX models in the wild) and by the
dynamo exporter, folded with ``branchfold.fold`` (runtime guard on, the default), timed against the
unfolded export: folded / original, goal <= 1.00. The zoo CNNs (RepVGG, ACNet, MobileOne, DBB), folded
from their multi-branch export, timed against the export of their hand-written single-path model:
folded / single path, goal <= 1.02. Every side runs in onnxruntime at ``ORT_ENABLE_ALL`` with one
intra-op thread, all sides of a row timed in the same interleaved rounds (``benchmarks.timing``). The
fused kernels onnxruntime makes of each side (``branchfold.passes.runtime_guard.runtime_profile``) are
listed next to the times: a fold that cost a fusion shows there first.

    .venv/bin/python -m benchmarks.bench_ort_harm [--quick] [--only bert-legacy]
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import branchfold
from benchmarks.deploy import quiet, reason
from benchmarks.timing import interleaved, ratio

HF_GOAL = 1.00  # folded / original
ZOO_GOAL = 1.02  # folded / hand-written single path
EXPORTERS = ("legacy", "dynamo")


@dataclass(frozen=True)
class Size:
    layers: int
    hidden: int
    heads: int
    seq: int
    rounds: int
    min_round_s: float


FULL = Size(layers=4, hidden=256, heads=4, seq=128, rounds=7, min_round_s=0.2)
QUICK = Size(layers=1, hidden=32, heads=2, seq=8, rounds=2, min_round_s=0.01)


# ------------------------------------------------------------------------------------------------
# models


class _TextModel(nn.Module):
    """``input_ids, attention_mask → last_hidden_state``, with position ids made inside, so that both
    exporters see the same two integer inputs for every family."""

    def __init__(self, model: nn.Module, positions: bool) -> None:
        super().__init__()
        self.model, self.positions = model, positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        extra: dict[str, Any] = {}
        if self.positions:
            extra = {"position_ids": torch.arange(input_ids.shape[1]).unsqueeze(0), "use_cache": False}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state


def hf_model(family: str, size: Size) -> nn.Module:
    """A small randomly initialised (seeded) Hugging Face text model, eval mode, eager attention."""
    import transformers as tf

    torch.manual_seed(0)
    common = {"vocab_size": 1000, "attn_implementation": "eager"}
    if family == "bert":
        config = tf.BertConfig(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                               intermediate_size=4 * size.hidden, **common)  # fmt: skip
        return _TextModel(tf.BertModel(config, add_pooling_layer=False), positions=False).eval()
    if family == "gpt2":
        config = tf.GPT2Config(n_embd=size.hidden, n_layer=size.layers, n_head=size.heads, **common)
        return _TextModel(tf.GPT2Model(config), positions=True).eval()
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=size.hidden, num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                num_key_value_heads=size.heads, intermediate_size=4 * size.hidden, **common)  # fmt: skip
        return _TextModel(tf.LlamaModel(config), positions=True).eval()
    raise ValueError(family)


def text_inputs(size: Size) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (1, size.seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def export(model: nn.Module, inputs: dict[str, torch.Tensor], exporter: str) -> Any:
    """The ONNX model ``torch.onnx.export`` writes: legacy at opset 17, or dynamo with its defaults."""
    args = tuple(inputs.values())
    with quiet(), _quiet_onnxscript():
        if exporter == "dynamo":
            return torch.onnx.export(model, args, dynamo=True, verbose=False, input_names=list(inputs)).model_proto
        import onnx

        f = io.BytesIO()
        torch.onnx.export(model, args, f, dynamo=False, opset_version=17, input_names=list(inputs))
        return onnx.load_from_string(f.getvalue())


@contextlib.contextmanager
def _quiet_onnxscript() -> Iterator[None]:
    """The dynamo exporter's constant folding logs shapes it could not evaluate (harmless)."""
    logger = logging.getLogger("onnxscript")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------------
# measuring


def _session(proto: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _runner(proto: Any, inputs: dict[str, torch.Tensor]) -> Callable[[], object]:
    session = _session(proto)
    arrays = {k: v.numpy() for k, v in inputs.items()}
    feed = {i.name: arrays[i.name] if i.name in arrays else next(iter(arrays.values())) for i in session.get_inputs()}
    return lambda: session.run(None, feed)


def _kernels(proto: Any) -> tuple[str, int]:
    """The fused kernels onnxruntime makes of ``proto`` ("BiasGelu 4, SkipLayerNormalization 8") and its
    NCHWc reorders."""
    from branchfold.passes.runtime_guard import runtime_profile

    profile = runtime_profile(proto)
    text = ", ".join(f"{k} {n}" for k, n in sorted(profile.fused.items())) or "none"
    return text, profile.reorders


def _fold(proto: Any) -> tuple[Any, branchfold.FoldReport, float]:
    start = time.perf_counter()
    with quiet():
        result = branchfold.fold_with_report(proto)
    return result.model, result.report, time.perf_counter() - start


def measure(name: str, exporter: str, original: Any, inputs: dict[str, torch.Tensor], size: Size,
            single: Any | None = None) -> dict:
    """One row: the original export, its fold and (CNNs) the single-path export, timed side by side."""
    folded, report, fold_s = _fold(original)
    sides = {"original": _runner(original, inputs), "folded": _runner(folded, inputs)}
    if single is not None:
        sides["single_path"] = _runner(single, inputs)
    times = interleaved(sides, rounds=size.rounds, min_round_s=size.min_round_s)
    baseline = "single_path" if single is not None else "original"
    goal = ZOO_GOAL if single is not None else HF_GOAL
    over = ratio(times["folded"].median, times[baseline].median)
    (base_kernels, base_reorders), (folded_kernels, folded_reorders) = _kernels(
        single if single is not None else original
    ), _kernels(folded)
    skipped = report.skipped_by_reason()
    return {
        "model": name,
        "exporter": exporter,
        "baseline": baseline.replace("_", " "),
        "original_ms": times["original"].ms,
        "single_path_ms": times["single_path"].ms if single is not None else None,
        "folded_ms": times["folded"].ms,
        "folded_over_baseline": over,
        "goal": goal,
        "goal_met": None if over is None else over <= goal,
        "spread": max(t.spread for t in times.values()),
        "regions": len(report.folded),
        "lost_fusion_undone": skipped.get("lost-fusion", 0),
        "kept_whole": skipped.get("fused-pattern", 0),
        "verified": report.verified,
        "fold_s": fold_s,
        "baseline_kernels": base_kernels,
        "folded_kernels": folded_kernels,
        "reorders_baseline_to_folded": f"{base_reorders} -> {folded_reorders}",
        "note": "nothing folded: folded and original are the same graph, the ratio is noise"
        if not report.folded
        else "",
    }


def _missing(name: str, exporter: str, e: BaseException) -> dict:
    return {"model": name, "exporter": exporter, "note": f"not available ({reason(e)})"}


def hf_rows(size: Size, families: tuple[str, ...], exporters: tuple[str, ...], log: Callable[[str], None]) -> list[dict]:
    rows = []
    for family in families:
        inputs = text_inputs(size)
        try:
            model = hf_model(family, size)
        except Exception as e:  # transformers missing or changed: a row saying so
            rows += [_missing(family, x, e) for x in exporters]
            continue
        for exporter in exporters:
            log(f"bench_ort_harm: {family} ({exporter})")
            try:
                rows.append(measure(family, exporter, export(model, inputs, exporter), inputs, size))
            except Exception as e:  # one export or fold failing must not lose the other rows
                rows.append(_missing(family, exporter, e))
    return rows


def zoo_rows(size: Size, names: tuple[str, ...], exporters: tuple[str, ...], log: Callable[[str], None]) -> list[dict]:
    from branchfold.zoo import ZOO

    rows = []
    for name in names:
        entry = ZOO[name]
        model = entry.build().eval()
        (x,) = entry.example_input(model, 1)
        single = entry.single_path(model).eval()
        inputs = {"x": x}
        for exporter in exporters:
            log(f"bench_ort_harm: {name} ({exporter})")
            try:
                rows.append(measure(name, exporter, export(model, inputs, exporter), inputs, size,
                                    single=export(single, inputs, exporter)))  # fmt: skip
            except Exception as e:  # one export or fold failing must not lose the other rows
                rows.append(_missing(name, exporter, e))
    return rows


def run(quick: bool = False, only: str | None = None, log: Callable[[str], None] = lambda s: None) -> list[dict]:
    """Every row (``folded_over_baseline``: folded / original for HF models, folded / single path for CNNs).

    ``quick``: BERT and RepVGG, legacy exporter, tiny sizes, 2 short rounds (figures meaningless).
    ``only``: one "model-exporter" pair, e.g. "bert-legacy" or "repvgg-dynamo" (at the quick or full size).
    """
    size = QUICK if quick else FULL
    families, cnns, exporters = ("bert", "gpt2", "llama"), ("repvgg", "acnet", "mobileone", "dbb"), EXPORTERS
    if quick and only is None:
        families, cnns, exporters = ("bert",), ("repvgg",), ("legacy",)
    if only is not None:
        model, _, exporter = only.rpartition("-")
        families = tuple(f for f in families if f == model)
        cnns = tuple(c for c in cnns if c == model)
        exporters = (exporter,)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return hf_rows(size, families, exporters, log) + zoo_rows(size, cnns, exporters, log)
    finally:
        torch.set_num_threads(previous)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[argv.index("--only") + 1] if "--only" in argv else None
    rows = run(quick="--quick" in argv, only=only, log=lambda s: print(s, file=sys.stderr, flush=True))
    for r in rows:
        if "note" in r:
            print(f"{r['model']:10s} {r['exporter']:7s} {r['note']}")
            continue
        over = r["folded_over_baseline"]
        print(f"{r['model']:10s} {r['exporter']:7s} folded/{r['baseline']:11s} "
              f"{over if over is not None and math.isfinite(over) else float('nan'):.3f} (goal {r['goal']}) "
              f"spread {r['spread']:.2f}  regions {r['regions']}  lost-fusion undone {r['lost_fusion_undone']}  "
              f"fold {r['fold_s']:.1f} s\n    baseline: {r['baseline_kernels']}\n    folded:   {r['folded_kernels']}"
              f"\n    reorders {r['reorders_baseline_to_folded']}")  # fmt: skip


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
