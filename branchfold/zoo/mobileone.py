"""MobileOne (Vasu et al., CVPR 2023): depthwise-separable blocks with over-parameterized branches.

A unit is a depthwise stage -- ``branches`` 3x3 depthwise conv+BN, a 1x1 depthwise conv+BN ("scale") and an
identity BN (stride 1 only), summed, ReLU -- then a pointwise stage -- ``branches`` 1x1 conv+BN and an
identity BN (when in == out), summed, ReLU.  Each stage folds to one conv with bias: the K kernels add up,
the 1x1 scale kernel is padded to 3x3 and the identity is a per-group centre-1 kernel.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._common import (
    ConvNet,
    conv_bn,
    conv_relu,
    fold_copy,
    fuse_bn,
    identity_kernel,
    pad_kernel,
    randomize_bn_stats,
    seeded,
)


class MobileOneBlock(nn.Module):
    """One MobileOne stage: ``branches`` kxk conv+BN, a 1x1 conv+BN if k > 1, an identity BN if shapes allow."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
        branches: int = 4,
    ) -> None:
        super().__init__()
        self.in_channels, self.kernel_size, self.stride, self.groups = in_channels, kernel_size, stride, groups
        pad = kernel_size // 2
        self.convs = nn.ModuleList(
            conv_bn(in_channels, out_channels, kernel_size, stride, pad, groups) for _ in range(branches)
        )
        self.scale = conv_bn(in_channels, out_channels, 1, stride, 0, groups) if kernel_size > 1 else None
        self.identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.convs[0](x)
        for conv in self.convs[1:]:
            out = out + conv(x)
        if self.scale is not None:
            out = out + self.scale(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The float64 kxk kernel and bias of the one conv equal to the stage's pre-activation (eval mode)."""
        fused = [fuse_bn(branch.conv.weight, branch.bn) for branch in self.convs]
        if self.scale is not None:
            k, b = fuse_bn(self.scale.conv.weight, self.scale.bn)
            fused.append((pad_kernel(k, self.kernel_size), b))
        if self.identity is not None:
            eye = identity_kernel(self.in_channels, self.groups, self.kernel_size, device=fused[0][0].device)
            fused.append(fuse_bn(eye, self.identity))
        return torch.stack([k for k, _ in fused]).sum(0), torch.stack([b for _, b in fused]).sum(0)


def mobileone_unit(in_channels: int, out_channels: int, stride: int = 1, branches: int = 4) -> nn.Sequential:
    """Depthwise 3x3 stage (carries the stride) then pointwise 1x1 stage (changes the width)."""
    depthwise = MobileOneBlock(in_channels, in_channels, 3, stride, groups=in_channels, branches=branches)
    pointwise = MobileOneBlock(in_channels, out_channels, 1, 1, groups=1, branches=branches)
    return nn.Sequential(OrderedDict(depthwise=depthwise, pointwise=pointwise))


def _deploy(block: MobileOneBlock) -> nn.Sequential:
    kernel, bias = block.get_equivalent_kernel_bias()
    return conv_relu(kernel, bias, stride=block.stride, groups=block.groups, like=block.convs[0].conv.weight)


def mobileone_net(
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (2, 2, 2),
    branches: int = 4,
    num_classes: int = 10,
    image_size: int = 32,
    *,
    seed: int | None = 0,
) -> ConvNet:
    """A small MobileOne classifier (train mode, random BN statistics), deterministic in ``seed``.

    The stem is a dense 3x3 ``MobileOneBlock`` with stride 2, as in the paper; the rest are units.
    """

    def unit(cin: int, cout: int, stride: int) -> nn.Sequential:
        return mobileone_unit(cin, cout, stride, branches)

    def stem(cin: int, cout: int, stride: int) -> MobileOneBlock:
        return MobileOneBlock(cin, cout, 3, stride, groups=1, branches=branches)

    with seeded(seed):
        net = ConvNet(unit, widths, depths, stem=stem, num_classes=num_classes, image_size=image_size)
        return randomize_bn_stats(net)


def single_path_mobileone(model: nn.Module) -> nn.Module:
    """Copy of ``model`` with every ``MobileOneBlock`` replaced by ``Sequential(Conv2d(bias), ReLU)``."""
    return fold_copy(model, {MobileOneBlock: _deploy})
