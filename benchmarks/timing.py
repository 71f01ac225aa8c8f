"""What the benchmarks need besides the timing itself: ratios of rows that may be missing, and the
environment a reader needs to judge the figures.

The interleaved timing (every side measured in the same rounds, in rotating order, no GC inside a timed
region) lives in ``branchfold.timing``, shared with ``branchfold demo``; it is re-exported here so that the
benchmark modules keep importing it from one place.
"""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from branchfold.timing import Timing, interleaved, interleaved_fresh

__all__ = ["Timing", "environment", "interleaved", "interleaved_fresh", "ratio"]


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
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnxslim", "transformers", "openvino"):
        env[dist] = _version(dist)
    return env
