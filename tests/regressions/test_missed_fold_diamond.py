"""Fuzz regression (op-count via onnx-legacy): a value read twice inside one branch sum is not absorbed.

Found by ``make fuzz``: two average-pool branches of one RepVGG/DBB-style block become one ``AveragePool``
node after the legacy ONNX exporter's common-subexpression elimination, read by the sum and by a
BatchNorm. The same diamond written by hand in torch (``p = pool(x); conv(x) + p + bn(p)``) is not folded
either, as long as the walk absorbed a value with more than one user only when its map was diagonal: ``p``
(a depthwise conv map) became a source of its own and the sum mixed two sources. The block is one conv
(``W x`` with ``W = conv + pool + bn∘pool``); the walk now absorbs a value whose readers all lie in one region.
"""

from __future__ import annotations

import pytest
import torch
from helpers import count_kind, fold_in, randomize_bn
from torch import nn


class Diamond(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.pool, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(3, 1, 1), nn.BatchNorm2d(4)

    def forward(self, x):
        p = self.pool(x)
        return torch.relu(self.conv(x) + p + self.bn(p))


@pytest.mark.parametrize("dialect", ["symbolic_trace", "export"])
def test_pool_read_twice_in_one_sum_folds_to_one_conv(dialect):
    model = randomize_bn(Diamond()).eval()
    f = fold_in(dialect, model, (torch.randn(2, 4, 6, 6),))  # equality is checked here and holds today
    assert count_kind(f.gm, "conv") == 1 and count_kind(f.gm, "bn") == 0
