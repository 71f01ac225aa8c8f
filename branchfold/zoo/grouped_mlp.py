"""Weight sharing with branched linears (arXiv 2512.01059, GroupedMLP).

A stack of pre-norm transformer blocks in which each group of ``group_size`` adjacent blocks calls ONE MLP
module -- the same ``nn.Module`` object -- whose linears are ``BranchedLinear``.  Attention and norms stay
per block.  The model exercises a compiler on a module reached from several call sites: the fold must be
done once and the result must stay shared, which ``single_path_grouped_mlp`` does by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._common import fold_copy, seeded
from .vit import Block, BranchedLinear, Mlp, merge_branches, randomize_norms


class GroupedMLPNet(nn.Module):
    """``depth`` blocks, blocks ``[g*group_size, (g+1)*group_size)`` sharing MLP ``mlps[g]``; final LayerNorm.

    Maps tokens ``(batch, seq_len, dim)`` to tokens of the same shape.
    """

    def __init__(
        self, depth: int = 4, group_size: int = 2, dim: int = 64, heads: int = 2, mlp_ratio: int = 4,
        branches: int = 4, seq_len: int = 16,
    ) -> None:
        super().__init__()
        self.depth, self.group_size, self.dim, self.seq_len = depth, group_size, dim, seq_len
        groups = -(-depth // group_size)
        self.mlps = nn.ModuleList(Mlp(dim, dim * mlp_ratio, branches) for _ in range(groups))
        self.blocks = nn.ModuleList(
            Block(dim, heads, mlp_ratio, branches=1, mlp=self.mlps[i // group_size]) for i in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> Tensor:
        """Random tokens ``(batch, seq_len, dim)`` on the model's dtype/device."""
        p = next(self.parameters())
        x = torch.randn(batch, self.seq_len, self.dim, generator=generator)
        return x.to(device=p.device, dtype=p.dtype)


def grouped_mlp_net(
    depth: int = 4, group_size: int = 2, dim: int = 64, heads: int = 2, mlp_ratio: int = 4, branches: int = 4,
    seq_len: int = 16, *, seed: int | None = 0,
) -> GroupedMLPNet:
    """Build a GroupedMLP stack (train mode), deterministic in ``seed`` (``None``: use the global RNG)."""
    with seeded(seed):
        return randomize_norms(GroupedMLPNet(depth, group_size, dim, heads, mlp_ratio, branches, seq_len))


def single_path_grouped_mlp(model: GroupedMLPNet) -> GroupedMLPNet:
    """The equal model with summed linears that keeps the sharing: one plain MLP per group, called by the
    same blocks as before.  ``model`` is not modified."""
    plain = fold_copy(model, {BranchedLinear: merge_branches})
    assert isinstance(plain, GroupedMLPNet)
    return plain
