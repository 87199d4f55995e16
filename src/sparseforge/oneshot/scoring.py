"""From per-weight scores to a mask, the way the one-shot methods compare them.

Unstructured masks are chosen per layer (magnitude) or per output row (Wanda, RIA: the papers
compare weights within each output's row); N:M masks per group of ``m`` consecutive inputs.
"""

from __future__ import annotations

import math

import torch

from ..errors import SparseforgeError, check_sparsity
from ..structures import NM, Structure, Unstructured, topk_mask

__all__ = ["mask_from_scores"]


def mask_from_scores(
    scores: torch.Tensor, sparsity: float | None, structure: Structure, *, per_row: bool
) -> torch.Tensor:
    """Bool mask (``True`` = kept) keeping the highest ``scores`` of a 2-D ``(out, in)`` weight.

    With :class:`~sparseforge.structures.NM` the kept count is fixed per group and ``sparsity``
    must be ``None`` or equal to ``1 - n/m``. Unstructured: ``round_half_up((1 - sparsity) *
    count)`` kept per row (``per_row``) or per layer; ties go to the lower index.
    """
    if scores.dim() != 2:
        raise SparseforgeError(f"scores of shape {tuple(scores.shape)}; allowed: a 2-D (out, in) tensor")
    if torch.isnan(scores).any():
        raise SparseforgeError("scores contain NaN (NaN or Inf in the layer's weights or statistics)")
    if isinstance(structure, NM):
        if sparsity is not None and abs(float(sparsity) - (1.0 - structure.n_keep / structure.m)) > 1e-9:
            raise SparseforgeError(
                f"sparsity={sparsity!r} conflicts with {structure!r}, which fixes it at {1 - structure.n_keep / structure.m:g}"
            )
        structure.check_shape(tuple(scores.shape))
        return structure.mask_from_scores(scores, None)
    if not isinstance(structure, Unstructured):
        raise SparseforgeError(
            f"structure {structure!r} is not supported by one-shot pruning; allowed: unstructured or N:M"
        )
    if sparsity is None:
        raise SparseforgeError("sparsity=None needs an N:M structure; allowed: a fraction of zeros in [0, 1)")
    density = 1.0 - check_sparsity(sparsity)
    if per_row:
        k = math.floor(density * scores.shape[1] + 0.5)
        return topk_mask(scores, k)
    k = math.floor(density * scores.numel() + 0.5)
    return topk_mask(scores.reshape(1, -1), k).reshape(scores.shape)
