"""Where a fold's time goes: seconds per stage (capture, checks, the walk, weight arithmetic, ...).

A fold should cost about one capture and a few forward calls; anything above that is ours, and this is
how the report (``FoldReport.stages``) and the benchmarks see it. ``recording()`` collects the seconds of
every ``stage(name)`` entered inside it. Stages may nest; each second is counted once, in the innermost
stage running at that moment (the verification's forward calls inside the undo ladder count as
``verify``, not as the stage around them). Outside a recording, ``stage`` costs one context-variable read.

The ONNX pipeline already says what it starts through its progress callback; ``StageClock`` reads its
stages off those messages instead (the time until the next message is charged to each).
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

TOTAL = "total"


@dataclass
class _Recording:
    seconds: dict[str, float] = field(default_factory=dict)
    running: list[list] = field(default_factory=list)  # [name, started] of the stages entered, innermost last

    def charge(self, name: str, since: float, now: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + (now - since)


_active: contextvars.ContextVar[_Recording | None] = contextvars.ContextVar("branchfold_stages", default=None)


@contextlib.contextmanager
def recording() -> Iterator[dict[str, float]]:
    """Seconds per stage of the work inside, filled in as it runs; ``"total"`` (all of it) is added at the
    end, and the time no stage covered is ``"other"``."""
    rec = _Recording()
    token = _active.set(rec)
    start = time.perf_counter()
    try:
        yield rec.seconds
    finally:
        _active.reset(token)
        total = time.perf_counter() - start
        other = total - sum(rec.seconds.values())
        if other > 0:
            rec.seconds["other"] = other
        rec.seconds[TOTAL] = total


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Counts the seconds of the block as ``name`` in the active recording (nothing when none is active)."""
    rec = _active.get()
    if rec is None:
        yield
        return
    now = time.perf_counter()
    if rec.running:  # pause the enclosing stage
        outer = rec.running[-1]
        rec.charge(outer[0], outer[1], now)
    rec.running.append([name, now])
    try:
        yield
    finally:
        now = time.perf_counter()
        _, started = rec.running.pop()
        rec.charge(name, started, now)
        if rec.running:
            rec.running[-1][1] = now  # the enclosing stage resumes


class StageClock:
    """A progress callback that records the time of each stage (and forwards the message to ``forward``)."""

    def __init__(self, forward: Callable[[str], None] | None = None) -> None:
        self.forward = forward
        self.stages: dict[str, float] = {}
        self.current: str | None = None
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        self._close()
        self.current = message
        if self.forward is not None:
            self.forward(message)

    def _close(self) -> None:
        now = time.perf_counter()
        if self.current is not None:
            self.stages[self.current] = self.stages.get(self.current, 0.0) + now - self.started
        self.started = now

    def finish(self) -> dict[str, float]:
        """The stages so far, the running one closed."""
        self._close()
        self.current = None
        return dict(self.stages)
