"""Sparse momentum / SNFS (Dettmers & Zettlemoyer 2019).

At each update every layer drops the ``d_t`` fraction (cosine decay) of its active weights with
the smallest magnitude, as in :class:`~sparseforge.algorithms.dst.DynamicSparse`. The regrowth
budget (the total dropped) is then *redistributed* across layers in proportion to each layer's
mean momentum magnitude over its active weights, and each layer grows where the momentum
magnitude of its inactive positions is largest. Per-layer counts change; the total stays exact.

Momentum signals (documented choices):

* **Redistribution**: the optimizer's own momentum of the active weights: SGD
  ``momentum_buffer`` or Adam/AdamW ``exp_avg``; if the optimizer keeps none, the dense gradient.
* **Growth**: the sparsifier masks gradients before each step, so the optimizer's momentum at
  inactive positions is exactly 0 and useless. We use the dense gradient captured just before the
  update step (the newest term of the momentum an unmasked optimizer would have), which costs
  nothing between updates (no dense-gradient EMA kept every step).

Integer budgets use largest-remainder rounding. Every layer drops its fraction of active weights
(not limited by its own free room: the regrowth is redistributed anyway); a layer never grows more
than its inactive positions with a nonzero dense gradient (just-dropped ones excluded: a weight
grown where the gradient is 0 would start at 0 and stay there); the overflow goes to the other
layers, and what fits nowhere is not dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..distributions import kept_counts_from_densities
from .dst import RigL, round_half_up

if TYPE_CHECKING:
    from ..sparsifier import Sparsifier

__all__ = ["SNFS"]


def _momentum(sparsifier: Sparsifier, name: str) -> torch.Tensor:
    state = sparsifier.optimizer.state.get(sparsifier.params[name], {})
    for key in ("momentum_buffer", "exp_avg"):
        value = state.get(key)
        if isinstance(value, torch.Tensor) and value.shape == sparsifier.params[name].shape:
            return value
    dense_grads = sparsifier.dense_grads
    assert dense_grads is not None  # captured before every update step (needs_dense_grads)
    return dense_grads[name]


class SNFS(RigL):
    """Sparse momentum: magnitude drop, momentum-proportional layer budgets, momentum growth."""

    @torch.no_grad()
    def plan(self, sparsifier: Sparsifier, step: int) -> dict[str, tuple[int, int]]:
        fraction = self.drop_fraction(step)
        keep, drop, capacity, signal = {}, {}, {}, {}
        grads = sparsifier.dense_grads
        for name, mask in sparsifier.masks.items():
            nnz = int(torch.count_nonzero(mask))
            # every layer drops its fraction; the regrowth budget goes where momentum says, not back by
            # layer, so a layer's own free room does not limit what it drops
            drop[name] = round_half_up(fraction * nnz)
            keep[name] = nnz - drop[name]
            active = mask.to(sparsifier.params[name].device)
            signal[name] = float(_momentum(sparsifier, name).abs()[active].float().mean()) if nnz else 0.0
            # growth goes only to inactive positions with a nonzero growth score (the dense gradient):
            # a weight grown where the gradient is 0 starts at 0 and stays there
            score = grads[name] if grads is not None else _momentum(sparsifier, name)
            capacity[name] = int(torch.count_nonzero((score != 0) & ~active))
        budget = sum(drop.values())
        total_signal = sum(signal.values())
        share = {n: (signal[n] / total_signal if total_signal > 0 else 1.0 / len(signal)) for n in signal}
        growable = min(budget, sum(capacity.values()))
        grow = kept_counts_from_densities(
            {n: (capacity[n],) for n in capacity},
            {n: share[n] * growable / capacity[n] if capacity[n] else 0.0 for n in capacity},
            growable,
        )
        # what cannot grow anywhere is not dropped: returned to the layers in proportion to their drops
        shortfall = budget - sum(grow.values())
        if shortfall:
            back = kept_counts_from_densities(
                {n: (drop[n],) for n in drop},
                {n: shortfall / budget if drop[n] else 0.0 for n in drop},
                shortfall,
            )
            keep = {n: keep[n] + back[n] for n in keep}
        for name in keep:
            sparsifier.masks.targets[name] = 1.0 - (keep[name] + grow[name]) / sparsifier.masks[name].numel()
        return {n: (keep[n], grow[n]) for n in keep}
