"""``torch.compile(backend="branchfold")`` against Inductor, on the seed ViT (4 branches per linear).

    python -m benchmarks.bench_compile [--quick] [--threads 1] [--json]

Sides, all timed in the same interleaved rounds (median of >= 5): Inductor on the branched model,
``backend="branchfold"`` (fold, then Inductor) on the branched model, and Inductor on the plain ViT of
the same depth (``ZOO['seed-vit'].single_path``: the attainable limit). Goals: branchfold within 5% of
the plain model under Inductor, and far ahead of Inductor on the branched model. Also measured: the
per-call cost of the stale-weight guard, and how long a refold takes after an in-place weight change.

Then, per model of the deploy table that runs under Inductor (``benchmarks.models.cases``: the zoo and
an HF model), ``backend="branchfold"`` against ``torch.compile(branchfold.fold(m))`` in the same rounds
(goal: <= 1.02) with the guard's cost per call in microseconds, the parameters it watches and the inputs
the compiled folded graph takes. Part of the gap is dynamo's own: it guards and passes every parameter
of the original module tree, which no backend can avoid; each row gives that floor (dynamo over the
original module running the backend's compiled graph with no guard) and what the guard costs.

``--quick`` is a smoke configuration (a tiny ViT, eager hand-off instead of Inductor): its figures say
nothing about speed. ``run(quick)`` returns the rows for ``benchmarks.run``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
import timeit

import torch

import branchfold
from benchmarks.models import cases
from benchmarks.timing import interleaved, ratio
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
    for case in cases(quick):
        if case.inductor:
            torch._dynamo.reset()
            rows.append(_against_fold_then_compile(case, inner, quick))
    return rows


def _against_fold_then_compile(case, inner: str, quick: bool) -> dict:
    """``backend="branchfold"`` / ``torch.compile(branchfold.fold(m))`` on one model, and what the gap is made of.

    A third side, ``unguarded``, compiles a copy of the model with a backend that runs the branchfold
    backend's own compiled graph with no guard: dynamo over the original module tree plus the same
    compiled graph. ``unguarded / fold_then_compile`` is the floor for that graph, which no backend can
    go under (dynamo guards and passes every parameter of the original tree; ``torch.compile(m)`` pays it too); the rest
    of the gap is the backend's guard and call. The guard is timed alone, in a loop
    (``guard_us_per_call``) and right after the graph ran
    (``guard_after_graph_us``: the graph's activations push the parameters' metadata out of the CPU
    caches, so a real call pays more than the loop). ``dynamo_us_per_call`` is dynamo alone over the
    original tree (a backend that returns a constant), in a loop.
    """
    model = case.build()
    args = case.inputs(model, 2 if quick else BATCH)
    captured: list[tuple[object, list]] = []

    def copy_of_model() -> torch.nn.Module:
        twin = case.build()
        twin.load_state_dict(model.state_dict())
        return twin

    def recording_backend(gm, example_inputs):
        out = branchfold_backend(gm, example_inputs, options={"backend": inner})
        captured.append((out, list(example_inputs)))
        return out

    def unguarded_backend(gm, example_inputs):  # the backend's compiled graph, called without the guard
        graph = next(g for g, _ in reversed(captured) if isinstance(g, FoldedGraph))
        compiled, select, tensors = graph.compiled, graph.select, graph.tensors
        return lambda *a: compiled(*select(a), *tensors)

    def constant_backend(gm, example_inputs):  # dynamo's own per-call cost: a graph that returns at once
        out = gm(*example_inputs)
        return lambda *a: out

    sides = {
        "backend": torch.compile(model, backend=recording_backend),
        "fold_then_compile": torch.compile(branchfold.fold(model, args), backend=inner),
        "dynamo_only": torch.compile(copy_of_model(), backend=constant_backend),
    }
    for fn in sides.values():
        fn(*args)
    graphs = [(g, ex) for g, ex in captured if isinstance(g, FoldedGraph)]
    if graphs:
        sides["unguarded"] = torch.compile(copy_of_model(), backend=unguarded_backend)
        sides["unguarded"](*args)
    times = interleaved({k: (lambda fn=fn: fn(*args)) for k, fn in sides.items()},
                        rounds=5 if quick else 15, min_round_s=0.02 if quick else 0.3)  # fmt: skip
    backend_ms, fold_ms = times["backend"].ms, times["fold_then_compile"].ms
    row = {"case": f"{case.name}: backend / fold() then compile", "batch": args[0].shape[0],
           "backend_ms": round(backend_ms, 4), "fold_then_compile_ms": round(fold_ms, 4),
           "backend_over_fold_then_compile": round(ratio(backend_ms, fold_ms), 3),
           "spread": round(max(times["backend"].spread, times["fold_then_compile"].spread), 3),
           "dynamo_us_per_call": round(times["dynamo_only"].ms * 1e3, 1)}  # fmt: skip
    if graphs:
        graph, example = graphs[-1]
        example = tuple(example)  # dynamo calls the backend's callable with a tuple
        unguarded_ms = times["unguarded"].ms
        row["unguarded_ms"] = round(unguarded_ms, 4)
        row["floor_over_fold_then_compile"] = round(ratio(unguarded_ms, fold_ms), 3)
        n = 200 if quick else 2000
        row["guard_us_per_call"] = round(_guard_seconds(graph, example, n) * 1e6, 2)
        after_graph_s = _guard_after_graph_seconds(graph, example, 20 if quick else 200)
        row["guard_after_graph_us"] = round(after_graph_s * 1e6, 2)
        row["watched"] = len(graph.watch)
        row["inputs"] = f"{len(example)} -> {len(graph.select(example)) + len(graph.tensors)}"
    return row


def _guard_seconds(graph: FoldedGraph, args: tuple, calls: int) -> float:
    """Seconds per call of the stale-weight guard: the best of 5 runs, as a busy machine only adds time."""
    per_run = max(1, calls // 5)
    return min(timeit.repeat(lambda: graph.fresh(args), number=per_run, repeat=5)) / per_run


def _guard_after_graph_seconds(graph: FoldedGraph, args: tuple, calls: int) -> float:
    """Seconds of one guard check right after the compiled graph ran, as in a real call (median).

    The graph's activations push the watched parameters' metadata out of the CPU caches, so the check
    costs more there than in a loop that runs nothing else.
    """
    inner_args = (*graph.select(args), *graph.tensors)
    times = []
    for _ in range(calls):
        graph.compiled(*inner_args)
        start = time.perf_counter()
        graph.fresh(args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _guard_rows(model, x, compiled, captured, plain_ms: float) -> list[dict]:
    graphs = [(g, ex) for g, ex in captured if isinstance(g, FoldedGraph)]
    if not graphs:
        return []
    graph, example = graphs[-1]
    guard_s = _guard_seconds(graph, tuple(example), 2000)
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
        if "backend_ms" in r:
            print(f"{r['case']:62s} {r['batch']:>5} backend {r['backend_ms']} ms, fold() then compile "
                  f"{r['fold_then_compile_ms']} ms: {r['backend_over_fold_then_compile']}x; dynamo's floor "
                  f"{r.get('floor_over_fold_then_compile', '-')}x; guard {r.get('guard_us_per_call', '-')} us in a "
                  f"loop, {r.get('guard_after_graph_us', '-')} us after the graph ({r.get('watched', 0)} watched, inputs "
                  f"{r.get('inputs', '-')}); dynamo alone "
                  f"{r['dynamo_us_per_call']} us")  # fmt: skip
            continue
        cells = [f"{r[k]}" if r[k] is not None else "-" for k in ("batch", "median_ms", "spread",
                                                                   "vs_plain_inductor", "compile_s")]  # fmt: skip
        print(f"{r['case']:62s} {cells[0]:>5s} {cells[1]:>10s} {cells[2]:>7s} {cells[3]:>9s} {cells[4]:>9s}")
    if "--json" in argv:
        print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
