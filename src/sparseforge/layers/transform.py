"""Rewrite a model's Linear and convolution layers into their Sparse-IFT form, with iso-FLOP masks."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_int, check_sparsity
from ..masks import MaskState, check_module, unwrap
from .base import REPLACEABLE, check_layer
from .doped import SparseDoped
from .factorized import SparseFactorized
from .parallel import SparseParallel
from .wide import widen

__all__ = ["TRANSFORMS", "transform"]

#: The transformations :func:`transform` knows.
TRANSFORMS = ("wide", "parallel", "factorized", "doped")
_PER_LAYER: dict[str, type[SparseParallel] | type[SparseFactorized] | type[SparseDoped]] = {
    "parallel": SparseParallel,
    "factorized": SparseFactorized,
    "doped": SparseDoped,
}


def _random_mask(shape: torch.Size, kept: int, generator: torch.Generator) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=generator)[:kept]] = True
    return flat.reshape(shape)


def _example(layers: list[tuple[str, nn.Module]], example: Any) -> Any:
    """The batch that traces the model for ``wide``: ``example``, or zeros for a model whose first
    layer is a Linear (two rows of its ``in_features``)."""
    if example is not None:
        return example
    name, first = layers[0]
    if not isinstance(first, nn.Linear):
        raise SparseforgeError(
            f"wide traces the model with an example batch, and its first layer {name!r} is a "
            f"{type(first).__name__} whose input length is not known; allowed: example= one input batch"
        )
    return torch.zeros(2, first.in_features, device=first.weight.device, dtype=first.weight.dtype)


def transform(
    model: nn.Module,
    kind: str,
    sparsity: float,
    *,
    exclude: Sequence[str] = (),
    seed: int = 0,
    example: Any = None,
) -> tuple[nn.Module, MaskState]:
    """Rewrite ``model`` (in place) into its Sparse-IFT form at ``sparsity``: same FLOPs, more weights.

    Args:
        model: a module holding ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers
            (convolutions with ``groups=1``; exclude others); a DDP or compiled wrapper is unwrapped.
        kind: ``"parallel"``, ``"factorized"`` or ``"doped"`` replace every layer by
            :class:`SparseParallel`, :class:`SparseFactorized` or :class:`SparseDoped` of the same
            type and geometry. ``"wide"`` widens every hidden width (outputs of one layer, inputs
            of the next) by ``k = 1 / sqrt(1 - sparsity)``, rounded to whole units: for models
            whose layers form a chain (see :mod:`sparseforge.layers.wide`); the model's input and
            output widths stay, norms between widened layers are rebuilt, and **widened layers are
            freshly initialised** (trained from scratch, as in the paper).
        sparsity: the fraction of zeros the transformation is sized for, in ``[0, 1)``. At 0,
            ``parallel`` (one branch), ``doped`` (rank 0) and ``wide`` (``k = 1``) compute the
            dense model. A sparsity above 0 that leaves no sparse shape (one branch, rank 0, a
            width that rounds to itself, more branches than weights) is refused with the
            sparsities that work.
        exclude: glob patterns over module names left dense (e.g. ``["classifier"]``); each must
            match a Linear or convolution. For ``wide``, an excluded layer also keeps its widths,
            so the widths on both sides of it are not widened.
        seed: the random initial masks (uniform positions, exact counts).
        example: ``wide`` only: one input batch to trace the model (default: zeros of two rows
            when the first layer is a Linear; needed when it is a convolution).

    Returns ``(model, masks)``. The masks cover every new weight that is sparse (a ``wide`` layer
    whose widths did not change gets an all-kept mask), and their kept counts (plus the dense
    low-rank weights of Sparse Doped) add up to each replaced layer's weight count: ``in x out``
    (``x kernel`` for a convolution). A layer's multiply-adds are its kept weights per input row
    (Linear) or per output position (convolution), and every part keeps the dense layer's output
    positions, so **equal kept counts are equal FLOPs, exactly**, per layer and per sample.
    Pruned weights are set to zero. Train with a :class:`~sparseforge.Sparsifier` and an algorithm
    that keeps per-layer counts (static, SET, RigL) to stay iso-FLOP.
    """
    model = unwrap(check_module(model))
    if kind not in TRANSFORMS:
        raise SparseforgeError(f"transformation {kind!r} is not known; allowed: {', '.join(TRANSFORMS)}")
    sparsity = check_sparsity(sparsity)
    seed = check_int(seed, "seed", 0)
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise SparseforgeError(f"exclude={exclude!r} is not allowed; allowed: a list of glob patterns")
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, REPLACEABLE)]
    if not layers:
        raise SparseforgeError(f"{type(model).__name__} has no nn.Linear, nn.Conv1d or nn.Conv2d layer to transform")
    if any(name == "" for name, _ in layers):
        raise SparseforgeError(
            f"the model itself is a {type(model).__name__} layer; allowed: a module that holds it (e.g. nn.Sequential)"
        )
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in layers):
            raise SparseforgeError(
                f"exclude pattern {pattern!r} matches no Linear or convolution layer; allowed: names such as "
                f"{', '.join(name for name, _ in layers[:4])}"
            )
    excluded = {n for n, _ in layers if any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    changes: list[tuple[str, nn.Module, dict[str, int]]] = []
    if kind == "wide":
        changes = widen(model, sparsity, excluded, _example(layers, example))
    else:
        for name, layer in layers:
            if name not in excluded:
                check_layer(layer, name)  # every refusal before the model changes
        for name, layer in layers:
            if name not in excluded:
                replacement, counts = _PER_LAYER[kind].iso_flop(layer, sparsity, name)
                changes.append((name, replacement, counts))
    generator = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    targets: dict[str, float] = {}
    for name, new, counts in changes:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        params = dict(new.named_parameters())
        for sub, kept in counts.items():
            weight = params[sub]
            mask = _random_mask(weight.shape, kept, generator).to(weight.device)
            with torch.no_grad():
                weight.mul_(mask)
            masks[f"{name}.{sub}"] = mask
            targets[f"{name}.{sub}"] = 1.0 - kept / weight.numel()
    return model, MaskState(masks, targets=targets)
