"""``python -m fuzz``: a fuzz campaign of ``FUZZ_N`` random models (default 10,000) from ``FUZZ_SEED``.

    FUZZ_N=500 FUZZ_SEED=7 python -m fuzz --workers 2
    python -m fuzz --index 1234 --seed 7          # re-run one model of a campaign, verbosely
    FUZZ_SECONDS=600 python -m fuzz               # stop dispatching models after 10 minutes

The last line is ``fuzz: N graphs (FX a, ONNX b), M mismatches``; mismatches are written as JSON lines
to ``build/fuzz/mismatches.jsonl`` and the first few are shrunk into ``tests/regressions/``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from fuzz.driver import Config, check_model, default_workers, model_cases, run_campaign, write_mismatches

OUT = Path(__file__).resolve().parents[1] / "build" / "fuzz" / "mismatches.jsonl"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=int(os.environ.get("FUZZ_N", 10_000)), help="models (FUZZ_N)")
    parser.add_argument("--seed", type=int, default=None, help="campaign seed (FUZZ_SEED; random if unset)")
    parser.add_argument("--seconds", type=float, default=None, help="time budget (FUZZ_SECONDS)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("FUZZ_WORKERS", 0)) or default_workers())
    parser.add_argument("--start", type=int, default=0, help="first model index")
    parser.add_argument("--index", type=int, default=None, help="check only this model, and print its spec")
    parser.add_argument("--onnx-fraction", type=float, default=0.5)
    parser.add_argument("--onnx-dynamo-fraction", type=float, default=0.02)
    parser.add_argument("--verify-fraction", type=float, default=0.15)
    parser.add_argument("--shrink", type=int, default=int(os.environ.get("FUZZ_SHRINK", 3)),
                        help="shrink and write reproducers for up to this many mismatches (one per status and path)")  # fmt: skip
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(os.environ.get("FUZZ_SEED", random.randrange(2**31)))
    seconds = args.seconds if args.seconds is not None else (float(os.environ["FUZZ_SECONDS"]) if os.environ.get("FUZZ_SECONDS") else None)
    config = Config(seed, args.onnx_fraction, args.onnx_dynamo_fraction, args.verify_fraction)

    if args.index is not None:
        spec, cases = model_cases(config, args.index)
        print(spec)
        for r in check_model(config, args.index):
            print(f"{r.case['path']} (verify={r.case['verify']}): {r.status} {r.message}")
        return 0

    print(f"fuzz: FUZZ_SEED={seed} FUZZ_N={args.n} workers={args.workers} "
          f"(ONNX on {args.onnx_fraction:.0%} of models, its dynamo exporter on {args.onnx_dynamo_fraction:.0%} of those, "
          f"fold's own verify on {args.verify_fraction:.0%})", flush=True)  # fmt: skip
    summary = run_campaign(config, args.n, args.workers, seconds, log=lambda s: print(s, flush=True), start=args.start)
    rate = summary.graphs / max(summary.seconds, 1e-9)
    print(f"fuzz: {summary.models} models in {summary.seconds:.0f} s ({rate:.2f} graphs/s, {summary.skipped} folds skipped: "
          f"the exporter or the original could not run the model); by path: {summary.by_path}")  # fmt: skip
    if summary.mismatches:
        write_mismatches(summary, config, OUT)
        print(f"fuzz: mismatches written to {OUT}; reproduce one with `python -m fuzz --seed {seed} --index I`")
        _shrink_some(summary, config, args.shrink)
    print(summary.last_line(), flush=True)
    return 1 if summary.mismatches else 0


def _shrink_some(summary, config: Config, limit: int) -> None:
    from fuzz.campaign import Case
    from fuzz.shrink import same_failure, shrink, write_reproducer

    seen = set()
    for r in summary.mismatches:
        key = (r.status, r.case["path"])
        if len(seen) >= limit or key in seen or r.status == "harness-error":
            continue
        seen.add(key)
        case = Case(**r.case)
        start = time.perf_counter()
        small = shrink(r.spec, same_failure(case, r.status))
        path = write_reproducer(small, case, r.status, r.message, f"`make fuzz` (FUZZ_SEED={config.seed}, model {r.index})")
        print(f"fuzz: shrunk model {r.index} ({r.status} via {case.path}) in {time.perf_counter() - start:.0f} s: {path}",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
