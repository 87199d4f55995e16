"""RIA, Relative Importance and Activations (Zhang et al., "Plug-and-Play", ICLR 2024).

Score of weight ``W_ij`` (output ``i``, input ``j``)::

    RI_ij = |W_ij| / sum_k |W_kj|  +  |W_ij| / sum_k |W_ik|
    score_ij = RI_ij * (||X_j||_2) ** a

The first term divides by the sum of input ``j``'s column (all the outputs it feeds), the second
by the sum of output ``i``'s row (all its inputs), as in the paper and its reference code
(``|W| / sum(|W|, dim=0) + |W| / sum(|W|, dim=1)`` for a ``(out, in)`` weight). No weight update.
"""

from __future__ import annotations

import torch

from ..errors import SparseforgeError, check_float
from ..structures import Structure
from .result import LayerResult
from .scoring import mask_from_scores
from .stats import InputStats

__all__ = ["prune_ria", "ria_scores"]


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # a row or column of zeros has only zero weights: their relative importance is 0, not 0/0
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def ria_scores(weight: torch.Tensor, col_norms: torch.Tensor, *, a: float = 0.5) -> torch.Tensor:
    """RIA's scores (fp32, shaped like ``weight``): relative importance times ``||X_j||_2 ** a``.

    ``col_norms`` are the inputs' L2 norms over the calibration tokens (``InputStats.col_norms``);
    the reference uses ``sqrt(mean over samples of ||X_j||^2)``, a constant factor away, which
    changes no comparison within a layer. ``a`` (>= 0): the paper's exponent, 0.5 by default.
    """
    a = check_float(a, "a", low=0.0)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise SparseforgeError(f"weight {shape} is not allowed; allowed: a 2-D (out, in) tensor")
    if col_norms.shape != (weight.shape[1],):
        raise SparseforgeError(
            f"column norms of shape {tuple(col_norms.shape)} for a weight of shape {tuple(weight.shape)}"
        )
    w = weight.detach().abs().float()
    column_sums = w.sum(dim=0, keepdim=True)  # over outputs: one per input j
    row_sums = w.sum(dim=1, keepdim=True)  # over inputs: one per output i
    relative = _safe_ratio(w, column_sums) + _safe_ratio(w, row_sums)
    return relative * col_norms.to(w.device).float().pow(a).unsqueeze(0)


def prune_ria(
    weight: torch.Tensor,
    stats: InputStats | None,
    sparsity: float | None,
    structure: Structure,
    *,
    a: float = 0.5,
    per_row: bool = False,
) -> LayerResult:
    """RIA's mask for one ``(out, in)`` layer: keep the highest :func:`ria_scores`.

    Comparison group: with unstructured sparsity the scores are compared over the **whole layer**
    by default, as the reference code does unless ``--per_outneuron`` is given (the relative
    importance already normalises every weight by its row and its column, which is what makes
    layer-wide comparison fair); ``per_row=True`` compares within each output row instead
    (Wanda's choice). With N:M, within each group of ``m`` inputs of a row ("directly N:M" in the
    reference; the paper's optional channel permutation before choosing groups is not applied).
    The kept count is exact: ``round_half_up((1 - sparsity) x count)`` per layer or per row; ties
    go to the lower index.
    """
    if stats is None:
        raise SparseforgeError("method='ria' needs calibration statistics (input column norms), got None")
    if not isinstance(per_row, bool):
        raise SparseforgeError(f"per_row={per_row!r} is not allowed; allowed: True or False")
    scores = ria_scores(weight, stats.col_norms(), a=a)
    return LayerResult(mask_from_scores(scores, sparsity, structure, per_row=per_row))
