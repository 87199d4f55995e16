"""Wanda (Sun et al., 2024): score ``|W_ij| * ||X_j||_2``, compared within each output row."""

from __future__ import annotations

import torch

from ..errors import SparseforgeError
from ..structures import Structure
from .result import LayerResult
from .scoring import mask_from_scores
from .stats import InputStats

__all__ = ["prune_wanda", "wanda_scores"]


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (fp32) for a weight ``(out, in)`` and input-column norms ``(in,)``."""
    if col_norms.shape != (weight.shape[1],):
        raise SparseforgeError(
            f"column norms of shape {tuple(col_norms.shape)} for a weight of shape {tuple(weight.shape)}"
        )
    return weight.detach().abs().float() * col_norms.float().unsqueeze(0)


def prune_wanda(
    weight: torch.Tensor, stats: InputStats | None, sparsity: float | None, structure: Structure
) -> LayerResult:
    """Wanda's mask: unstructured sparsity per output row, as in the paper, or N:M per group."""
    if stats is None:
        raise SparseforgeError("method='wanda' needs calibration statistics (input column norms)")
    return LayerResult(mask_from_scores(wanda_scores(weight, stats.col_norms()), sparsity, structure, per_row=True))
