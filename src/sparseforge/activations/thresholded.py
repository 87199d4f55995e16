"""A linear layer that drops its small inputs: the unit of training-free activation sparsity.

TEAL and CATS make a dense model's hidden states sparse without training: each chosen linear
layer zeroes the entries of its input whose magnitude is at most a per-layer threshold
(calibrated so that a target fraction of entries falls below it), then multiplies as usual. The
weight columns that the dropped entries would have multiplied are never needed, which is what
the sparse-input kernel of :func:`sparseforge.inference.convert` exploits at batch 1.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError, check_sparsity

__all__ = ["ThresholdedLinear", "drop_small"]


def drop_small(x: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """``x`` with every entry of magnitude ``<= threshold`` set to 0 (NaN and inf are kept).

    Written as ``where(|x| <= t, 0, x)`` rather than ``x * (|x| > t)`` so that a NaN input stays
    NaN (``NaN <= t`` is false) and propagates exactly as it does through the dense layer. At a
    threshold of 0 only zeros would be dropped, so ``x`` itself is returned: no elementwise pass, and
    a layer calibrated at 0 % costs what the dense layer costs.
    """
    if float(threshold) == 0.0:
        return x
    return torch.where(x.abs() <= threshold, torch.zeros((), dtype=x.dtype, device=x.device), x)


class ThresholdedLinear(nn.Linear):
    """``nn.Linear`` whose input entries with ``|x| <= input_threshold`` are zeroed first.

    A subclass of ``nn.Linear`` that shares the original layer's parameters, so state-dict keys
    (``weight``, ``bias``) and every tool that looks for linear layers keep working; it adds two
    buffers: ``input_threshold`` (a scalar, in the input's units) and ``input_sparsity`` (the
    fraction of input entries the threshold was calibrated to drop, in [0, 1); what
    :func:`~sparseforge.inference.convert` times the sparse-input kernel at).
    """

    input_threshold: torch.Tensor
    input_sparsity: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        threshold: float = 0.0,
        sparsity: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("input_threshold", torch.zeros((), dtype=torch.float32, device=device))
        self.register_buffer("input_sparsity", torch.zeros((), dtype=torch.float32, device=device))
        self.set_threshold(threshold, sparsity)

    @classmethod
    def from_linear(cls, layer: nn.Linear, threshold: float = 0.0, sparsity: float = 0.0) -> ThresholdedLinear:
        """A thresholded layer sharing ``layer``'s weight and bias (no copy)."""
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"{type(layer).__name__} is not allowed; allowed: an nn.Linear")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = layer.in_features, layer.out_features
        new.weight = layer.weight
        new.bias = layer.bias
        device = layer.weight.device
        new.register_buffer("input_threshold", torch.zeros((), dtype=torch.float32, device=device))
        new.register_buffer("input_sparsity", torch.zeros((), dtype=torch.float32, device=device))
        new.set_threshold(threshold, sparsity)
        new.train(layer.training)
        return new

    def set_threshold(self, threshold: float, sparsity: float = 0.0) -> None:
        """Set the input threshold (finite, >= 0) and the input sparsity it was calibrated for."""
        value = float(threshold) if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) else None
        if value is None or not math.isfinite(value) or value < 0:
            raise SparseforgeError(f"threshold={threshold!r} is not allowed; allowed: a finite number >= 0")
        sparsity = check_sparsity(sparsity, "input sparsity")
        self.input_threshold.fill_(value)
        self.input_sparsity.fill_(sparsity)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` sharing this layer's weight and bias (the threshold dropped)."""
        plain = nn.Linear.__new__(nn.Linear)
        nn.Module.__init__(plain)
        plain.in_features, plain.out_features = self.in_features, self.out_features
        plain.weight, plain.bias = self.weight, self.bias
        plain.train(self.training)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(drop_small(x, self.input_threshold.to(x.dtype)), self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, input_threshold={float(self.input_threshold):.4g}, "
            f"input_sparsity={float(self.input_sparsity):.3f}"
        )
