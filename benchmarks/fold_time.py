"""The time a user waits for ``fold``, against what its checks must cost: one capture and one forward.

For each model: ``torch.export.export`` of it, one forward call, ``fold(verify=False)`` and ``fold()``
(verified), all in this process, at batch 2, random weights. ``*_ratio`` is the fold's seconds over
``export + forward``; the goals are verified <= 3x and unverified <= 1.5x. ``stages`` is where the
verified fold's time went (``FoldReport.stages``: capture, second-batch check, constant folding, the
walk, weight arithmetic, horizontal policy, verification, report).

Where the default fold's time above the goal comes from is measured beside it: ``free_batch_export_s`` is
``torch.export`` asked for the free batch ``fold`` captures (``Dim.AUTO``, torch's symbolic shapes), and
``fold_unverified_static_s`` is ``fold(verify=False, dynamic=False)``, the fold of a static capture, which
has no second batch to check.

torchvision is not installed here: ViT-B/16 and ResNet-50 are Hugging Face ``ViTModel(ViTConfig())`` and
``ResNetModel(ResNetConfig())`` (the same architectures and sizes, random weights).

    .venv/bin/python -m benchmarks.fold_time [--quick]
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import branchfold

VERIFIED_GOAL = 3.0
UNVERIFIED_GOAL = 1.5
BATCH = 2


def _models(quick: bool) -> list[tuple[str, Callable[[], tuple[nn.Module, tuple]]]]:
    if quick:
        from branchfold.zoo import ZOO

        def zoo(name: str) -> Callable[[], tuple[nn.Module, tuple]]:
            def build():
                model = ZOO[name].build().eval()
                return model, ZOO[name].example_input(model, BATCH)

            return build

        return [("repvgg (zoo)", zoo("repvgg"))]
    import transformers as tf

    def vit():
        torch.manual_seed(0)
        return tf.ViTModel(tf.ViTConfig()).eval(), (torch.randn(BATCH, 3, 224, 224),)

    def resnet():
        torch.manual_seed(0)
        return tf.ResNetModel(tf.ResNetConfig()).eval(), (torch.randn(BATCH, 3, 224, 224),)

    return [("ViT-B/16 (HF ViTModel(ViTConfig()))", vit), ("ResNet-50 (HF ResNetModel(ResNetConfig()))", resnet)]


def _seconds(fn: Callable[[], object], runs: int) -> tuple[float, object]:
    """Median seconds of ``runs`` calls, and the last call's result."""
    samples, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def _warm_up() -> None:
    """One small export and fold first, so that torch's one-time set-up is billed to no model."""
    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    branchfold.fold(m, (torch.randn(2, 4),))


def measure(name: str, build: Callable[[], tuple[nn.Module, tuple]], runs: int) -> dict:
    model, args = build()
    export_s, _ = _seconds(lambda: torch.export.export(model, args), runs)
    with torch.no_grad():
        model(*args)
        forward_s, _ = _seconds(lambda: model(*args), max(runs, 3))
    free_export_s, _ = _seconds(lambda: branchfold.export(model, args), runs)
    unverified_s, unverified = _seconds(lambda: branchfold.fold_with_report(model, args, verify=False), runs)
    verified_s, result = _seconds(lambda: branchfold.fold_with_report(model, args), runs)
    static_s, _ = _seconds(lambda: branchfold.fold_with_report(model, args, verify=False, dynamic=False), runs)
    base = export_s + forward_s
    return {
        "model": name,
        "batch": BATCH,
        "threads": torch.get_num_threads(),
        "export_s": export_s,
        "forward_s": forward_s,
        "fold_unverified_s": unverified_s,
        "unverified_ratio": unverified_s / base,
        "fold_verified_s": verified_s,
        "verified_ratio": verified_s / base,
        "goal_met": verified_s / base <= VERIFIED_GOAL and unverified_s / base <= UNVERIFIED_GOAL,
        "free_batch_export_s": free_export_s,
        "fold_unverified_static_s": static_s,
        "unverified_static_ratio": static_s / base,
        "verified": result.report.verified,
        "stages (verified, s)": _stages(result.report.stages),
        "stages (unverified, s)": _stages(unverified.report.stages),
    }


def _stages(seconds: dict[str, float]) -> str:
    """The last run's seconds per stage, largest first (``total`` left out: it is the fold's column)."""
    parts = sorted(((k, v) for k, v in seconds.items() if k != "total"), key=lambda kv: -kv[1])
    return ", ".join(f"{k} {v:.2f}" for k, v in parts)


def run(quick: bool = False) -> list[dict]:
    """One row per model; fold times are medians of 3 runs (1 when ``quick``)."""
    runs = 1 if quick else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _warm_up()
        return [measure(name, build, runs) for name, build in _models(quick)]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    for row in run(quick="--quick" in argv):
        print(row)


if __name__ == "__main__":
    main()
