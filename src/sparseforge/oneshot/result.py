"""What one-shot pruning of one layer returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["LayerResult"]


@dataclass
class LayerResult:
    """The outcome for one layer.

    ``mask`` (bool, shaped like the weight, ``True`` = kept); ``weight``: the updated weight where
    the method changes the kept weights (SparseGPT), else ``None`` (the caller multiplies the old
    weight by the mask); ``info``: numbers for the report (e.g. the dampening SparseGPT used).
    """

    mask: torch.Tensor
    weight: torch.Tensor | None = None
    info: dict[str, float] = field(default_factory=dict)
