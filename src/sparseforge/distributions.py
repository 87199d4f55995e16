"""Layer-wise sparsity budgets: how a global sparsity is split over layers.

Pure functions of layer shapes (``uniform``, ``er``, ``erk``) or of scores (``global``).

Budget convention: the global ``sparsity`` counts only the layers passed in (the prunable ones);
excluded layers, biases and norms are outside the budget. ``sparsity_report`` shows both totals.
The results are *exact*: per-layer kept counts are integers (largest-remainder rounding) whose
sum equals ``round((1 - sparsity) * total)``, and the returned per-layer sparsities are
``1 - kept / numel`` so an ``Unstructured`` mask reproduces the counts exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch

from .errors import SparseforgeError, check_sparsity
from .structures import topk_mask

__all__ = [
    "DISTRIBUTIONS",
    "layer_sparsities",
    "uniform",
    "er",
    "erk",
    "global_masks",
    "global_sparsities",
    "kept_counts_from_densities",
]

Shapes = Mapping[str, Sequence[int]]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)


def _target_kept(shapes: Shapes, sparsity: float) -> int:
    total = sum(_numel(s) for s in shapes.values())
    return int(math.floor((1.0 - sparsity) * total + 0.5))


def kept_counts_from_densities(shapes: Shapes, densities: Mapping[str, float], total_kept: int) -> dict[str, int]:
    """Round real kept counts ``density * numel`` to integers summing to ``total_kept``.

    Largest-remainder rounding, ties broken by layer order; no layer exceeds its size.
    ``densities`` (kept fractions; values above 1 are clamped to 1, below 0 to 0) must name every
    layer of ``shapes``; ``total_kept`` must lie in ``[0, total weights]``.
    """
    _check_shapes(shapes, allow_empty_layers=True)
    capacity = sum(_numel(s) for s in shapes.values())
    if isinstance(total_kept, bool) or not isinstance(total_kept, numbers.Integral) or not 0 <= total_kept <= capacity:
        raise SparseforgeError(f"total_kept={total_kept!r} is not allowed; allowed: an integer in [0, {capacity}]")
    if not isinstance(densities, Mapping):
        raise SparseforgeError(f"densities is a {type(densities).__name__}; allowed: a dict name -> kept fraction")
    for name in shapes:
        value = densities.get(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
            raise SparseforgeError(f"densities[{name!r}]={value!r} is not allowed; allowed: a number (kept fraction)")
    real = {n: min(1.0, max(0.0, densities[n])) * _numel(s) for n, s in shapes.items()}
    counts = {n: min(int(math.floor(v)), _numel(shapes[n])) for n, v in real.items()}
    remaining = total_kept - sum(counts.values())
    order = sorted(shapes, key=lambda n: -(real[n] - math.floor(real[n])))
    while remaining > 0:
        progressed = False
        for name in order:
            if remaining > 0 and counts[name] < _numel(shapes[name]):
                counts[name] += 1
                remaining -= 1
                progressed = True
        if not progressed:  # every layer is full: the budget cannot be met
            break
    while remaining < 0:
        name = max(counts, key=lambda n: counts[n])
        counts[name] -= 1
        remaining += 1
    return counts


def _counts_to_sparsities(shapes: Shapes, counts: Mapping[str, int]) -> dict[str, float]:
    return {n: 1.0 - counts[n] / _numel(s) for n, s in shapes.items()}


def _check_shapes(shapes: Shapes, *, allow_empty_layers: bool = False) -> None:
    """Refuse anything but a non-empty dict of shapes of positive integers (zeros too if asked)."""
    low = 0 if allow_empty_layers else 1
    if not isinstance(shapes, Mapping):
        raise SparseforgeError(f"shapes is a {type(shapes).__name__}; allowed: a dict name -> shape")
    if not shapes:
        raise SparseforgeError("no layers were given to distribute the sparsity over; allowed: at least one layer")
    for name, shape in shapes.items():
        dims = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else None
        if not dims or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < low for d in dims):
            raise SparseforgeError(
                f"layer {name!r} has shape {shape!r}; allowed: a non-empty tuple of integers >= {low}"
            )


def uniform(shapes: Shapes, sparsity: float) -> dict[str, float]:
    """Every layer gets ``sparsity``, rounded to whole weights per layer (floor or ceil of
    ``(1 - sparsity) * numel``, largest remainder) so the layers sum to the global target."""
    sparsity = check_sparsity(sparsity)
    _check_shapes(shapes)
    densities = {n: 1.0 - sparsity for n in shapes}
    counts = kept_counts_from_densities(shapes, densities, _target_kept(shapes, sparsity))
    return _counts_to_sparsities(shapes, counts)


def _erdos_renyi(shapes: Shapes, sparsity: float, raw: Mapping[str, float]) -> dict[str, float]:
    """Solve ``sum_l eps * raw_l * N_l = kept`` with layers whose density would exceed 1 made dense."""
    sparsity = check_sparsity(sparsity)
    _check_shapes(shapes)
    total_kept = _target_kept(shapes, sparsity)
    dense: set[str] = set()
    while True:
        budget = total_kept - sum(_numel(shapes[n]) for n in dense)
        denom = sum(raw[n] * _numel(shapes[n]) for n in shapes if n not in dense)
        if denom <= 0:
            break
        eps = budget / denom
        over = {n for n in shapes if n not in dense and eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over  # eps only grows when dense layers leave the solve, so all can go at once
    densities = {n: 1.0 if n in dense else eps * raw[n] for n in shapes}
    return _counts_to_sparsities(shapes, kept_counts_from_densities(shapes, densities, total_kept))


def er(shapes: Shapes, sparsity: float) -> dict[str, float]:
    """Erdos-Renyi (SET): density proportional to ``(n_in + n_out) / (n_in * n_out)``.

    For convolutions ``n_in``/``n_out`` are channel counts (kernel size ignored).
    """
    _check_shapes(shapes)
    raw = {}
    for n, s in shapes.items():
        n_out, n_in = (int(s[0]), int(s[1])) if len(s) >= 2 else (1, int(s[0]))
        raw[n] = (n_in + n_out) / (n_in * n_out)
    return _erdos_renyi(shapes, sparsity, raw)


def erk(shapes: Shapes, sparsity: float) -> dict[str, float]:
    """Erdos-Renyi-Kernel (RigL): density proportional to ``sum(shape) / prod(shape)``."""
    _check_shapes(shapes)
    raw = {n: sum(int(d) for d in s) / _numel(s) for n, s in shapes.items()}
    return _erdos_renyi(shapes, sparsity, raw)


def global_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float, *, min_density: float = 0.0
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Unstructured masks and per-layer sparsities from one threshold over all layers' scores.

    Each layer keeps at least ``min_density`` of its weights: the floor prevents layer collapse
    (a layer pruned to nothing disconnects the network). Layers held at their floor are taken out
    and the threshold is recomputed over the rest. Ties across layers are broken by layer order,
    then index order.
    """
    sparsity = check_sparsity(sparsity)
    if isinstance(min_density, bool) or not isinstance(min_density, numbers.Real):
        raise SparseforgeError(f"min_density={min_density!r} is not a number; allowed: a float in [0, 1]")
    min_density = float(min_density)
    if not (0.0 <= min_density <= 1.0):
        raise SparseforgeError(f"min_density={min_density!r} is outside the allowed range [0, 1]")
    if not isinstance(scores, Mapping) or not all(isinstance(s, torch.Tensor) for s in scores.values()):
        raise SparseforgeError(
            "scores is not a dict name -> tensor; allowed: a dict of score tensors shaped like the weights"
        )
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    _check_shapes(shapes)
    total_kept = _target_kept(shapes, sparsity)
    floors = {n: min(_numel(s), math.ceil(min_density * _numel(s))) for n, s in shapes.items()}
    if sum(floors.values()) > total_kept:
        raise SparseforgeError(
            f"min_density={min_density} keeps more weights than sparsity={sparsity} allows; "
            f"allowed: min_density <= {1 - sparsity:.4g}"
        )
    pinned: dict[str, int] = {}
    while True:
        free = [n for n in shapes if n not in pinned]
        budget = total_kept - sum(pinned.values())
        flat = torch.cat([scores[n].detach().reshape(-1).float() for n in free]).reshape(1, -1)
        keep = topk_mask(flat, budget).reshape(-1)
        masks, start = {}, 0
        for n in free:
            size = _numel(shapes[n])
            masks[n] = keep[start : start + size].reshape(shapes[n])
            start += size
        low = [n for n in free if int(masks[n].sum()) < floors[n]]
        if not low:
            break
        for n in low:
            pinned[n] = floors[n]
    for n, count in pinned.items():
        masks[n] = topk_mask(scores[n].detach().reshape(1, -1).float(), count).reshape(shapes[n])
    masks = {n: masks[n] for n in shapes}
    counts = {n: int(m.sum()) for n, m in masks.items()}
    return masks, _counts_to_sparsities(shapes, counts)


def global_sparsities(
    scores: Mapping[str, torch.Tensor], sparsity: float, *, min_density: float = 0.0
) -> dict[str, float]:
    """Per-layer sparsities of :func:`global_masks` (one threshold, per-layer floors)."""
    return global_masks(scores, sparsity, min_density=min_density)[1]


DISTRIBUTIONS = ("uniform", "er", "erk", "global")


def layer_sparsities(shapes: Shapes, sparsity: float, distribution: str = "uniform") -> dict[str, float]:
    """Per-layer sparsity for a shape-only distribution: ``uniform``, ``er`` or ``erk``.

    ``global`` needs scores: use :func:`global_sparsities`.
    """
    fns = {"uniform": uniform, "er": er, "erk": erk}
    if distribution not in fns:
        raise SparseforgeError(
            f"distribution={distribution!r} is not a shape-only distribution; allowed: {sorted(fns)} "
            "(use global_sparsities for 'global')"
        )
    return fns[distribution](shapes, sparsity)
