"""`make fuzz` (FUZZ_SEED=20261129, models 4230, 4387, 5161): op-count via onnx-legacy.

Depthwise branches 1x3 + 3x1 + 5x1 (each with BatchNorm) summed: the FX graph folds them to one 5x3 conv
(64 MACs a position before, 60 after, BatchNorms counted), but the legacy exporter has already folded
each BatchNorm into its conv, so on ONNX the one conv (60) costs more than the branches and their adds
(52) and the fold refuses it on cost, as it must. The campaign's op-count check took that reported
decision for a missed fold; it now accepts a cost refusal.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

import branchfold
from fuzz.campaign import Case, _export_onnx, count_linear_onnx, refused_on_cost


class Branches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        geometry = [((1, 3), (0, 1)), ((3, 1), (1, 0)), ((5, 1), (2, 0))]
        self.convs = nn.ModuleList(nn.Conv2d(4, 4, k, padding=p, groups=4, bias=False) for k, p in geometry)
        self.bns = nn.ModuleList(nn.BatchNorm2d(4) for _ in geometry)
        for bn in self.bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        a, b, c = (bn(conv(x)) for conv, bn in zip(self.convs, self.bns))
        return a + (b + c)


def test_onnx_refuses_the_costlier_conv_and_the_campaign_accepts_it():
    model, x = Branches().eval(), torch.randn(1, 4, 9, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = _export_onnx(model, x, Case("onnx-legacy"))
    result = branchfold.fold_with_report(proto, verify=False)
    assert count_linear_onnx(result.model) == 2  # (3x1 + 5x1) folded into one 5x1; adding the 1x3 would cost more
    assert [s.detail for s in result.report.not_folded if s.reason == "cost"] == ["fused map costs 60 MACs per position vs 52"]
    assert refused_on_cost(result.report)
    fx = branchfold.fold_with_report(model, (x,), verify=False)
    assert [r.macs_before for r in fx.report.folded] == [64] and [r.macs_after for r in fx.report.folded] == [60]
