"""Differential checking: the folded graph against the original, on the example and random inputs.

The error is max |folded - original| / max |original| over every output tensor, so that it reads
the same for a logit and a feature map. NaN must meet NaN and an infinity the same infinity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.utils import _pytree as pytree

FP32_TOLERANCE = 1e-5
LOW_PRECISION_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def tolerance_for(dtype: torch.dtype | None) -> float:
    return LOW_PRECISION_TOLERANCE.get(dtype, FP32_TOLERANCE)


def relative_error(reference, candidate) -> float:
    """Largest error relative to the output's own scale, over all tensors of two output pytrees."""
    ref_leaves, ref_spec = pytree.tree_flatten(reference)
    new_leaves, new_spec = pytree.tree_flatten(candidate)
    if len(ref_leaves) != len(new_leaves):
        return math.inf
    worst = 0.0
    for r, c in zip(ref_leaves, new_leaves):
        if not isinstance(r, torch.Tensor):
            if r != c:
                return math.inf
            continue
        if not isinstance(c, torch.Tensor) or r.shape != c.shape:
            return math.inf
        if not r.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(r, c) else math.inf)
            continue
        r64, c64 = r.detach().double().cpu(), c.detach().double().cpu()
        nan_r, nan_c = torch.isnan(r64), torch.isnan(c64)
        inf_r, inf_c = torch.isinf(r64), torch.isinf(c64)
        if not torch.equal(nan_r, nan_c) or not torch.equal(inf_r, inf_c) or not torch.equal(r64[inf_r], c64[inf_c]):
            return math.inf
        finite = ~(nan_r | inf_r)
        if not finite.any():
            continue
        scale = r64[finite].abs().max().item() or 1.0
        worst = max(worst, (r64[finite] - c64[finite]).abs().max().item() / scale)
    return worst


def leading_dtype(outputs) -> torch.dtype | None:
    for leaf in pytree.tree_leaves(outputs):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf.dtype
    return None


def random_inputs(example: Sequence, generator: torch.Generator) -> list:
    """Fresh inputs of the example's shapes and dtypes (integer inputs stay inside the example's range)."""

    def fresh(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            r = torch.randn(t.shape, generator=generator, dtype=torch.float64)
            return r.to(dtype=t.dtype, device=t.device)
        if t.dtype == torch.bool:
            return torch.randint(0, 2, t.shape, generator=generator).bool().to(t.device)
        lo, hi = (int(t.min()), int(t.max())) if t.numel() else (0, 1)
        return torch.randint(lo, hi + 1, t.shape, generator=generator).to(dtype=t.dtype, device=t.device)

    return pytree.tree_map(fresh, list(example))


@dataclass
class Check:
    error: float  # worst relative error over all input sets
    tolerance: float
    ok: bool


def run(fn: Callable, args: Sequence, kwargs: dict | None = None):
    """``fn`` on copies of the inputs, so that a model writing its input changes nothing of the caller's."""
    args, kwargs = fresh_copies(args, kwargs)
    with torch.no_grad():
        return fn(*args, **kwargs)


def fresh_copies(args: Sequence, kwargs: dict | None) -> tuple[tuple, dict]:
    """Copies of the tensors among ``args`` and ``kwargs`` (the rest as it is)."""
    return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, (tuple(args), dict(kwargs or {})))


def check(
    reference: Callable,
    candidate: Callable,
    input_sets: Sequence[tuple[Sequence, dict]],
    tolerance: float | None = None,
    reference_outputs: list | None = None,
) -> Check:
    """Compare two callables on each ``(args, kwargs)``; ``reference_outputs`` may be precomputed."""
    worst, tol = 0.0, tolerance
    for i, (args, kwargs) in enumerate(input_sets):
        ref = reference_outputs[i] if reference_outputs is not None else run(reference, args, kwargs)
        new = run(candidate, args, kwargs)
        if tol is None:
            tol = tolerance_for(leading_dtype(ref))
        worst = max(worst, relative_error(ref, new))
    tol = FP32_TOLERANCE if tol is None else tol
    return Check(worst, tol, worst <= tol)
