"""Sparse Doped: a dense low-rank product plus a sparse full-size residual."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check_int
from .base import IsoFlopLinear

__all__ = ["SparseDoped"]


class SparseDoped(IsoFlopLinear):
    """``y = U (V x) + S x + bias``: ``U V`` dense of rank ``rank``, ``S`` of the layer's shape, sparse.

    Iso-FLOP at sparsity ``s`` with ``rank = s * in * out / (in + out)`` (rounded down): the
    low-rank part costs ``rank * (in + out)`` multiply-adds and ``S`` keeps the rest of the dense
    layer's count (its mask comes from :func:`~sparseforge.layers.transform`). The bias sits on ``S``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features)
        check_int(rank, "rank", 0)
        self.v = nn.Linear(in_features, rank, bias=False) if rank else None
        self.u = nn.Linear(rank, out_features, bias=False) if rank else None
        self.sparse = nn.Linear(in_features, out_features, bias=bias)
        if self.u is not None:
            with torch.no_grad():  # the low-rank part starts at 0: the layer starts as its sparse part
                self.u.weight.zero_()

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int) -> SparseDoped:
        """The sparse part starts from ``layer``'s weight and bias (masked by the caller)."""
        layer = cls._source(layer)
        new = cls(layer.in_features, layer.out_features, rank, bias=layer.bias is not None)
        new._like(layer)
        new._copy(new.sparse.weight, layer.weight)
        new._copy(new.sparse.bias, layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sparse(x)
        if self.u is not None and self.v is not None:
            out = out + self.u(self.v(x))
        return out

    def extra_repr(self) -> str:
        rank = 0 if self.v is None else self.v.out_features
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={rank}"
