"""Sparse Parallel: ``B`` sparse copies of a linear layer, their outputs summed."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import check_int
from .base import IsoFlopLinear

__all__ = ["SparseParallel"]


class SparseParallel(IsoFlopLinear):
    """``y = sum_b W_b x + bias`` with ``branches`` weights of the dense layer's shape.

    Iso-FLOP at sparsity ``s`` with ``branches = 1 / (1 - s)``: each branch keeps ``1 / branches``
    of its weights (the masks come from :func:`~sparseforge.layers.transform`). One bias.
    """

    def __init__(self, in_features: int, out_features: int, branches: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features)
        check_int(branches, "branches", 1)
        self.branches = nn.ModuleList(nn.Linear(in_features, out_features, bias=False) for _ in range(branches))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, branches: int) -> SparseParallel:
        """Branches initialised like ``layer`` (fresh draws of its default initialisation), its bias kept."""
        layer = cls._source(layer)
        new = cls(layer.in_features, layer.out_features, branches, bias=layer.bias is not None)
        new._like(layer)
        new._copy(new.bias, layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, branches={len(self.branches)}"
