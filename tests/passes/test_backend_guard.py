"""The backend's stale-weight guard on its own: each way a parameter can change, and what sees it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from branchfold.passes.backend_guard import WeightGuard, invalidate


def inputs(n: int = 5) -> tuple:
    """What dynamo passes: an activation first, then parameters."""
    torch.manual_seed(0)
    return (torch.randn(2, 3), *(nn.Parameter(torch.randn(3, 3)) for _ in range(n)))


def test_unchanged_parameters_are_fresh_and_the_activation_is_not_watched():
    args = inputs()
    guard = WeightGuard(args, [1, 2, 3, 4, 5])
    assert guard.fresh(args)
    assert guard.fresh((torch.randn(2, 3), *args[1:]))  # a new activation changes nothing
    assert [i for i, *_ in guard.watch] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda p: p.mul_(2.0), id="in place under no_grad"),
        pytest.param(lambda p: setattr(p, "data", torch.randn(3, 3)), id="p.data = t"),
    ],
)
def test_metadata_check_sees_in_place_updates_and_data_assignment(change):
    args = inputs()
    guard = WeightGuard(args, [1, 2, 3, 4, 5])
    with torch.no_grad():
        change(args[4])
    assert not guard.fresh(args)


def test_a_replaced_parameter_is_not_fresh():
    args = inputs()
    guard = WeightGuard(args, [1, 2, 3, 4, 5])
    replaced = list(args)
    replaced[2] = nn.Parameter(args[2].detach().clone())
    assert not guard.fresh(tuple(replaced))


def test_optimizer_steps_mark_only_the_guards_of_their_parameters():
    args = inputs()
    guard = WeightGuard(args, [1, 2, 3, 4, 5])
    other = WeightGuard(inputs(2), [1, 2])
    opt = torch.optim.SGD([args[3]], lr=0.1)
    args[3].grad = torch.ones(3, 3)
    opt.step()
    assert guard.stale and not guard.fresh(args)
    assert not other.stale


def test_writes_through_data_need_invalidate_or_a_value_check():
    args = inputs()
    metadata = WeightGuard(args, [1, 2, 3, 4, 5])
    sampled = WeightGuard(args, [1, 2, 3, 4, 5], "sampled")
    values = WeightGuard(args, [1, 2, 3, 4, 5], "values")
    args[5].data.copy_(torch.randn(3, 3))  # bypasses the version counter by design
    assert metadata.fresh(args)
    assert not sampled.fresh(args) and not values.fresh(args)
    invalidate()
    assert not metadata.fresh(args)


def test_a_guard_watching_nothing_is_always_fresh():
    guard = WeightGuard(inputs(), [])
    assert guard.fresh(inputs()) and guard.watch == []


def test_the_optimizer_hook_lives_only_while_a_guard_does():
    import gc

    from branchfold.passes import backend_guard

    gc.collect()
    before = backend_guard.optimizer_hook_registered()
    args = inputs()
    guard = WeightGuard(args, [1, 2])
    assert backend_guard.optimizer_hook_registered()
    second = WeightGuard(args, [3])
    del guard
    gc.collect()
    assert backend_guard.optimizer_hook_registered()  # the second guard still needs it
    del second
    gc.collect()
    assert backend_guard.optimizer_hook_registered() == before  # no guard of ours left: no hook
    opt = torch.optim.SGD([args[1]], lr=0.1)
    args[1].grad = torch.ones(3, 3)
    opt.step()  # a step without guards touches nothing of ours
