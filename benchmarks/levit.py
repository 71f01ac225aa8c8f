"""A LeViT-style network for the deploy benchmark: attention whose bias is gathered from a table and, as in
timm's LeViT and TinyViT, cached on the first eval-mode call. Its hand-written single path stores the
gathered bias, so folded / limit shows whether the fold recomputes weight-only work on every call."""

from __future__ import annotations

import copy
import itertools

import torch
from torch import Tensor, nn


class BiasCachedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, resolution: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.scale = heads, dim // heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        points = list(itertools.product(range(resolution), range(resolution)))
        offsets: dict[tuple[int, int], int] = {}
        idxs = [offsets.setdefault((abs(a[0] - b[0]), abs(a[1] - b[1])), len(offsets)) for a in points for b in points]
        self.attention_biases = nn.Parameter(torch.randn(heads, len(offsets)))
        self.register_buffer("attention_bias_idxs", torch.tensor(idxs).view(len(points), len(points)), persistent=False)
        self.attention_bias_cache: dict[str, Tensor] = {}

    @torch.no_grad()
    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.attention_bias_cache = {}
        return self

    def bias(self, x: Tensor) -> Tensor:
        if self.training:
            return self.attention_biases[:, self.attention_bias_idxs]
        key = str(x.device)
        if key not in self.attention_bias_cache:
            self.attention_bias_cache[key] = self.attention_biases[:, self.attention_bias_idxs]
        return self.attention_bias_cache[key]

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.bias(x)
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c))


class StoredBiasAttention(BiasCachedAttention):
    """The single path: the gathered bias is a buffer."""

    def __init__(self, source: BiasCachedAttention) -> None:
        nn.Module.__init__(self)
        self.heads, self.head_dim, self.scale = source.heads, source.head_dim, source.scale
        self.qkv, self.proj = copy.deepcopy(source.qkv), copy.deepcopy(source.proj)
        with torch.no_grad():
            self.register_buffer("stored_bias", source.attention_biases[:, source.attention_bias_idxs].clone())

    def bias(self, x: Tensor) -> Tensor:
        return self.stored_bias


class LeViTStyle(nn.Module):
    """``depth`` residual blocks of bias-cached attention and an MLP on ``resolution²`` tokens."""

    def __init__(self, dim: int = 64, heads: int = 4, resolution: int = 7, depth: int = 2) -> None:
        super().__init__()
        self.dim, self.tokens = dim, resolution * resolution
        self.attns = nn.ModuleList(BiasCachedAttention(dim, heads, resolution) for _ in range(depth))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.Hardswish(), nn.Linear(2 * dim, dim)) for _ in range(depth)
        )

    def forward(self, x: Tensor) -> Tensor:
        for attn, mlp in zip(self.attns, self.mlps):
            x = x + attn(x)
            x = x + mlp(x)
        return x


def levit_style() -> LeViTStyle:
    torch.manual_seed(0)
    return LeViTStyle().eval()


def single_path_levit(model: LeViTStyle) -> LeViTStyle:
    single = copy.deepcopy(model)
    single.attns = nn.ModuleList(StoredBiasAttention(a) for a in model.attns)
    return single.eval()


def levit_inputs(model: nn.Module, batch: int) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(batch, model.tokens, model.dim, generator=generator),)  # type: ignore[arg-type]
