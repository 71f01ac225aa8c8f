"""The result of a ``make fuzz`` campaign as a row of the benchmark results.

A 10,000-model campaign takes most of an hour on two cores, so ``make bench`` does not run one: the
campaign's own log is read instead, and the row says which campaign it was (seed, models, workers), how
long it took, and what it found. ``python -m benchmarks.run --fuzz-log build/fuzz/campaign.log`` adds it.
"""

from __future__ import annotations

import re
from pathlib import Path

_START = re.compile(r"fuzz: FUZZ_SEED=(?P<seed>\d+) FUZZ_N=(?P<n>\d+) workers=(?P<workers>\d+)")
_DONE = re.compile(r"fuzz: (?P<models>\d+) models in (?P<seconds>\d+) s \((?P<rate>[\d.]+) graphs/s, (?P<skipped>\d+) folds skipped")
_LAST = re.compile(r"fuzz: (?P<graphs>\d+) graphs \(FX (?P<fx>\d+), ONNX (?P<onnx>\d+)\), (?P<mismatches>\d+) mismatches")


def campaign_row(log: Path) -> dict:
    """The row of the campaign whose output is ``log``; ValueError if the log holds no finished campaign."""
    text = log.read_text(errors="replace")
    start, done = _START.search(text), _DONE.search(text)
    last = ([None, *_LAST.finditer(text)])[-1]  # the campaign's closing line (the last one printed)
    if start is None or done is None or last is None:
        raise ValueError(f"{log} holds no finished fuzz campaign (no start, summary and last line)")
    seconds = int(done["seconds"])
    return {
        "campaign": f"make fuzz, FUZZ_SEED={start['seed']}",
        "models": int(done["models"]),
        "of FUZZ_N": int(start["n"]),
        "graphs": int(last["graphs"]),
        "FX graphs": int(last["fx"]),
        "ONNX graphs": int(last["onnx"]),
        "mismatches": int(last["mismatches"]),
        "folds skipped": int(done["skipped"]),
        "workers": int(start["workers"]),
        "minutes": round(seconds / 60, 1),
        "graphs/s": float(done["rate"]),
        "last line": last.group(0),
    }
