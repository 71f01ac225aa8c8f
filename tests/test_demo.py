"""``branchfold demo`` end to end on a tiny model: fold, verify, and time with ``branchfold.timing``."""

from __future__ import annotations

import torch
from torch import nn

from branchfold import demo, timing
from branchfold.zoo import ZOO, ZooEntry


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.a(x) + self.b(x))


def test_demo_folds_verifies_and_times_both_sides_interleaved(monkeypatch, capsys, tmp_path):
    entry = ZooEntry(
        "tiny", "two summed linears", TwoBranches, lambda m: m, lambda m, b: (torch.randn(b, 8),)
    )
    monkeypatch.setitem(ZOO, "tiny", entry)
    timed: list[tuple[str, ...]] = []

    def spy(sides, **kw):
        timed.append(tuple(sides))
        return timing.interleaved(sides, **kw, min_round_s=0.0, max_calls=1)

    monkeypatch.setattr(demo, "interleaved", spy)
    pages = tmp_path / "pages"
    assert demo.main(["--models", "tiny", "--batch", "2", "--runs", "3", "--html-dir", str(pages)]) == 0
    out = capsys.readouterr().out
    assert timed == [("original", "folded")]
    assert f"report page: {pages / 'tiny.html'}" in out
    assert 'id="group-0"' in (pages / "tiny.html").read_text()
    assert "folded regions: 1 (parallel-sum: 1)" in out
    assert "median of 3 interleaved rounds" in out and "all folded models verified" in out


def test_demo_refuses_an_unknown_model(capsys):
    assert demo.main(["--models", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().out
