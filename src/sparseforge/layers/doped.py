"""Sparse Doped: a dense low-rank product plus a sparse full-size residual."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SparseforgeError, check_int
from .base import IsoFlopLayer, in_out
from .budget import sparsity_bound

__all__ = ["SparseDoped"]


class SparseDoped(IsoFlopLayer):
    """``y = U (V x) + S x + bias``: ``U V`` dense of rank ``rank``, ``S`` of the layer's shape, sparse.

    ``U`` and ``V`` factor the layer as in :class:`~sparseforge.layers.SparseFactorized` (for a
    convolution: ``V`` with the dense geometry, ``U`` 1x1). Iso-FLOP at sparsity ``s`` with
    ``rank = floor(s x out x in x kernel / (in x kernel + out))``: the low-rank part costs
    ``rank x (in x kernel + out)`` multiply-adds per output position and ``S`` keeps the rest of
    the dense layer's count (see :meth:`iso_flop`). The bias sits on ``S``.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, *, like: nn.Module | None = None
    ) -> None:
        super().__init__(in_features, out_features, like)
        check_int(rank, "rank", 0)
        self.v = self.spec.make(in_features, rank, bias=False) if rank else None
        self.u = self.spec.make(rank, out_features, bias=False, pointwise=True) if rank else None
        self.sparse = self.spec.make(in_features, out_features, bias=bias)
        if self.u is not None:
            with torch.no_grad():  # the low-rank part starts at 0: the layer starts as its sparse part
                self.u.weight.zero_()

    @classmethod
    def from_layer(cls, layer: nn.Module, rank: int) -> SparseDoped:
        """The sparse part starts from ``layer``'s weight and bias (masked by the caller)."""
        layer = cls._source(layer)
        n_in, n_out = in_out(layer)
        new = cls(n_in, n_out, rank, bias=layer.bias is not None, like=layer)
        new._like(layer)
        new._copy(new.sparse.weight, layer.weight)
        new._copy(new.sparse.bias, layer.bias)
        return new

    @classmethod
    def iso_flop(cls, layer: nn.Module, sparsity: float, name: str = "") -> tuple[SparseDoped, dict[str, int]]:
        """The replacement of ``layer`` at ``sparsity`` and the sparse part's kept-weight count.

        At sparsity 0 the rank is 0 and the layer is the dense one. Refused where a sparsity above
        0 gives rank 0 (no low-rank part: the dense layer again).
        """
        layer = cls._source(layer)
        n_in, n_out = in_out(layer)
        dense = int(layer.weight.numel())
        fan_in = dense // n_out  # in x kernel
        rank = math.floor(sparsity * dense / (fan_in + n_out) + 1e-9)
        if sparsity > 0 and rank == 0:
            lowest = sparsity_bound((fan_in + n_out) / dense, up=True)
            allowed = (
                f"sparsity 0, or at least {lowest:g} (rank 1)"
                if lowest < 1
                else "sparsity 0 only (too few weights for a rank-1 part; exclude the layer)"
            )
            raise SparseforgeError(
                f"doped at sparsity {sparsity:g} gives layer {name!r} ({n_out} x {fan_in} weights) rank 0, "
                f"the dense layer; allowed: {allowed}"
            )
        return cls.from_layer(layer, rank), {"sparse.weight": dense - rank * (fan_in + n_out)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.sparse(x)
        if self.u is not None and self.v is not None:
            out = out + self.u(self.v(x))
        return out

    def extra_repr(self) -> str:
        rank = 0 if self.v is None else self.v.weight.shape[0]
        return f"{super().extra_repr()}, rank={rank}"
