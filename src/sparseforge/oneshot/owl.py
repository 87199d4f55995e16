"""OWL, Outlier Weighed Layerwise sparsity (Yin et al., ICML 2024).

Layers (or transformer blocks) whose Wanda scores hold more outliers get a lower sparsity:

1. outlier ratio ``D_l`` = fraction of the scores ``|W_ij| ||X_j||_2`` greater than ``m`` times
   the mean score of the layer or block (:func:`outlier_ratio`, :func:`block_outlier_ratio`);
2. sparsity ``S_l`` = the target minus a linear function of ``D_l``, with mean exactly the target
   and every ``S_l`` within ``[target - lam, target + lam]`` (:func:`owl_sparsities`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..errors import SparseforgeError, check_float, check_sparsity
from .wanda import wanda_scores

__all__ = ["block_outlier_ratio", "outlier_ratio", "owl_sparsities"]


def block_outlier_ratio(layers: Sequence[tuple[torch.Tensor, torch.Tensor]], *, m: float = 5.0) -> float:
    """Outlier ratio of several layers pooled, as the reference computes it per decoder block.

    ``layers``: ``(weight (out, in), col_norms (in,))`` pairs. All their Wanda scores are pooled;
    the result is the fraction (in ``[0, 1]``; the reference reports percent) of pooled scores
    strictly greater than ``m`` times the pooled mean score. ``m``: a finite number > 0 (the
    paper uses 3 to 10, 5 by default). All-zero scores have no outliers (0.0).
    """
    m = check_float(m, "m", low=0.0, low_open=True)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or len(layers) == 0:
        raise SparseforgeError(f"layers={layers!r} is not allowed; allowed: a non-empty list of (weight, col_norms)")
    total = 0.0
    count = 0
    flat: list[torch.Tensor] = []
    for pair in layers:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise SparseforgeError(f"entry {pair!r} of layers is not allowed; allowed: a (weight, col_norms) tuple")
        weight, col_norms = pair
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise SparseforgeError(f"weight {shape} is not allowed; allowed: a 2-D (out, in) tensor")
        scores = wanda_scores(weight, col_norms.to(weight.device)).double().flatten()
        if not torch.isfinite(scores).all():
            raise SparseforgeError("Wanda scores contain NaN or Inf; allowed: finite weights and statistics")
        flat.append(scores)
        total += float(scores.sum())
        count += scores.numel()
    if count == 0:
        return 0.0
    threshold = m * total / count
    outliers = sum(int((s > threshold).sum()) for s in flat)
    return outliers / count


def outlier_ratio(weight: torch.Tensor, col_norms: torch.Tensor, *, m: float = 5.0) -> float:
    """Fraction of one layer's Wanda scores ``|W_ij| ||X_j||_2`` greater than ``m`` x their mean.

    ``col_norms``: the input columns' L2 norms over the calibration tokens (``InputStats.col_norms``).
    """
    return block_outlier_ratio([(weight, col_norms)], m=m)


def owl_sparsities(ratios: Mapping[str, float], target: float, *, lam: float = 0.08) -> dict[str, float]:
    """Per-layer (or per-block) sparsities from outlier ratios: more outliers, lower sparsity.

    ``S_l = target - lam (D_l - mean D) / max_k |D_k - mean D|``: linear and
    decreasing in the outlier ratio, mean exactly ``target`` (up to float64 rounding), and the
    layer farthest from the mean ratio at exactly ``target +- lam``; all equal ratios give
    ``target`` everywhere.

    Differs from the reference code in one respect: the reference maps the ratios min-max onto a
    band of width ``2 lam`` and then shifts it to the target mean, so when the ratios are skewed
    one end can lie beyond ``lam`` (its own printed example at target 0.7 reaches 0.6076). Here the
    slope is chosen so the paper's stated constraint ``S_l in [target - lam, target + lam]`` holds;
    for ratios symmetric about their mean the two agree.

    Args:
        ratios: name -> outlier ratio, each finite in ``[0, 1]`` (a fraction, as
            :func:`outlier_ratio` returns); at least one.
        target: the mean sparsity, in ``[0, 1)``.
        lam: half-width of the allowed band, ``0 <= lam`` with ``target - lam >= 0`` and
            ``target + lam < 1`` so every sparsity is valid.

    Returns:
        name -> sparsity, in the order of ``ratios``.
    """
    target = check_sparsity(target, "target")
    lam = check_float(lam, "lam", low=0.0)
    if target - lam < 0.0 or target + lam >= 1.0:
        raise SparseforgeError(
            f"lam={lam!r} with target={target!r} allows sparsities outside [0, 1); "
            f"allowed: 0 <= lam <= {target:g} and lam < {1.0 - target:g}"
        )
    if not isinstance(ratios, Mapping) or len(ratios) == 0:
        raise SparseforgeError(f"ratios={ratios!r} is not allowed; allowed: a non-empty mapping name -> outlier ratio")
    values: list[float] = []
    for name, ratio in ratios.items():
        value = check_float(ratio, f"ratios[{name!r}]", low=0.0, high=1.0)
        values.append(value)
    low, high = min(values), max(values)
    if high == low or lam == 0.0:
        return {name: target for name in ratios}
    # min-max normalise first (as the reference does), so even tiny spreads are well conditioned,
    # then centre on the mean and scale the farthest layer to +-lam
    unit = [(v - low) / (high - low) for v in values]
    centre = math.fsum(unit) / len(unit)
    centred = [u - centre for u in unit]
    reach = max(abs(c) for c in centred)
    out = {name: target - lam * (c / reach) for name, c in zip(ratios, centred, strict=True)}
    # the farthest layer lands on target +- lam up to rounding; keep it inside the band
    return {name: min(max(s, target - lam), target + lam) for name, s in out.items()}
