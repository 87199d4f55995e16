"""What the Sparse-IFT layers share: the dense layer's interface, checked once."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseforgeError, check_int

__all__ = ["IsoFlopLinear"]


class IsoFlopLinear(nn.Module):
    """A replacement of an ``nn.Linear`` with the same ``in_features`` and ``out_features``."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)

    @classmethod
    def _source(cls, layer: object) -> nn.Linear:
        """``layer`` if it is the ``nn.Linear`` this class can replace, else a one-line error."""
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"{cls.__name__} replaces an nn.Linear, not {type(layer).__name__}")
        return layer

    def _like(self, layer: nn.Linear) -> None:
        """Move to ``layer``'s device and dtype."""
        self.to(device=layer.weight.device, dtype=layer.weight.dtype)

    @staticmethod
    def _copy(target: torch.Tensor | None, source: torch.Tensor | None) -> None:
        if target is not None and source is not None:
            with torch.no_grad():
                target.copy_(source)
