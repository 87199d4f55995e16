"""SRigL (Lasby et al. 2023): RigL with constant fan-in and neuron ablation.

Masks must start with constant fan-in (``init_sparse(model, s, structure="fanin")``): every
output row (neuron) keeps the same number ``k`` of weights. Each update, per layer:

1. **Saliency**: run RigL's choice unstructured over the whole layer: the surviving
   largest-magnitude active weights plus the largest-``|dense gradient|`` inactive positions of
   live rows. A row's *salient count* is how many of these fall in it.
2. **Neuron ablation**: a live row with fewer than ``gamma_sal * k`` salient weights (none when
   its dense gradient is 0 everywhere: a dead neuron) is removed
   entirely (all its weights pruned; it stays removed). Rows are never ablated below
   ``ceil(budget / fan_in)`` live rows (the least salient go first) nor below one.
3. **Redistribution**: the layer's budget (its weight count when attached) is spread over the
   live rows: new fan-in ``k' = min(fan_in, budget // live_rows)``. Without ablation ``k' = k``
   and the count is exact; after an ablation the count is ``live_rows * k'``, at most
   ``live_rows - 1`` below the budget (constant fan-in takes precedence over the exact total).
4. **Per-row RigL**: each live row keeps its ``k - d`` largest-magnitude weights (``d`` = the
   cosine drop fraction of ``k``) and grows ``k' - (k - d)`` where ``|dense gradient|`` is
   largest among its previously inactive positions. Grown weights start at 0. A row with fewer
   inactive positions of nonzero gradient than that (e.g. behind dead units) grows only those
   and keeps as many more of its largest weights, so no weight is grown where it would stay 0;
   after an ablation, ``k'`` is also capped at ``k`` plus the fewest such positions of any live
   row.

The ablated neuron's bias is left alone (it becomes a constant input to the next layer).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SparseforgeError, check_float
from ..structures import ConstantFanIn, Structure
from .dst import RigL, keep_top, keep_top_per_row, round_half_up

if TYPE_CHECKING:
    from ..masks import MaskState
    from ..sparsifier import Sparsifier

__all__ = ["SRigL"]


class SRigL(RigL):
    """Constant fan-in RigL with neuron ablation (``gamma_sal`` in [0, 1]; 0 disables ablation)."""

    supported_structures = (ConstantFanIn,)

    def __init__(self, *, gamma_sal: float = 0.3, structure: Structure = ConstantFanIn(), **dst: Any) -> None:
        gamma_sal = check_float(gamma_sal, "gamma_sal", low=0.0, high=1.0)
        super().__init__(structure=structure, **dst)
        self.gamma_sal = gamma_sal
        self.budget: dict[str, int] = {}

    def check(self, masks: MaskState) -> None:
        """Refuse masks whose live rows do not all keep the same number of weights."""
        for name, mask in masks.items():
            counts = mask.reshape(mask.shape[0], -1).sum(1)
            if counts[counts > 0].unique().numel() > 1:
                raise SparseforgeError(
                    f"SRigL needs constant fan-in masks, but {name!r} rows keep {sorted(set(counts.tolist()))[:5]} "
                    "weights; allowed: init_sparse(model, sparsity, structure='fanin')"
                )

    def attach(self, sparsifier: Sparsifier) -> None:
        for name, mask in sparsifier.masks.items():
            self.budget.setdefault(name, int(mask.sum()))

    def _live_rows(self, alive: torch.Tensor, salient: torch.Tensor, k: int, fan_in: int, budget: int) -> torch.Tensor:
        candidates = torch.nonzero(alive & (salient < self.gamma_sal * k)).flatten()
        most = int(alive.sum()) - max(1, math.ceil(budget / fan_in))
        if candidates.numel() > most:
            candidates = candidates[torch.sort(salient[candidates], stable=True).indices[: max(most, 0)]]
        live = alive.clone()
        live[candidates] = False
        return live

    @torch.no_grad()
    def update(self, sparsifier: Sparsifier, step: int) -> None:
        fraction = self.drop_fraction(step)
        new: dict[str, torch.Tensor] = {}
        for index, (name, mask) in enumerate(sparsifier.masks.items()):
            param = sparsifier.params[name]
            rows = mask.shape[0]
            m = mask.to(param.device).reshape(rows, -1)
            fan_in, alive = m.shape[1], m.any(1)
            n_alive = int(alive.sum())
            k = int(m.sum()) // max(n_alive, 1)
            d = min(round_half_up(fraction * k), fan_in - k)
            w = param.detach().abs().reshape(rows, -1)
            g = self.grow_scores(sparsifier, name, index, step).to(param.device).reshape(rows, -1)
            salient = keep_top(w, m, n_alive * (k - d)) | keep_top(g, ~m & alive[:, None], n_alive * d)
            counts = salient.sum(1)
            counts[~(g != 0).any(1)] = 0  # a row with no gradient at all (a dead neuron) is not salient
            live = self._live_rows(alive, counts, k, fan_in, self.budget[name])
            k_new = min(fan_in, self.budget[name] // max(int(live.sum()), 1))
            # a row grows only where the dense gradient is nonzero (a weight grown at 0 with no
            # gradient stays 0, e.g. behind a dead unit) and keeps more of its own weights instead;
            # after an ablation the live rows' new fan-in is capped by what every one of them can
            # grow that way (constant fan-in before the exact total)
            useful = (~m & (g != 0)).sum(1)
            if bool(live.any()):
                k_new = min(k_new, k + int(useful[live].min()))
            n_grow = min(k_new - (k - d), fan_in - k)
            if n_grow == 0 and k_new == k and bool((live == alive).all()):
                continue
            if bool((useful[live] >= n_grow).all()):
                keep = keep_top(w, m, k_new - n_grow, rows) | keep_top(g, ~m, n_grow, rows)
            else:
                grow = useful.clamp(max=n_grow)
                keep = keep_top_per_row(w, m, k_new - grow) | keep_top_per_row(g, ~m, grow)
            new[name] = (keep & live[:, None]).reshape(mask.shape)
        self.history.append((step, sparsifier.change_masks(new) if new else {}))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "budget": dict(self.budget)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.budget = {k: int(v) for k, v in state.get("budget", {}).items()}
