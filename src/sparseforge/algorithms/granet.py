"""GraNet (Liu et al. 2021): gradual magnitude pruning plus zero-cost neuroregeneration.

Start from a *denser* sparse network (e.g. ``init_sparse(model, 0.5)``). At every update step:

1. **Gradual pruning**: shrink the masks to the cubic schedule's sparsity between
   ``prune_start`` and ``prune_end`` (from the sparsity at attach time to ``final_sparsity``) by
   removing the smallest-magnitude surviving weights. ``distribution="global"`` (default, as in
   the paper) ranks all layers together with a per-layer floor; ``uniform``/``er``/``erk`` prune
   each layer to its own target.
2. **Neuroregeneration**: drop the ``d_t`` fraction (cosine decay, ``alpha``, ``end``) of the
   remaining weights by magnitude and regrow exactly as many where ``|dense gradient|`` is
   largest among positions inactive before this update (so regeneration keeps the count that
   step 1 reached, and no weight dropped in this update is regrown). Grown weights start at 0.

Updates happen every ``every`` steps while regeneration runs (``step < end``) or pruning does
(``step <= prune_end``), and at ``prune_end`` itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .dst import RigL, round_half_up
from .gmp import CubicTargets

if TYPE_CHECKING:
    from ..masks import MaskState
    from ..sparsifier import Sparsifier

__all__ = ["GraNet"]


class GraNet(RigL):
    """RigL-style regeneration on top of cubic gradual magnitude pruning to ``final_sparsity``."""

    def __init__(
        self,
        final_sparsity: float,
        *,
        prune_start: int = 0,
        prune_end: int,
        distribution: str = "global",
        min_density: float | None = None,
        **dst: Any,
    ) -> None:
        self.targets = CubicTargets(
            final_sparsity,
            start=prune_start,
            end=prune_end,
            distribution=distribution,
            min_density=min_density,
            names=("prune_start", "prune_end"),
        )
        super().__init__(**dst)

    def _never_updates(self) -> bool:
        return False  # prune_end is always an update step

    def check(self, masks: MaskState) -> None:
        self.targets.check(masks, type(self).__name__)

    def attach(self, sparsifier: Sparsifier) -> None:
        self.targets.attach(sparsifier)

    def is_update_step(self, step: int) -> bool:
        prune_end = self.targets.end
        if step < 1:
            return False
        return (step % self.schedule.every == 0 and (step < self.end or step <= prune_end)) or step == prune_end

    def plan(self, sparsifier: Sparsifier, step: int) -> dict[str, tuple[int, int]]:
        fraction = self.drop_fraction(step)
        out = {}
        for name, k in self.targets.kept_counts(sparsifier, step).items():
            room = sparsifier.masks[name].numel() - int(torch.count_nonzero(sparsifier.masks[name]))
            n_grow = min(round_half_up(fraction * k), room)
            out[name] = (k - n_grow, n_grow)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "targets": self.targets.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.targets.load_state_dict(state.get("targets", {}))
