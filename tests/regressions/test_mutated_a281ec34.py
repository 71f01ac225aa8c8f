"""Fuzz regression (mutated via symbolic_trace, verify=False): the fold changed the user's parameters or buffers

Found by `make fuzz` (FUZZ_SEED=1, model 16); shrunk by ``fuzz.shrink``. The model is rebuilt from ``SPEC`` by ``fuzz.generator.build``
and folded as ``CASE`` says; the test asserts the folded model equals the original at both batch sizes
(and that a block known to fold reaches one op).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `fuzz` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from fuzz.campaign import Case, run_case  # noqa: E402

SPEC = {'domain': 'conv2d',
 'channels': 4,
 'spatial': [7, 10],
 'blocks': [{'kind': 'chain',
             'ops': [{'op': 'bn', 'c': 4, 'train': True}],
             'act': 'none',
             'in': [4, 7, 10]}],
 'dtype': 'float32',
 'train': False,
 'batches': [1, 2],
 'seed': 1337475724}
CASE = Case(path='symbolic_trace', verify=False, opset=17, count_ops=True)


def test_mutated_a281ec34():
    outcome = run_case(SPEC, CASE)
    assert outcome.status == "ok", f"{outcome.status}: {outcome.message}"
