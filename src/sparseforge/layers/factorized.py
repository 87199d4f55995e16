"""Sparse Factorized: ``W ~ U V`` with both factors sparse."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import SparseforgeError, check_int
from .base import IsoFlopLayer, in_out
from .budget import split_exactly

__all__ = ["SparseFactorized"]


class SparseFactorized(IsoFlopLayer):
    """``y = U (V x) + bias``: ``V`` maps ``in_features`` to ``rank``, ``U`` maps ``rank`` to ``out_features``.

    For a convolution, ``V`` is a convolution with the dense layer's kernel, stride, padding and
    dilation (``in -> rank`` channels) and ``U`` a 1x1 convolution (``rank -> out``): both produce
    the dense layer's output positions, and per position they cost ``rank x in x kernel + out x
    rank`` multiply-adds against the dense ``out x in x kernel``. Iso-FLOP at sparsity ``s`` with
    ``rank = out x in x kernel / ((1 - s)(in x kernel + out))``, rounded up: the two factors
    together keep exactly the dense layer's weight count (see :meth:`iso_flop`). The bias sits on ``U``.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool = True, *, like: nn.Module | None = None
    ) -> None:
        super().__init__(in_features, out_features, like)
        check_int(rank, "rank", 1)
        self.v = self.spec.make(in_features, rank, bias=False)
        self.u = self.spec.make(rank, out_features, bias=bias, pointwise=True)

    @classmethod
    def from_layer(cls, layer: nn.Module, rank: int) -> SparseFactorized:
        """Fresh factors (default initialisation) with ``layer``'s bias."""
        layer = cls._source(layer)
        n_in, n_out = in_out(layer)
        new = cls(n_in, n_out, rank, bias=layer.bias is not None, like=layer)
        new._like(layer)
        new._copy(new.u.bias, layer.bias)
        return new

    @classmethod
    def iso_flop(cls, layer: nn.Module, sparsity: float, name: str = "") -> tuple[SparseFactorized, dict[str, int]]:
        """The replacement of ``layer`` at ``sparsity`` and each factor's kept-weight count.

        The rank is the smallest whose factors hold the dense count at ``sparsity`` (at least 1);
        the dense count is split over ``V`` and ``U`` in proportion to their sizes. Refused for a
        layer of one weight, which cannot be split over two factors.
        """
        layer = cls._source(layer)
        n_in, n_out = in_out(layer)
        dense = int(layer.weight.numel())
        fan_in = dense // n_out  # in x kernel
        rank = max(1, math.ceil(dense / ((1.0 - sparsity) * (fan_in + n_out)) - 1e-9))
        kept_v, kept_u = split_exactly(dense, [rank * fan_in, n_out * rank])
        if min(kept_v, kept_u) == 0:
            raise SparseforgeError(
                f"factorized cannot split the {dense} weight of layer {name!r} over two factors at any sparsity; "
                "allowed: layers of at least 2 weights (exclude the layer to keep it dense)"
            )
        return cls.from_layer(layer, rank), {"v.weight": kept_v, "u.weight": kept_u}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.u(self.v(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.u.weight.shape[1]}"
