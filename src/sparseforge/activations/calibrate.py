"""Training-free activation sparsity: per-layer magnitude thresholds calibrated to a target (TEAL, CATS).

For each chosen linear layer, the magnitudes of its inputs over the calibration tokens are
sampled, and the threshold is their ``sparsity`` quantile: at run time the layer zeroes every
input entry of magnitude at most the threshold (:class:`ThresholdedLinear`), which drops about
``sparsity`` of its inputs on data like the calibration set. The thresholds come from the dense
model's activations (TEAL's greedy per-layer calibration is not applied: every layer sees the
dense model's inputs), so one forward pass over the calibration data suffices.

Where the thresholds go (``where``):

- ``"mlp"``: every input of the MLP (the hidden state its up/gate layers read, and the hidden
  activation its down layer reads): what "MLP-input sparsity" means here;
- ``"mlp-down"``: only the MLP hidden activation (CATS sparsifies there);
- ``"all"``: every linear layer of the blocks (attention too; TEAL's setting).
"""

from __future__ import annotations

import fnmatch
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_int, check_sparsity
from ..masks import check_module, unwrap
from ..oneshot.blocks import find_blocks
from ..oneshot.layers import find_linear_layers
from .collect import CalibrationData, for_each_input
from .sites import find_mlps
from .thresholded import ThresholdedLinear

__all__ = [
    "WHERE",
    "ActivationThresholds",
    "LayerThreshold",
    "apply_thresholds",
    "sparsify_activations",
    "threshold_layers",
]

#: The places :func:`sparsify_activations` can put thresholds.
WHERE = ("mlp", "mlp-down", "all")


@dataclass(frozen=True)
class LayerThreshold:
    """One layer's threshold (input units) and the fraction of its inputs it dropped on the calibration data."""

    name: str
    threshold: float
    sparsity: float


@dataclass(frozen=True)
class ActivationThresholds:
    """What :func:`sparsify_activations` did: the target, where, and every layer's threshold."""

    target: float
    where: str
    layers: tuple[LayerThreshold, ...]
    tokens: int
    seconds: float

    @property
    def mean_sparsity(self) -> float:
        """Mean over layers of the calibration sparsity (each layer weighs the same)."""
        return sum(layer.sparsity for layer in self.layers) / max(1, len(self.layers))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (:meth:`from_dict` reads it back)."""
        return {
            "target": self.target,
            "where": self.where,
            "tokens": self.tokens,
            "seconds": self.seconds,
            "mean_sparsity": self.mean_sparsity,
            "layers": [{"name": x.name, "threshold": x.threshold, "sparsity": x.sparsity} for x in self.layers],
        }

    @classmethod
    def from_dict(cls, data: object) -> ActivationThresholds:
        """Read what :meth:`to_dict` wrote (e.g. a JSON file); bad content raises a one-line error."""
        allowed = "allowed: the dict ActivationThresholds.to_dict() writes"
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), list):
            raise SparseforgeError(f"activation thresholds of type {type(data).__name__} without 'layers'; {allowed}")
        layers = []
        for item in data["layers"]:
            if not isinstance(item, Mapping) or not isinstance(item.get("name"), str):
                raise SparseforgeError(f"activation threshold entry {item!r} has no layer name; {allowed}")
            t, s = item.get("threshold"), item.get("sparsity")
            ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (t, s))
            if not ok or t < 0 or not 0 <= s < 1:  # type: ignore[operator]
                raise SparseforgeError(
                    f"activation threshold entry for {item['name']} has threshold={t!r}, sparsity={s!r}; "
                    "allowed: a threshold >= 0 and a sparsity in [0, 1)"
                )
            layers.append(LayerThreshold(item["name"], float(t), float(s)))  # type: ignore[arg-type]
        target = data.get("target", math.nan)
        return cls(
            float(target) if isinstance(target, (int, float)) else math.nan,
            str(data.get("where", "mlp")),
            tuple(layers),
            int(data.get("tokens", 0)) if isinstance(data.get("tokens", 0), int) else 0,
            float(data.get("seconds", 0.0)) if isinstance(data.get("seconds", 0.0), (int, float)) else 0.0,
        )


def threshold_layers(model: nn.Module, where: str = "mlp", exclude: Sequence[str] = ()) -> list[str]:
    """Names of the linear layers ``where`` selects (see the module docstring), minus ``exclude`` globs.

    Only ``nn.Linear`` layers can take a threshold; a transformers ``Conv1D`` (GPT-2) is refused.
    Every exclude pattern must match a selected layer.
    """
    model = unwrap(check_module(model))
    if where not in WHERE:
        raise SparseforgeError(f"where={where!r} is not known; allowed: {', '.join(WHERE)}")
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise SparseforgeError(f"exclude={exclude!r} is not allowed; allowed: a list of glob patterns")
    if where == "all":
        blocks_name, blocks = find_blocks(model)
        prefixes = tuple(f"{blocks_name}.{i}." if blocks_name else f"{i}." for i in range(len(blocks)))
        names = [layer.name for layer in find_linear_layers(model, exclude=()) if layer.name.startswith(prefixes)]
    else:
        names = []
        for site in find_mlps(model):
            names += ([*site.up, site.down]) if where == "mlp" else [site.down]
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise SparseforgeError(
                f"exclude pattern {pattern!r} matches none of the {len(names)} layers where={where!r} selects "
                f"(e.g. {', '.join(names[:3])}); allowed: patterns matching those names"
            )
    chosen = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    for name in chosen:
        layer = model.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(
                f"layer {name} is a {type(layer).__name__}; allowed: nn.Linear layers (transformers' Conv1D of "
                "GPT-2 stores its weight transposed and cannot take an input threshold)"
            )
    if not chosen:
        raise SparseforgeError(f"where={where!r} with exclude={list(exclude)!r} leaves no layer to threshold")
    return chosen


def _token_count(calibration: CalibrationData) -> int:
    ids: object = calibration
    if isinstance(calibration, Mapping):
        ids = calibration.get("input_ids")
    elif isinstance(calibration, (tuple, list)):
        ids = calibration[0] if calibration else None
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


class _Sampler:
    """Uniform random samples (with replacement) of each layer's input magnitudes, at most ``budget`` in all."""

    def __init__(self, budget: int, tokens: int, widths: Mapping[str, int], seed: int) -> None:
        self.fraction = {name: min(1.0, budget / max(1, tokens * width)) for name, width in widths.items()}
        self.parts: dict[str, list[torch.Tensor]] = {name: [] for name in widths}
        self.generator = torch.Generator().manual_seed(seed)

    def visit(self, name: str, rows: torch.Tensor) -> None:
        values = rows.detach().abs().reshape(-1).float().cpu()
        if self.fraction[name] < 1.0:
            k = max(1, math.ceil(self.fraction[name] * values.numel()))
            values = values[torch.randint(0, values.numel(), (k,), generator=self.generator)]
        self.parts[name].append(values)

    def sorted(self, name: str) -> torch.Tensor:
        return torch.cat(self.parts[name]).sort().values


def _quantile_threshold(values: torch.Tensor, sparsity: float) -> float:
    """The smallest sampled magnitude ``t`` with at least ``sparsity`` of the samples ``<= t`` (0 at sparsity 0)."""
    k = math.ceil(sparsity * values.numel() - 1e-9)
    return 0.0 if k <= 0 else float(values[k - 1])


def _dropped(values: torch.Tensor, threshold: float) -> float:
    """Fraction of the sorted ``values`` that are ``<= threshold``."""
    return float(torch.searchsorted(values, torch.tensor([threshold]), right=True)) / max(1, values.numel())


def _choose(name: str, values: torch.Tensor, target: float, thresholds: Mapping[str, float] | None) -> LayerThreshold:
    """One layer's threshold from its sorted sampled input magnitudes, checked not to drop them all."""
    if thresholds is not None:
        value = thresholds[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise SparseforgeError(f"threshold {value!r} for {name} is not allowed; allowed: a finite number >= 0")
        t = float(value)
    else:
        t = _quantile_threshold(values, target)
    dropped = _dropped(values, t)
    if dropped >= 1.0:
        raise SparseforgeError(
            f"threshold {t:.4g} drops every calibration input of layer {name} (largest magnitude "
            f"{float(values[-1]):.4g}), which would zero its output; allowed: a threshold below that "
            "(a lower sparsity)"
        )
    return LayerThreshold(name, t, dropped)


def apply_thresholds(model: nn.Module, thresholds: ActivationThresholds) -> list[str]:
    """Give a model the thresholds of an earlier calibration (e.g. read back with ``from_dict``), in place.

    No data is needed: each named ``nn.Linear`` becomes (or stays) a :class:`ThresholdedLinear`
    with the recorded threshold and calibrated sparsity. Every name must be an ``nn.Linear`` of
    the model (checked before anything changes). Returns the names.
    """
    model = unwrap(check_module(model))
    if not isinstance(thresholds, ActivationThresholds):
        raise SparseforgeError(
            f"thresholds of type {type(thresholds).__name__}; allowed: an ActivationThresholds (from_dict reads JSON)"
        )
    for item in thresholds.layers:
        try:
            layer = model.get_submodule(item.name)
        except AttributeError:
            raise SparseforgeError(
                f"layer {item.name!r} is not in the model; allowed: thresholds calibrated on it"
            ) from None
        if not isinstance(layer, nn.Linear):
            raise SparseforgeError(f"layer {item.name} is a {type(layer).__name__}; allowed: nn.Linear layers")
    for item in thresholds.layers:
        layer = model.get_submodule(item.name)
        if not isinstance(layer, ThresholdedLinear):
            assert isinstance(layer, nn.Linear)
            layer = ThresholdedLinear.from_linear(layer)
            model.set_submodule(item.name, layer)
        layer.set_threshold(item.threshold, min(item.sparsity, 1.0 - 1e-6))
    return [item.name for item in thresholds.layers]


def sparsify_activations(
    model: nn.Module,
    calibration: CalibrationData,
    *,
    sparsity: float | None = None,
    thresholds: Mapping[str, float] | None = None,
    where: str = "mlp",
    exclude: Sequence[str] = (),
    batch_size: int = 8,
    samples_per_layer: int = 1 << 20,
    seed: int = 0,
    passes: int = 2,
) -> ActivationThresholds:
    """Give the chosen linear layers of a transformer input thresholds, in place (no training).

    Args:
        model: a transformer whose blocks :func:`~sparseforge.oneshot.find_blocks` finds (any
            ``transformers`` model built of ``nn.Linear`` layers, or your own).
        calibration: token ids ``(n_samples, seqlen)``, or with an attention mask, exactly as
            :func:`~sparseforge.oneshot.prune_model` takes them (and checked the same way).
        sparsity: the fraction of each layer's input entries to drop, in ``[0, 1)`` (default 0.5);
            each layer's threshold is that quantile of its input magnitudes on the calibration data.
        thresholds: instead of ``sparsity``, explicit thresholds by layer name (every chosen layer
            needs one); the calibration data then only measures what they drop.
        where: ``"mlp"``, ``"mlp-down"`` or ``"all"`` (see the module docstring).
        exclude: glob patterns over layer names left without a threshold.
        batch_size: calibration samples per forward.
        samples_per_layer: input magnitudes sampled per layer for the quantiles (at random, seeded
            by ``seed``); a million gives quantiles within about 0.1 points.
        passes: calibration passes. The first reads the dense model's activations; each further
            pass recalibrates every layer on its inputs with the thresholds of the layers before
            it in place, as they will be at run time (a layer reading a thresholded layer's output
            otherwise drifts from its target: 2 points on a tiny random Llama). One pass with
            explicit ``thresholds``.

    Layers already thresholded are recalibrated (their inputs are read before their own
    threshold). A threshold that drops every calibration input of a layer is refused (naming the
    layer), as it would zero the layer's output. Returns an :class:`ActivationThresholds`.
    """
    start = time.perf_counter()
    model = unwrap(check_module(model))
    names = threshold_layers(model, where, exclude)
    if thresholds is not None:
        if sparsity is not None:
            raise SparseforgeError("sparsity and thresholds were both given; allowed: one of them")
        if not isinstance(thresholds, Mapping):
            raise SparseforgeError(
                f"thresholds={thresholds!r} is not allowed; allowed: a mapping of layer name -> number"
            )
        missing = [n for n in names if n not in thresholds]
        unknown = [n for n in thresholds if n not in names]
        if missing or unknown:
            raise SparseforgeError(
                f"thresholds {'lack ' + missing[0] if missing else 'name ' + unknown[0]}; allowed: exactly the "
                f"{len(names)} layers where={where!r} selects (e.g. {', '.join(names[:3])})"
            )
        target = float("nan")
    else:
        target = check_sparsity(0.5 if sparsity is None else sparsity)
    samples_per_layer = check_int(samples_per_layer, "samples_per_layer", minimum=1000)
    seed = check_int(seed, "seed", minimum=0)
    passes = check_int(passes, "passes", minimum=1, maximum=10)
    layers = {name: model.get_submodule(name) for name in names}
    widths = {name: int(getattr(layer, "in_features", 1)) for name, layer in layers.items()}
    tokens = 0
    chosen: list[LayerThreshold] = []
    for _ in range(passes if thresholds is None else 1):
        sampler = _Sampler(samples_per_layer, _token_count(calibration), widths, seed)
        tokens = for_each_input(model, calibration, layers, sampler.visit, batch_size=batch_size)
        chosen = [_choose(name, sampler.sorted(name), target, thresholds) for name in names]
        apply_thresholds(model, ActivationThresholds(target, where, tuple(chosen), tokens, 0.0))
        layers = {name: model.get_submodule(name) for name in names}
    return ActivationThresholds(target, where, tuple(chosen), tokens, time.perf_counter() - start)
