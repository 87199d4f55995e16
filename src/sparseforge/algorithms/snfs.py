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

Integer budgets use largest-remainder rounding; a layer never grows more than its inactive
positions (just-dropped ones excluded); the overflow goes to the other layers.
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
        keep, room, signal = {}, {}, {}
        for name, mask in sparsifier.masks.items():
            nnz = int(torch.count_nonzero(mask))
            keep[name] = nnz - min(round_half_up(fraction * nnz), mask.numel() - nnz)
            room[name] = mask.numel() - nnz
            active = mask.to(sparsifier.params[name].device)
            signal[name] = float(_momentum(sparsifier, name).abs()[active].float().mean()) if nnz else 0.0
        budget = sum(m.numel() for _, m in sparsifier.masks.items()) - sum(room.values()) - sum(keep.values())
        total_signal = sum(signal.values())
        share = {n: (signal[n] / total_signal if total_signal > 0 else 1.0 / len(signal)) for n in signal}
        grow = kept_counts_from_densities(
            {n: (room[n],) for n in room}, {n: share[n] * budget / room[n] if room[n] else 0.0 for n in room}, budget
        )
        for name in keep:
            sparsifier.masks.targets[name] = 1.0 - (keep[name] + grow[name]) / sparsifier.masks[name].numel()
        return {n: (keep[n], grow[n]) for n in keep}
