"""``merge``: fewer branches in an expanded model, in place, same function, still trainable.

Branches are summed in float64 with the compiler's own algebra (``add_maps``: a smaller centred kernel
is padded into the one that absorbs it, an identity becomes its centre taps) and cast back once.  The
merged tensors are new ``nn.Parameter`` objects, so the report says which parameters replaced which:
``report.update_optimizer(optimizer)`` swaps them in an existing optimizer (its schedulers keep working).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from branchfold import compat

from .maps import branch_maps, layer_from_map, sum_maps
from .modules import BranchedConv, BranchedLinear
from .split import IDENTITY, Footprint


@dataclass(frozen=True)
class ReplacedParameters:
    """The parameters of one expanded module that a merge removed (``old``) and created (``new``), by
    qualified name; a branch left as it was keeps its parameter objects and is in neither."""

    module: str
    old: dict[str, nn.Parameter]
    new: dict[str, nn.Parameter]


@dataclass
class MergeReport:
    """What ``merge`` changed: one entry per expanded module whose branches were reduced."""

    replaced: list[ReplacedParameters] = field(default_factory=list)

    @property
    def old_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.replaced for p in r.old.values()]

    @property
    def new_parameters(self) -> list[nn.Parameter]:
        return [p for r in self.replaced for p in r.new.values()]

    def update_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Swap the replaced parameters for their successors in ``optimizer``, in place; returns it.

        A module's new parameters join the parameter group of its first old parameter, with no state
        (momentum, Adam moments): a sum of branches has no exact optimizer state of its own.  Modules
        none of whose parameters were being optimized stay out.  Other parameters keep their state.
        """
        owner = {id(p): r for r in self.replaced for p in r.old.values()}
        placed: set[int] = set()
        for group in optimizer.param_groups:
            params: list[nn.Parameter] = []
            for p in group["params"]:
                entry = owner.get(id(p))
                if entry is None:
                    params.append(p)
                    continue
                optimizer.state.pop(p, None)
                if id(entry) not in placed:
                    placed.add(id(entry))
                    params.extend(entry.new.values())
            group["params"] = params
        return optimizer

    def __len__(self) -> int:
        return len(self.replaced)


def merge(model: nn.Module, branches: int = 2) -> MergeReport:
    """Reduce every ``BranchedLinear`` / ``BranchedConv`` of ``model`` to at most ``branches`` branches.

    In place and exact up to one rounding to the model's dtype, in training mode too (the branches sit
    inside the conv: a BatchNorm after it is untouched).  Parallel branches of one shape are summed in
    contiguous groups of near-equal size; branches of different kernels are reduced by absorbing the
    smallest into the smallest branch whose kernel contains it (RepVGG: the identity into the 1x1, then
    the 1x1 into the KxK; ACNet: the 1xK into the KxK, ...).  ``branches=1`` replaces each expanded
    module by a plain ``nn.Linear`` / ``nn.Conv*d``.  A module shared by several parents is merged once
    and stays shared.  Returns which parameters were replaced, so an optimizer can be updated.
    """
    if branches < 1:
        raise ValueError(f"branches must be >= 1, got {branches}")
    if branches == 1 and isinstance(model, (BranchedLinear, BranchedConv)):
        raise ValueError("merge(..., branches=1) cannot replace the model itself: merge its parent instead")
    report = MergeReport()
    replacement: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules()):  # a shared module is listed once
        if not isinstance(module, (BranchedLinear, BranchedConv)) or _count(module) <= branches:
            continue
        before = dict(module.named_parameters(prefix=name))
        with torch.no_grad():
            merged = _merged(module, branches)
        if branches == 1:
            replacement[id(module)] = merged
        after = dict(merged.named_parameters(prefix=name))
        kept = {id(p) for p in after.values()} & {id(p) for p in before.values()}
        report.replaced.append(ReplacedParameters(
            name,
            {n: p for n, p in before.items() if id(p) not in kept},
            {n: p for n, p in after.items() if id(p) not in kept},
        ))  # fmt: skip
    if replacement:
        _replace(model, replacement)
    return report


def _count(block: nn.Module) -> int:
    return len(block.branches) + (getattr(block, "identity", None) is not None)


def _footprint(block: nn.Module, index: int) -> Footprint:
    if index == len(block.branches):
        return IDENTITY
    return tuple(getattr(block.branches[index], "kernel_size", ()))


def _contains(outer: Footprint, inner: Footprint) -> bool:
    if outer == IDENTITY:
        return False
    return inner == IDENTITY or all(o >= i for o, i in zip(outer, inner))


def _size(f: Footprint) -> int:
    return 0 if f == IDENTITY else math.prod(f)


def _groups(block: nn.Module, target: int) -> list[list[int]]:
    """Which branch indices (the identity is ``len(branches)``) are summed together, each group's absorber first."""
    count = _count(block)
    footprints = [_footprint(block, i) for i in range(count)]
    if len(set(footprints)) == 1:  # parallel: contiguous groups of near-equal size
        bounds = [round(i * count / target) for i in range(target + 1)]
        return [list(range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    groups = [[i] for i in range(count)]
    while len(groups) > target:
        smallest = min(range(len(groups)), key=lambda g: (_size(footprints[groups[g][0]]), -g))
        inner = footprints[groups[smallest][0]]
        hosts = [g for g in range(len(groups)) if g != smallest and _contains(footprints[groups[g][0]], inner)]
        host = groups[min(hosts, key=lambda g: (_size(footprints[groups[g][0]]), g))]
        host += groups.pop(smallest)
    return groups


def _merged(block: nn.Module, target: int) -> nn.Module:
    """``block`` with its branches summed into ``target`` groups (in place), or the plain layer for 1."""
    maps = branch_maps(block)
    n_layers = len(block.branches)
    layers: list[nn.Module] = []
    identity = None
    for group in _groups(block, target):
        if group == [n_layers]:  # the identity left on its own
            identity = block.identity
            continue
        host = block.branches[group[0]]
        layers.append(host if len(group) == 1 else layer_from_map(host, sum_maps([maps[i] for i in group])))
    if target == 1:
        return layers[0].train(block.training)
    block.branches = nn.ModuleList(layers)
    if isinstance(block, BranchedConv):
        block.identity = identity
    return block


def _replace(model: nn.Module, replacement: dict[int, nn.Module]) -> None:
    """Point every parent of a replaced module at its replacement (shared modules at every parent)."""
    for parent in list(model.modules()):
        for name, child in compat.child_modules(parent):
            if id(child) in replacement:
                setattr(parent, name, replacement[id(child)])
