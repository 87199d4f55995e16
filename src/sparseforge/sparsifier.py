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
* **post-step hook**: multiply weights by their masks (so no optimizer, known or not, can revive
  a pruned weight, e.g. through decoupled weight decay or noise) and zero every optimizer-state
  tensor shaped like a masked parameter at its pruned positions -- both skipped with
  ``zero_state="grads"``, where they are provably no-ops; count the step (here and nowhere
  else), and run the algorithm's mask update when one is due.

Fast by default: ``zero_state="auto"`` picks ``"grads"`` (one elementwise pass per step, about
1.08x a dense step for RigL instead of 1.22x, measured by benchmarks/bench_overhead.py) when ``type(optimizer)`` is exactly
``torch.optim.SGD``, ``Adam`` or ``AdamW`` and the algorithm writes weights only through
:meth:`Sparsifier.change_masks`; otherwise ``"step"``. ``repr(sparsifier)`` says which and why.

One Sparsifier per optimizer at a time: a second one on an optimizer whose first Sparsifier (or
:class:`~sparseforge.algorithms.nm_training.NMTraining`) is still attached is refused; after
``finalize()`` a new one may attach.

Parameter names and ``model.state_dict()`` keys never change (no ``weight_orig``, no mask buffers).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import SparseforgeError
from .masks import MaskState, check_materialized

if TYPE_CHECKING:
    from .algorithms.base import Algorithm

__all__ = ["Sparsifier", "attached_owner", "check_optimizer_owns", "resolve_zero_state"]

_STATE_MODES = ("auto", "step", "update", "grads")
# Optimizers for which masked gradients alone keep pruned weights and their state exactly at 0.
_GRADS_EXACT = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _algorithm_base() -> type:
    from .algorithms.base import Algorithm  # late: the algorithms package imports this module

    return Algorithm


def attached_owner(optimizer: torch.optim.Optimizer) -> Any | None:
    """The sparseforge object (Sparsifier or NMTraining) whose step hooks are on ``optimizer``, if any.

    Read from the optimizer's own registered step hooks (bound methods of an object marking
    itself with ``_sparseforge_hook_owner``), so no global registry is kept and ``finalize()``
    (which removes the hooks) frees the optimizer by itself.
    """
    for attr in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        hooks = getattr(optimizer, attr, {})
        for hook in list(hooks.values()):
            owner = getattr(hook, "__self__", None)
            if getattr(owner, "_sparseforge_hook_owner", False) and getattr(owner, "attached", False):
                return owner
    return None


def check_optimizer_owns(optimizer: torch.optim.Optimizer, params: Mapping[str, torch.Tensor]) -> None:
    """Raise unless every tensor of ``params`` (name -> parameter) is in ``optimizer.param_groups``."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for name, param in params.items():
        if id(param) not in owned:
            raise SparseforgeError(
                f"parameter {name!r} is not in the optimizer's param_groups; allowed: an optimizer built over "
                "the model's parameters (e.g. torch.optim.SGD(model.parameters(), ...))"
            )


def resolve_zero_state(
    zero_state: str, optimizer: torch.optim.Optimizer, algorithm: Algorithm | None = None
) -> tuple[str, str]:
    """The effective ``zero_state`` mode and why it was chosen, e.g. ``("grads", "auto: exact for AdamW")``.

    ``"auto"``: ``"grads"`` when ``type(optimizer)`` is exactly SGD, Adam or AdamW (a subclass may
    change ``step()``) and the algorithm does not set ``requires_step_masking``; else ``"step"``.
    """
    kind = type(optimizer).__name__
    needs_step = bool(getattr(algorithm, "requires_step_masking", False))
    if zero_state != "auto":
        return zero_state, "explicit"
    if needs_step:
        return "step", f"auto: {type(algorithm).__name__} needs weights masked every step"
    if type(optimizer) in _GRADS_EXACT:
        return "grads", f"auto: exact for {kind}"
    if isinstance(optimizer, _GRADS_EXACT):
        base = next(c for c in type(optimizer).__mro__ if c in _GRADS_EXACT)
        return "step", f"auto: {kind} subclasses {base.__name__} and may change step()"
    return "step", f"auto: {kind} is not SGD, Adam or AdamW"


class Sparsifier:
    """Owns a :class:`MaskState` for a model and its optimizer.

    Args:
        model: the model (a DDP / compiled wrapper is fine; names are matched canonically). Its
            parameters must hold real values (not on the ``meta`` device).
        optimizer: any ``torch.optim.Optimizer`` whose ``param_groups`` hold every masked
            parameter, with no other Sparsifier attached to it.
        masks: a :class:`MaskState` (``True`` = kept) with at least one mask, e.g. from
            :func:`sparseforge.prune`. Applied to the weights at once.
        algorithm: optional dynamic-sparsity algorithm deciding when and how masks change.
        zero_state: ``"auto"`` (default) is ``"grads"`` for exactly ``torch.optim.SGD``, ``Adam``
            and ``AdamW`` (not subclasses) unless the algorithm sets ``requires_step_masking``,
            else ``"step"``; :attr:`zero_state_reason` says which rule applied.
            ``"step"`` masks weights and optimizer state after every step, which holds for
            optimizers that write state independent of the gradient; ``"update"`` masks state only
            when masks change (weights still every step).
            ``"grads"`` (fastest: one elementwise pass per step) masks only the gradients each
            step; weights and state are masked when masks change. Pruned weights then provably
            stay exactly 0 (zero gradient, zero state, zero weight give a zero update: SGD with
            momentum, dampening, Nesterov and weight decay; Adam/AdamW with amsgrad and either
            weight decay), so it is allowed only for SGD, Adam and AdamW (and subclasses, when
            asked for explicitly), and assumes nothing but the optimizer and
            :meth:`change_masks` writes the weights or the optimizer state between steps (e.g. no
            ``model.load_state_dict`` of dense weights or ``optimizer.load_state_dict`` of dense
            state while attached; call :meth:`load_state_dict` or re-create the Sparsifier then).
    """

    #: Marks the bound step hooks of this class for :func:`attached_owner`.
    _sparseforge_hook_owner = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        masks: MaskState,
        algorithm: Algorithm | None = None,
        *,
        zero_state: str = "auto",
    ) -> None:
        # Every check runs before anything is touched (weights, optimizer state, hooks).
        if not isinstance(zero_state, str) or zero_state not in _STATE_MODES:
            raise SparseforgeError(f"zero_state={zero_state!r} is not allowed; allowed: {list(_STATE_MODES)}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SparseforgeError(f"optimizer is a {type(optimizer).__name__}; allowed: a torch.optim.Optimizer")
        if not isinstance(masks, MaskState):
            raise SparseforgeError(
                f"masks is a {type(masks).__name__}; allowed: a MaskState, e.g. from sparseforge.prune(...) "
                "(MaskState(d) wraps a dict d of bool masks)"
                if masks is not None
                else "masks=None; allowed: a MaskState, e.g. from sparseforge.prune(...)"
            )
        if len(masks) == 0:
            raise SparseforgeError(
                "masks has no layer; allowed: a MaskState with at least one mask, e.g. from sparseforge.prune(...)"
            )
        if algorithm is not None and not isinstance(algorithm, _algorithm_base()):
            raise SparseforgeError(
                f"algorithm is a {type(algorithm).__name__}; allowed: None or a sparseforge.algorithms.Algorithm "
                "(e.g. RigL(total_steps=...))"
            )
        check_materialized(model)
        params = masks.resolve(model)
        check_optimizer_owns(optimizer, params)
        owner = attached_owner(optimizer)
        if owner is not None:
            raise SparseforgeError(
                f"the optimizer already has an attached {type(owner).__name__}; allowed: one at a time "
                "(call its finalize() first)"
            )
        if algorithm is not None:
            algorithm.check(masks)
        mode, reason = resolve_zero_state(zero_state, optimizer, algorithm)
        if mode == "grads" and reason == "explicit":
            if not isinstance(optimizer, _GRADS_EXACT):
                raise SparseforgeError(
                    f"zero_state='grads' is not exact for {type(optimizer).__name__}; allowed: SGD, Adam, AdamW "
                    "(use zero_state='step' for other optimizers)"
                )
            if getattr(algorithm, "requires_step_masking", False):
                raise SparseforgeError(
                    f"zero_state='grads' is not exact for {type(algorithm).__name__}, which needs weights masked "
                    "every step; allowed: 'auto', 'step' or 'update'"
                )
        self.model = model
        self.optimizer = optimizer
        self.masks = masks
        self.algorithm = algorithm
        #: The mode in effect: ``"grads"``, ``"step"`` or ``"update"`` (``"auto"`` resolved).
        self.zero_state = mode
        #: Why: ``"explicit"`` or the ``auto`` rule that applied, e.g. ``"auto: exact for AdamW"``.
        self.zero_state_reason = reason
        self.params: dict[str, nn.Parameter] = params
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
            try:
                algorithm.attach(self)
            except BaseException:
                self._remove_hooks()
                raise

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

        Returns ``{name: (n_dropped, n_grown)}``. Every argument is checked before any layer changes.
        """
        if not isinstance(new_masks, Mapping):
            raise SparseforgeError(f"new_masks is a {type(new_masks).__name__}; allowed: a dict name -> bool tensor")
        for name, new in new_masks.items():
            if name not in self.params:
                raise SparseforgeError(
                    f"mask {name!r} is not managed by this sparsifier; allowed: {sorted(self.params)}"
                )
            if not isinstance(new, torch.Tensor) or tuple(new.shape) != tuple(self.params[name].shape):
                got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
                raise SparseforgeError(
                    f"new mask for {name!r} has shape {got}; expected {tuple(self.params[name].shape)}"
                )
        if grown_values is not None:
            extra = [n for n in grown_values if n not in new_masks]
            if extra:
                raise SparseforgeError(
                    f"grown_values names {extra[0]!r}, which new_masks does not change; allowed: {sorted(new_masks)}"
                )
        changed: dict[str, tuple[int, int]] = {}
        touched: dict[str, torch.Tensor] = {}
        for name, new in new_masks.items():
            param = self.params[name]
            new = new.to(device=param.device, dtype=torch.bool)
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
    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def finalize(self) -> MaskState:
        """Remove every hook, apply the masks a last time and return them. The model is plain,
        and the optimizer is free for a new Sparsifier."""
        self._remove_hooks()
        self._apply_weights()
        if self.algorithm is not None:
            self.algorithm.detach()
        return self.masks

    @property
    def attached(self) -> bool:
        """Whether the step hooks are registered (True until :meth:`finalize`)."""
        return bool(self._handles)

    def __repr__(self) -> str:
        algo = type(self.algorithm).__name__ if self.algorithm is not None else None
        return (
            f"Sparsifier({len(self.masks)} masks, sparsity={self.masks.sparsity():.4f}, step={self.masks.step}, "
            f"zero_state={self.zero_state!r} ({self.zero_state_reason}), algorithm={algo}, "
            f"{'attached' if self.attached else 'finalized'})"
        )

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"masks": self.masks.state_dict()}
        if self.algorithm is not None:
            state["algorithm"] = self.algorithm.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks (shape-checked against the model) and algorithm state."""
        if not isinstance(state, Mapping) or "masks" not in state:
            raise SparseforgeError(
                f"sparsifier state is a {type(state).__name__} without 'masks'; "
                "allowed: the dict from Sparsifier.state_dict()"
            )
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
