"""CETT (ReLU² Wins): the largest threshold whose dropped activations change a layer's output by at most ``t``.

For a layer ``y = W h`` reading the MLP hidden activation ``h``, dropping the entries with
``|h_i| <= threshold`` removes the contributions ``h_i W[:, i]``. Their cumulative error of tail
truncation, per token, is ``||W (h * [|h| <= threshold])|| / ||W h||`` (bias excluded). The CETT
threshold of a layer for a target ``t`` is the largest threshold whose mean over tokens stays
``<= t``. A single ``t`` for every layer gives each layer its own threshold: layers whose small
activations matter less get larger ones.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import SparseforgeError, check_float, check_int
from ..masks import check_module, unwrap
from .collect import CalibrationData, for_each_input
from .sites import find_mlps

__all__ = ["cett", "cett_threshold", "cett_thresholds", "down_inputs"]


def cett(h: torch.Tensor, weight: torch.Tensor, threshold: float) -> float:
    """Mean over the rows of ``h`` (tokens, in) of ``||W (h * [|h| <= threshold])|| / ||W h||``.

    ``weight`` is ``(out, in)``. Rows whose full output is zero are left out of the mean (0 if
    all are).
    """
    dropped = torch.where(h.abs() <= threshold, h, torch.zeros((), dtype=h.dtype))
    full = (h @ weight.T).norm(dim=1)
    part = (dropped @ weight.T).norm(dim=1)
    keep = full > 0
    if not bool(keep.any()):
        return 0.0
    return float((part[keep] / full[keep]).mean())


def cett_threshold(h: torch.Tensor, weight: torch.Tensor, target: float, candidates: int = 4096) -> float:
    """The largest threshold (in ``h``'s units) with :func:`cett` ``<= target``, found by bisection.

    The thresholds tried are the quantiles of ``|h|`` (``candidates`` of them, plus 0); the CETT
    grows with the threshold except for cancellations between dropped terms, which bisection
    tolerates. Returns 0 when even dropping only the exact zeros exceeds ``target``.
    """
    target = check_float(target, "cett", low=0.0, high=1.0)
    h = h.float()
    weight = weight.float()
    magnitudes = h.abs().reshape(-1)
    if magnitudes.numel() > candidates:
        q = torch.linspace(0, 1, candidates, dtype=torch.float64)
        values = torch.quantile(magnitudes.double(), q).float()
    else:
        values = magnitudes.sort().values
    values = torch.cat([torch.zeros(1), values]).unique()
    lo, hi = 0, values.numel() - 1  # values[lo] satisfies the target (threshold 0 drops only zeros)
    if cett(h, weight, float(values[hi])) <= target:
        return float(values[hi])
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cett(h, weight, float(values[mid])) <= target:
            lo = mid
        else:
            hi = mid
    return float(values[lo])


def down_inputs(
    model: nn.Module, calibration: CalibrationData, *, max_tokens: int = 4096, batch_size: int = 8, seed: int = 0
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per MLP down layer: ``(h, weight)``, up to ``max_tokens`` random rows of its input and its ``(out, in)`` weight."""
    model = unwrap(check_module(model))
    max_tokens = check_int(max_tokens, "max_tokens", minimum=1)
    generator = torch.Generator().manual_seed(check_int(seed, "seed", minimum=0))
    layers = {site.down: model.get_submodule(site.down) for site in find_mlps(model)}
    rows: dict[str, list[torch.Tensor]] = {name: [] for name in layers}

    def visit(name: str, x: torch.Tensor) -> None:
        rows[name].append(x.detach().float().cpu())

    for_each_input(model, calibration, layers, visit, batch_size=batch_size)
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, layer in layers.items():
        h = torch.cat(rows[name])
        if h.shape[0] > max_tokens:
            h = h[torch.randperm(h.shape[0], generator=generator)[:max_tokens]]
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != h.shape[1]:
            raise SparseforgeError(f"layer {name} has no (out, {h.shape[1]}) weight; allowed: an nn.Linear")
        out[name] = (h, weight.detach().float().cpu())
    return out


def cett_thresholds(
    model: nn.Module,
    calibration: CalibrationData,
    target: float = 0.2,
    *,
    max_tokens: int = 4096,
    batch_size: int = 8,
    seed: int = 0,
) -> dict[str, float]:
    """The CETT threshold of every MLP's down layer (the MLP hidden activation), by layer name.

    Up to ``max_tokens`` calibration tokens per layer are drawn at random (seeded) for the
    bisection. Use the result as ``thresholds=`` of :func:`sparsify_activations` with
    ``where="mlp-down"``.
    """
    target = check_float(target, "cett", low=0.0, high=1.0)
    inputs = down_inputs(model, calibration, max_tokens=max_tokens, batch_size=batch_size, seed=seed)
    return {name: cett_threshold(h, weight, target) for name, (h, weight) in inputs.items()}
