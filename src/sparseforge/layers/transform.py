"""Rewrite a model's linear layers into their Sparse-IFT form, with iso-FLOP masks."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SparseforgeError, check_int, check_sparsity
from ..masks import MaskState, check_module, unwrap
from .budget import split_exactly
from .doped import SparseDoped
from .factorized import SparseFactorized
from .parallel import SparseParallel

__all__ = ["TRANSFORMS", "transform"]

#: The per-layer transformations :func:`transform` knows.
TRANSFORMS = ("parallel", "factorized", "doped")


def _random_mask(shape: torch.Size, kept: int, generator: torch.Generator) -> torch.Tensor:
    flat = torch.zeros(math.prod(shape), dtype=torch.bool)
    flat[torch.randperm(flat.numel(), generator=generator)[:kept]] = True
    return flat.reshape(shape)


def _replacement(layer: nn.Linear, kind: str, sparsity: float) -> tuple[nn.Module, dict[str, int]]:
    """The new module and the kept count of each of its sparse weights (by name inside it)."""
    n_in, n_out = layer.in_features, layer.out_features
    dense = n_in * n_out
    if kind == "parallel":
        branches = max(1, round(1.0 / (1.0 - sparsity)))
        module: nn.Module = SparseParallel.from_linear(layer, branches)
        counts = split_exactly(dense, [dense] * branches)
        return module, {f"branches.{b}.weight": k for b, k in enumerate(counts)}
    if kind == "factorized":
        rank = max(1, math.ceil(dense / ((1.0 - sparsity) * (n_in + n_out)) - 1e-9))
        module = SparseFactorized.from_linear(layer, rank)
        kept_v, kept_u = split_exactly(dense, [rank * n_in, n_out * rank])
        return module, {"v.weight": kept_v, "u.weight": kept_u}
    rank = math.floor(sparsity * dense / (n_in + n_out))
    module = SparseDoped.from_linear(layer, rank)
    return module, {"sparse.weight": dense - rank * (n_in + n_out)}


def transform(
    model: nn.Module,
    kind: str,
    sparsity: float,
    *,
    exclude: Sequence[str] = (),
    seed: int = 0,
) -> tuple[nn.Module, MaskState]:
    """Replace every ``nn.Linear`` of ``model`` (in place) by its Sparse-IFT form at ``sparsity``.

    Args:
        model: any module holding ``nn.Linear`` layers (a DDP or compiled wrapper is unwrapped).
        kind: ``"parallel"``, ``"factorized"`` or ``"doped"`` (see the classes).
        sparsity: the fraction of zeros the transformation is sized for, in ``[0, 1)``. Sparse
            Parallel rounds ``1 / (1 - sparsity)`` to a whole number of branches.
        exclude: glob patterns over module names left dense (e.g. ``["classifier"]``); each must
            match a linear layer.
        seed: the random initial masks (uniform positions, exact counts).

    Returns ``(model, masks)``: the masks cover every new sparse weight, and their kept counts
    (plus the dense low-rank weights of Sparse Doped) add up to each replaced layer's
    ``in_features x out_features``: the same multiply-adds per input as the dense layer. Pruned
    weights are set to zero. Train with a :class:`~sparseforge.Sparsifier` and any algorithm
    that keeps per-layer counts (static, SET, RigL) to stay iso-FLOP.
    """
    model = unwrap(check_module(model))
    if kind not in TRANSFORMS:
        raise SparseforgeError(f"transformation {kind!r} is not known; allowed: {', '.join(TRANSFORMS)}")
    sparsity = check_sparsity(sparsity)
    seed = check_int(seed, "seed", 0)
    if isinstance(exclude, str) or not all(isinstance(p, str) for p in exclude):
        raise SparseforgeError(f"exclude={exclude!r} is not allowed; allowed: a list of glob patterns")
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise SparseforgeError(f"{type(model).__name__} has no nn.Linear layer to transform")
    if any(name == "" for name, _ in linears):
        raise SparseforgeError("the model itself is an nn.Linear; allowed: a module that holds it (e.g. nn.Sequential)")
    for pattern in exclude:
        if not any(fnmatch.fnmatchcase(name, pattern) for name, _ in linears):
            raise SparseforgeError(
                f"exclude pattern {pattern!r} matches no linear layer; allowed: names such as "
                f"{', '.join(name for name, _ in linears[:4])}"
            )
    chosen = [(n, m) for n, m in linears if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    generator = torch.Generator().manual_seed(seed)
    masks: dict[str, torch.Tensor] = {}
    targets: dict[str, float] = {}
    for name, layer in chosen:
        new, counts = _replacement(layer, kind, sparsity)
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
