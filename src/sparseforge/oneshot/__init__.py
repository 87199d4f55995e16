"""One-shot pruning of pretrained models, layer by layer on calibration data.

The maths is a set of small pure functions of ``(weight, input statistics, sparsity, structure)``
that return a :class:`LayerResult` (a mask and, where the method says so, updated weights).
"""

from __future__ import annotations

from .magnitude import prune_magnitude
from .result import LayerResult
from .scoring import mask_from_scores
from .stats import InputStats
from .wanda import prune_wanda, wanda_scores

__all__ = ["InputStats", "LayerResult", "mask_from_scores", "prune_magnitude", "prune_wanda", "wanda_scores"]
