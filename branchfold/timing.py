"""Side-by-side timing: every side of a comparison is measured in the same rounds, interleaved.

Timing A for a while and then B for a while lets a change in machine load (other processes, thermal
state, a cache filled by A) land on one side only and turn into a fake speed-up. Here each round times
every side once, in an order that rotates from round to round, and each side's figure is the median of
its rounds, so a slow moment costs every side one round at most. The demo and the benchmarks both time
with this module, so a speed-up the demo prints is measured the way ``benchmarks/RESULTS.md`` measures it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass


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
