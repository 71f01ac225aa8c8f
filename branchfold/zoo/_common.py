"""Shared pieces of the zoo: conv+BN branches, BN folding math, the small CNN skeleton the convolutional
families plug their block into, and the module-swapping copy behind every ``single_path_*``.

The folding math here is written out by hand and shares nothing with ``branchfold``'s compiler on purpose:
the zoo's single-path models are the independent oracle the compiler is tested against.  It runs in
float64 and casts back once, so the oracle adds no rounding error of its own beyond that final cast.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@contextlib.contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """Run the body under ``torch.manual_seed(seed)`` without disturbing the caller's RNG.

    ``None`` uses the global RNG as it is, so a builder is then deterministic under the caller's
    ``torch.manual_seed`` instead.
    """
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def randomize_bn_stats(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm of ``model`` non-trivial running statistics and affine parameters; returns it.

    A fresh BN (mean 0, var 1, weight 1, bias 0) is almost the identity, the one setting in which a wrong
    or forgotten BN fold goes unnoticed.  Variances are drawn in [0.5, 2], weights in [0.5, 1.5].
    """

    def uniform(n: int, lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    for m in model.modules():
        if not isinstance(m, _BATCH_NORMS):
            continue
        n = m.num_features
        if m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(uniform(n, 0.5, 2.0))
        if m.affine:
            m.weight.copy_(uniform(n, 0.5, 1.5))
            m.bias.copy_(0.1 * torch.randn(n, generator=generator))
    return model


def conv_bn(
    in_channels: int,
    out_channels: int,
    kernel_size: int | tuple[int, int],
    stride: int = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
) -> nn.Sequential:
    """Bias-free conv followed by BN (children ``conv`` and ``bn``): the branch of every reparameterizable CNN."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
    return nn.Sequential(OrderedDict(conv=conv, bn=nn.BatchNorm2d(out_channels)))


def fuse_bn(kernel: Tensor, bn: nn.BatchNorm2d, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BN into the conv before it, in float64.

    ``BN(W*x + b) = (g/s) W*x + beta + (b - mu) g/s`` with ``s = sqrt(var + eps)``.
    """
    assert bn.running_mean is not None and bn.running_var is not None, "BN without running statistics"
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() - bn.running_mean.double() * scale
    if bias is not None:
        shift = shift + bias.double() * scale
    return kernel.double() * scale.reshape(-1, 1, 1, 1), shift


def pad_kernel(kernel: Tensor, size: int) -> Tensor:
    """Zero-pad a ``(..., kh, kw)`` kernel to ``size x size``, centred.

    A centred smaller kernel with correspondingly smaller padding reads the same input pixels as the
    padded one, so e.g. a 1x1 (padding 0) branch equals a 3x3 (padding 1) conv with zeros off-centre.
    """
    kh, kw = kernel.shape[-2:]
    top, left = (size - kh) // 2, (size - kw) // 2
    return F.pad(kernel, (left, size - kw - left, top, size - kh - top))


def identity_kernel(channels: int, groups: int, size: int, device: torch.device | None = None) -> Tensor:
    """The float64 ``(C, C/groups, size, size)`` kernel of a grouped conv that computes the identity."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, size, size, dtype=torch.float64, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % per_group, size // 2, size // 2] = 1.0
    return kernel


@torch.no_grad()
def conv_relu(
    kernel: Tensor, bias: Tensor, *, stride: int, groups: int, like: Tensor
) -> nn.Sequential:
    """The deploy form of a block: one biased conv ('same' padding for the odd kernel) followed by ReLU.

    ``kernel``/``bias`` (float64) are cast to the dtype and device of ``like``, the original weights.
    """
    out_channels, per_group, kh, kw = kernel.shape
    conv = nn.utils.skip_init(
        nn.Conv2d, per_group * groups, out_channels, (kh, kw), stride=stride, padding=(kh // 2, kw // 2),
        groups=groups, bias=True, device=like.device, dtype=like.dtype,
    )
    conv.weight.copy_(kernel)
    conv.bias.copy_(bias)
    return nn.Sequential(conv, nn.ReLU())


def fold_copy(model: nn.Module, folds: dict[type[nn.Module], Callable[[Any], nn.Module]]) -> nn.Module:
    """A deep copy of ``model`` in which every submodule of a type in ``folds`` is replaced by its fold.

    Working on a copy leaves the multi-branch original untouched.  A module reached from several parents
    (weight sharing) is folded once and the folded module is shared in the same way.
    """
    new = copy.deepcopy(model)
    done: dict[int, tuple[nn.Module, nn.Module]] = {}  # keeps the old module alive so its id stays unique

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            fold = next((f for cls, f in folds.items() if isinstance(child, cls)), None)
            if fold is None:
                visit(child)
                continue
            if id(child) not in done:
                done[id(child)] = (child, fold(child).train(child.training))
            setattr(parent, name, done[id(child)][1])

    with torch.no_grad():
        visit(new)
    return new


def random_images(
    model: nn.Module, batch: int, channels: int, size: int, generator: torch.Generator | None = None
) -> Tensor:
    """A random image batch on the dtype/device of ``model``'s parameters."""
    p = next(model.parameters())
    return torch.randn(batch, channels, size, size, generator=generator).to(device=p.device, dtype=p.dtype)


BlockFactory = Callable[[int, int, int], nn.Module]
"""``factory(in_channels, out_channels, stride)`` builds one block."""


class ConvNet(nn.Module):
    """Classifier skeleton of the CNN families: stem -> stages of blocks -> global average pool -> linear head.

    The stem (a block with stride 2) maps ``in_chans`` to ``widths[0]``; stage ``i`` has ``depths[i]``
    blocks of width ``widths[i]``, the first of every stage after the first with stride 2.  So each family
    gets blocks with and without stride, with and without a channel change, i.e. with and without its
    identity branch.
    """

    def __init__(
        self,
        block: BlockFactory,
        widths: Sequence[int],
        depths: Sequence[int],
        *,
        stem: BlockFactory | None = None,
        in_chans: int = 3,
        num_classes: int = 10,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.in_chans, self.image_size = in_chans, image_size
        self.stem = (stem or block)(in_chans, widths[0], 2)
        blocks: list[nn.Module] = []
        prev = widths[0]
        for i, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for j in range(depth):
                blocks.append(block(prev, width, 2 if i > 0 and j == 0 else 1))
                prev = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.stem(x))
        return self.head(x.mean(dim=(2, 3)))

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> Tensor:
        """A random image batch of the size the model was built for."""
        return random_images(self, batch, self.in_chans, self.image_size, generator)
