"""``branchfold demo``: the main job on a built-in default.

A seed-style multi-branch ViT (every linear trained as K parallel linears) and a RepVGG-style CNN
are folded and verified, and the report shows ops/params/MACs before → after, the error, and the
speed of the folded model against the original, measured side by side. Each model's report is also
written as an HTML page (``--html-dir``, default ``branchfold-reports/``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from branchfold.api import fold_with_report
from branchfold.timing import interleaved

DEMO_MODELS = ("seed-vit", "repvgg")


def run_one(name: str, console: Console, batch: int, runs: int, html_dir: Path | None = None) -> dict:
    from branchfold.zoo import ZOO

    entry = ZOO[name]
    model = entry.build().eval()
    inputs = entry.example_input(model, batch)
    console.print(f"\n[bold]{name}[/bold]: {entry.description}")
    start = time.perf_counter()
    result = fold_with_report(model, inputs)
    fold_seconds = time.perf_counter() - start
    console.print(
        result.report.render(title=f"{name}: folded in {fold_seconds:.1f}s (capture, fold, verify)")
    )
    if html_dir is not None:
        page = html_dir / f"{name}.html"
        page.write_text(result.report.to_html(title=f"branchfold: {name}"), encoding="utf-8")
        console.print(f"report page: {page}", soft_wrap=True)
    with torch.no_grad():
        t = interleaved(
            {"original": lambda: model(*inputs), "folded": lambda: result.model(*inputs)}, rounds=runs
        )
    speedup = t["original"].median / t["folded"].median
    console.print(
        f"latency (batch {batch}, median of {runs} interleaved rounds, {torch.get_num_threads()} threads): "
        f"original {t['original'].ms:.2f} ms, folded {t['folded'].ms:.2f} ms → [bold]{speedup:.2f}x[/bold]"
    )
    return {"model": name, "verified": result.report.verified, "speedup": speedup}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="branchfold demo", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEMO_MODELS), help="zoo models to fold")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--runs", type=int, default=7, help="timed rounds per model (median)")
    parser.add_argument("--html-dir", default="branchfold-reports",
                        help="folder for one HTML report page per model (created; '' writes none)")  # fmt: skip
    args = parser.parse_args(argv)
    console = Console()
    from branchfold.zoo import ZOO

    unknown = [m for m in args.models if m not in ZOO]
    if unknown:
        console.print(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ZOO)}")
        return 2
    html_dir = Path(args.html_dir) if args.html_dir else None
    if html_dir is not None:
        html_dir.mkdir(parents=True, exist_ok=True)
    rows = [run_one(name, console, args.batch, args.runs, html_dir) for name in args.models]
    failed = [r["model"] for r in rows if not r["verified"]]
    if failed:
        console.print(f"[red]verification failed for {', '.join(failed)}[/red]")
        return 1
    console.print("\nall folded models verified against their originals")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
