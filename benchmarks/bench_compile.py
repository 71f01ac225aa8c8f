"""``torch.compile(backend="branchfold")`` against Inductor, on the seed ViT (4 branches per linear).

    python -m benchmarks.bench_compile [--quick] [--threads 1] [--json]

Sides, all timed in the same interleaved rounds (median of >= 5): Inductor on the branched model,
``backend="branchfold"`` (fold, then Inductor) on the branched model, and Inductor on the plain ViT of
the same depth (``ZOO['seed-vit'].single_path``: the attainable limit). Goals: branchfold within 5% of
the plain model under Inductor, and far ahead of Inductor on the branched model. Also measured: the
per-call cost of the stale-weight guard, and how long a refold takes after an in-place weight change.

``--quick`` is a smoke configuration (a tiny ViT, eager hand-off instead of Inductor): its figures say
nothing about speed. ``run(quick)`` returns the rows for ``benchmarks.run``.
"""

from __future__ import annotations

import json
import sys
import time
import timeit

import torch

from benchmarks.timing import interleaved
from branchfold.passes.backend import FoldedGraph, branchfold_backend
from branchfold.zoo import ZOO, seed_vit

BATCH = 8


def _models(quick: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    branched = (seed_vit(depth=1, dim=32, heads=2, mlp_ratio=2, image_size=8) if quick
                else ZOO["seed-vit"].build()).eval()  # fmt: skip
    return branched, ZOO["seed-vit"].single_path(branched).eval()


def run(quick: bool = False, threads: int = 1) -> list[dict]:
    """Rows: one per side (``median_ms``, ``vs_plain_inductor``), then the guard and refold costs."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return _run(quick)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool) -> list[dict]:
    torch._dynamo.reset()
    inner = "eager" if quick else "inductor"
    branched, plain = _models(quick)
    x = branched.example_input(2 if quick else BATCH)
    captured: list[tuple[object, list]] = []

    def recording_backend(gm, example_inputs):
        out = branchfold_backend(gm, example_inputs, options={"backend": inner})
        captured.append((out, list(example_inputs)))
        return out

    compiled = {
        f"{inner} / branched": torch.compile(branched, backend=inner),
        "branchfold / branched": torch.compile(branched, backend=recording_backend),
        f"{inner} / plain (single path)": torch.compile(plain, backend=inner),
    }
    compile_s = {}
    for name, fn in compiled.items():
        start = time.perf_counter()
        fn(x)
        compile_s[name] = time.perf_counter() - start
    timings = interleaved({name: (lambda fn=fn: fn(x)) for name, fn in compiled.items()},
                          rounds=5 if quick else 9, min_round_s=0.05 if quick else 0.5)  # fmt: skip
    plain_ms = timings[f"{inner} / plain (single path)"].ms
    rows = [
        {"case": name, "batch": x.shape[0], "median_ms": round(t.ms, 4), "spread": round(t.spread, 3),
         "vs_plain_inductor": round(t.ms / plain_ms, 3), "compile_s": round(compile_s[name], 2)}
        for name, t in timings.items()
    ]  # fmt: skip
    rows += _guard_rows(branched, x, compiled["branchfold / branched"], captured, plain_ms)
    return rows


def _guard_rows(model, x, compiled, captured, plain_ms: float) -> list[dict]:
    graphs = [(g, ex) for g, ex in captured if isinstance(g, FoldedGraph)]
    if not graphs:
        return []
    graph, example = graphs[-1]
    n = 2000
    guard_s = timeit.timeit(lambda: graph.fresh(example), number=n) / n
    weight = model.blocks[0].attn.q.branches[0].weight
    weight.add_(1e-3)  # an in-place change: the next call refolds
    start = time.perf_counter()
    compiled(x)
    refold_s = time.perf_counter() - start
    weight.sub_(1e-3)
    compiled(x)
    base = {"batch": x.shape[0], "spread": None, "compile_s": None}
    return [
        {"case": f"stale-weight guard per call ({len(graph.watch)} parameters)", **base,
         "median_ms": round(guard_s * 1e3, 4), "vs_plain_inductor": round(guard_s * 1e3 / plain_ms, 4)},
        {"case": "first call after an in-place weight change (refold + check)", **base,
         "median_ms": round(refold_s * 1e3, 1), "vs_plain_inductor": None},
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    threads = int(argv[argv.index("--threads") + 1]) if "--threads" in argv else 1
    rows = run(quick="--quick" in argv, threads=threads)
    print(f"{'case':62s} {'batch':>5s} {'median ms':>10s} {'spread':>7s} {'vs plain':>9s} {'compile s':>9s}")
    for r in rows:
        cells = [f"{r[k]}" if r[k] is not None else "-" for k in ("batch", "median_ms", "spread",
                                                                   "vs_plain_inductor", "compile_s")]  # fmt: skip
        print(f"{r['case']:62s} {cells[0]:>5s} {cells[1]:>10s} {cells[2]:>7s} {cells[3]:>9s} {cells[4]:>9s}")
    if "--json" in argv:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
