"""Dynamic sparse training (DST): drop by magnitude, regrow by a score, per layer.

Every update (after completed optimizer steps ``every, 2 * every, ... < end``) each layer drops
the ``d_t`` fraction of its active weights with the smallest magnitude, ``d_t`` following the
cosine decay :func:`~sparseforge.schedules.cosine_drop_fraction` (RigL defaults ``alpha=0.3``,
``every=100``, ``end`` = 75% of training), and regrows exactly as many among the positions that
were inactive *before* the update, so a just-dropped weight is never regrown in the same update
(the dropped and grown sets are disjoint) and each layer keeps its exact number of weights.
Subclasses differ only in the grow score:

* :class:`SET` (Mocanu et al. 2018): random positions (seeded by ``seed``, the step and the layer
  index, so every DDP rank and a resumed run draw the same ones).
* :class:`RigL` (Evci et al. 2020): largest ``|dense gradient|``, captured by the sparsifier only
  before update steps (``needs_dense_grads``).

Grown weights start at exactly 0 (RigL's rule; for SET too, so a new connection does not jolt
the function), and their optimizer state (momentum, Adam moments) is zeroed by
:meth:`Sparsifier.change_masks <sparseforge.sparsifier.Sparsifier.change_masks>`.

If a layer has fewer inactive positions than it would drop (density above 1 / (1 + d_t)), it drops
only as many as it can regrow.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SparseforgeError, check_seed
from ..schedules import UpdateSchedule, check_drop_fraction, cosine_drop_fraction
from ..structures import Structure, Unstructured, topk_mask
from .base import Algorithm

if TYPE_CHECKING:
    from ..sparsifier import Sparsifier

__all__ = ["DynamicSparse", "SET", "RigL", "keep_top", "keep_top_per_row", "resolve_end", "top_indices"]


def keep_top(scores: torch.Tensor, allowed: torch.Tensor, k: int, rows: int = 1) -> torch.Tensor:
    """Bool mask of the ``k`` highest ``scores`` among ``allowed`` positions, in each of ``rows`` rows.

    The tensors are viewed as ``(rows, -1)``; ties go to the lower index. ``k`` must not exceed
    the number of allowed positions in any row (callers guarantee it).
    """
    if rows == 1:
        chosen = allowed.reshape(-1).nonzero().squeeze(1)
        out = torch.zeros(allowed.numel(), dtype=torch.bool, device=allowed.device)
        out[chosen[top_indices(scores.reshape(-1)[chosen], k)]] = True
        return out.reshape(allowed.shape)
    view = torch.where(allowed, scores.float(), float("-inf")).reshape(rows, -1)
    return topk_mask(view, k).reshape(scores.shape) & allowed


def keep_top_per_row(scores: torch.Tensor, allowed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Bool mask of the ``counts[r]`` highest ``scores`` among ``allowed`` positions of each row ``r``.

    The tensors are viewed as ``(len(counts), -1)``; ties go to the lower index. ``counts[r]``
    must not exceed the number of allowed positions in row ``r`` (callers guarantee it).
    """
    rows = counts.numel()
    view = torch.where(allowed, scores.float(), float("-inf")).reshape(rows, -1)
    order = torch.sort(view, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(view.shape[1], device=view.device).expand(rows, -1))
    return (rank < counts.reshape(rows, 1)).reshape(scores.shape) & allowed


def top_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the ``k`` largest entries of a 1-D tensor; ties go to the lower index.

    Exact, and O(n): a strided sample gives a threshold that keeps a small superset of the
    answer (checked; else the whole tensor is used), then one ``kthvalue`` on that superset finds
    the k-th largest value. About 5x faster than ``topk`` on a 4M-entry layer.
    """
    n = scores.numel()
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    if k >= n:
        return torch.arange(n, device=scores.device)
    candidates = None
    stride = 16
    if n >= 1 << 16 and k * 4 < n * 3:
        sample = scores[::stride]
        wanted = min(sample.numel(), k // stride + k // (4 * stride) + 64)
        bound = torch.kthvalue(sample, sample.numel() - wanted + 1).values
        found = (scores >= bound).nonzero().squeeze(1)
        if found.numel() >= k:
            candidates = found
    if candidates is None:
        candidates = torch.arange(n, device=scores.device)
    values = scores[candidates]
    kth = torch.kthvalue(values, values.numel() - k + 1).values
    above = values > kth
    ties = (values == kth).nonzero().squeeze(1)[: k - int(torch.count_nonzero(above))]
    return torch.sort(torch.cat([candidates[above], candidates[ties]])).values


def resolve_end(end: int | None, total_steps: int | None) -> int:
    """``end`` as given, or 75% of ``total_steps`` (RigL's default); exactly one must be given."""
    if (end is None) == (total_steps is None):
        raise SparseforgeError(
            f"end={end!r}, total_steps={total_steps!r}: give exactly one (end = last update step; "
            "total_steps sets end = 75% of it)"
        )
    if total_steps is not None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 2:
            raise SparseforgeError(f"total_steps={total_steps!r} is not allowed; allowed: an integer >= 2")
        return max(1, int(0.75 * total_steps))
    if isinstance(end, bool) or not isinstance(end, int) or end < 1:
        raise SparseforgeError(f"end={end!r} is not allowed; allowed: an integer >= 1 (a step)")
    return end


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class DynamicSparse(Algorithm):
    """Base class of magnitude-drop DST methods; subclasses implement :meth:`grow_scores`.

    Args:
        end: last step at which masks may change (exclusive for drops: the drop fraction is 0
            from ``end`` on). Or give ``total_steps`` and ``end`` becomes 75% of it.
        alpha: initial drop fraction in (0, 1) (default 0.3).
        every: steps between mask updates (default 100); must be below ``end``, else the masks
            would never change (refused).
        structure: only ``Unstructured`` for SET/RigL/SNFS/GraNet (``SRigL`` takes
            ``ConstantFanIn``); anything else raises :class:`SparseforgeError` here.
        seed: seeds random choices (SET's growth); an integer.
    """

    supported_structures: tuple[type[Structure], ...] = (Unstructured,)

    def __init__(
        self,
        *,
        end: int | None = None,
        total_steps: int | None = None,
        alpha: float = 0.3,
        every: int = 100,
        structure: Structure = Unstructured(),
        seed: int = 0,
    ) -> None:
        if not isinstance(structure, self.supported_structures):
            allowed = ", ".join(s.__name__ for s in self.supported_structures)
            raise SparseforgeError(
                f"{type(self).__name__} does not support structure={structure!r}; allowed: {allowed}"
            )
        self.structure = structure
        self.alpha = check_drop_fraction(alpha)
        self.end = resolve_end(end, total_steps)
        self.schedule = UpdateSchedule(start=0, end=self.end, every=every)
        self.seed = check_seed(seed)
        if self._never_updates():
            source = f"total_steps={total_steps} sets end={self.end}" if total_steps is not None else f"end={self.end}"
            raise SparseforgeError(
                f"{type(self).__name__} with every={every} and {source} never updates the masks (the first update "
                f"would be at step {every}, not before end); allowed: every < {self.end}"
            )
        #: ``(step, {layer: (n_dropped, n_grown)})`` for every update that ran.
        self.history: list[tuple[int, dict[str, tuple[int, int]]]] = []

    #: Whether a position must have a positive growth score to grow (see :class:`RigL`).
    grow_needs_signal = False

    def _never_updates(self) -> bool:
        """Whether no step is an update step (the first, ``every``, is not before ``end``)."""
        return self.schedule.every >= self.end

    # -- schedule --------------------------------------------------------------------------
    def drop_fraction(self, step: int) -> float:
        """Fraction of each layer's active weights dropped at ``step`` (cosine decay)."""
        return cosine_drop_fraction(step, alpha=self.alpha, end=self.end)

    def is_update_step(self, step: int) -> bool:
        return self.schedule.is_update_step(step) and step < self.end

    # -- the update ------------------------------------------------------------------------
    def grow_scores(self, sparsifier: Sparsifier, name: str, index: int, step: int) -> torch.Tensor:
        """A *new* tensor of scores shaped like layer ``name``'s weight (the caller overwrites it);
        the highest-scoring inactive positions grow."""
        raise NotImplementedError

    def plan(self, sparsifier: Sparsifier, step: int) -> dict[str, tuple[int, int]]:
        """Per layer ``(n_keep, n_grow)``: keep the ``n_keep`` largest active weights, grow ``n_grow``."""
        fraction = self.drop_fraction(step)
        out = {}
        for name, mask in sparsifier.masks.items():
            nnz = int(torch.count_nonzero(mask))
            n_grow = min(round_half_up(fraction * nnz), mask.numel() - nnz)
            out[name] = (nnz - n_grow, n_grow)
        return out

    @torch.no_grad()
    def update(self, sparsifier: Sparsifier, step: int) -> None:
        new: dict[str, torch.Tensor] = {}
        for index, (name, (n_keep, n_grow)) in enumerate(self.plan(sparsifier, step).items()):
            param = sparsifier.params[name]
            mask = sparsifier.masks[name].to(param.device).reshape(-1)
            active = mask.nonzero().squeeze(1)
            if n_keep == active.numel() and n_grow == 0:
                continue
            new_mask = torch.zeros_like(mask)
            new_mask[active[top_indices(param.detach().reshape(-1)[active].abs(), n_keep)]] = True
            if n_grow:
                scores = self.grow_scores(sparsifier, name, index, step).to(param.device, torch.float32).reshape(-1)
                scores[active] = float("-inf")  # only positions inactive before this update may grow
                if self.grow_needs_signal:
                    # a position whose growth score is 0 (e.g. the column of a dead unit: zero gradient)
                    # would start at 0 and stay there; keep that many more of the active weights instead
                    useful = int(torch.count_nonzero(scores > 0))
                    if useful < n_grow:
                        n_keep, n_grow = n_keep + (n_grow - useful), useful
                        new_mask.zero_()
                        new_mask[active[top_indices(param.detach().reshape(-1)[active].abs(), n_keep)]] = True
                new_mask[top_indices(scores, n_grow)] = True
            new[name] = new_mask.reshape(param.shape)
        self.history.append((step, sparsifier.change_masks(new) if new else {}))

    def state_dict(self) -> dict[str, Any]:
        return {"history": [(s, dict(c)) for s, c in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(int(s), dict(c)) for s, c in state.get("history", [])]


class SET(DynamicSparse):
    """Sparse Evolutionary Training: regrow at uniformly random inactive positions."""

    def grow_scores(self, sparsifier: Sparsifier, name: str, index: int, step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(hash((self.seed, step, index)) & 0x7FFF_FFFF_FFFF)
        return torch.rand(sparsifier.params[name].shape, generator=generator)


class RigL(DynamicSparse):
    """Rigged Lottery: regrow where the dense gradient's magnitude is largest.

    Positions whose dense gradient is exactly 0 never grow (a weight grown there would start at 0
    and stay 0, e.g. behind a dead unit); where fewer positions have a gradient than the layer
    drops, it keeps that many more of its largest active weights, so its count stays exact.
    """

    needs_dense_grads = True
    grow_needs_signal = True

    def grow_scores(self, sparsifier: Sparsifier, name: str, index: int, step: int) -> torch.Tensor:
        if sparsifier.dense_grads is None:
            raise SparseforgeError(
                f"{type(self).__name__} update at step {step} found no dense gradients; "
                "allowed: updates driven by the Sparsifier's optimizer hooks"
            )
        return sparsifier.dense_grads[name].abs()
