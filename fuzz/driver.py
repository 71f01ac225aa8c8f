"""The campaign: N random models, each folded through one FX path and (on a fraction) ONNX, spread over
worker processes, every model reproducible from the campaign seed and its index."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuzz.campaign import Case, draw_cases, run_case
from fuzz.generator import Spec, random_spec


@dataclass(frozen=True)
class Config:
    seed: int
    onnx_fraction: float = 0.5  # models also folded through ONNX
    onnx_dynamo_fraction: float = 0.02  # of those, through the (slow) dynamo exporter
    verify_fraction: float = 0.15  # folds that run branchfold's own check (and its undo path)


def model_seed(campaign_seed: int, index: int) -> int:
    return (campaign_seed * 1_000_003 + index) % 2**63


def model_cases(config: Config, index: int) -> tuple[Spec, list[Case]]:
    """Model ``index`` of a campaign and the folds it goes through: a function of seed and index only."""
    rng = random.Random(model_seed(config.seed, index))
    spec = random_spec(rng)
    return spec, draw_cases(rng, config.onnx_fraction, config.onnx_dynamo_fraction, config.verify_fraction)


@dataclass
class Record:
    index: int
    case: dict
    status: str
    message: str
    seconds: float
    spec: Spec = field(default_factory=dict)  # kept for mismatches only


def check_model(config: Config, index: int) -> list[Record]:
    spec, cases = model_cases(config, index)
    records = []
    for case in cases:
        start = time.perf_counter()
        try:
            outcome = run_case(spec, case)
            status, message = outcome.status, outcome.message
        except Exception as e:  # a bug in the harness or the generator: report it, never stop the campaign
            status, message = "harness-error", f"{type(e).__name__}: {e}"
        seconds = time.perf_counter() - start
        keep = spec if status not in ("ok", "skipped") else {}
        records.append(Record(index, asdict(case), status, message[:2000], seconds, keep))
    return records


def _init_worker() -> None:
    import logging

    import torch

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    # exporter chatter; the backend's own warnings still reach the handler that reads them
    for name in ("torch", "torch._dynamo", "torch.onnx", "torch.export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _work(args: tuple[Config, int]) -> list[Record]:
    return check_model(*args)


@dataclass
class Summary:
    graphs: int = 0
    fx: int = 0
    onnx: int = 0
    skipped: int = 0
    mismatches: list[Record] = field(default_factory=list)
    by_path: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    models: int = 0

    def add(self, records: list[Record]) -> None:
        self.models += 1
        for r in records:
            if r.status == "skipped":
                self.skipped += 1
                continue
            self.graphs += 1
            side = "onnx" if r.case["path"].startswith("onnx") else "fx"
            setattr(self, side, getattr(self, side) + 1)
            self.by_path[r.case["path"]] = self.by_path.get(r.case["path"], 0) + 1
            if r.status != "ok":
                self.mismatches.append(r)

    def last_line(self) -> str:
        return f"fuzz: {self.graphs} graphs (FX {self.fx}, ONNX {self.onnx}), {len(self.mismatches)} mismatches"


def run_campaign(
    config: Config,
    count: int,
    workers: int = 1,
    seconds: float | None = None,
    log: Callable[[str], None] = print,
    start: int = 0,
) -> Summary:
    """Check models ``start .. start+count-1`` (fewer if ``seconds`` runs out); mismatches are logged as
    they come, with the index that reproduces them."""
    summary = Summary()
    began = time.perf_counter()
    jobs = ((config, i) for i in range(start, start + count))

    def results() -> Iterator[list[Record]]:
        if workers <= 1:
            _init_worker()
            for job in jobs:
                yield _work(job)
                if seconds is not None and time.perf_counter() - began > seconds:
                    return
            return
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker, maxtasksperchild=200) as pool:
            yield from pool.imap_unordered(_work, _budgeted(jobs, began, seconds), chunksize=1)

    step = max(1, count // 20)
    for records in results():
        summary.add(records)
        for r in records:
            if r.status not in ("ok", "skipped"):
                log(f"  mismatch: model {r.index} via {r.case['path']} (verify={r.case['verify']}): {r.status}: "
                    f"{r.message.splitlines()[0][:300] if r.message else ''}")  # fmt: skip
        if summary.models % step == 0:
            rate = summary.graphs / max(time.perf_counter() - began, 1e-9)
            log(f"  {summary.models}/{count} models, {summary.graphs} graphs, {len(summary.mismatches)} mismatches, "
                f"{rate:.2f} graphs/s")  # fmt: skip
    summary.seconds = time.perf_counter() - began
    return summary


def _budgeted(jobs, began: float, seconds: float | None):
    for job in jobs:
        if seconds is not None and time.perf_counter() - began > seconds:
            return
        yield job


def write_mismatches(summary: Summary, config: Config, path: Path) -> None:
    """One JSON line per mismatch: campaign seed, model index, path, what went wrong and the spec."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in summary.mismatches:
            f.write(json.dumps({"seed": config.seed, **asdict(r)}) + "\n")


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
