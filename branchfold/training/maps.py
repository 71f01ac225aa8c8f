"""Branch modules ↔ the compiler's affine maps, so that summing branches reuses ``rewriter/affine.py``.

``add_maps`` already sums linears, centred convs of different kernels (padding the smaller one) and an
identity (a per-channel diagonal) exactly in float64; merging branches and checking a split are that sum.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from functools import reduce

import torch
from torch import nn

from branchfold.patterns import canonical
from branchfold.rewriter.affine import (
    F64,
    AffineMap,
    Conv,
    Dense,
    Diagonal,
    add_maps,
    bias_if_any,
)
from branchfold.rewriter.rounding import cast_tensor

from .modules import CONV_TYPES


def layer_map(layer: nn.Module) -> Dense | Conv:
    """The map of one ``nn.Linear`` or ``nn.Conv*d`` branch (float64 copies of its tensors)."""
    if isinstance(layer, nn.Linear):
        return canonical.linear(layer.weight, layer.bias)
    if isinstance(layer, CONV_TYPES):
        return canonical.conv(
            layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups,
            layer.padding_mode,
        )  # fmt: skip
    raise TypeError(f"not a linear or conv branch: {type(layer).__name__}")


def identity_map(scale: torch.Tensor) -> Diagonal:
    """``x * scale`` for a ``(C, 1, ..., 1)`` scale: a diagonal on the channel axis of a ``len(shape)-1``-d conv."""
    return Diagonal(scale.detach().to("cpu", F64).reshape(-1), torch.zeros(scale.shape[0], dtype=F64),
                    -scale.dim())  # fmt: skip


def sum_maps(maps: Sequence[AffineMap]) -> AffineMap:
    return reduce(add_maps, maps)


def layer_from_map(like: nn.Module, fused: Dense | Conv) -> nn.Module:
    """A copy of ``like`` (same class, geometry and flags) holding ``fused``'s weight and bias.

    ``fused`` must have ``like``'s weight shape (it is a sum absorbed into ``like``'s footprint).  The new
    parameters are fresh ``nn.Parameter`` s in ``like``'s dtype and device, trainable as ``like``'s weight.
    """
    if tuple(fused.weight.shape) != tuple(like.weight.shape):
        raise ValueError(f"fused weight {tuple(fused.weight.shape)} does not fit {tuple(like.weight.shape)}")
    if isinstance(fused, Conv) and fused.padding != layer_map(like).padding:
        raise ValueError("fused conv is not padded like the branch it replaces")
    new = copy.deepcopy(like)
    new.weight = _parameter(fused.weight, like.weight)
    if like.bias is not None:
        new.bias = _parameter(fused.bias, like.bias)
    elif bias_if_any(fused) is not None:
        raise ValueError("fused map has a bias but the branch it replaces has none")
    return new


def _parameter(value: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    t = cast_tensor(value, like.dtype).to(like.device)
    return nn.Parameter(t, requires_grad=like.requires_grad)


def branch_maps(block: nn.Module) -> list[AffineMap]:
    """The maps of a ``BranchedLinear`` / ``BranchedConv``'s branches, the identity (if any) last."""
    maps: list[AffineMap] = [layer_map(b) for b in block.branches]
    identity = getattr(block, "identity", None)
    if identity is not None:
        maps.append(identity_map(identity))
    return maps
