"""``branchfold demo``: the main job on a built-in default.

A seed-style multi-branch ViT (every linear trained as K parallel linears) and a RepVGG-style CNN
are folded and verified, and the report shows ops/params/MACs before → after, the error, and the
speed of the folded model against the original, measured side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from rich.console import Console

from branchfold.api import fold_with_report

DEMO_MODELS = ("seed-vit", "repvgg")


def interleaved_medians(fns: Sequence[Callable[[], object]], runs: int = 7, warmup: int = 2) -> list[float]:
    """Median seconds per call of each function, the functions taking turns so drift hits all alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def run_one(name: str, console: Console, batch: int, runs: int) -> dict:
    from branchfold.zoo import ZOO

    entry = ZOO[name]
    model = entry.build().eval()
    inputs = entry.example_input(model, batch)
    console.print(f"\n[bold]{name}[/bold]: {entry.description}")
    start = time.perf_counter()
    result = fold_with_report(model, inputs)
    fold_seconds = time.perf_counter() - start
    console.print(result.report.render(title=f"{name}: folded in {fold_seconds:.1f}s (capture, fold, verify)"))
    with torch.no_grad():
        t_orig, t_folded = interleaved_medians([lambda: model(*inputs), lambda: result.model(*inputs)], runs)
    speedup = t_orig / t_folded
    console.print(
        f"latency (batch {batch}, median of {runs} interleaved runs, {torch.get_num_threads()} threads): "
        f"original {t_orig * 1e3:.2f} ms, folded {t_folded * 1e3:.2f} ms → [bold]{speedup:.2f}x[/bold]"
    )
    return {"model": name, "verified": result.report.verified, "speedup": speedup}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="branchfold demo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS), help="zoo models to fold")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7, help="timed runs per model (median)")
    args = parser.parse_args(argv)
    console = Console()
    from branchfold.zoo import ZOO

    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        console.print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
        return 2
    rows = [run_one(name, console, args.batch, args.runs) for name in args.models]
    failed = [r["model"] for r in rows if not r["verified"]]
    if failed:
        console.print(f"[red]verification failed for {', '.join(failed)}[/red]")
        return 1
    console.print("\nall folded models verified against their originals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
