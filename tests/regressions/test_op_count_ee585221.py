"""Fuzz regression (op-count via onnx-legacy, verify=False): a block known to fold left 2 Conv/Gemm/MatMul/BatchNormalization nodes, not 1

Found by `make fuzz` (FUZZ_SEED=20261129, model 4230); shrunk by ``fuzz.shrink``. The model is rebuilt from ``SPEC`` by ``fuzz.generator.build``
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
 'spatial': [9, 8],
 'blocks': [{'kind': 'branches',
             'branches': [[{'op': 'conv',
                            'cin': 4,
                            'cout': 4,
                            'k': [1, 3],
                            'stride': 1,
                            'pad': [0, 1],
                            'dilation': 1,
                            'groups': 4,
                            'bias': False}],
                          [{'op': 'conv',
                            'cin': 4,
                            'cout': 4,
                            'k': [5, 1],
                            'stride': 1,
                            'pad': [2, 0],
                            'dilation': 1,
                            'groups': 4,
                            'bias': False}]],
             'foldable': True,
             'style': '+',
             'tree': [0, 1],
             'act': 'none',
             'in': [4, 9, 8]}],
 'dtype': 'float32',
 'train': False,
 'batches': [1, 4],
 'seed': 1829781323}
CASE = Case(path='onnx-legacy', verify=False, opset=17, count_ops=True)


def test_op_count_ee585221():
    outcome = run_case(SPEC, CASE)
    assert outcome.status == "ok", f"{outcome.status}: {outcome.message}"
