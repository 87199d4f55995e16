"""Top-k activation (The Lazy Neuron Phenomenon): keep the k largest MLP hidden activations per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError, check_int
from ..masks import check_module, unwrap
from .sites import find_mlps

__all__ = ["TopKLinear", "apply_topk", "keep_topk"]


def keep_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` with all but the ``k`` largest-magnitude entries of each last-dimension row set to 0.

    Ties at the k-th magnitude are broken by ``torch.topk``; gradients flow to the kept entries.
    """
    if k >= x.shape[-1]:
        return x
    index = x.abs().topk(k, dim=-1).indices
    keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, index, True)
    return x * keep


class TopKLinear(nn.Linear):
    """``nn.Linear`` that keeps only the ``k`` largest-magnitude entries of each input row.

    Shares the original layer's parameters (same state-dict keys); ``k`` is a plain attribute.
    """

    k: int

    @classmethod
    def from_linear(cls, layer: nn.Linear, k: int) -> TopKLinear:
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"{type(layer).__name__} is not allowed; allowed: an nn.Linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight, new.bias = layer.weight, layer.bias
        new.k = check_int(k, "k", minimum=1, maximum=layer.in_features)
        new.train(layer.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(keep_topk(x, self.k), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"


def apply_topk(model: nn.Module, density: float) -> dict[str, int]:
    """Keep the top ``density`` fraction (0 < density <= 1) of every MLP hidden activation, in place.

    Each MLP's down layer becomes a :class:`TopKLinear` with ``k = max(1, round(density * width))``
    (a layer already top-k gets the new k). Returns ``{layer name: k}``.
    """
    model = unwrap(check_module(model))
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise SparseforgeError(f"density={density!r} is not allowed; allowed: a number in (0, 1]")
    out: dict[str, int] = {}
    for site in find_mlps(model):
        layer = model.get_submodule(site.down)
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"layer {site.down} is a {type(layer).__name__}; allowed: nn.Linear")
        k = max(1, round(density * site.width))
        model.set_submodule(site.down, TopKLinear.from_linear(layer, k))
        out[site.down] = k
    return out
