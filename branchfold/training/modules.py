"""The training-time modules ``expand`` writes: several branches of one linear or conv, outputs summed.

Each branch is an ordinary ``nn.Linear`` / ``nn.Conv*d`` submodule and the forward is a plain chain of
``+`` (never in place), so the expanded model trains in eager mode with any optimizer and traces, in every
capture, into the linear/conv ops and adds that ``branchfold.fold`` sums back into one op.

The ``nn.Linear`` / ``nn.Conv*d`` attributes that code reads (``in_features``, ``kernel_size``, ...) are
kept, and ``weight`` / ``bias`` are properties returning the summed (differentiable) tensors, so code that
reads ``layer.weight`` (its dtype, its shape, or the weight itself) keeps working.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _sum(tensors: Sequence[Tensor]) -> Tensor:
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total


class BranchedLinear(nn.Module):
    """``branches`` parallel linears of one shape on the same input, outputs summed.

    ``BranchedLinear(in, out, k)`` builds ``k`` freshly initialised ``nn.Linear`` (the seed ViT's layer);
    ``from_branches`` wraps given ones (what ``expand`` and ``merge`` use).
    """

    def __init__(
        self, in_features: int, out_features: int, branches: int = 2, bias: bool = True, *,
        device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        if branches < 1:
            raise ValueError(f"branches must be >= 1, got {branches}")
        self.in_features, self.out_features = in_features, out_features
        self.branches = nn.ModuleList(
            nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype) for _ in range(branches)
        )

    @classmethod
    def from_branches(cls, branches: Sequence[nn.Linear]) -> BranchedLinear:
        """Wrap ``branches`` (linears of one shape) without copying them."""
        first = branches[0]
        if any(b.weight.shape != first.weight.shape for b in branches):
            raise ValueError("branches of a BranchedLinear must all have the same shape")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = first.in_features, first.out_features
        layer.branches = nn.ModuleList(branches)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out

    @property
    def weight(self) -> Tensor:
        """The summed weight (differentiable): what the equivalent ``nn.Linear`` would hold."""
        return _sum([b.weight for b in self.branches])

    @property
    def bias(self) -> Tensor | None:
        biases = [b.bias for b in self.branches if b.bias is not None]
        return _sum(biases) if biases else None

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, branches={len(self.branches)}"


def pad_centred(kernel: Tensor, size: Sequence[int]) -> Tensor:
    """Zero-pad a ``(out, in, *k)`` kernel to spatial ``size``, centred (odd sizes on both sides)."""
    pads: list[int] = []
    for k, s in zip(reversed(kernel.shape[2:]), reversed(tuple(size))):
        pads += [(s - k) // 2, (s - k) - (s - k) // 2]
    return F.pad(kernel, pads) if any(pads) else kernel


def identity_kernel(scale: Tensor, groups: int, size: Sequence[int]) -> Tensor:
    """The ``(C, C/groups, *size)`` kernel of ``x * scale`` (per channel): ``scale`` at the centre tap."""
    channels = scale.shape[0]
    per_group = channels // groups
    index = torch.arange(channels, device=scale.device)
    kernel = scale.new_zeros((channels, per_group, *size))
    centre = tuple(torch.full_like(index, s // 2) for s in size)
    return kernel.index_put((index, index % per_group, *centre), scale.reshape(-1))


class BranchedConv(nn.Module):
    """Convs of one geometry (stride, dilation, groups, channels) summed, plus an optional identity branch.

    ``branches[0]`` holds the full kernel; the others are centred sub-kernels of it (RepVGG's 1x1, ACNet's
    1xK and Kx1) or copies of its shape (parallel), each padded so that it reads the pixels its taps
    read in the full kernel.  ``identity`` (shape ``(C, 1, ..., 1)``, or None) is RepVGG's identity branch
    as a learnable per-channel scale: ``x * identity`` (the identity BN of RepVGG without statistics).
    """

    identity: nn.Parameter | None

    def __init__(self, branches: Sequence[nn.Module], identity: nn.Parameter | None = None) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.register_parameter("identity", identity)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        if self.identity is not None:
            out = out + x * self.identity
        return out

    @property
    def main(self) -> nn.Module:
        """The full-kernel branch, whose geometry the block has."""
        return self.branches[0]

    in_channels = property(lambda self: self.main.in_channels)
    out_channels = property(lambda self: self.main.out_channels)
    kernel_size = property(lambda self: self.main.kernel_size)
    stride = property(lambda self: self.main.stride)
    padding = property(lambda self: self.main.padding)
    dilation = property(lambda self: self.main.dilation)
    groups = property(lambda self: self.main.groups)
    padding_mode = property(lambda self: self.main.padding_mode)

    @property
    def weight(self) -> Tensor:
        """The summed full-size kernel (differentiable): what the equivalent single conv would hold."""
        size = self.main.weight.shape[2:]
        kernels = [pad_centred(b.weight, size) for b in self.branches]
        if self.identity is not None:
            kernels.append(identity_kernel(self.identity, self.groups, size))
        return _sum(kernels)

    @property
    def bias(self) -> Tensor | None:
        biases = [b.bias for b in self.branches if b.bias is not None]
        return _sum(biases) if biases else None

    def extra_repr(self) -> str:
        kernels = ", ".join("x".join(map(str, b.kernel_size)) for b in self.branches)
        return f"branches=[{kernels}]" + (", identity" if self.identity is not None else "")
