"""The "seed" ViT (arXiv 2511.19718): every linear of every block is K parallel linears whose outputs are summed.

K parallel ``nn.Linear`` on the same input compute ``sum_k (W_k x + b_k) = (sum_k W_k) x + sum_k b_k``, so at
inference the block collapses to a plain ViT with one linear per projection; training keeps the K branches.
``single_path_vit`` is that collapse written by hand, the oracle for the compiler and the benchmarks' limit.

Attention is explicit matmul/softmax (no ``scaled_dot_product_attention``) so the model traces with every
front end, and q, k, v are separate projections (not one fused qkv linear) as in the paper.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from branchfold.training.modules import BranchedLinear

from ._common import fold_copy, random_images, seeded


@torch.no_grad()
def merge_branches(layer: BranchedLinear) -> nn.Linear:
    """The single ``nn.Linear`` equal to ``layer``: weights and biases summed over branches in float64.

    Written out here rather than taken from ``branchfold.merge``: the zoo's single paths are the oracle the
    library is tested against, so they share no folding code with it (``BranchedLinear`` itself is the
    library's training module, the one ``branchfold.expand`` writes).
    """
    first = layer.branches[0]
    has_bias = first.bias is not None
    linear = nn.utils.skip_init(
        nn.Linear, layer.in_features, layer.out_features, bias=has_bias,
        device=first.weight.device, dtype=first.weight.dtype,
    )
    linear.weight.copy_(torch.stack([b.weight.double() for b in layer.branches]).sum(0))
    if has_bias:
        linear.bias.copy_(torch.stack([b.bias.double() for b in layer.branches]).sum(0))
    return linear


def make_linear(in_features: int, out_features: int, branches: int) -> nn.Linear | BranchedLinear:
    """A plain ``nn.Linear`` for ``branches == 1`` (the single-path model), else a ``BranchedLinear``."""
    if branches == 1:
        return nn.Linear(in_features, out_features)
    return BranchedLinear(in_features, out_features, branches)


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v projections and an output projection."""

    def __init__(self, dim: int, heads: int, branches: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.q = make_linear(dim, dim, branches)
        self.k = make_linear(dim, dim, branches)
        self.v = make_linear(dim, dim, branches)
        self.proj = make_linear(dim, dim, branches)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, self.head_dim).transpose(1, 2)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    """``fc2(GELU(fc1(x)))``."""

    def __init__(self, dim: int, hidden: int, branches: int) -> None:
        super().__init__()
        self.fc1 = make_linear(dim, hidden, branches)
        self.act = nn.GELU()
        self.fc2 = make_linear(hidden, dim, branches)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; ``mlp`` may be passed in so that several blocks share one (GroupedMLP)."""

    def __init__(
        self, dim: int, heads: int, mlp_ratio: int, branches: int, mlp: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, branches)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp if mlp is not None else Mlp(dim, dim * mlp_ratio, branches)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SeedViT(nn.Module):
    """ViT classifier whose block linears have ``branches`` parallel branches (``branches == 1``: plain ViT)."""

    def __init__(
        self,
        depth: int = 3,
        branches: int = 4,
        dim: int = 192,
        heads: int = 3,
        mlp_ratio: int = 4,
        image_size: int = 32,
        patch: int = 4,
        num_classes: int = 10,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not divisible by patch {patch}")
        self.depth, self.branches, self.dim, self.heads, self.mlp_ratio = depth, branches, dim, heads, mlp_ratio
        self.image_size, self.patch, self.num_classes, self.in_chans = image_size, patch, num_classes, in_chans
        tokens = (image_size // patch) ** 2 + 1
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, branches) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])

    def example_input(self, batch: int = 2, generator: torch.Generator | None = None) -> Tensor:
        """A random image batch of the size the model was built for."""
        return random_images(self, batch, self.in_chans, self.image_size, generator)


@torch.no_grad()
def randomize_norms(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Perturb every LayerNorm's affine parameters away from (1, 0), so that a model copy which forgot to
    carry them over is caught; returns ``model``."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=generator))
            if m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=generator))
    return model


def seed_vit(
    depth: int = 3,
    branches: int = 4,
    dim: int = 192,
    heads: int = 3,
    mlp_ratio: int = 4,
    image_size: int = 32,
    patch: int = 4,
    num_classes: int = 10,
    *,
    seed: int | None = 0,
) -> SeedViT:
    """Build a seed ViT (train mode), deterministic in ``seed`` (``None``: use the global RNG)."""
    with seeded(seed):
        model = SeedViT(depth, branches, dim, heads, mlp_ratio, image_size, patch, num_classes)
        with torch.no_grad():
            model.cls_token.normal_(std=0.02)
            model.pos_embed.normal_(std=0.02)
        return randomize_norms(model)


def single_path_vit(model: SeedViT) -> SeedViT:
    """The plain ViT equal to ``model`` in eval mode: each ``BranchedLinear`` becomes one ``nn.Linear``
    holding the summed weights and biases; every other parameter is copied.  ``model`` is not modified."""
    plain = fold_copy(model, {BranchedLinear: merge_branches})
    assert isinstance(plain, SeedViT)
    plain.branches = 1
    return plain
