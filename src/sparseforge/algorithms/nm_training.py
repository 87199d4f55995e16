"""N:M sparse training from scratch: SR-STE and Progressive Gradient Flow.

Unlike the :class:`~sparseforge.sparsifier.Sparsifier`, which keeps pruned weights at zero, these
methods keep **dense** weights during training and apply the N:M mask in the forward pass only:

* the forward uses ``W * mask``, where ``mask`` keeps the ``n_keep`` largest ``|W|`` in every group
  of ``m`` consecutive inputs (:class:`~sparseforge.structures.NM`), recomputed from the dense
  weights every ``mask_interval`` optimizer steps (1 = every step, as in SR-STE);
* the backward passes the gradient straight through to the dense weight (STE), with
  - **SR-STE** (Zhou et al., ICLR 2021): ``dL/dW = g + decay * (1 - mask) * W``, where ``g`` is the
    gradient with respect to the masked weight and ``decay`` is the paper's ``lambda_w``;
  - **Progressive Gradient Flow** (Bambhaniya et al., 2024): the gradient reaching pruned
    elements is scaled, ``dL/dW = g * (mask + beta_t * (1 - mask))``, by a factor ``beta_t``
    decaying over training (:class:`GradientFlowSchedule`), so that high N:M sparsity (1:8)
    stays trainable: early on pruned weights receive the full gradient and can swap in,
    late the mask settles.
  Both combine: ``dL/dW = g * (mask + beta_t (1 - mask)) + decay * (1 - mask) * W``. The decay
  term is added once per use of the weight in a forward (as in the reference SR-STE code), so a
  weight used twice (tied) or over accumulated micro-batches gets it once per use.

Mechanism (no parametrization, no renamed parameters): for each N:M layer a forward *pre*-hook
puts the masked tensor ``_NMMaskFunction.apply(W, mask, ...)`` in ``module._parameters["weight"]``
for the duration of that module's forward (the same swap ``torch.func.functional_call`` does),
and a forward hook registered with ``always_call=True`` puts the dense ``nn.Parameter`` back, even
if the forward raises. Outside a module's forward, ``model.weight`` *is* the dense parameter, so
parameter names, ``named_parameters()``, ``state_dict()`` keys, the optimizer and DDP's reducer
all see the dense parameter; autograd routes the gradient to it through the custom function.
Steps are counted by an optimizer step post hook (completed optimizer steps, counted once), which
also refreshes the masks when due. ``beta_t`` uses the step count at the time of the forward.

``finalize()`` removes every hook, multiplies the weights by the masks in use and returns a
:class:`~sparseforge.masks.MaskState` that is exactly N:M; train further with a ``Sparsifier``
if wanted. Note: ``model.state_dict()`` holds dense weights until ``finalize()``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_float
from ..masks import MaskState, check_materialized, unwrap
from ..sparsifier import attached_owner, check_optimizer_owns
from ..structures import NM, parse_structure
from ..targets import DEFAULT_PRUNABLE_TYPES, ExcludeItem, select_prunable

__all__ = ["GradientFlowSchedule", "NMTraining", "srste", "progressive_gradient_flow", "SCHEDULE_KINDS"]

SCHEDULE_KINDS = ("linear", "cosine", "exponential")


@dataclass(frozen=True)
class GradientFlowSchedule:
    """``beta_t``: the factor on the gradient reaching pruned weights after ``t`` completed steps.

    Decays from ``start`` at ``t = 0`` to ``end`` at ``t >= total_steps`` (clamped), by ``kind``:
    ``linear``: ``start + (end - start) * t/T``; ``cosine``: ``end + (start - end) * (1 + cos(pi t/T)) / 2``;
    ``exponential``: ``start * (end / start) ** (t/T)`` (needs ``end > 0``). Unitless, in [0, 1].
    """

    total_steps: int
    start: float = 1.0
    end: float = 0.0
    kind: str = "cosine"

    def __post_init__(self) -> None:
        if isinstance(self.total_steps, bool) or not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise SparseforgeError(f"total_steps={self.total_steps!r} is not allowed; allowed: an integer >= 1")
        for value, name in ((self.start, "start"), (self.end, "end")):
            check_float(value, name, low=0.0, high=1.0)
        if self.kind not in SCHEDULE_KINDS:
            raise SparseforgeError(f"kind={self.kind!r} is not recognised; allowed: {list(SCHEDULE_KINDS)}")
        if self.kind == "exponential" and (self.end <= 0.0 or self.start <= 0.0):
            raise SparseforgeError(
                f"kind='exponential' needs start > 0 and end > 0, got start={self.start!r}, end={self.end!r}"
            )

    def __call__(self, step: int) -> float:
        frac = min(max(step, 0) / self.total_steps, 1.0)
        if self.kind == "linear":
            return self.start + (self.end - self.start) * frac
        if self.kind == "cosine":
            return self.end + (self.start - self.end) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.start * (self.end / self.start) ** frac


class _NMMaskFunction(torch.autograd.Function):
    """Forward ``W * mask``; backward ``g * (mask + scale * (1 - mask)) + decay * (1 - mask) * W``."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, mask: torch.Tensor, decay: float, scale: float) -> torch.Tensor:
        ctx.save_for_backward(weight, mask)
        ctx.decay = decay
        ctx.scale = scale
        return weight * mask

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        weight, mask = ctx.saved_tensors
        pruned = 1.0 - mask
        out = grad if ctx.scale == 1.0 else grad * (mask + ctx.scale * pruned)
        if ctx.decay != 0.0:
            out = out + ctx.decay * pruned * weight
        return out, None, None, None


def _check_nm(structure: NM | str) -> NM:
    parsed = parse_structure(structure)
    if not isinstance(parsed, NM):
        raise SparseforgeError(
            f"structure={structure!r} is not an N:M pattern; allowed: NM(n_keep, m) or 'N:M', e.g. '2:4'"
        )
    if parsed.n_keep < 1:
        raise SparseforgeError(f"structure={parsed!r} keeps no weight; allowed: n_keep >= 1")
    return parsed


class NMTraining:
    """Train dense weights whose forward is N:M sparse (SR-STE / Progressive Gradient Flow).

    Args:
        model: the model (a DDP wrapper is fine: masks are computed from the dense weights,
            identical on every rank, so ranks agree without communication).
        optimizer: the optimizer stepping the model's parameters (steps are counted on it).
        structure: ``NM(n_keep, m)`` or ``"N:M"`` (kept:group), e.g. ``"2:4"``, ``"1:4"``, ``"1:8"``.
        decay: SR-STE's ``lambda_w`` (>= 0, units of 1/step of gradient per weight unit); 0 = plain STE.
        pruned_grad_scale: ``beta``, the factor on the gradient reaching pruned weights: a number in
            [0, 1] or a function of the completed step count (e.g. :class:`GradientFlowSchedule`).
        mask_interval: recompute masks from ``|W|`` after every ``mask_interval`` steps (>= 1).
        exclude: module-name patterns or types kept dense (see ``select_prunable``).
        first_last_dense: keep the first and last prunable layers dense.
        include_types: module types whose weights get N:M.

    The optimizer must hold every N:M layer's weight, and no other NMTraining or
    :class:`~sparseforge.sparsifier.Sparsifier` may be attached to it (the Sparsifier zeroes the
    very weights this class keeps dense); ``finalize()`` or ``remove()`` frees it.

    Not a :class:`~sparseforge.sparsifier.Sparsifier` algorithm, so ``zero_state`` does not
    apply: pruned weights are *meant* to stay dense here, and nothing masks them per step.
    """

    #: Marks the bound step hook of this class for :func:`sparseforge.sparsifier.attached_owner`.
    _sparseforge_hook_owner = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        structure: NM | str = "2:4",
        *,
        decay: float = 2e-4,
        pruned_grad_scale: float | Callable[[int], float] = 1.0,
        mask_interval: int = 1,
        exclude: Sequence[ExcludeItem] = (),
        first_last_dense: bool = False,
        include_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    ) -> None:
        self.structure = _check_nm(structure)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SparseforgeError(f"optimizer is a {type(optimizer).__name__}; allowed: a torch.optim.Optimizer")
        try:
            decay = float(decay)
        except (TypeError, ValueError):
            raise SparseforgeError(f"decay={decay!r} is not a number; allowed: a float >= 0") from None
        if not math.isfinite(decay) or decay < 0:
            raise SparseforgeError(f"decay={decay!r} is not allowed; allowed: a finite float >= 0")
        if not callable(pruned_grad_scale):
            check_float(pruned_grad_scale, "pruned_grad_scale", low=0.0, high=1.0)
        if isinstance(mask_interval, bool) or not isinstance(mask_interval, int) or mask_interval < 1:
            raise SparseforgeError(f"mask_interval={mask_interval!r} is not allowed; allowed: an integer >= 1")
        check_materialized(model)
        owner = attached_owner(optimizer)
        if owner is not None:
            raise SparseforgeError(
                f"the optimizer already has an attached {type(owner).__name__}; allowed: one at a time "
                "(call its finalize() first)"
            )
        self.model = model
        self.optimizer = optimizer
        self.decay = decay
        self.pruned_grad_scale = pruned_grad_scale
        self.mask_interval = mask_interval
        self.step = 0
        bare = unwrap(model)
        self.params: dict[str, nn.Parameter] = select_prunable(
            bare, exclude=exclude, include_types=include_types, first_last_dense=first_last_dense
        )
        for name, param in self.params.items():
            self.structure.check_shape(tuple(param.shape), name)
        check_optimizer_owns(optimizer, self.params)
        owners: dict[int, str] = {id(p): n for n, p in self.params.items()}
        # every module using a selected weight (tied weights: several modules, one parameter)
        self._modules: list[tuple[str, nn.Module]] = []
        for module in bare.modules():
            weight = module._parameters.get("weight")
            if weight is not None and id(weight) in owners:
                self._modules.append((owners[id(weight)], module))
        self._masks: dict[str, torch.Tensor] = {}
        self._refresh_masks()
        self._handles: list[Any] = []
        for name, module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._make_pre_hook(name)))
            self._handles.append(module.register_forward_hook(self._make_post_hook(name), always_call=True))
        self._handles.append(optimizer.register_step_post_hook(self._post_step))

    # -- masks -------------------------------------------------------------------------------
    @torch.no_grad()
    def _refresh_masks(self) -> None:
        for name, param in self.params.items():
            keep = self.structure.mask_from_scores(param.detach().abs())
            self._masks[name] = keep.to(param.dtype)

    def current_scale(self) -> float:
        """``beta_t`` at the current step count."""
        s = self.pruned_grad_scale
        return float(s(self.step)) if callable(s) else float(s)

    @property
    def masks(self) -> MaskState:
        """The masks the forward currently uses (a copy), as a :class:`MaskState`."""
        target = 1.0 - self.structure.fixed_density
        return MaskState(
            {n: m.bool() for n, m in self._masks.items()}, step=self.step, targets={n: target for n in self._masks}
        )

    # -- hooks -------------------------------------------------------------------------------
    def _make_pre_hook(self, name: str) -> Callable[[nn.Module, Any], None]:
        param = self.params[name]

        def pre_hook(module: nn.Module, args: Any) -> None:
            mask = self._masks[name]
            if mask.device != param.device or mask.dtype != param.dtype:
                mask = self._masks[name] = mask.to(device=param.device, dtype=param.dtype)
            module._parameters["weight"] = _NMMaskFunction.apply(param, mask, self.decay, self.current_scale())

        return pre_hook

    def _make_post_hook(self, name: str) -> Callable[[nn.Module, Any, Any], None]:
        param = self.params[name]

        def post_hook(module: nn.Module, args: Any, output: Any) -> None:
            module._parameters["weight"] = param

        return post_hook

    def _post_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.step += 1
        if self.step % self.mask_interval == 0:
            self._refresh_masks()

    # -- lifecycle ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook without touching the weights (they stay dense)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for name, module in self._modules:
            module._parameters["weight"] = self.params[name]

    @torch.no_grad()
    def finalize(self) -> MaskState:
        """Remove every hook, zero the weights the masks in use prune, return exact N:M masks."""
        masks = self.masks
        self.remove()
        for name, param in self.params.items():
            param.mul_(self._masks[name])
        return masks

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def state_dict(self) -> dict[str, Any]:
        """The step count (masks are a function of the weights and are recomputed on load)."""
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self._refresh_masks()


def srste(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    structure: NM | str = "2:4",
    *,
    decay: float = 2e-4,
    mask_interval: int = 1,
    **kwargs: Any,
) -> NMTraining:
    """SR-STE: straight-through N:M training with sparse-refined decay ``decay * (1 - mask) * W``."""
    return NMTraining(
        model, optimizer, structure, decay=decay, pruned_grad_scale=1.0, mask_interval=mask_interval, **kwargs
    )


def progressive_gradient_flow(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    structure: NM | str = "1:8",
    *,
    total_steps: int,
    start: float = 1.0,
    end: float = 0.0,
    kind: str = "cosine",
    decay: float = 0.0,
    mask_interval: int = 1,
    **kwargs: Any,
) -> NMTraining:
    """Progressive Gradient Flow: the pruned weights' gradient factor decays ``start -> end`` over
    ``total_steps`` optimizer steps (``kind``: linear, cosine, exponential); ``decay`` adds SR-STE's term."""
    schedule = GradientFlowSchedule(total_steps, start, end, kind)
    return NMTraining(
        model, optimizer, structure, decay=decay, pruned_grad_scale=schedule, mask_interval=mask_interval, **kwargs
    )
