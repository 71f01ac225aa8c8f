"""Shared pytest setup. Being here puts ``tests/`` on sys.path, so test modules import ``helpers`` directly.

Hypothesis settings (``max_examples``, ``deadline=None``) are set on each property test, not in a profile:
the hypothesis plugin loads its own profile after this file is imported.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def _make_onnx(nodes, inputs, outputs, inits=(), opset=None, value_info=()):
    """A ModelProto from nodes; ``inputs``/``outputs`` are (name, shape) pairs (float32), ``inits`` a
    dict or list of (name, array)."""
    opset = opset or onnx.defs.onnx_opset_version()
    items = inits.items() if isinstance(inits, dict) else inits
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in items],
        value_info=list(value_info),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.fixture
def make_onnx():
    """Builder of small hand-written ONNX models (used by the ONNX tests)."""
    return _make_onnx
