"""SparseGPT (Frantar & Alistarh, 2023): prune one layer and update its kept weights (OBS).

The layer-wise problem is ``min ||W X - W' X||^2`` over weights ``W'`` with the chosen mask, ``X``
the layer's input (one column per calibration token). SparseGPT solves it approximately, one
input column at a time from left to right: a pruned weight's error is spread over the columns to
its right with the Optimal Brain Surgeon update, through the upper Cholesky factor of ``H^-1``
(``H = 2 X^T X / tokens``). Columns are handled in blocks with lazy batch updates, exactly as the
authors' reference code (``fasterprune``) does.
"""

from __future__ import annotations

import math

import torch

from ..errors import SparseforgeError, check_float, check_int, check_sparsity
from ..structures import NM, Structure, Unstructured, topk_mask
from .result import LayerResult
from .stats import InputStats

__all__ = ["prune_sparsegpt"]

#: The dampening fraction a failed Cholesky retries with when ``percdamp`` was 0 (the reference's default).
_FIRST_RETRY_PERCDAMP = 0.01


def _check_weight(weight: object, stats: InputStats | None, method: str) -> torch.Tensor:
    """The weight as a detached fp32 ``(out, in)`` tensor, checked against ``stats``."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise SparseforgeError(f"weight {shape} is not allowed; allowed: a 2-D floating-point (out, in) tensor")
    if stats is None:
        raise SparseforgeError(f"method={method!r} needs calibration statistics of the layer's inputs, got None")
    if stats.in_features != weight.shape[1]:
        raise SparseforgeError(
            f"statistics of width {stats.in_features} given for a weight of shape {tuple(weight.shape)}; "
            "allowed: in_features equal to the weight's dim 1"
        )
    w = weight.detach().to(torch.float32)
    if not torch.isfinite(w).all():
        raise SparseforgeError("the weight contains NaN or Inf; allowed: finite weights")
    return w


def _cholesky_of_inverse(
    h: torch.Tensor, percdamp: float, max_damp_retries: int
) -> tuple[torch.Tensor, float, int, float]:
    """Upper Cholesky factor ``U`` of ``(H + damp I)^-1``, ``U^T U = (H + damp I)^-1``.

    ``damp = percdamp x mean(diag H)``. When a factorisation fails (``H`` not positive definite in
    fp32), ``percdamp`` is multiplied by 10 (from 0 it becomes 0.01) and the factorisation retried,
    at most ``max_damp_retries`` times. Returns ``(U, percdamp used, retries, damp used)``.
    """
    mean_diag = float(torch.diagonal(h).mean())
    frac = percdamp
    tried: list[float] = []
    for retry in range(max_damp_retries + 1):
        tried.append(frac)
        damp = frac * mean_diag
        # at most three in x in matrices alive here besides h (a Hessian of a wide layer is large)
        dampened = h.clone()
        dampened.diagonal().add_(damp)
        lower, info = torch.linalg.cholesky_ex(dampened)
        del dampened
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and torch.isfinite(upper).all() and bool((torch.diagonal(upper) > 0).all()):
                return upper, frac, retry, damp
        frac = frac * 10.0 if frac > 0 else _FIRST_RETRY_PERCDAMP
    raise SparseforgeError(
        f"SparseGPT: the Cholesky factorisation of the dampened Hessian failed {max_damp_retries + 1} times "
        f"(percdamp tried: {', '.join(f'{t:g}' for t in tried)}); "
        "allowed: a larger percdamp or max_damp_retries, or more calibration tokens"
    )


def _rounded_cumulative(total: int, upto: int, width: int) -> int:
    """``round_half_up(total * upto / width)`` in exact integer arithmetic."""
    return (2 * total * upto + width) // (2 * width)


def prune_sparsegpt(
    weight: torch.Tensor,
    stats: InputStats | None,
    sparsity: float | None,
    structure: Structure,
    *,
    blocksize: int = 128,
    percdamp: float = 0.01,
    max_damp_retries: int = 4,
    per_row: bool = False,
) -> LayerResult:
    """SparseGPT's mask and updated weights for one ``(out, in)`` layer.

    Follows the reference ``fasterprune`` step by step, in fp32:

    1. ``H = stats.hessian()`` (``2 X^T X / tokens``, units: input squared). Dead inputs
       (``H_jj == 0``: the input was 0 on every calibration token) get ``H_jj = 1`` and their weight
       column is set to 0 (it never contributes to the output).
    2. ``damp = percdamp x mean(diag H)`` is added to the diagonal; ``U`` = upper Cholesky factor of
       ``H^-1`` (``U^T U = H^-1``), ``d_j = U_jj``. If a factorisation fails, the dampening is
       raised x10 (from 0: to 0.01) and retried up to ``max_damp_retries`` times; the dampening
       used is reported in ``info`` and never replaced silently by a magnitude mask. If every try
       fails, :class:`~sparseforge.errors.SparseforgeError` says so.
    3. Input columns are processed in blocks of ``blocksize``. At the start of a block the
       unstructured mask of the block's columns is chosen from the OBS saliency ``w^2 / d^2`` of the
       block's (already updated) weights; with N:M, each group of ``m`` columns is chosen when the
       loop reaches its first column, from the saliency of the current weights, ``n_keep`` kept per
       row. Then column by column: ``q`` = the column with its pruned entries zeroed, ``err =
       (w - q) / d_j``, the block's remaining columns get ``W -= err U_j,:``; after the block the
       later columns get the batched update ``W -= Err U_block,later``.

    **Which unstructured variant.** The reference compares the saliencies of *all rows* of a block
    together (one threshold per block, layer-wide in spirit) and prunes ``int(numel x sparsity)``
    of the block plus ties. Here the comparison group is the same (all rows of the block), but the
    count is exact: block ``b`` prunes its share ``P_b = round(P x end_b / in) - round(P x
    start_b / in)`` of the layer's total ``P = out x in - round_half_up((1 - sparsity) x out x
    in)``, so the returned mask keeps exactly ``round_half_up((1 - sparsity) x out x in)`` weights
    **per layer**. With ``per_row=True`` every row of every block prunes its share of the row's
    total instead, so every row keeps exactly ``round_half_up((1 - sparsity) x in)`` (the
    comparison Wanda uses). Ties go to the lower index (kept first).

    Args:
        weight: ``(out, in)`` floating-point weight (not modified).
        stats: the layer's input statistics gathered with ``hessian=True``.
        sparsity: fraction of zeros in ``[0, 1)``; ``None`` or ``1 - n_keep/m`` with N:M.
        structure: :class:`~sparseforge.structures.Unstructured` or :class:`~sparseforge.structures.NM`.
        blocksize: columns per lazy-update block (>= 1); with N:M a multiple of ``m`` unless the
            layer fits in one block.
        percdamp: dampening as a fraction of the mean Hessian diagonal (>= 0).
        max_damp_retries: how many times a failed Cholesky is retried with x10 the dampening.
        per_row: unstructured only: exact count per row instead of per layer.

    Returns:
        :class:`LayerResult` with ``mask`` (bool, ``True`` = kept), ``weight`` (the updated weight in
        the input's dtype and device, exactly 0 where pruned) and ``info``: ``percdamp`` (the
        fraction used), ``damp`` (the value added to ``diag H``), ``damp_retries``,
        ``dead_inputs`` (count) and ``error``: SparseGPT's own estimate of the reconstruction error
        ``||(W - W_new) X||_F^2 / tokens`` (squared output error per token, summed over outputs),
        the sum of the OBS losses ``(w - q)^2 / (2 d^2)``, exact for the dampened Hessian.
    """
    w = _check_weight(weight, stats, "sparsegpt")
    assert stats is not None  # _check_weight raised otherwise
    rows, cols = w.shape
    blocksize = check_int(blocksize, "blocksize", minimum=1)
    percdamp = check_float(percdamp, "percdamp", low=0.0)
    max_damp_retries = check_int(max_damp_retries, "max_damp_retries", minimum=0)
    if not isinstance(per_row, bool):
        raise SparseforgeError(f"per_row={per_row!r} is not allowed; allowed: True or False")

    nm: NM | None = None
    pruned_total = 0
    if isinstance(structure, NM):
        nm = structure
        if sparsity is not None and abs(float(sparsity) - (1.0 - nm.n_keep / nm.m)) > 1e-9:
            raise SparseforgeError(
                f"sparsity={sparsity!r} conflicts with {nm!r}, which fixes it at {1 - nm.n_keep / nm.m:g}"
            )
        nm.check_shape((rows, cols))
        if cols > blocksize and blocksize % nm.m != 0:
            raise SparseforgeError(
                f"blocksize={blocksize} splits the groups of {nm!r}; allowed: a multiple of m={nm.m}"
            )
        if per_row:
            raise SparseforgeError(f"per_row=True is for unstructured sparsity; {nm!r} is already per group")
    elif isinstance(structure, Unstructured):
        if sparsity is None:
            raise SparseforgeError("sparsity=None needs an N:M structure; allowed: a fraction of zeros in [0, 1)")
        density = 1.0 - check_sparsity(sparsity)
        width = cols if per_row else rows * cols
        pruned_total = width - math.floor(density * width + 0.5)
    else:
        raise SparseforgeError(f"structure {structure!r} is not supported by SparseGPT; allowed: unstructured or N:M")

    h = stats.hessian().to(device=w.device, dtype=torch.float32)  # a new tensor: modified below
    if not torch.isfinite(h).all():
        raise SparseforgeError("the Hessian X^T X overflowed fp32 (NaN or Inf); allowed: finite, smaller activations")
    w = w.clone()
    dead = torch.diagonal(h) == 0
    n_dead = int(dead.sum())
    if n_dead:
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
    hinv, used_percdamp, retries, damp = _cholesky_of_inverse(h, percdamp, max_damp_retries)
    del h

    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    losses = torch.zeros(rows, dtype=torch.float32, device=w.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        losses1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d1 = torch.diagonal(hinv1)

        prune1 = torch.zeros_like(w1, dtype=torch.bool)
        if nm is None:
            saliency = w1.pow(2) / d1.pow(2).unsqueeze(0)
            share = _rounded_cumulative(pruned_total, i2, cols) - _rounded_cumulative(pruned_total, i1, cols)
            if per_row:
                prune1 = ~topk_mask(saliency, count - share)
            else:
                prune1 = ~topk_mask(saliency.reshape(1, -1), rows * count - share).reshape(rows, count)

        for i in range(count):
            col = w1[:, i]
            d = d1[i]
            if nm is not None and i % nm.m == 0:
                group = slice(i, i + nm.m)
                saliency = w1[:, group].pow(2) / d1[group].pow(2).unsqueeze(0)
                prune1[:, group] = ~topk_mask(saliency, nm.n_keep)
            q = torch.where(prune1[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            losses1[:, i] = (col - q).pow(2) / d.pow(2)
            err = (col - q) / d
            w1[:, i:] -= err.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = err

        w[:, i1:i2] = q1
        pruned[:, i1:i2] = prune1
        losses += losses1.sum(dim=1) / 2
        if i2 < cols:
            w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    info = {
        "percdamp": float(used_percdamp),
        "damp": float(damp),
        "damp_retries": float(retries),
        "dead_inputs": float(n_dead),
        "error": float(losses.sum()),
    }
    return LayerResult(~pruned, w.to(dtype=weight.dtype, device=weight.device), info)
