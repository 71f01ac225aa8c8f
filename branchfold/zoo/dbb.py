"""Diverse Branch Block (Ding et al., CVPR 2021), in the variant that folds exactly with ordinary layers.

Branches, summed then ReLU: 3x3 conv+BN; 1x1 conv+BN; 1x1 conv -> AvgPool2d(3, stride, padding=1,
count_include_pad=True) -> BN; 1x1 conv -> 3x3 conv (padding 1) -> BN.  The average pool with
``count_include_pad`` is a depthwise conv with a constant 1/9 kernel and zero padding, and a 1x1 conv followed
by a 3x3 conv is the 3x3 conv with kernel ``K[o,i] = sum_m W3[o,m] W1[m,i]``; so the block is one 3x3 conv.

Why the 1x1 convs that feed a padded op have no bias and no BN: the 3x3 conv / pool zero-pads *their output*.
A 1x1 conv without bias maps 0 to 0, so padding its output equals padding its input and the composition is a
single zero-padded conv.  With a bias (or BN shift) ``c`` the padded border would have to hold ``c``, not 0,
and the folded conv would be wrong on the border pixels (the original DBB needs a special "BN and pad" layer
for this).  The trailing BN of each branch is after the padded op and folds exactly.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import ConvNet, conv_bn, conv_relu, fold_copy, fuse_bn, pad_kernel, randomize_bn_stats, seeded


class DiverseBranchBlock(nn.Module):
    """Training-time DBB (dense convs only) followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.dense = conv_bn(in_channels, out_channels, 3, stride, 1)
        self.pointwise = conv_bn(in_channels, out_channels, 1, stride, 0)
        self.avg = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, out_channels, 1, bias=False),
            pool=nn.AvgPool2d(3, stride, padding=1, count_include_pad=True),
            bn=nn.BatchNorm2d(out_channels),
        ))
        self.pointwise_dense = nn.Sequential(OrderedDict(
            conv1=nn.Conv2d(in_channels, in_channels, 1, bias=False),
            conv2=nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
            bn=nn.BatchNorm2d(out_channels),
        ))
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.dense(x) + self.pointwise(x) + self.avg(x) + self.pointwise_dense(x))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The float64 3x3 kernel and bias of the one conv equal to the block's pre-activation (eval mode)."""
        kernel, bias = fuse_bn(self.dense.conv.weight, self.dense.bn)
        k, b = fuse_bn(self.pointwise.conv.weight, self.pointwise.bn)
        kernel, bias = kernel + pad_kernel(k, 3), bias + b
        k, b = fuse_bn(self.avg.conv.weight.double().expand(-1, -1, 3, 3) / 9.0, self.avg.bn)
        kernel, bias = kernel + k, bias + b
        w1 = self.pointwise_dense.conv1.weight.double()[:, :, 0, 0]
        chain = torch.einsum("omhw,mi->oihw", self.pointwise_dense.conv2.weight.double(), w1)
        k, b = fuse_bn(chain, self.pointwise_dense.bn)
        return kernel + k, bias + b


def _deploy(block: DiverseBranchBlock) -> nn.Sequential:
    kernel, bias = block.get_equivalent_kernel_bias()
    return conv_relu(kernel, bias, stride=block.stride, groups=1, like=block.dense.conv.weight)


def dbb_net(
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (2, 2, 2),
    num_classes: int = 10,
    image_size: int = 32,
    *,
    seed: int | None = 0,
) -> ConvNet:
    """A small DBB classifier (train mode, random BN statistics), deterministic in ``seed``."""
    with seeded(seed):
        net = ConvNet(DiverseBranchBlock, widths, depths, num_classes=num_classes, image_size=image_size)
        return randomize_bn_stats(net)


def single_path_dbb(model: nn.Module) -> nn.Module:
    """Copy of ``model`` with every ``DiverseBranchBlock`` replaced by ``Sequential(Conv2d(3x3, bias), ReLU)``."""
    return fold_copy(model, {DiverseBranchBlock: _deploy})
