"""Magnitude pruning of one layer: keep the largest ``|W_ij|``."""

from __future__ import annotations

import torch

from ..structures import Structure
from .result import LayerResult
from .scoring import mask_from_scores
from .stats import InputStats

__all__ = ["prune_magnitude"]


def prune_magnitude(
    weight: torch.Tensor, stats: InputStats | None, sparsity: float | None, structure: Structure
) -> LayerResult:
    """Mask of the largest ``|W|``: per layer (unstructured) or per group of ``m`` inputs (N:M).

    ``stats`` is not used (magnitude needs no calibration data); ``sparsity`` is the fraction of
    zeros, ``None`` with an N:M structure.
    """
    return LayerResult(mask_from_scores(weight.detach().abs().float(), sparsity, structure, per_row=False))
