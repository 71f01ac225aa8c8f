"""``adapters/fx_store.py``: the FX side's one store of equal tensors, shared by the emitter and the constant
folder."""

from __future__ import annotations

import torch

from branchfold.adapters.fx_store import StoredOnce


def test_an_equal_tensor_is_found_and_a_different_one_is_not():
    store = StoredOnce()
    w = torch.randn(6, 5)
    store.add(w, "a")
    assert store.find(w.clone()) == "a"
    assert store.find(w.t().contiguous().t()) == "a"  # other strides, same values
    other = w.clone()
    other[5, 4] += 1  # one element differs
    assert store.find(other) is None
    assert store.find(w.double()) is None and store.find(w[:5]) is None


def test_equal_means_the_same_bits():
    store = StoredOnce()
    store.add(torch.tensor([0.0, float("nan")]), "z")
    assert store.find(torch.tensor([0.0, float("nan")])) == "z"  # NaN is stored once too
    assert store.find(torch.tensor([-0.0, float("nan")])) is None  # -0 is not 0: 1/x differs
