"""Exact budgets: kept-weight counts that add up to a dense layer's multiply-adds."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..errors import SparseforgeError

__all__ = ["iso_macs", "sparsity_bound", "split_exactly"]


def split_exactly(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` kept weights over tensors of ``sizes`` weights, proportionally to their sizes.

    Largest remainders decide the rounding, so the counts add up to ``total`` exactly; no count
    exceeds its size. ``total`` must lie in ``[0, sum(sizes)]``.
    """
    whole = sum(sizes)
    if not 0 <= total <= whole:
        raise SparseforgeError(f"{total} kept weights do not fit in tensors of {whole} weights")
    if whole == 0:
        return [0 for _ in sizes]
    exact = [total * n / whole for n in sizes]
    counts = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def iso_macs(module: nn.Module, masks: Mapping[str, torch.Tensor], prefix: str = "") -> int:
    """Kept weights of ``module``'s Linear and Conv1d/Conv2d layers: the mask's count where a mask
    is given (keyed by parameter name below ``prefix``), every weight elsewhere; biases not counted.

    A layer's kept weights are its multiply-adds per input row (Linear) or per output position
    (convolution). Every Sparse-IFT part produces the dense layer's output positions, so equal
    counts per replaced layer mean equal multiply-adds per sample.
    """
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            key = f"{prefix}{name}.weight" if name else f"{prefix}weight"
            total += int(masks[key].sum()) if key in masks else sub.weight.numel()
    return total


def sparsity_bound(value: float, *, up: bool) -> float:
    """``value`` rounded to 3 decimals, up (a lowest allowed sparsity) or down (a highest), for messages."""
    return (math.ceil if up else math.floor)(value * 1000 - (1e-9 if up else -1e-9)) / 1000
