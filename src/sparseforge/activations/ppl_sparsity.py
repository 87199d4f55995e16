"""PPL-p% sparsity (Sparsing Law): the activation sparsity at which perplexity rises by p percent.

One CETT target for every layer sets each MLP's hidden-activation threshold (:mod:`.cett`); a
larger target drops more activations and raises the perplexity. Bisection over the target finds
the largest one whose perplexity stays within ``(1 + p/100)`` of the dense model's, and the
PPL-p% sparsity is the fraction of MLP hidden activations that target drops on the evaluation
data. It makes models with different activation functions comparable on one performance-aware
scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_float, check_int
from ..masks import check_module, unwrap
from ..oneshot.evaluate import perplexity
from .cett import cett_threshold, down_inputs
from .collect import CalibrationData
from .measure import measure_activations
from .thresholded import ThresholdedLinear
from .topk import TopKLinear

__all__ = ["PPLSparsity", "ppl_p_sparsity"]


@dataclass(frozen=True)
class PPLSparsity:
    """The result of :func:`ppl_p_sparsity`; ``trials`` holds every ``(cett, sparsity, perplexity)`` tried."""

    p: float
    sparsity: float
    cett: float
    perplexity: float
    dense_perplexity: float
    trials: tuple[tuple[float, float, float], ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "sparsity": self.sparsity,
            "cett": self.cett,
            "perplexity": self.perplexity,
            "dense_perplexity": self.dense_perplexity,
            "trials": [list(t) for t in self.trials],
        }


def ppl_p_sparsity(
    model: nn.Module,
    calibration: CalibrationData,
    eval_ids: torch.Tensor,
    p: float = 1.0,
    *,
    steps: int = 8,
    max_tokens: int = 4096,
    batch_size: int = 8,
) -> PPLSparsity:
    """The PPL-p% sparsity of a causal LM's MLP hidden activations.

    Args:
        model: a causal LM (``model(input_ids=...).logits``); left as it was on return.
        calibration: token ids for the CETT thresholds.
        eval_ids: token ids ``(windows, seqlen)`` for perplexity and the measured sparsity.
        p: the allowed perplexity rise in percent (> 0).
        steps: bisection steps over the CETT target in [0, 1].
    """
    model = unwrap(check_module(model))
    p = check_float(p, "p", low=0.0, low_open=True, high=1000.0)
    steps = check_int(steps, "steps", minimum=1, maximum=50)
    inputs = down_inputs(model, calibration, max_tokens=max_tokens, batch_size=batch_size)
    originals = {name: model.get_submodule(name) for name in inputs}
    for name, layer in originals.items():
        if isinstance(layer, TopKLinear):
            raise SparseforgeError(
                f"layer {name} keeps the top {layer.k} activations, which CETT thresholds would replace; allowed: "
                "models without top-k layers (measure a top-k model's sparsity with measure_activations)"
            )
    dense_nll, _ = perplexity(model, eval_ids, batch_size=batch_size)
    dense = math.exp(dense_nll)
    limit = dense * (1.0 + p / 100.0)
    trials: list[tuple[float, float, float]] = []

    def attempt(target: float) -> tuple[float, float]:
        for name, (h, weight) in inputs.items():
            layer = originals[name]
            assert isinstance(layer, nn.Linear)
            model.set_submodule(name, ThresholdedLinear.from_linear(layer, cett_threshold(h, weight, target)))
        nll, _ = perplexity(model, eval_ids, batch_size=batch_size)
        sparsity = measure_activations(model, eval_ids, layers=list(inputs), batch_size=batch_size).mean_below
        trials.append((target, sparsity, math.exp(nll)))
        return sparsity, math.exp(nll)

    best = (0.0, *attempt(0.0))
    try:
        lo, hi = 0.0, 1.0
        for _ in range(steps):
            mid = 0.5 * (lo + hi)
            sparsity, ppl = attempt(mid)
            if ppl <= limit:
                lo, best = mid, (mid, sparsity, ppl)
            else:
                hi = mid
    finally:
        for name, layer in originals.items():
            model.set_submodule(name, layer)
    return PPLSparsity(p, best[1], best[0], best[2], dense, tuple(trials))
