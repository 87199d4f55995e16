"""One-shot pruning of pretrained models, layer by layer on calibration data.

The maths is a set of small pure functions of ``(weight, input statistics, sparsity, structure)``
that return a :class:`LayerResult` (a mask and, where the method says so, updated weights).
"""

from __future__ import annotations

from .dsnot import refine_dsnot
from .magnitude import prune_magnitude
from .owl import block_outlier_ratio, outlier_ratio, owl_sparsities
from .registry import METHODS, Method, get_method
from .result import LayerResult
from .ria import prune_ria, ria_scores
from .scoring import mask_from_scores
from .sparsegpt import prune_sparsegpt
from .stats import InputStats
from .wanda import prune_wanda, wanda_scores

__all__ = [
    "METHODS",
    "InputStats",
    "LayerResult",
    "Method",
    "block_outlier_ratio",
    "get_method",
    "mask_from_scores",
    "outlier_ratio",
    "owl_sparsities",
    "prune_magnitude",
    "prune_ria",
    "prune_sparsegpt",
    "prune_wanda",
    "refine_dsnot",
    "ria_scores",
    "wanda_scores",
]

# the sequential driver (model-agnostic: blocks found by structure, block inputs captured by a hook)
from .blocks import find_blocks  # noqa: E402
from .capture import BlockCall, Captured, capture_block_inputs  # noqa: E402
from .driver import BlockReport, LayerReport, OneShotReport, available_methods, prune_model  # noqa: E402
from .layers import DEFAULT_EXCLUDE, LinearLayer, find_linear_layers  # noqa: E402

__all__ += [
    "DEFAULT_EXCLUDE",
    "BlockCall",
    "BlockReport",
    "Captured",
    "LayerReport",
    "LinearLayer",
    "OneShotReport",
    "available_methods",
    "capture_block_inputs",
    "find_blocks",
    "find_linear_layers",
    "prune_model",
]

# OWL and DSnoT as options of the driver
from .driver import OWL, DSnoT  # noqa: E402

__all__ += ["OWL", "DSnoT"]

# pretrained transformers in and out: local folders only (load, calibration text, atomic save)
from .io import (  # noqa: E402
    MASKS_FILE,
    REPORT_FILE,
    calibration_ids,
    check_pruned_out,
    load_masks,
    load_transformer,
    save_pruned,
    text_windows,
)

__all__ += [
    "MASKS_FILE",
    "REPORT_FILE",
    "calibration_ids",
    "check_pruned_out",
    "load_masks",
    "load_transformer",
    "save_pruned",
    "text_windows",
]

# pruned models with packed layers: written by save_pruned(packed=True), loaded ready to run fast
from .packed import PACKED_FILE, LoadedModel, load  # noqa: E402

__all__ += ["PACKED_FILE", "LoadedModel", "load"]
