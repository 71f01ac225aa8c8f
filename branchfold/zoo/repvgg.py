"""RepVGG (Ding et al., CVPR 2021): a 3x3 conv+BN, a 1x1 conv+BN and an identity BN, summed, then ReLU.

Every branch is linear in eval mode and reads a subset of the 3x3 window, so the sum is one 3x3 conv with
bias: fuse each BN into its kernel, pad the 1x1 kernel to 3x3, write the identity as a 3x3 kernel with a 1
at the centre (per group), and add.  ``single_path_repvgg`` is that standard ``get_equivalent_kernel_bias``
reparameterization written by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

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


class RepVGGBlock(nn.Module):
    """Training-time RepVGG block; the identity branch exists only when ``in == out`` and ``stride == 1``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.stride, self.groups = in_channels, out_channels, stride, groups
        self.dense = conv_bn(in_channels, out_channels, 3, stride, 1, groups)
        self.pointwise = conv_bn(in_channels, out_channels, 1, stride, 0, groups)
        self.identity = nn.BatchNorm2d(in_channels) if in_channels == out_channels and stride == 1 else None
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.dense(x) + self.pointwise(x)
        if self.identity is not None:
            out = out + self.identity(x)
        return self.act(out)

    def get_equivalent_kernel_bias(self) -> tuple[Tensor, Tensor]:
        """The float64 3x3 kernel and bias of the one conv equal to the block's pre-activation (eval mode)."""
        kernel, bias = fuse_bn(self.dense.conv.weight, self.dense.bn)
        k1, b1 = fuse_bn(self.pointwise.conv.weight, self.pointwise.bn)
        kernel, bias = kernel + pad_kernel(k1, 3), bias + b1
        if self.identity is not None:
            eye = identity_kernel(self.in_channels, self.groups, 3, device=kernel.device)
            k_id, b_id = fuse_bn(eye, self.identity)
            kernel, bias = kernel + k_id, bias + b_id
        return kernel, bias


def _deploy(block: RepVGGBlock) -> nn.Sequential:
    kernel, bias = block.get_equivalent_kernel_bias()
    return conv_relu(kernel, bias, stride=block.stride, groups=block.groups, like=block.dense.conv.weight)


def repvgg_net(
    widths: Sequence[int] = (16, 32, 64),
    depths: Sequence[int] = (2, 2, 2),
    groups: int = 2,
    num_classes: int = 10,
    image_size: int = 32,
    *,
    seed: int | None = 0,
) -> ConvNet:
    """A small RepVGG classifier (train mode, random BN statistics), deterministic in ``seed``.

    As in RepVGG-g2/g4, ``groups`` applies to the blocks that keep width and resolution (which are also the
    ones with an identity branch); stride-2 and width-changing blocks are dense.
    """

    def block(cin: int, cout: int, stride: int) -> RepVGGBlock:
        return RepVGGBlock(cin, cout, stride, groups if cin == cout and stride == 1 else 1)

    with seeded(seed):
        return randomize_bn_stats(ConvNet(block, widths, depths, num_classes=num_classes, image_size=image_size))


def single_path_repvgg(model: nn.Module) -> nn.Module:
    """Copy of ``model`` with every ``RepVGGBlock`` replaced by ``Sequential(Conv2d(3x3, bias), ReLU)``."""
    return fold_copy(model, {RepVGGBlock: _deploy})
