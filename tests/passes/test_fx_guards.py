"""What fold returns pickles: export's input guards survive torch.save/torch.load, and so do their messages."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import branchfold
from branchfold.passes.fx_guards import GUARDS, InputGuards, make_picklable


class Branches(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 4), torch.nn.Linear(8, 4)

    def forward(self, x):
        return torch.relu(self.a(x) + self.b(x))


def _round_trip(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_a_captured_module_does_not_pickle_until_made_picklable():
    unlifted = torch.export.export(Branches().eval(), (torch.randn(2, 8),)).module()
    gm = torch.fx.GraphModule(unlifted, unlifted.graph)  # as fold rebuilds it: without export's hooks
    with pytest.raises(Exception, match="Can't pickle local object"):
        pickle.dumps(gm)
    make_picklable(gm)
    assert isinstance(getattr(gm, GUARDS), InputGuards)
    loaded = pickle.loads(pickle.dumps(gm))
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), gm(x))


def test_the_folded_module_round_trips_with_its_guard_messages():
    m, x = Branches().eval(), torch.randn(2, 8)
    loaded = _round_trip(branchfold.fold(m, (x,)))
    y = torch.randn(5, 8)
    assert torch.allclose(loaded(y), m(y), atol=1e-6)
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[1\] == 8"):
        loaded(torch.randn(2, 7))
    assert isinstance(copy.deepcopy(loaded)._guards_fn, InputGuards)


def test_guards_torch_no_longer_generates_as_code_are_dropped_not_kept_unpicklable():
    gm = torch.fx.symbolic_trace(Branches().eval())
    guards = torch.nn.Module()
    guards.forward = lambda *args: None
    gm.add_submodule(GUARDS, guards)
    with gm.graph.inserting_after(next(iter(gm.graph.nodes))):
        gm.graph.call_module(GUARDS, (next(iter(gm.graph.nodes)),))
    gm.recompile()
    make_picklable(gm)
    assert not hasattr(gm, GUARDS) and GUARDS not in gm.code
    pickle.dumps(gm)
