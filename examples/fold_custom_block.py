"""Fold a multi-branch block you wrote yourself: no reparameterize() method needed.

    python examples/fold_custom_block.py
"""

import torch
from torch import nn

import branchfold


class Block(nn.Module):
    """3x3 conv + BN, 1x3 conv + BN, 3x1 conv + BN, and an identity BN, summed before a ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()

        def conv_bn(kernel, padding):
            return nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=padding, bias=False),
                                 nn.BatchNorm2d(channels))

        self.square = conv_bn(3, 1)
        self.horizontal = conv_bn((1, 3), (0, 1))
        self.vertical = conv_bn((3, 1), (1, 0))
        self.identity = nn.BatchNorm2d(channels)

    def forward(self, x):
        return torch.relu(self.square(x) + self.horizontal(x) + self.vertical(x) + self.identity(x))


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(Block(16), Block(16)).eval()
    for m in model.modules():  # make the BatchNorms non-trivial, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 16, 32, 32)
    result = branchfold.fold_with_report(model, (x,))
    print(result.report)
    print(result.model.code)  # two conv2d + relu: one conv per block


if __name__ == "__main__":
    main()
