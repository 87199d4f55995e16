"""Sparse Factorized: ``W ~ U V`` with both factors sparse."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check_int
from .base import IsoFlopLinear

__all__ = ["SparseFactorized"]


class SparseFactorized(IsoFlopLinear):
    """``y = U (V x) + bias``: ``V`` maps ``in_features`` to ``rank``, ``U`` maps ``rank`` to ``out_features``.

    Iso-FLOP at sparsity ``s`` with ``rank = in * out / ((1 - s) (in + out))``: the two factors
    together keep as many weights as the dense layer has (the masks come from
    :func:`~sparseforge.layers.transform`). The bias sits on ``U``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features)
        check_int(rank, "rank", 1)
        self.v = nn.Linear(in_features, rank, bias=False)
        self.u = nn.Linear(rank, out_features, bias=bias)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int) -> SparseFactorized:
        """Fresh factors (default initialisation) with ``layer``'s bias."""
        layer = cls._source(layer)
        new = cls(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
        new._like(layer)
        new._copy(new.u.bias, layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.v.out_features}"
