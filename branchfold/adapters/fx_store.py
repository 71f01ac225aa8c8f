"""Equal tensors stored once in an FX GraphModule: the one de-duplication of the FX side.

A module called from several places (GroupedMLP) folds to the same weights at each call site, and two
call sites compute the same weight-only constant: storing each value once keeps the model's sharing
instead of multiplying its parameters. Both the region emitter and the constant folder register what
they store here. Candidates are matched on their shape, dtype, device and a strided sample of their
values first, so distinct tensors are compared whole only when the sample agrees.
"""

from __future__ import annotations

import torch

SAMPLE = 64  # elements compared before a whole comparison


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _sample(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    picked = flat[:: max(1, flat.numel() // SAMPLE)][:SAMPLE]
    return _bits(picked).cpu().numpy().tobytes()


class StoredOnce:
    """Name -> tensor of what a pass stored, found again by value (every element, bit for bit)."""

    def __init__(self) -> None:
        self.by_key: dict[tuple, list[tuple[torch.Tensor, str]]] = {}

    def find(self, t: torch.Tensor) -> str | None:
        """The name an equal tensor was stored under, or None."""
        for other, name in self.by_key.get(self._key(t), ()):
            if torch.equal(_bits(other), _bits(t)):
                return name
        return None

    def add(self, t: torch.Tensor, name: str) -> None:
        self.by_key.setdefault(self._key(t), []).append((t, name))

    @staticmethod
    def _key(t: torch.Tensor) -> tuple:
        return (tuple(t.shape), t.dtype, t.device, _sample(t))
