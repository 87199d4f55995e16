"""How sparse a model's activations are: per layer, and per token within a layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError
from ..masks import check_module, unwrap
from .calibrate import threshold_layers
from .collect import CalibrationData, for_each_input
from .thresholded import ThresholdedLinear
from .topk import TopKLinear, keep_topk

__all__ = ["ActivationReport", "LayerActivity", "measure_activations"]

_QUANTILES = (0.1, 0.5, 0.9)


@dataclass(frozen=True)
class LayerActivity:
    """One layer's input sparsity over the measured tokens (fractions in [0, 1]).

    ``zero``: fraction of input entries exactly 0; ``below``: fraction with ``|x| <= threshold``
    (the layer's own threshold for a :class:`ThresholdedLinear`, else the one asked for);
    ``per_token``: the 10th, 50th and 90th percentile over tokens of each token's ``below``
    fraction, and ``token_min`` / ``token_max`` its extremes.
    """

    name: str
    width: int
    threshold: float
    zero: float
    below: float
    per_token: tuple[float, float, float]
    token_min: float
    token_max: float


@dataclass(frozen=True)
class ActivationReport:
    """:func:`measure_activations`'s result: one :class:`LayerActivity` per layer, and the tokens seen."""

    layers: tuple[LayerActivity, ...]
    tokens: int

    @property
    def mean_below(self) -> float:
        """Mean over layers of ``below`` (each layer weighs the same)."""
        return sum(x.below for x in self.layers) / max(1, len(self.layers))

    @property
    def mean_zero(self) -> float:
        """Mean over layers of ``zero``."""
        return sum(x.zero for x in self.layers) / max(1, len(self.layers))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "mean_below": self.mean_below,
            "mean_zero": self.mean_zero,
            "layers": [
                {
                    "name": x.name,
                    "width": x.width,
                    "threshold": x.threshold,
                    "zero": x.zero,
                    "below": x.below,
                    "per_token_p10_p50_p90": list(x.per_token),
                    "token_min": x.token_min,
                    "token_max": x.token_max,
                }
                for x in self.layers
            ],
        }


class _Counts:
    def __init__(self, thresholds: Mapping[str, float], topk: Mapping[str, int]) -> None:
        self.thresholds = thresholds
        self.topk = topk
        self.zero = dict.fromkeys(thresholds, 0)
        self.entries = dict.fromkeys(thresholds, 0)
        self.per_token: dict[str, list[torch.Tensor]] = {name: [] for name in thresholds}

    def visit(self, name: str, rows: torch.Tensor) -> None:
        if name in self.topk:  # what a top-k layer multiplies
            rows = keep_topk(rows, self.topk[name])
        magnitude = rows.detach().abs()
        self.zero[name] += int((magnitude == 0).sum())
        self.entries[name] += magnitude.numel()
        below = (magnitude <= self.thresholds[name]).float().mean(dim=1)
        self.per_token[name].append(below.cpu())


def measure_activations(
    model: nn.Module,
    data: CalibrationData,
    *,
    where: str = "mlp-down",
    layers: Sequence[str] | None = None,
    threshold: float | Mapping[str, float] | None = None,
    batch_size: int = 8,
) -> ActivationReport:
    """Measure the input sparsity of a transformer's layers on ``data`` (token ids, as for calibration).

    Args:
        model: a transformer (blocks found by :func:`~sparseforge.oneshot.find_blocks`).
        data: token ids ``(n, seqlen)`` or with an attention mask (padding is not counted).
        where: which layers' inputs (``"mlp-down"``: the MLP hidden activation; ``"mlp"``;
            ``"all"``), unless ``layers`` names them.
        threshold: magnitude at or below which an entry counts as inactive, one number or one per
            layer name; ``None``: each :class:`ThresholdedLinear`'s own threshold, else 0 (exact
            zeros only).

    The inputs are read as the layers receive them, before their own thresholding (so ``below``
    is what a :class:`ThresholdedLinear`'s own threshold drops); a :class:`TopKLinear`'s input is
    counted after its top-k, i.e. as the layer multiplies it.
    """
    model = unwrap(check_module(model))
    names = list(layers) if layers is not None else threshold_layers(model, where)
    modules: dict[str, nn.Module] = {}
    for name in names:
        try:
            modules[name] = model.get_submodule(name)
        except AttributeError:
            raise SparseforgeError(f"layer {name!r} is not in the model; allowed: names of its linear layers") from None
    limits: dict[str, float] = {}
    for name, module in modules.items():
        if isinstance(threshold, Mapping):
            if name not in threshold:
                raise SparseforgeError(f"threshold has no entry for {name}; allowed: one per measured layer")
            value: object = threshold[name]
        elif threshold is None:
            value = float(module.input_threshold) if isinstance(module, ThresholdedLinear) else 0.0
        else:
            value = threshold
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise SparseforgeError(f"threshold {value!r} for {name} is not allowed; allowed: a number >= 0")
        limits[name] = float(value)
    counts = _Counts(limits, {n: m.k for n, m in modules.items() if isinstance(m, TopKLinear)})
    tokens = for_each_input(model, data, modules, counts.visit, batch_size=batch_size)
    report: list[LayerActivity] = []
    for name, module in modules.items():
        per_token = torch.cat(counts.per_token[name])
        q = torch.quantile(per_token, torch.tensor(_QUANTILES))
        entries = max(1, counts.entries[name])
        report.append(
            LayerActivity(
                name=name,
                width=int(getattr(module, "in_features", 0)),
                threshold=limits[name],
                zero=counts.zero[name] / entries,
                below=float(per_token.mean()),
                per_token=(float(q[0]), float(q[1]), float(q[2])),
                token_min=float(per_token.min()),
                token_max=float(per_token.max()),
            )
        )
    return ActivationReport(tuple(report), tokens)
