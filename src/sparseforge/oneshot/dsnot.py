"""DSnoT, "Dynamic Sparse No Training" (Zhang et al., ICLR 2024): training-free prune-and-grow.

Starting from any mask (magnitude, Wanda, RIA, SparseGPT's), DSnoT swaps one pruned and one kept
weight per output row per cycle, without gradients and without changing any weight value, so
that the *expected* reconstruction error of each output shrinks.

What it optimises, honestly: for output ``i`` the error of the pruned layer on a token ``x`` is
``sum over pruned j of W_ij x_j``. DSnoT tracks only its **mean**, ``e_i = sum over pruned j of
W_ij E[X_j]`` (from the input means), and drives ``|e_i|`` towards 0. The spread of the error
(``Var`` and the covariances between inputs) enters only as a heuristic: a weight is regrown in
preference when its input has a small variance. The squared error ``||W X - (W * M) X||^2`` per
token is ``e_i^2`` plus that spread, so DSnoT reduces it when the inputs' means are large compared
with their spread (the case it was designed for: LLM activations with large-mean channels), and
can leave it unchanged or worse when they are not.
"""

from __future__ import annotations

import torch

from ..errors import SparseforgeError, check_float, check_int
from ..structures import NM, Structure, Unstructured
from .result import LayerResult
from .sparsegpt import _check_weight
from .stats import InputStats

__all__ = ["refine_dsnot"]


def _check_mask(mask: object, shape: tuple[int, int], nm: NM | None) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SparseforgeError(f"mask {got} is not allowed; allowed: a bool tensor of the weight's shape {shape}")
    if nm is not None:
        nm.check_shape(shape, name="mask")
        per_group = mask.reshape(-1, nm.m).sum(dim=1)
        if bool((per_group != nm.n_keep).any()):
            raise SparseforgeError(
                f"the mask is not {nm!r}: some groups of {nm.m} keep a count other than {nm.n_keep}; "
                "allowed: a valid N:M mask, or structure=Unstructured()"
            )
    return mask


def refine_dsnot(
    weight: torch.Tensor,
    mask: torch.Tensor,
    stats: InputStats | None,
    *,
    structure: Structure | None = None,
    max_cycles: int = 50,
    update_threshold: float = 0.1,
    tokens_per_sample: int = 2048,
    pow_of_var_regrowing: float = 1.0,
    keep_sign: bool = False,
) -> LayerResult:
    """Refine ``mask`` of the **dense** ``weight`` by DSnoT's prune-and-grow; sparsity unchanged.

    Per output row ``i``, with ``mu_j = stats.mean()``, ``var_j = stats.variance()`` and
    ``c_ij = W_ij mu_j`` (expected contribution of a weight to its output, per token):

    - expected error ``e_i = sum over pruned j of c_ij`` (dense minus sparse output, mean over
      tokens, in the layer's output units);
    - **prune partner**: unstructured: among kept weights whose ``c_ij`` does not have the sign
      of ``e_i`` (pruning them does not push ``e_i`` away from 0), the one with the lowest Wanda
      score ``|W_ij| ||X_j||_2`` (the reference orders its pruning candidates by Wanda's score and
      by sign; the variance enters only the growth criterion there too). With
      ``structure=NM(n, m)`` the partner is in the grown weight's own group of ``m``: the kept
      weight with the lowest Wanda score there, of any sign (the reference's N:M rule), so every
      group keeps exactly ``n``;
    - **grow**: among pruned weights whose ``c_ij`` has the sign of ``e_i`` and whose swap with
      their partner strictly lowers ``|e_i|`` (and, with ``keep_sign=True``, keeps its sign: the
      reference's N:M condition), the largest ``|c_ij| / var_j ** pow_of_var_regrowing`` (an input
      with zero variance ranks first); ties go to the lower index;
    - a row stops for good when no such swap is left or once ``tokens_per_sample x |e_i| <=
      update_threshold``. A weight swapped once is not swapped again.

    At most ``max_cycles`` cycles (one swap per row each). Every row keeps its count of kept
    weights, so the layer's sparsity is exactly the input mask's.

    Units of ``update_threshold``: the reference accumulates the expected error summed over the
    tokens of one calibration sample (its ``sum_metric_row``), so its threshold of 0.1 applies to
    ``tokens_per_sample x |e_i|``; ``tokens_per_sample=2048`` is the reference's LLaMA calibration
    length; pass your own sequence length to reproduce its stopping rule. Differences from the
    reference: the variance is the pooled variance over all tokens (the reference averages
    per-batch variances); candidates are recomputed each cycle instead of walked along lists
    sorted once; a swap must lower ``|e_i|`` (the reference also takes swaps that overshoot or,
    in N:M, that raise it); and a stopped row changes no more weights (in the reference it keeps
    regrowing one weight per cycle without pruning a partner, which changes the row's count).

    Args:
        weight: the dense ``(out, in)`` weight (pruned entries still hold their values).
        mask: bool, ``True`` = kept, shaped like ``weight``.
        stats: the layer's input statistics (means and variances are read).
        structure: ``None`` / :class:`~sparseforge.structures.Unstructured` (swaps anywhere in a
            row) or :class:`~sparseforge.structures.NM` (swaps inside a group; the mask must be
            valid N:M).
        max_cycles: >= 0. update_threshold: >= 0. tokens_per_sample: >= 1.
        pow_of_var_regrowing: >= 0 (0: the variance is ignored).
        keep_sign: only accept swaps that keep the sign of ``e_i``.

    Returns:
        :class:`LayerResult` with the refined ``mask``, ``weight=None`` (values are unchanged; the
        caller multiplies by the mask) and ``info``: ``cycles``, ``swaps``,
        ``expected_error_before`` / ``expected_error_after`` (``sum_i |e_i|``, per token).
    """
    w = _check_weight(weight, stats, "dsnot")
    assert stats is not None
    rows, cols = w.shape
    nm: NM | None
    if structure is None or isinstance(structure, Unstructured):
        nm = None
    elif isinstance(structure, NM):
        nm = structure
    else:
        raise SparseforgeError(f"structure {structure!r} is not supported by DSnoT; allowed: unstructured or N:M")
    kept = _check_mask(mask, (rows, cols), nm).to(w.device).clone()
    max_cycles = check_int(max_cycles, "max_cycles", minimum=0)
    threshold = check_float(update_threshold, "update_threshold", low=0.0)
    tokens_per_sample = check_int(tokens_per_sample, "tokens_per_sample", minimum=1)
    power = check_float(pow_of_var_regrowing, "pow_of_var_regrowing", low=0.0)
    if not isinstance(keep_sign, bool):
        raise SparseforgeError(f"keep_sign={keep_sign!r} is not allowed; allowed: True or False")

    mean = stats.mean().to(w.device)
    contrib64 = w.double() * mean.double().unsqueeze(0)  # c_ij, in float64 so e_i adds up exactly
    contrib_sign = torch.sign(contrib64)
    magnitude = contrib64.abs()
    if power > 0:
        spread = stats.variance().to(w.device).double().pow(power).unsqueeze(0)
        safe = torch.where(spread > 0, spread, torch.ones_like(spread))
        infinite = torch.full_like(magnitude, float("inf"))
        grow_score = torch.where(spread > 0, magnitude / safe, torch.where(magnitude > 0, infinite, magnitude))
    else:
        grow_score = magnitude
    prune_score = w.abs() * stats.col_norms().to(w.device).unsqueeze(0)

    error = (contrib64 * (~kept)).sum(dim=1)
    error_before = float(error.abs().sum())
    frozen = torch.zeros_like(kept)
    active = error.abs() * tokens_per_sample > threshold
    row_ids = torch.arange(rows, device=w.device)
    neg_inf = torch.tensor(float("-inf"), device=w.device)
    pos_inf = torch.tensor(float("inf"), device=w.device)
    group_width = nm.m if nm is not None else 1
    group_start = (torch.arange(cols, device=w.device) // group_width * group_width).unsqueeze(0)
    cycles = swaps = 0
    for _ in range(max_cycles):
        if not bool(active.any()):
            break
        cycles += 1
        sign = torch.sign(error).unsqueeze(1)
        free = ~frozen
        can_grow = ~kept & free & (contrib_sign == sign) & active.unsqueeze(1)
        if nm is None:
            can_prune = kept & free & (contrib_sign * sign <= 0)
            partner_idx = torch.where(can_prune, prune_score, pos_inf).argmin(dim=1, keepdim=True)
            can_grow &= can_prune.any(dim=1, keepdim=True)
            partner = partner_idx.expand(rows, cols)
        else:
            groups = torch.where(kept & free, prune_score, pos_inf).reshape(rows, cols // nm.m, nm.m)
            group_min, group_arg = groups.min(dim=2)
            can_grow &= torch.isfinite(group_min).repeat_interleave(nm.m, dim=1)
            partner = group_start + group_arg.repeat_interleave(nm.m, dim=1)
        # the expected error after growing column j and pruning its partner, for every j at once
        new_error = error.unsqueeze(1) - contrib64 + contrib64.gather(1, partner)
        can_grow &= new_error.abs() < error.abs().unsqueeze(1)
        if keep_sign:
            can_grow &= new_error * sign >= 0
        accept = can_grow.any(dim=1)
        grow_idx = torch.where(can_grow, grow_score, neg_inf).argmax(dim=1)
        prune_idx = partner[row_ids, grow_idx]
        r = row_ids[accept]
        kept[r, grow_idx[accept]] = True
        kept[r, prune_idx[accept]] = False
        frozen[r, grow_idx[accept]] = True
        frozen[r, prune_idx[accept]] = True
        error = torch.where(accept, new_error[row_ids, grow_idx], error)
        swaps += int(accept.sum())
        active = accept & (error.abs() * tokens_per_sample > threshold)

    info = {
        "cycles": float(cycles),
        "swaps": float(swaps),
        "expected_error_before": error_before,
        "expected_error_after": float(error.abs().sum()),
    }
    return LayerResult(kept.to(mask.device), None, info)
