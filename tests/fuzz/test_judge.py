"""The campaign's judge of rounding (``fuzz.campaign._within``): what it measures the noise with, and that
a well-conditioned model's noise excuses nothing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `fuzz` is a top-level folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from fuzz.campaign import Case, _export_onnx, _one_ulp_off, _reference_evaluator, _rounded_runs, _within  # noqa: E402


def _mlp(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_one_ulp_off_moves_every_weight_by_one_ulp_and_leaves_the_model_alone(dtype):
    model = _mlp(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moved = _one_ulp_off(model, seed=0)
    eps = torch.finfo(dtype).eps
    for name, w in moved.state_dict().items():
        assert torch.equal(model.state_dict()[name], before[name])  # the original is untouched
        step = (w.double() - before[name].double()).abs() / before[name].double().abs().clamp_min(1e-30)
        assert (step > 0).all() and (step <= 2 * eps).all(), name  # moved, by one ulp (two at a binade edge)
    x = torch.randn(3, 8).to(dtype)
    with torch.no_grad():
        assert not torch.equal(moved(x), model(x))


def test_a_well_conditioned_model_has_a_spread_of_a_few_ulps():
    model, x = _mlp(torch.float32), torch.randn(16, 8)
    with torch.no_grad():
        exact = model.double()(x.double())
        model.float()
    spreads = [((r.double() - exact).abs().max() / exact.abs().max()).item() for r in _rounded_runs(model, x)()]
    assert len(spreads) == 8 and max(spreads) < 50 * torch.finfo(torch.float32).eps


def test_a_difference_over_the_spread_is_a_mismatch_whatever_the_float64_fold_says():
    model, x = _mlp(torch.float32), torch.randn(16, 8)
    with torch.no_grad():
        ref = model(x)
        exact = model.double()(x.double())
        model.float()
    wrong = ref * (1 + 1e-4)
    ok, err = _within(ref, wrong, 1e-5, lambda: exact, _rounded_runs(model, x), lambda: True)
    assert not ok and err > 1e-5
    asked = []
    ok, _ = _within(ref, ref + 1e-7 * ref.abs().max(), 1e-5, lambda: exact, _rounded_runs(model, x),
                    lambda: asked.append(1) or True)  # fmt: skip
    assert ok and not asked  # within tolerance: neither noise nor float64 is consulted


@pytest.mark.parametrize("opset", [13, 17])
def test_the_float64_oracle_runs_an_exported_batchnorm_in_inference_mode_as_onnxruntime_does(opset):
    """onnx's own reference BatchNormalization (opset 9-13) takes the exporters' ``momentum`` attribute
    for training mode; the oracle must compute the graph onnxruntime computes, or it decides nothing."""
    import numpy as np
    import onnxruntime as ort

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(3))
        bn.running_var.copy_(torch.rand(3) + 0.5)
    model = nn.Sequential(bn, nn.ReLU()).double().eval()  # no conv before it: the exporter keeps the node
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    proto = _export_onnx(model, x, Case(path="onnx-legacy", verify=False, opset=opset))
    assert [n.op_type for n in proto.graph.node] == ["BatchNormalization", "Relu"]
    with torch.no_grad():
        want = model(x).numpy()
    (got,) = _reference_evaluator(proto).run(None, {"x": x.numpy()})
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], want, rtol=1e-9, atol=1e-9)
