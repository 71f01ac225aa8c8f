"""``make bench``: every benchmark in one run on this machine, written to RESULTS.md, a chart and raw JSON.

    python -m benchmarks.run [--quick] [--out benchmarks/RESULTS.md] [--threads 1]

``--quick`` is a seconds-long smoke configuration (tiny models, few rounds, no Inductor): its figures
say nothing about speed, only that the benchmark code still runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks import chart, deploy, markdown, pass_speed
from benchmarks.timing import environment

# Benchmarks owned by other modules: (section title, module name). Each exposes run(quick) -> list[dict].
OTHERS = {
    "Inductor compile with the branchfold backend": "bench_compile",
    "Horizontal fusion": "bench_horizontal",
    "onnxruntime: do no harm": "bench_ort_harm",
    "Big ONNX models at I/O speed": "bench_big",
    "Do no harm in a second runtime: folded files in onnxruntime and OpenVINO": "bench_runtimes",
    "The time a user waits: fold against torch.export + one forward": "fold_time",
    "Adapters (LoRA, DoRA)": "bench_adapters",
}


def other_rows(module: str, quick: bool) -> list[dict] | str:
    """The rows of ``benchmarks.<module>.run(quick)``, or a sentence saying why there are none."""
    try:
        mod = importlib.import_module(f"benchmarks.{module}")
    except ImportError as e:
        return f"not available ({deploy.reason(e)})"
    try:
        return list(mod.run(quick=quick))
    except Exception as e:  # another module's failure is reported in the results, not fatal to ours
        return f"not available: run() failed ({deploy.reason(e)})"


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (figures meaningless)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS.md"), help="markdown file to write")
    parser.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads")
    parser.add_argument("--only", choices=["deploy", "pass", "others"], action="append",
                        help="run only these parts (repeatable); default: all")
    parser.add_argument("--rerender", action="store_true",
                        help="measure nothing: rewrite the markdown and chart from the results.json next to --out")
    parser.add_argument("--fuzz-log", type=Path,
                        help="add the result of the `make fuzz` campaign whose output is this file to the stored "
                             "results (a 10,000-model campaign is not run by the benchmarks themselves)")
    parser.add_argument("--fuzz-note", default="", help="a sentence shown with the fuzz campaign's row")
    parser.add_argument("--section", choices=sorted(OTHERS.values()), action="append",
                        help="re-measure only this section (repeatable) and keep every other figure from the "
                             "results.json next to --out; the header says which sections were measured when")
    args = parser.parse_args(argv)
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    if args.rerender:
        return rerender(args.out, say)
    if args.section:
        return remeasure(args.out, args.section, args.quick, args.threads, say)
    if args.fuzz_log:
        return add_fuzz(args.out, args.fuzz_log, say, args.fuzz_note)
    torch.set_num_threads(args.threads)
    parts = set(args.only or ["deploy", "pass", "others"])

    start = time.perf_counter()
    rows: list[dict] = []
    if "deploy" in parts:
        rows += deploy.run(quick=args.quick, log=say)
    if "pass" in parts:
        rows += pass_speed.run(quick=args.quick, log=say)
    others: dict[str, tuple[str, list[dict] | str]] = {}
    for title, module in OTHERS.items():
        if "others" in parts:
            say(f"{module}")
            others[title] = (module, other_rows(module, args.quick))
        else:
            others[title] = (module, "not run in this invocation (--only)")
    minutes = (time.perf_counter() - start) / 60

    out: Path = args.out
    png = out.with_name("results.png")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "QUICK smoke configuration: the figures say nothing about speed. " if args.quick else ""
    header = [
        f"{mode}Written by `python -m benchmarks.run{' --quick' if args.quick else ''}` (`make bench`) on {stamp}; "
        f"the whole run took {minutes:.1f} min. All figures come from this one run on the machine described below.",
        "",
        f"![results]({png.name})",
    ]
    env = environment(args.threads)
    title = f"branchfold benchmarks, {stamp}, {env['cpu']}, {args.threads} thread(s)"
    raw = {"environment": env, "rows": rows, "others": {t: list(v) for t, v in others.items()},
           "header": header, "title": title}
    out.parent.mkdir(parents=True, exist_ok=True)
    _store(out, raw)
    say(f"wrote {out}, {png} and {out.with_name('results.json')} in {minutes:.1f} min")
    return 0


def _stored(out: Path, say: Callable[[str], None], what: str, flag: str) -> dict | None:
    """The results.json next to ``out``, or None after saying why ``what`` cannot be done without it."""
    source = out.with_name("results.json")
    try:
        return json.loads(source.read_text())
    except (OSError, ValueError) as e:
        say(f"cannot {what}: {source} is missing or not JSON ({e}); run without {flag} first")
        return None


def _store(out: Path, raw: dict) -> None:
    out.with_name("results.json").write_text(json.dumps(raw, indent=1, default=str))
    write(out, raw)


def remeasure(out: Path, modules: Sequence[str], quick: bool, threads: int, say: Callable[[str], None]) -> int:
    """Measure ``modules`` again and put their rows in the stored results; nothing else changes, and the
    header gains a line saying what was measured when, so no figure's date is ever hidden."""
    raw = _stored(out, say, "re-measure a section", "--section")
    if raw is None:
        return 2
    torch.set_num_threads(threads)
    start = time.perf_counter()
    titles = {module: title for title, module in OTHERS.items()}
    for module in modules:
        say(module)
        raw["others"][titles[module]] = [module, other_rows(module, quick)]
    minutes = (time.perf_counter() - start) / 60
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    names = ", ".join(f"`{m}`" for m in modules)
    said = f"Section(s) {names} re-measured by "
    # an earlier re-measure of exactly these sections dates figures that are no longer shown
    raw["header"] = [line for line in raw["header"] if not line.startswith(said)]
    raw["header"].insert(1, f"{said}`python -m benchmarks.run --section ...` on {stamp} "
                            f"({minutes:.1f} min, commit {environment(threads)['git commit']}); the rest is from the run above.")
    _store(out, raw)
    say(f"re-measured {names} in {minutes:.1f} min; wrote {out}")
    return 0


FUZZ_TITLE = "Fuzz campaign (make fuzz)"


def add_fuzz(out: Path, log_file: Path, say: Callable[[str], None], note: str = "") -> int:
    """Put the campaign logged in ``log_file`` into the stored results as its own section."""
    from benchmarks.fuzz_result import campaign_row

    raw = _stored(out, say, "add the fuzz campaign", "--fuzz-log")
    if raw is None:
        return 2
    try:
        row = campaign_row(log_file)
    except (OSError, ValueError) as e:
        say(f"cannot add the fuzz campaign: {e}")
        return 2
    stamp = dt.datetime.fromtimestamp(log_file.stat().st_mtime, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    row["finished"] = stamp
    row["added at commit"] = environment(1)["git commit"]
    row["note"] = note
    raw["others"][FUZZ_TITLE] = ["fuzz", [row]]
    _store(out, raw)
    say(f"added {row['last line']!r} ({row['minutes']} min) to {out}")
    return 0


def write(out: Path, raw: dict) -> None:
    """RESULTS.md and the chart from the raw results (a fresh run's, or a stored results.json)."""
    others = {t: tuple(v) for t, v in raw["others"].items()}
    out.write_text(markdown.render(raw["rows"], raw["environment"], others, raw["header"]))
    chart.draw(raw["rows"], out.with_name("results.png"), raw["title"])


def rerender(out: Path, say: Callable[[str], None]) -> int:
    """Rewrite RESULTS.md and the chart from stored figures: a change of layout never needs a re-run."""
    raw = _stored(out, say, "rerender", "--rerender")
    if raw is None:
        return 2
    write(out, raw)
    say(f"rewrote {out} and {out.with_name('results.png')} from {out.with_name('results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
