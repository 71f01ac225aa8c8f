"""ACNet (Ding et al., ICCV 2019): asymmetric convolution block, 3x3 + 1x3 + 3x1 conv+BN branches summed.

The 1x3 branch (padding (0, 1)) and the 3x1 branch (padding (1, 0)) read the middle row and the middle
column of the 3x3 window, with or without stride, so after folding each BN the three kernels add up to
one 3x3 conv with bias: the 1x3 kernel goes into the middle row, the 3x1 kernel into the middle column.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._common import ConvNet, conv_bn, conv_relu, fold_copy, fuse_bn, pad_kernel, randomize_bn_stats, seeded


class ACBlock(nn.Module):
    """Training-time asymmetric convolution block followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.stride, self.groups = stride, groups
        self.square = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.horizontal = conv_bn(in_channels, out_channels, (1, 3), stride, (0, 1), groups)
        self.vertical = conv_bn(in_channels, out_channels, (3, 1), stride, (1, 0), groups)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.square(x) + self.horizontal(x) + self.vertical(x))

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The float64 3x3 kernel and bias of the one conv equal to the block's pre-activation (eval mode)."""
        kernel, bias = fuse_bn(self.square.conv.weight, self.square.bn)
        for branch in (self.horizontal, self.vertical):
            k, b = fuse_bn(branch.conv.weight, branch.bn)
            kernel, bias = kernel + pad_kernel(k, 3), bias + b
        return kernel, bias


def _deploy(block: ACBlock) -> nn.Sequential:
    kernel, bias = block.get_equivalent_kernel_bias()
    return conv_relu(kernel, bias, stride=block.stride, groups=block.groups, like=block.square.conv.weight)


def acnet_net(
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (2, 2, 2),
    num_classes: int = 10,
    image_size: int = 32,
    *,
    seed: int | None = 0,
) -> ConvNet:
    """A small ACNet classifier (train mode, random BN statistics), deterministic in ``seed``."""
    with seeded(seed):
        return randomize_bn_stats(ConvNet(ACBlock, widths, depths, num_classes=num_classes, image_size=image_size))


def single_path_acnet(model: nn.Module) -> nn.Module:
    """Copy of ``model`` with every ``ACBlock`` replaced by ``Sequential(Conv2d(3x3, bias), ReLU)``."""
    return fold_copy(model, {ACBlock: _deploy})
