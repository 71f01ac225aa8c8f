"""Seconds per stage of a fold, read off the progress messages the pipelines already send.

A pipeline says what it starts (``progress("verifying with onnxruntime")``); ``StageClock`` passes each
message on and charges the time until the next one to it, so the report can show where a fold's time
went without timers inside the pipelines.
"""

from __future__ import annotations

import time
from collections.abc import Callable


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
