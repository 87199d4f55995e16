"""MaskState: the one place masks live.

Masks are bool tensors keyed by *canonical* parameter name (the name in the bare model, without a
DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix). They are stored once, here, and not as
buffers on the model, so ``model.state_dict()`` keys never change while a model is sparse.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .errors import SparseforgeError

__all__ = ["MaskState", "canonical_name", "check_materialized", "check_module", "named_parameters", "unwrap"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """Strip DDP (``module.``) and ``torch.compile`` (``_orig_mod.``) prefixes from a name."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None) if isinstance(model, nn.parallel.DistributedDataParallel) else None
        inner = inner if inner is not None else getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of ``model`` keyed by canonical name (tied parameters appear once)."""
    return {canonical_name(n): p for n, p in model.named_parameters()}


def check_module(model: object, name: str = "model") -> nn.Module:
    """Return ``model`` if it is a ``torch.nn.Module``, else raise :class:`SparseforgeError`."""
    if not isinstance(model, nn.Module):
        raise SparseforgeError(f"{name} is a {type(model).__name__}; allowed: a torch.nn.Module")
    return model


def check_materialized(model: nn.Module, name: str = "model") -> None:
    """Raise if ``model`` is not a module or any parameter lives on the ``meta`` device.

    A meta tensor has a shape but no values: masks computed from it would be garbage and applying
    masks to it does nothing, so models built with ``torch.device("meta")`` must be loaded first.
    """
    check_module(model, name)
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for key, tensor in items:
            if tensor is not None and tensor.is_meta:
                raise SparseforgeError(
                    f"{kind} {canonical_name(key)!r} is on the meta device; load real weights first "
                    "(e.g. model.to_empty(device=...) then load_state_dict)"
                )


def _check_step(step: object) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise SparseforgeError(f"step={step!r} is not allowed; allowed: an integer >= 0 (completed optimizer steps)")
    return int(step)


def _check_targets(targets: object) -> dict[str, float]:
    if targets is None:
        return {}
    if not isinstance(targets, Mapping):
        raise SparseforgeError(f"targets is a {type(targets).__name__}; allowed: a dict name -> sparsity in [0, 1]")
    out: dict[str, float] = {}
    for key, value in targets.items():
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0
        if not isinstance(key, str) or not ok or math.isnan(float(value)):
            raise SparseforgeError(
                f"targets[{key!r}]={value!r} is not allowed; allowed: str names -> sparsity in [0, 1]"
            )
        out[key] = float(value)
    return out


class MaskState:
    """Bool masks keyed by canonical parameter name, plus the step count and per-layer targets.

    ``True`` marks a kept weight. ``step`` counts completed optimizer steps (the Sparsifier
    increments it once per step, nowhere else). ``targets`` records each layer's target sparsity
    (fraction of zeros) as chosen by the distribution.
    """

    def __init__(
        self,
        masks: Mapping[str, torch.Tensor] | None = None,
        *,
        step: int = 0,
        targets: Mapping[str, float] | None = None,
    ) -> None:
        if masks is not None and not isinstance(masks, Mapping):
            raise SparseforgeError(f"masks is a {type(masks).__name__}; allowed: a dict name -> bool tensor")
        self._masks: dict[str, torch.Tensor] = {}
        self.step = _check_step(step)
        self.targets: dict[str, float] = _check_targets(targets)
        #: Prunable layers left dense because the structure could not tile them (informational).
        self.skipped: list[str] = []
        for name, mask in (masks or {}).items():
            self[name] = mask

    # -- mapping interface -------------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        """Store ``mask`` as bool. Non-bool masks must hold only 0 and 1 (e.g. a float 0/1 mask)."""
        if not isinstance(name, str):
            raise SparseforgeError(f"mask name {name!r} is a {type(name).__name__}; allowed: a str parameter name")
        if not isinstance(mask, torch.Tensor):
            raise SparseforgeError(f"mask for {name!r} is a {type(mask).__name__}; allowed: a bool torch.Tensor")
        if name in self._masks and self._masks[name].shape != mask.shape:
            raise SparseforgeError(
                f"mask for {name!r} has shape {tuple(mask.shape)}; expected {tuple(self._masks[name].shape)}"
            )
        if mask.dtype != torch.bool and not mask.is_meta and bool(((mask != 0) & (mask != 1)).any()):
            raise SparseforgeError(
                f"mask for {name!r} has dtype {mask.dtype} with values other than 0 and 1; "
                "allowed: a bool tensor (True = kept) or a 0/1 tensor"
            )
        self._masks[name] = mask.detach().to(torch.bool)

    def __contains__(self, name: object) -> bool:
        return name in self._masks

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def names(self) -> list[str]:
        return list(self._masks)

    def items(self) -> list[tuple[str, torch.Tensor]]:
        return list(self._masks.items())

    # -- statistics --------------------------------------------------------------------------
    def _known(self, name: str) -> torch.Tensor:
        if name not in self._masks:
            raise SparseforgeError(f"mask {name!r} is not in this MaskState; allowed: {sorted(self._masks)[:5]}")
        return self._masks[name]

    def nnz(self, name: str | None = None) -> int:
        """Number of kept weights in one layer, or over all masked layers."""
        if name is not None:
            return int(self._known(name).sum())
        return sum(int(m.sum()) for m in self._masks.values())

    def numel(self, name: str | None = None) -> int:
        """Number of weights (kept or not) in one layer, or over all masked layers."""
        if name is not None:
            return self._known(name).numel()
        return sum(m.numel() for m in self._masks.values())

    def sparsity(self, name: str | None = None) -> float:
        """Fraction of zeros in one layer, or over all masked layers."""
        total = self.numel(name)
        return 1.0 - self.nnz(name) / total if total else 0.0

    # -- applying ----------------------------------------------------------------------------
    def resolve(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """Map each mask to the model's parameter, checking that names and shapes match."""
        params = named_parameters(check_module(model))
        resolved: dict[str, nn.Parameter] = {}
        for name, mask in self._masks.items():
            if name not in params:
                raise SparseforgeError(
                    f"mask {name!r} names no parameter of the model; model has e.g. {sorted(params)[:5]}"
                )
            param = params[name]
            if param.shape != mask.shape:
                raise SparseforgeError(
                    f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has shape {tuple(param.shape)}"
                )
            resolved[name] = param
        return resolved

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every masked-out weight of ``model`` in place (a meta-device model is refused)."""
        check_materialized(model)
        for name, param in self.resolve(model).items():
            mask = self._masks[name]
            if mask.device != param.device:
                mask = self._masks[name] = mask.to(param.device)
            param.mul_(mask)

    # -- (de)serialisation ------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and numbers only (safe for ``torch.load(weights_only=True)``)."""
        return {
            "masks": {name: mask.clone() for name, mask in self._masks.items()},
            "step": self.step,
            "targets": dict(self.targets),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace masks, step and targets from :meth:`state_dict` output (validated)."""
        if not isinstance(state, Mapping) or "masks" not in state:
            raise SparseforgeError("mask state is not a dict with a 'masks' entry; it is not a sparseforge mask state")
        masks = state["masks"]
        if not isinstance(masks, Mapping):
            raise SparseforgeError(f"mask state 'masks' is a {type(masks).__name__}; allowed: a dict of bool tensors")
        new: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise SparseforgeError(f"mask {name!r} is not a bool tensor; the mask state is corrupted")
            if name in self._masks and self._masks[name].shape != mask.shape:
                raise SparseforgeError(
                    f"mask {name!r} has shape {tuple(mask.shape)}; expected {tuple(self._masks[name].shape)}"
                )
            new[name] = mask.clone()
        step = _check_step(state.get("step", 0))
        targets = _check_targets(state.get("targets", {}))
        self._masks = new
        self.step = step
        self.targets = targets

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> MaskState:
        out = cls()
        out.load_state_dict(state)
        return out

    def __repr__(self) -> str:
        return f"MaskState({len(self)} masks, sparsity={self.sparsity():.4f}, step={self.step})"
