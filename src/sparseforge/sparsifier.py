"""Sparsifier: keeps a model sparse through training by optimizer step hooks.

Attach it once; nothing has to be called per step::

    masks = sparseforge.prune(model, sparsity=0.9)
    sparsifier = Sparsifier(model, optimizer, masks)
    for x, y in loader:                      # the user's own loop, unchanged
        loss_fn(model(x), y).backward()
        optimizer.step(); optimizer.zero_grad()
    masks = sparsifier.finalize()            # removes every hook; a plain model is left

Per optimizer step:

* **pre-step hook**: if an algorithm update follows this step and the algorithm needs dense
  gradients, copy them (only then); then zero the gradients of pruned weights, so momentum and
  adaptive moments never accumulate there.
* **post-step hook**: multiply weights by their masks (skipped with ``zero_state="grads"``, where it is
  provably a no-op for SGD/Adam/AdamW) (so no optimizer, known or not, can revive a
  pruned weight, e.g. through decoupled weight decay or noise), zero every optimizer-state tensor
  shaped like a masked parameter at its pruned positions, count the step (here and nowhere
  else), and run the algorithm's mask update when one is due.

Parameter names and ``model.state_dict()`` keys never change (no ``weight_orig``, no mask buffers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import SparseforgeError
from .masks import MaskState

if TYPE_CHECKING:
    from .algorithms.base import Algorithm

__all__ = ["Sparsifier"]

_STATE_MODES = ("step", "update", "grads")
# Optimizers for which masked gradients alone keep pruned weights and their state exactly at 0.
_GRADS_EXACT = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


class Sparsifier:
    """Owns a :class:`MaskState` for a model and its optimizer.

    Args:
        model: the model (a DDP / compiled wrapper is fine; names are matched canonically).
        optimizer: any ``torch.optim.Optimizer``.
        masks: the masks to enforce (``True`` = kept). Applied to the weights at once.
        algorithm: optional dynamic-sparsity algorithm deciding when and how masks change.
        zero_state: ``"step"`` (default) masks optimizer state after every step, which holds for
            optimizers that write state independent of the gradient; ``"update"`` masks it only
            when masks change (cheaper; exact for SGD/Adam/AdamW since gradients are masked).
            ``"grads"`` (fastest: one elementwise pass per step) masks only the gradients each
            step; weights and state are masked when masks change. Pruned weights then provably
            stay exactly 0 (zero gradient, zero state, zero weight give a zero update, weight
            decay included), so it is allowed only for SGD, Adam and AdamW, and assumes nothing
            but the optimizer writes the weights between steps.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        masks: MaskState,
        algorithm: Algorithm | None = None,
        *,
        zero_state: str = "step",
    ) -> None:
        if zero_state not in _STATE_MODES:
            raise SparseforgeError(f"zero_state={zero_state!r} is not allowed; allowed: {list(_STATE_MODES)}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SparseforgeError(f"optimizer is a {type(optimizer).__name__}; allowed: a torch.optim.Optimizer")
        if zero_state == "grads" and not isinstance(optimizer, _GRADS_EXACT):
            raise SparseforgeError(
                f"zero_state='grads' is not exact for {type(optimizer).__name__}; allowed: SGD, Adam, AdamW "
                "(use zero_state='step' for other optimizers)"
            )
        self.model = model
        self.optimizer = optimizer
        self.masks = masks
        self.algorithm = algorithm
        self.zero_state = zero_state
        self.params: dict[str, nn.Parameter] = masks.resolve(model)
        self.dense_grads: dict[str, torch.Tensor] | None = None
        self._value_masks: dict[str, torch.Tensor] = {}
        self._refresh_value_masks()
        self._apply_weights()
        self._mask_optimizer_state(self._value_masks)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        if algorithm is not None:
            algorithm.attach(self)

    # -- masks as multipliers ----------------------------------------------------------------
    def _refresh_value_masks(self, names: list[str] | None = None) -> None:
        """Cache each mask in its parameter's dtype/device (derived from MaskState, never stored)."""
        for name in names or self.params:
            param = self.params[name]
            self._value_masks[name] = self.masks[name].to(device=param.device, dtype=param.dtype)

    @torch.no_grad()
    def _apply_weights(self) -> None:
        names = list(self.params)
        torch._foreach_mul_([self.params[n].data for n in names], [self._value_masks[n] for n in names])

    @torch.no_grad()
    def _mask_optimizer_state(self, multipliers: Mapping[str, torch.Tensor]) -> None:
        """Multiply every optimizer-state tensor shaped like a parameter by that parameter's multiplier."""
        states, factors = [], []
        for name, factor in multipliers.items():
            param = self.params[name]
            for value in self.optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and value.is_floating_point():
                    states.append(value)
                    factors.append(factor if factor.dtype == value.dtype else factor.to(value.dtype))
        if states:
            torch._foreach_mul_(states, factors)

    # -- hooks -------------------------------------------------------------------------------
    @torch.no_grad()
    def _pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        algo = self.algorithm
        upcoming = self.masks.step + 1
        if algo is not None and algo.needs_dense_grads and algo.is_update_step(upcoming):
            self.dense_grads = {
                n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                for n, p in self.params.items()
            }
        grads, factors = [], []
        for name, param in self.params.items():
            if param.grad is not None:
                grads.append(param.grad)
                factors.append(self._value_masks[name])
        if grads:
            torch._foreach_mul_(grads, factors)

    @torch.no_grad()
    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.zero_state != "grads":
            self._apply_weights()
        if self.zero_state == "step":
            self._mask_optimizer_state(self._value_masks)
        self.masks.step += 1
        algo = self.algorithm
        if algo is not None and algo.is_update_step(self.masks.step):
            algo.update(self, self.masks.step)
            self.dense_grads = None

    # -- mask changes ------------------------------------------------------------------------
    @torch.no_grad()
    def change_masks(
        self,
        new_masks: Mapping[str, torch.Tensor],
        grown_values: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, tuple[int, int]]:
        """Replace masks; zero dropped weights; set grown weights; zero optimizer state at both.

        Args:
            new_masks: bool masks for some or all layers.
            grown_values: per layer, a tensor shaped like the weight whose entries at newly grown
                positions become the weights' initial values. Layers absent here grow at 0.

        Returns ``{name: (n_dropped, n_grown)}``.
        """
        changed: dict[str, tuple[int, int]] = {}
        touched: dict[str, torch.Tensor] = {}
        for name, new in new_masks.items():
            if name not in self.params:
                raise SparseforgeError(f"mask {name!r} is not managed by this sparsifier; allowed: {sorted(self.params)}")
            param = self.params[name]
            new = new.to(device=param.device, dtype=torch.bool)
            if new.shape != param.shape:
                raise SparseforgeError(f"new mask for {name!r} has shape {tuple(new.shape)}; expected {tuple(param.shape)}")
            old = self.masks[name].to(param.device)
            dropped = old & ~new
            grown = new & ~old
            if grown_values is not None and name in grown_values:
                param.data.masked_fill_(~new, 0.0)
                param.data[grown] = grown_values[name].to(param.device, param.dtype)[grown]
            else:  # one pass: zero everything outside the new mask and the grown positions
                param.data.masked_fill_(~new | grown, 0.0)
            touched[name] = (~(dropped | grown)).to(param.dtype)
            self.masks[name] = new
            # count_nonzero: a bool .sum() widens to int64 first and is ~10x slower on big layers
            changed[name] = (int(torch.count_nonzero(dropped)), int(torch.count_nonzero(grown)))
        self._mask_optimizer_state(touched)
        self._refresh_value_masks(list(new_masks))
        return changed

    # -- lifecycle ---------------------------------------------------------------------------
    def finalize(self) -> MaskState:
        """Remove every hook, apply the masks a last time and return them. The model is plain."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._apply_weights()
        if self.algorithm is not None:
            self.algorithm.detach()
        return self.masks

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"masks": self.masks.state_dict()}
        if self.algorithm is not None:
            state["algorithm"] = self.algorithm.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks (shape-checked against the model) and algorithm state."""
        incoming = MaskState.from_state_dict(state["masks"])
        if set(incoming.names()) != set(self.params):
            raise SparseforgeError(
                f"checkpoint masks {sorted(incoming.names())[:5]} do not match this sparsifier's layers {sorted(self.params)[:5]}"
            )
        incoming.resolve(self.model)
        self.masks.load_state_dict(state["masks"])
        if self.algorithm is not None and "algorithm" in state:
            self.algorithm.load_state_dict(state["algorithm"])
        self._refresh_value_masks()
        self._apply_weights()
        self._mask_optimizer_state(self._value_masks)
