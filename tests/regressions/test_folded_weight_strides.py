"""Folded weights have the strides of a new contiguous tensor, so a folded conv writes the layout the
original wrote.

Found by `make fuzz` (FUZZ_SEED=20261130, model 5704, the ``torch.compile`` backend on a model in
training mode): two chained 1x1 convs folded into one whose weight, ``[2, 4, 1]``, had strides
``(4, 1, 4)``. ``contiguous()`` keeps a size-1 dim's stride, torch takes such a weight for channels-last
and the folded conv wrote its output channels-last; the training-mode Dropout after it drew its mask in
that memory order, so the same seed dropped other elements (an error of 2 against the original).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import branchfold
from branchfold.rewriter.affine import stored
from branchfold.rewriter.rounding import cast_tensor


class ChainThenDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Conv1d(4, 2, 1), nn.Conv1d(2, 2, 1)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(nn.functional.hardswish(self.second(self.first(x))))


def _seeded(model, x):
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return model(x)


def test_cast_tensor_gives_canonical_strides_even_for_size_one_dims():
    odd = torch.randn(2, 4).as_strided((2, 4, 1), (4, 1, 4))  # contiguous by torch's test, not in its strides
    assert odd.is_contiguous() and odd.stride() == (4, 1, 4)
    for t in (odd, stored(odd)):
        w = cast_tensor(t, torch.float32)
        assert w.stride() == (4, 1, 1) and torch.equal(w, odd)


@pytest.mark.parametrize("capture", ["export", "symbolic_trace"])
def test_a_folded_chain_keeps_the_layout_and_a_training_dropout_draws_the_same_mask(capture):
    torch.manual_seed(0)
    model = ChainThenDropout().train()
    x = torch.randn(3, 4, 2)
    result = branchfold.fold_with_report(model, (x,), capture=capture, verify=False)
    convs = [m for m in result.model.modules() if isinstance(m, nn.Conv1d)]
    weights = [p for n, p in result.model.named_parameters() if "weight" in n] + [
        b for n, b in result.model.named_buffers() if "weight" in n
    ]
    assert len(convs) + len(weights) >= 1
    assert all(w.stride() == w.clone(memory_format=torch.contiguous_format).stride() for w in weights)
    torch.testing.assert_close(_seeded(result.model, x), _seeded(model, x), rtol=1e-5, atol=1e-6)


def test_the_backend_in_training_mode_draws_the_same_dropout_mask():
    torch.manual_seed(0)
    model = ChainThenDropout().train()
    x = torch.randn(3, 4, 2)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, backend="branchfold", options={"backend": "eager", "verify": False})
        torch.testing.assert_close(_seeded(compiled, x), _seeded(model, x), rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
