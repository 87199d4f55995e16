"""Gradual magnitude pruning (GMP; Zhu & Gupta 2017) on the cubic schedule.

Masks start as given (typically dense: ``init_sparse(model, 0.0)``) and, at steps
``start, start + every, ... <= end`` and at ``end`` itself, shrink to the cubic schedule's
sparsity :func:`~sparseforge.schedules.cubic_sparsity` by removing the smallest-magnitude
*surviving* weights. Scores are the current trained weights; pruned weights are zero and stay
pruned (masks only ever lose weights: monotone).

Layer budgets (``distribution``):

* ``uniform`` / ``er`` / ``erk``: each layer follows its own cubic from its sparsity at attach
  time to its final target from the distribution (layer magnitude ranking).
* ``global``: the total follows the cubic; one magnitude threshold over all layers decides
  where, each layer keeping at least ``min_density`` of its weights (default: a tenth of the final
  density) so no layer collapses. A layer never regrows, so it may stay above its floor share.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..distributions import DISTRIBUTIONS, global_sparsities, layer_sparsities
from ..errors import SparseforgeError, check_float, check_int, check_sparsity
from ..masks import MaskState
from ..schedules import UpdateSchedule, check_window, cubic_sparsity
from .base import Algorithm
from .dst import keep_top, round_half_up

if TYPE_CHECKING:
    from ..sparsifier import Sparsifier

__all__ = ["GMP", "CubicTargets"]


class CubicTargets:
    """Per-layer kept counts over time for gradual magnitude pruning (shared by GMP and GraNet).

    Args:
        final_sparsity: fraction of zeros over all masked layers at ``end``, in [0, 1).
        start: step at which sparsity starts to follow the cubic (an integer, ``start <= end``).
        end: step at which the cubic reaches ``final_sparsity`` (an integer, ``1 <= end``).
        distribution: ``uniform``, ``er``, ``erk`` or ``global``.
        min_density: floor for ``global`` (default ``0.1 * (1 - final_sparsity)``), in
            ``[0, 1 - final_sparsity]``.
        names: the caller's names for ``start`` and ``end`` in error messages.
    """

    def __init__(
        self,
        final_sparsity: float,
        *,
        start: int,
        end: int,
        distribution: str,
        min_density: float | None,
        names: tuple[str, str] = ("start", "end"),
    ) -> None:
        self.final = check_sparsity(final_sparsity, "final_sparsity")
        if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
            raise SparseforgeError(f"distribution={distribution!r} is not recognised; allowed: {list(DISTRIBUTIONS)}")
        check_int(start, names[0], 0)
        check_int(end, names[1], 1)
        check_window(start, end, names)
        self.start, self.end, self.distribution = int(start), int(end), distribution
        if min_density is None:
            self.min_density = 0.1 * (1.0 - self.final)
        else:
            self.min_density = check_float(min_density, "min_density", low=0.0, high=1.0 - self.final)
        self.initial: dict[str, float] = {}  # sparsity per layer at attach time
        self.finals: dict[str, float] = {}  # final sparsity per layer (layer-wise distributions)

    def check(self, masks: MaskState, owner: str) -> None:
        """Refuse masks already sparser than ``final_sparsity``: masks only lose weights, so the
        schedule could never be followed (it would silently stay at the starting sparsity)."""
        if self.initial:  # restored from a checkpoint: attach keeps the original starting point
            return
        total = masks.numel()
        if masks.nnz() < round((1.0 - self.final) * total):
            raise SparseforgeError(
                f"{owner} final_sparsity={self.final:g} is below the masks' sparsity {masks.sparsity():.4g} at attach; "
                f"allowed: final_sparsity >= {masks.sparsity():.4g} (masks only lose weights; start denser)"
            )

    def attach(self, sparsifier: Sparsifier) -> None:
        if self.initial:  # restored from a checkpoint: keep the original starting point
            return
        masks = sparsifier.masks
        self.initial = {n: masks.sparsity(n) for n in masks}
        self.initial["__total__"] = masks.sparsity()
        if self.distribution != "global":
            shapes = {n: tuple(m.shape) for n, m in masks.items()}
            self.finals = layer_sparsities(shapes, self.final, self.distribution)
            masks.targets.update(self.finals)

    def kept_counts(self, sparsifier: Sparsifier, step: int) -> dict[str, int]:
        """Target kept count per layer at ``step``, never above the layer's current count."""
        masks = sparsifier.masks

        def sparsity_at(initial: float, final: float) -> float:
            return cubic_sparsity(step, initial=initial, final=final, start=self.start, end=self.end)

        if self.distribution != "global":
            return {
                n: min(
                    int(torch.count_nonzero(m)),
                    round_half_up((1.0 - sparsity_at(self.initial[n], self.finals[n])) * m.numel()),
                )
                for n, m in masks.items()
            }
        total = sparsity_at(min(self.initial["__total__"], self.final), self.final)
        params = sparsifier.params  # by name: masks and params share keys, not necessarily order
        scores = {
            n: torch.where(m.to(params[n].device), params[n].detach().abs().float(), -1.0) for n, m in masks.items()
        }
        floor = min(self.min_density, 1.0 - total)
        layer = global_sparsities(scores, total, min_density=floor)
        return {
            n: min(int(torch.count_nonzero(m)), round_half_up((1.0 - layer[n]) * m.numel())) for n, m in masks.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"initial": dict(self.initial), "finals": dict(self.finals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = {k: float(v) for k, v in state.get("initial", {}).items()}
        self.finals = {k: float(v) for k, v in state.get("finals", {}).items()}


def shrink_masks(sparsifier: Sparsifier, counts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Masks keeping the ``counts[name]`` largest-magnitude active weights (only layers that shrink)."""
    new = {}
    for name, k in counts.items():
        param = sparsifier.params[name]
        mask = sparsifier.masks[name].to(param.device)
        if k < int(torch.count_nonzero(mask)):
            new[name] = keep_top(param.detach().abs(), mask, k)
    return new


class GMP(Algorithm):
    """Gradual magnitude pruning to ``final_sparsity`` between steps ``start`` and ``end``.

    Args:
        final_sparsity: fraction of zeros over the masked layers at ``end``, in [0, 1).
        start: first pruning step ("The Journey Matters": ~25% of training).
        end: last pruning step (~75% of training).
        every: steps between pruning updates (>= 1); ``end`` is always an update step too.
        distribution: ``uniform`` (default), ``er``, ``erk`` or ``global`` (see module doc).
        min_density: per-layer floor for ``global``.
    """

    def __init__(
        self,
        final_sparsity: float,
        *,
        start: int,
        end: int,
        every: int = 100,
        distribution: str = "uniform",
        min_density: float | None = None,
    ) -> None:
        self.targets = CubicTargets(
            final_sparsity, start=start, end=end, distribution=distribution, min_density=min_density
        )
        self.schedule = UpdateSchedule(start=start, end=end, every=every)
        self.history: list[tuple[int, dict[str, tuple[int, int]]]] = []

    def check(self, masks: MaskState) -> None:
        self.targets.check(masks, type(self).__name__)

    def attach(self, sparsifier: Sparsifier) -> None:
        self.targets.attach(sparsifier)

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step) or (step == self.schedule.end and step >= 1)

    @torch.no_grad()
    def update(self, sparsifier: Sparsifier, step: int) -> None:
        new = shrink_masks(sparsifier, self.targets.kept_counts(sparsifier, step))
        self.history.append((step, sparsifier.change_masks(new) if new else {}))

    def state_dict(self) -> dict[str, Any]:
        return {"targets": self.targets.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.targets.load_state_dict(state.get("targets", {}))
        self.history = [(int(s), dict(c)) for s, c in state.get("history", [])]
