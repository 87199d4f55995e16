"""Sparse Factorized: ``W ~ U V`` with both factors sparse."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseforgeError, check_int

__all__ = ["SparseFactorized"]


class SparseFactorized(nn.Module):
    """``y = U (V x) + bias``: ``V`` maps ``in_features`` to ``rank``, ``U`` maps ``rank`` to ``out_features``.

    Iso-FLOP at sparsity ``s`` with ``rank = in * out / ((1 - s) (in + out))``: the two factors
    together keep as many weights as the dense layer has (the masks come from
    :func:`~sparseforge.layers.transform`). The bias sits on ``U``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        check_int(rank, "rank", 1)
        self.in_features, self.out_features = (
            check_int(in_features, "in_features", 1),
            check_int(out_features, "out_features", 1),
        )
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int) -> SparseFactorized:
        """Fresh factors (default initialisation) with ``layer``'s bias."""
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"SparseFactorized replaces an nn.Linear, not {type(layer).__name__}")
        new = cls(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
        new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        if new.u.bias is not None and layer.bias is not None:
            with torch.no_grad():
                new.u.bias.copy_(layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.v.out_features}"
