"""``EagerCallsPass``: exported ATen calls go through torch's bindings, with bit-identical results."""

from __future__ import annotations

import torch
from torch import nn

from branchfold.passes.fx_eager_calls import EagerCallsPass


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).relu()
        y = y.view(y.shape[0], 4, 16).transpose(1, 2)
        return self.fc(y.transpose(1, 2)).softmax(-1)


def test_aten_calls_become_bindings_and_stay_exact() -> None:
    model, x = Small().eval(), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        gm = torch.export.export(model, (x,), strict=False).module()
        before = gm(x)
    EagerCallsPass().call(gm)
    left = [n.target for n in gm.graph.nodes if isinstance(n.target, torch._ops.OpOverload)]
    assert left == []
    assert {n.target for n in gm.graph.nodes if n.op == "call_method"} >= {"view"}
    with torch.no_grad():
        assert torch.equal(gm(x), before)
        assert torch.equal(gm(x * 2), model(x * 2))


def test_in_place_ops_keep_their_overload() -> None:
    class InPlace(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 2
            y.add_(1)
            return y

    x = torch.randn(3)
    gm = torch.export.export(InPlace(), (x,), strict=False).module()
    EagerCallsPass().call(gm)
    assert any(isinstance(n.target, torch._ops.OpOverload) and n.target._schema.is_mutable for n in gm.graph.nodes)
    assert torch.equal(gm(x), x * 2 + 1)
