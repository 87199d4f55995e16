"""Sparse Parallel: ``B`` sparse copies of a layer, their outputs summed."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseforgeError, check_int
from .base import IsoFlopLayer, check_weights, in_out
from .budget import sparsity_bound, split_exactly

__all__ = ["SparseParallel"]


class SparseParallel(IsoFlopLayer):
    """``y = sum_b W_b * x + bias`` with ``branches`` weights of the dense layer's shape.

    Each branch is a layer like the dense one (a convolution keeps its kernel, stride, padding and
    dilation). Iso-FLOP at sparsity ``s`` with ``branches = round(1 / (1 - s))``: the branches'
    kept weights add up to the dense layer's count (see :meth:`iso_flop`), and every branch has the
    dense layer's output positions, so the multiply-adds per sample are the dense layer's. One bias.
    """

    def __init__(
        self, in_features: int, out_features: int, branches: int, bias: bool = True, *, like: nn.Module | None = None
    ) -> None:
        super().__init__(in_features, out_features, like)
        check_int(branches, "branches", 1)
        self.branches = nn.ModuleList(self.spec.make(in_features, out_features, bias=False) for _ in range(branches))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_layer(cls, layer: nn.Module, branches: int) -> SparseParallel:
        """Branch 0 starts from ``layer``'s weight, the others are fresh draws of its default
        initialisation; ``layer``'s bias is kept (with one branch, the layer computes ``layer``)."""
        layer = cls._source(layer)
        n_in, n_out = in_out(layer)
        new = cls(n_in, n_out, branches, bias=layer.bias is not None, like=layer)
        new._like(layer)
        first = new.branches[0]
        assert isinstance(first, (nn.Linear, nn.Conv1d, nn.Conv2d))
        new._copy(first.weight, layer.weight)
        new._copy(new.bias, layer.bias)
        return new

    @classmethod
    def iso_flop(cls, layer: nn.Module, sparsity: float, name: str = "") -> tuple[SparseParallel, dict[str, int]]:
        """The replacement of ``layer`` at ``sparsity`` and each branch's kept-weight count.

        ``round(1 / (1 - sparsity))`` branches share the dense layer's weight count as evenly as
        whole numbers allow. Refused where that has no sparse shape: a sparsity above 0 that rounds
        to one branch, or more branches than the layer has weights.
        """
        branches = max(1, round(1.0 / (1.0 - sparsity)))
        dense = int(cls._source(layer).weight.numel())
        if sparsity > 0 and branches == 1:
            raise SparseforgeError(
                f"parallel at sparsity {sparsity:g} gives layer {name!r} 1 branch, the dense layer; "
                f"allowed: sparsity 0, or at least {sparsity_bound(1 - 1 / 1.5, up=True):g} (2 branches)"
            )
        if branches > dense:
            raise SparseforgeError(
                f"parallel at sparsity {sparsity:g} gives layer {name!r} {branches} branches for its {dense} "
                f"weights (fewer than one each); allowed: sparsity at most {sparsity_bound(1 - 1 / dense, up=False):g} "
                f"({dense} branch{'es' if dense > 1 else ''})"
            )
        check_weights(branches * dense, f"parallel at sparsity {sparsity:g} ({branches} branches of layer {name!r})")
        counts = split_exactly(dense, [dense] * branches)
        return cls.from_layer(layer, branches), {f"branches.{b}.weight": k for b, k in enumerate(counts)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return self.spec.add_bias(out, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, branches={len(self.branches)}"
