"""Sparse Parallel: ``B`` sparse copies of a linear layer, their outputs summed."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseforgeError, check_int

__all__ = ["SparseParallel"]


class SparseParallel(nn.Module):
    """``y = sum_b W_b x + bias`` with ``branches`` weights of the dense layer's shape.

    Iso-FLOP at sparsity ``s`` with ``branches = 1 / (1 - s)``: each branch keeps ``1 / branches``
    of its weights (the masks come from :func:`~sparseforge.layers.transform`). One bias.
    """

    def __init__(self, in_features: int, out_features: int, branches: int, bias: bool = True) -> None:
        super().__init__()
        check_int(branches, "branches", 1)
        self.in_features, self.out_features = (
            check_int(in_features, "in_features", 1),
            check_int(out_features, "out_features", 1),
        )
        self.branches = nn.ModuleList(nn.Linear(in_features, out_features, bias=False) for _ in range(branches))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, branches: int) -> SparseParallel:
        """Branches initialised like ``layer`` (fresh draws of its default initialisation), its bias kept."""
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"SparseParallel replaces an nn.Linear, not {type(layer).__name__}")
        new = cls(layer.in_features, layer.out_features, branches, bias=layer.bias is not None)
        new.to(device=layer.weight.device, dtype=layer.weight.dtype)
        if new.bias is not None and layer.bias is not None:
            with torch.no_grad():
                new.bias.copy_(layer.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, branches={len(self.branches)}"
