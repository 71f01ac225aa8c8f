"""Are the folded weights still those of the live parameters? The per-call check of the backend.

Dynamo passes a module's parameters as graph inputs on every call; the backend folded the graph with
their values at fold time. Between two calls a parameter can change in five ways, and each leaves a
different trace:

- an optimizer step (any ``torch.optim.Optimizer``, including ones that write through ``p.data``): the
  global optimizer step post-hook marks every guard that watches one of the optimizer's parameters (the
  hook is registered while at least one guard lives, and removed with the last);
- an in-place update (``load_state_dict``, ``p.mul_(2)`` under ``no_grad``, built-in optimizers): no hook
  fires, only the parameter's version counter moves;
- ``p.data = t``: the version counter stays, the data pointer moves;
- a replaced parameter (``m.bias = nn.Parameter(...)``, ``load_state_dict(assign=True)``): dynamo passes
  another object;
- a write through ``p.data`` outside an optimizer (``p.data.copy_(w)``): bypasses the version counter by
  design; ``invalidate()``, or the ``"sampled"`` / ``"values"`` checks, see it.

So the hook alone cannot stand in for the per-call read: torch keeps no mutation counter shared by many
tensors and has no batched reader of version counters (``torch._C._tensors_data_ptrs_at_indices_equal``,
the batched data-pointer check, exists in CUDA builds only). The read is three C-level ``map`` passes
over the watched tensors (identity, version counter, data pointer), each compared with the list taken
at fold time, about 0.1-0.2 us per watched parameter; the hook flag is checked first, for nothing.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Callable, Sequence

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

WEIGHT_CHECKS = ("metadata", "sampled", "values")
SAMPLES_PER_TENSOR = 8
_VERSION = operator.attrgetter("_version")
_DATA_PTR = torch.Tensor.data_ptr

_LIVE: weakref.WeakSet[WeightGuard] = weakref.WeakSet()
_hook: torch.utils.hooks.RemovableHandle | None = None
_holders = 0  # live guards that need the hook


def picker(positions: Sequence[int]) -> Callable[[Sequence], tuple]:
    """``args -> tuple(args[i] for i in positions)`` in one C call (``itemgetter``), for any length."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    if len(positions) == 1:
        (i,) = positions
        return lambda args: (args[i],)
    return lambda args: ()


def invalidate() -> None:
    """Make every folded graph refold on its next call.

    Writes through ``param.data`` outside an optimizer step (``p.data.copy_(w)``) bypass the version
    counter by design, so the default check cannot see them: call this after such writes, or compile
    with ``options={"weight_check": "sampled"}`` or ``"values"``.
    """
    for guard in list(_LIVE):
        guard.stale = True


def _after_optimizer_step(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
    """Mark the guards that watch a parameter this optimizer just stepped (it may have written ``p.data``)."""
    if not _LIVE:
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for guard in list(_LIVE):
        if not guard.stale and not stepped.isdisjoint(guard.ids):
            guard.stale = True


def _hold_optimizer_hook() -> None:
    """One global step post-hook, registered when the first live guard is made.

    It costs an optimizer step one set of parameter ids and an intersection per live guard; an
    optimizer of another model leaves that model's guards alone.
    """
    global _hook, _holders
    _holders += 1
    if _hook is None:
        _hook = register_optimizer_step_post_hook(_after_optimizer_step)


def _release_optimizer_hook() -> None:
    """A guard died: the last one removes the hook, so no optimizer step pays for a backend no longer used."""
    global _hook, _holders
    _holders -= 1
    if _holders == 0 and _hook is not None:
        _hook.remove()
        _hook = None


def optimizer_hook_registered() -> bool:
    """Whether the optimizer step hook is registered (it is while some folded graph's guard lives)."""
    return _hook is not None


def _sample(t: torch.Tensor) -> torch.Tensor:
    """A flat strided view of about ``SAMPLES_PER_TENSOR`` elements of ``t``'s storage.

    A view, not a copy: writes through ``t.data`` land in the same storage and show in it. A tensor
    that cannot be viewed flat (non-contiguous) is sampled as a whole copy-free alias of its first row.
    """
    flat = t.detach().reshape(-1) if t.is_contiguous() else t.detach()[(0,) * (t.dim() - 1)]
    return flat[:: max(1, flat.numel() // SAMPLES_PER_TENSOR)]


class WeightGuard:
    """The parameters one fold read, as they were at fold time; ``fresh(args)`` says if they still are."""

    def __init__(self, args: Sequence, positions: Sequence[int], check: str = "metadata") -> None:
        self.positions = list(positions)
        self.pick = picker(self.positions)
        self.watched: tuple[torch.Tensor, ...] = tuple(args[i] for i in self.positions)
        self.ids = frozenset(map(id, self.watched))
        self.versions = list(map(_VERSION, self.watched))
        self.pointers = list(map(_DATA_PTR, self.watched))
        self.snapshots = [t.detach().clone() for t in self.watched] if check == "values" else []
        self.samples = [_sample(t) for t in self.watched] if check == "sampled" else []
        self.sampled_at_fold = torch.cat(self.samples).clone() if self.samples else None
        self.stale = False
        if self.watched:
            _LIVE.add(self)
            _hold_optimizer_hook()
            weakref.finalize(self, _release_optimizer_hook)

    def fresh(self, args: Sequence) -> bool:
        """Whether every watched parameter is the same tensor, unmodified, as at fold time.

        Cheapest first: the optimizer-hook flag, identity (a replaced parameter), version counters
        (in-place updates), data pointers (``p.data = t``); then the sampled or full values if asked.
        """
        if self.stale:
            return False
        live = self.pick(args)
        if (
            not all(map(operator.is_, live, self.watched))
            or list(map(_VERSION, live)) != self.versions
            or list(map(_DATA_PTR, live)) != self.pointers
        ):
            return False
        if self.samples and not torch.equal(torch.cat(self.samples), self.sampled_at_fold):
            return False
        return all(map(torch.equal, live, self.snapshots)) if self.snapshots else True

    @property
    def watch(self) -> list[tuple[int, torch.Tensor, int, int]]:
        """``(input position, tensor, version, data pointer)`` per watched parameter, as at fold time."""
        return list(zip(self.positions, self.watched, self.versions, self.pointers))
