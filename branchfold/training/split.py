"""Split one weight into branch weights that sum to it exactly and differ from each other.

Every branch covers a *footprint* of the full kernel: all of it (the main branch, a parallel copy), a
centred sub-kernel (RepVGG's 1x1, ACNet's 1xK / Kx1), or the diagonal centre taps (the identity branch).
Each tap of the weight is shared equally among the branches covering it, plus zero-sum noise across
those branches: ``w_i = w / c + δ_i`` with ``Σ_i δ_i = 0`` on each tap and ``δ`` of the weight's scale, so
the branches differ while their sum is the weight.  Everything runs in float64 on the CPU, from a seeded
generator: the split is deterministic, and its sum is checked before anything is cast to the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from branchfold.rewriter.affine import F64

IDENTITY = "identity"
"""The footprint of an identity branch: the centre tap of each channel's own input."""

Footprint = tuple[int, ...] | str  # a centred kernel size, or IDENTITY


@dataclass(frozen=True)
class Split:
    """Branch weights (each of its footprint's shape; an identity's as a ``[C]`` vector) and biases."""

    weights: list[Tensor]
    biases: list[Tensor | None]  # None for the identity branch and for bias-free weights


def rms(t: Tensor) -> float:
    """The scale of a tensor: root mean square (0 for an empty or all-zero one)."""
    return float(t.double().pow(2).mean().sqrt()) if t.numel() else 0.0


def _centre_slices(full: Sequence[int], size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice((f - s) // 2, (f - s) // 2 + s) for f, s in zip(full, size))


def _identity_index(weight: Tensor, groups: int) -> tuple[Tensor, ...]:
    channels, per_group = weight.shape[0], weight.shape[1]
    if weight.shape[1] * groups != channels:
        raise ValueError("an identity branch needs as many input as output channels")
    index = torch.arange(channels)
    centre = tuple(torch.full_like(index, k // 2) for k in weight.shape[2:])
    return (index, index % per_group, *centre)


def _mask(weight: Tensor, footprint: Footprint, groups: int) -> Tensor:
    mask = torch.zeros_like(weight)
    if footprint == IDENTITY:
        mask[_identity_index(weight, groups)] = 1.0
    else:
        mask[(slice(None), slice(None), *_centre_slices(weight.shape[2:], footprint))] = 1.0
    return mask


def _zero_sum_noise(masks: list[Tensor], scale: float, generator: torch.Generator) -> list[Tensor]:
    """Noise on each mask's support, of std ``scale``, summing to zero over the masks on every entry."""
    noise = [torch.randn(m.shape, generator=generator, dtype=F64) * scale * m for m in masks]
    cover = torch.stack(masks).sum(0).clamp_min(1)
    mean = torch.stack(noise).sum(0) / cover
    return [(n - mean) * m for n, m in zip(noise, masks)]


def split_weight(
    weight: Tensor,
    bias: Tensor | None,
    footprints: Sequence[Footprint],
    *,
    groups: int = 1,
    spread: float,
    generator: torch.Generator,
) -> Split:
    """Split ``weight`` (``[out, in/groups, *k]`` or ``[out, in]``) and ``bias`` over ``footprints``.

    ``footprints[0]`` must be the full kernel, so that every tap is covered.  Biases go to the non-identity
    branches only.  The returned tensors are float64 on the CPU.
    """
    w = weight.detach().to("cpu", F64)
    if footprints[0] != tuple(w.shape[2:]):
        raise ValueError("the first branch must cover the whole kernel")
    masks = [_mask(w, f, groups) for f in footprints]
    cover = torch.stack(masks).sum(0)
    noise = _zero_sum_noise(masks, spread * rms(w), generator)
    full = [w * m / cover + n for m, n in zip(masks, noise)]
    weights = []
    for f, t in zip(footprints, full):
        if f == IDENTITY:
            weights.append(t[_identity_index(w, groups)])
        else:
            weights.append(t[(slice(None), slice(None), *_centre_slices(w.shape[2:], f))].clone())
    biases: list[Tensor | None] = [None] * len(footprints)
    convs = [i for i, f in enumerate(footprints) if f != IDENTITY]
    if bias is not None:
        b = bias.detach().to("cpu", F64)
        ones = [torch.ones_like(b) for _ in convs]
        for i, n in zip(convs, _zero_sum_noise(ones, spread * rms(b), generator)):
            biases[i] = b / len(convs) + n
    return Split(weights, biases)
