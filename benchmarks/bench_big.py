"""Big ONNX models at I/O speed: branchfold on real-size files against reading and writing them.

For GPT-2 124M (legacy and dynamo exports), BERT-base, ViT-B/16 (``benchmarks.big_models``) and a
synthetic 2 GB+ model with external data (``benchmarks.synthetic_big``), each tool does one job on the
file in a fresh child process (``benchmarks._big_child``): ``onnx_ir`` load + save (the limit: no tool can
beat reading and writing the file), ``branchfold fold --no-verify``, ``branchfold fold`` (verified),
``onnxslim.slim`` and the onnxscript optimizer. Times are the child's own, from after its imports to after
its output is written, median of the runs; peak memory is the child's peak resident set (its own
``VmHWM``: ``ru_maxrss`` of a child starts at its parent's peak on Linux), the largest over the runs.
The goals, per model:

- unverified fold <= 2.5 x (load + save) + 2 s;
- verified fold faster than onnxslim;
- peak resident memory of the fold (unverified and verified) <= 1.5 x the model's bytes + 300 MB.

MB are 10^6 bytes. ``quick=True`` runs the same code on a synthetic model of a few MB (figures meaningless).

    .venv/bin/python -m benchmarks.bench_big [--quick] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from benchmarks._big_child import RESULT_MARK
from benchmarks.synthetic_big import write_stacked_branches

ROOT = Path(__file__).resolve().parents[1]

TIME_FACTOR, TIME_SLACK_S = 2.5, 2.0  # unverified fold <= TIME_FACTOR x limit + TIME_SLACK_S
RSS_FACTOR, RSS_SLACK_MB = 1.5, 300.0  # peak RSS <= RSS_FACTOR x model bytes + RSS_SLACK_MB
MB = 1e6

# child job → the name its columns carry
TOOLS = {
    "onnx_ir": "load+save",
    "branchfold": "fold",
    "branchfold_verified": "fold verified",
    "onnxslim": "onnxslim",
    "onnxscript": "onnxscript optimizer",
}
REAL_MODELS = ("gpt2-124m-legacy", "gpt2-124m-dynamo", "bert-base-legacy", "vit-b16-legacy")
SYNTHETIC = (17, 4096)  # blocks, width: 34 weights of 64 MiB = 2.1 GiB of external data
QUICK_SYNTHETIC = (6, 256)  # 3 MB


@dataclass(frozen=True)
class Config:
    runs: int
    timeout_s: float


FULL = Config(runs=3, timeout_s=600)
QUICK = Config(runs=1, timeout_s=300)


@dataclass
class JobResult:
    """One child run: its own figures, or why there are none."""

    seconds: float | None = None  # the job alone, measured in the child
    peak_mb: float | None = None
    imports_mb: float | None = None  # peak RSS after the imports, before the job
    out_mb: float | None = None
    process_s: float | None = None  # the whole child process, measured by the parent
    error: str | None = None
    output: Path | None = None  # the file written (gone once run_job_isolated returns)


def run_job(job: str, src: Path, out_dir: Path, timeout_s: float) -> JobResult:
    """Run ``job`` on ``src`` in a fresh interpreter, writing ``out_dir/<stem>.out.onnx``."""
    dst = out_dir / f"{src.stem}.out.onnx"
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "benchmarks._big_child", job, str(src), str(dst)],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return JobResult(error=f"timeout after {timeout_s:g} s")
    process_s = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        last = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), "")
        what = f"exit {proc.returncode}" if proc.returncode >= 0 else f"killed by signal {-proc.returncode}"
        return JobResult(error=f"failed ({what}): {last.strip()[:140]}")
    raw = json.loads(lines[-1][len(RESULT_MARK):])
    return JobResult(seconds=raw["seconds"], peak_mb=raw["peak_kib"] * 1024 / MB,
                     imports_mb=raw["imports_peak_kib"] * 1024 / MB, out_mb=raw["out_bytes"] / MB,
                     process_s=process_s, output=dst)


def run_job_isolated(job: str, src: Path, timeout_s: float) -> JobResult:
    """``run_job`` into a temporary folder that is removed afterwards (outputs can be GBs)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-big-{job}-") as out:
        return run_job(job, src, Path(out), timeout_s)


def model_bytes(path: Path) -> int:
    """The model file and every external data file it names."""
    header = onnx.load(str(path), load_external_data=False)
    locations = {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


@dataclass
class ToolRuns:
    """All runs of one tool on one model; a tool that failed once is not run again."""

    results: list[JobResult] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return next((r.error for r in self.results if r.error), None)

    def _ok(self, attr: str) -> list[float]:
        return [getattr(r, attr) for r in self.results if r.error is None]

    def median(self, attr: str) -> float | None:
        values = self._ok(attr)
        return statistics.median(values) if values and self.error is None else None

    def max(self, attr: str) -> float | None:
        values = self._ok(attr)
        return max(values) if values and self.error is None else None

    def time_cell(self) -> float | str | None:
        """The median time, or the reason there is none (a cell of the table)."""
        return self.error or self.median("seconds")


def _leq(a: float | None, b: float | None) -> bool | None:
    return None if a is None or b is None else a <= b


def measure(name: str, path: Path, config: Config, log: Callable[[str], None]) -> dict[str, Any]:
    """One row: every tool on ``path``, ``config.runs`` rounds, the tools interleaved within a round."""
    size = model_bytes(path)
    runs = {job: ToolRuns() for job in TOOLS}
    for round_ in range(config.runs):
        for job in TOOLS:
            if runs[job].error is None:
                result = run_job_isolated(job, path, config.timeout_s)
                runs[job].results.append(result)
                log(f"  {name} {job} run {round_ + 1}: "
                    + (result.error or f"{result.seconds:.2f} s, peak {result.peak_mb:.0f} MB"))
    limit = runs["onnx_ir"].median("seconds")
    fold = runs["branchfold"].median("seconds")
    verified = runs["branchfold_verified"].median("seconds")
    slim = runs["onnxslim"].median("seconds")
    time_bound = None if limit is None else TIME_FACTOR * limit + TIME_SLACK_S
    rss_bound = RSS_FACTOR * size / MB + RSS_SLACK_MB
    row: dict[str, Any] = {"model": name, "MB": size / MB}
    row |= {f"{label} s": runs[job].time_cell() for job, label in TOOLS.items()}
    row |= {
        f"fold / ({TIME_FACTOR:g} load+save + {TIME_SLACK_S:g} s)": None if time_bound is None or fold is None
        else fold / time_bound,
        "fold within time bound": _leq(fold, time_bound),
        "verified faster than onnxslim": None if verified is None or slim is None else verified < slim,
    }  # fmt: skip
    row |= {f"peak MB {label}": runs[job].max("peak_mb") for job, label in TOOLS.items()}
    row |= {
        f"peak bound MB ({RSS_FACTOR:g} size + {RSS_SLACK_MB:g})": rss_bound,
        "fold peak within bound": _leq(runs["branchfold"].max("peak_mb"), rss_bound),
        "verified peak within bound": _leq(runs["branchfold_verified"].max("peak_mb"), rss_bound),
        "peak MB after imports (fold)": runs["branchfold"].max("imports_mb"),
        "fold process s (with start + imports)": runs["branchfold"].median("process_s"),
        "fold output MB": runs["branchfold"].median("out_mb"),
        "runs": config.runs,
        "note": "",
    }  # fmt: skip
    return row


def synthetic_file(folder: Path, blocks: int, width: int) -> Path:
    """The synthetic stacked-branches model, written once into ``folder`` (its .onnx is written last)."""
    path = folder / f"stacked-branches-{blocks}x{width}.onnx"
    if not path.exists():
        folder.mkdir(parents=True, exist_ok=True)
        write_stacked_branches(path, blocks, width)
    return path


def _real_file(name: str) -> Path:
    from benchmarks.big_models import model_file

    return model_file(name)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(quick: bool, only: Sequence[str] | None = None, log: Callable[[str], None] = _log) -> list[dict]:
    """The table's rows: one per model (``only``: these model names)."""
    if quick:
        with tempfile.TemporaryDirectory(prefix="bench-big-quick-") as folder:
            path = synthetic_file(Path(folder), *QUICK_SYNTHETIC)
            return [measure(path.stem, path, QUICK, log)]
    from benchmarks.big_models import CACHE

    sources: dict[str, Callable[[], Path]] = {name: (lambda n=name: _real_file(n)) for name in REAL_MODELS}
    blocks, width = SYNTHETIC
    sources[f"stacked-branches-{blocks}x{width}"] = lambda: synthetic_file(CACHE, blocks, width)
    rows = []
    for name, source in sources.items():
        if only and name not in only:
            continue
        log(f"bench_big: {name}")
        try:
            path = source()
        except Exception as e:  # an export that fails is a row that says why, not a lost table
            rows.append({"model": name, "note": f"not available: {type(e).__name__}: {str(e)[:140]}"})
            continue
        rows.append(measure(name, path, FULL, log))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_big", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", action="append", help="model name (repeatable)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, args.only), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
