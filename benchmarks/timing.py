"""Side-by-side timing: every side of a comparison is measured in the same rounds, interleaved.

Timing A for a while and then B for a while lets a change in machine load (other processes, thermal
state, a cache filled by A) land on one side only and turn into a fake speed-up. Here each round times
every side once, in an order that rotates from round to round, and each side's figure is the median of
its rounds, so a slow moment costs every side one round at most.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over rounds, with every round's figure kept for the spread."""

    median: float
    samples: tuple[float, ...]
    calls_per_round: int

    @property
    def ms(self) -> float:
        return self.median * 1e3

    @property
    def spread(self) -> float:
        """(max - min) / median over rounds: how noisy this measurement was."""
        return (max(self.samples) - min(self.samples)) / self.median if self.median > 0 else math.nan


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """No garbage collection inside a timed region (as ``timeit`` does): a collection pause would land on
    whichever side happened to allocate last. Rounds collect between sides instead."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _calls_for(fn: Callable[[], object], min_round_s: float, max_calls: int) -> int:
    """How many calls make one round last ``min_round_s``, so that timer resolution never matters."""
    start = time.perf_counter()
    fn()
    once = time.perf_counter() - start
    return max(1, min(max_calls, math.ceil(min_round_s / max(once, 1e-7))))


def interleaved(
    sides: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    warmup: int = 2,
    min_round_s: float = 0.05,
    max_calls: int = 1000,
) -> dict[str, Timing]:
    """Median seconds per call of every callable in ``sides``, all timed in the same interleaved rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(sides)
    for name in names:
        for _ in range(warmup):
            sides[name]()
    calls = {name: _calls_for(sides[name], min_round_s, max_calls) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        gc.collect()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn, n = sides[name], calls[name]
            with _no_gc():
                start = time.perf_counter()
                for _ in range(n):
                    fn()
                samples[name].append((time.perf_counter() - start) / n)
    return {n: Timing(statistics.median(samples[n]), tuple(samples[n]), calls[n]) for n in names}


def interleaved_fresh(
    sides: Mapping[str, tuple[Callable[[], object], Callable[[object], object]]], rounds: int = 5
) -> dict[str, Timing]:
    """Like ``interleaved`` for work that consumes its input (a pass rewriting a graph in place).

    Each side is ``(prepare, work)``: every round calls ``prepare()`` untimed for a fresh input and times
    one ``work(input)``; sides take turns within a round as in ``interleaved``.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(sides)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            prepare, work = sides[name]
            subject = prepare()
            gc.collect()
            with _no_gc():
                start = time.perf_counter()
                work(subject)
                samples[name].append(time.perf_counter() - start)
            del subject
    return {n: Timing(statistics.median(samples[n]), tuple(samples[n]), 1) for n in names}


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, or None when either side is missing (a row that could not be measured)."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=5
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(threads: int) -> dict[str, str]:
    """What a reader needs to judge the figures: machine, thread counts and library versions."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    env = {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "threads": f"torch.set_num_threads({threads}); onnxruntime intra_op_num_threads={threads}",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git commit": _git_commit(),
    }
    env["torch threads (interop)"] = str(torch.get_num_interop_threads())
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnxslim", "transformers"):
        env[dist] = _version(dist)
    return env
