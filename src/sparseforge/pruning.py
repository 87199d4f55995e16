"""One-shot pruning of any PyTorch model: ``sparseforge.prune(model, sparsity=0.9, ...)``.

Combines the independent pieces: layer selection (:mod:`targets`), a score (:mod:`scores`), a
layer-wise budget (:mod:`distributions`) and a structure (:mod:`structures`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import scores as score_fns
from .distributions import DISTRIBUTIONS, global_masks, layer_sparsities
from .errors import SparseforgeError, check_float, check_int, check_seed, check_sparsity
from .masks import MaskState, check_materialized
from .structures import Structure, Unstructured, parse_structure
from .targets import DEFAULT_PRUNABLE_TYPES, ExcludeItem, select_prunable

__all__ = ["prune", "METHODS", "masks_for_scores", "validate_options"]

METHODS = ("magnitude", "random", "snip", "grasp", "synflow", "movement")
_NEEDS_DATA = ("snip", "grasp", "movement")


def _resolve_sparsity(sparsity: float | None, structure: Structure) -> float:
    fixed = structure.fixed_density
    if fixed is not None:
        if sparsity is not None and abs(float(sparsity) - (1.0 - fixed)) > 1e-9:
            raise SparseforgeError(
                f"sparsity={sparsity!r} conflicts with structure {structure!r}, which fixes sparsity at "
                f"{1 - fixed:g}; pass sparsity=None or {1 - fixed:g}"
            )
        return 1.0 - fixed
    if sparsity is None:
        raise SparseforgeError(f"sparsity=None needs a structure that fixes it (N:M); {structure!r} does not")
    if isinstance(sparsity, (str, bytes, bool)):
        raise SparseforgeError(f"sparsity={sparsity!r} is not a number; allowed: a float in [0, 1)")
    return check_sparsity(sparsity)


def _check_no_empty_layer(
    shapes: Mapping[str, Sequence[int]], sparsity: float, structure: Structure, distribution: str
) -> None:
    """Refuse a budget that leaves a layer with no weight at all (a disconnected network).

    Only shape-only distributions are checked here (``global`` has its per-layer floor). Runs on
    shapes alone, so it fails before any score is computed.
    """
    if distribution == "global" or structure.fixed_density is not None:
        return
    targets = layer_sparsities(shapes, sparsity, distribution)
    for name, shape in shapes.items():
        if structure.kept_count(shape, 1.0 - targets[name]) == 0:
            raise SparseforgeError(
                f"sparsity={sparsity:g} with distribution={distribution!r} and {structure!r} keeps no weight of "
                f"{name!r} (shape {tuple(shape)}, layer sparsity {targets[name]:.4g}); allowed: a lower sparsity, "
                "distribution='erk' or 'global', or exclude=[...] that layer"
            )


def masks_for_scores(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    structure: Structure = Unstructured(),
    distribution: str = "uniform",
    min_density: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Masks (``True`` = kept) and per-layer target sparsities for given scores.

    ``sparsity`` is the fraction of zeros over the scored (prunable) layers. For ``global`` each
    layer keeps at least ``min_density`` of its weights (default: a tenth of the average density).
    """
    shapes = {n: tuple(s.shape) for n, s in scores.items()}
    if structure.fixed_density is not None:
        if distribution != "uniform":
            raise SparseforgeError(
                f"distribution={distribution!r} cannot be used with {structure!r}, which fixes every layer's "
                "sparsity; allowed: 'uniform'"
            )
        targets = {n: 1.0 - structure.fixed_density for n in shapes}
    elif distribution == "global":
        if not isinstance(structure, Unstructured):
            raise SparseforgeError(
                f"distribution='global' supports only unstructured pruning, not {structure!r}; "
                "allowed for this structure: uniform, er, erk"
            )
        floor = 0.1 * (1.0 - sparsity) if min_density is None else min_density
        return global_masks(scores, sparsity, min_density=floor)
    elif distribution in DISTRIBUTIONS:
        targets = layer_sparsities(shapes, sparsity, distribution)
    else:
        raise SparseforgeError(f"distribution={distribution!r} is not recognised; allowed: {list(DISTRIBUTIONS)}")
    masks = {n: structure.mask_from_scores(scores[n], 1.0 - targets[n]) for n in shapes}
    return masks, targets


def _input_shape(data: Any, input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if data is None:
        raise SparseforgeError("method='synflow' needs input_shape=(features...) or data to read it from")
    x = next(iter(score_fns.iter_batches(data)))[0]
    return tuple(x.shape[1:])


def validate_options(
    sparsity: float | None, method: str, structure: str | Structure, distribution: str
) -> tuple[float, Structure]:
    """Check pruning options before any work is done; return (sparsity, structure)."""
    if not isinstance(method, str) or method not in METHODS:
        raise SparseforgeError(f"method={method!r} is not recognised; allowed: {list(METHODS)}")
    if not isinstance(distribution, str) or distribution not in DISTRIBUTIONS:
        raise SparseforgeError(f"distribution={distribution!r} is not recognised; allowed: {list(DISTRIBUTIONS)}")
    structure = parse_structure(structure)
    return _resolve_sparsity(sparsity, structure), structure


def prune(
    model: nn.Module,
    sparsity: float | None = None,
    *,
    method: str = "magnitude",
    structure: str | Structure = "unstructured",
    distribution: str = "uniform",
    exclude: Sequence[ExcludeItem] = (),
    first_last_dense: bool = False,
    include_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    data: tuple[torch.Tensor, torch.Tensor] | Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    min_density: float | None = None,
    synflow_rounds: int = 100,
    skip_incompatible: bool = False,
) -> MaskState:
    """Prune ``model`` in place in one shot and return its :class:`MaskState`.

    Args:
        sparsity: fraction of zeros over the prunable weights, in [0, 1). ``None`` only with an
            N:M structure, which fixes it (``NM(2, 4)`` -> 0.5).
        method: score: ``magnitude``, ``random`` (seeded by ``seed``), ``snip``, ``grasp``,
            ``movement`` (these three need ``data``), or ``synflow`` (data-free, iterative,
            ``synflow_rounds`` rounds; needs ``input_shape`` or ``data``).
        structure: a :class:`Structure` or its name (``unstructured``, ``2:4``, ``block:4x4``,
            ``channel``, ``fanin``).
        distribution: layer-wise budget: ``uniform``, ``er``, ``erk`` or ``global``.
        exclude: module-name patterns or module types to keep dense (a pattern matching nothing
            is an error); ``first_last_dense`` keeps the first and last prunable layers dense.
        data: one ``(inputs, targets)`` batch or an iterable of them, for data-driven scores.
        min_density: for ``global``, the least fraction each layer keeps.
        skip_incompatible: leave layers the structure cannot tile (e.g. fan-in 4 under 1:8)
            dense instead of raising; their names are in the returned state's ``skipped``.

    Every argument is checked before any score is computed or any weight changes, including the
    ones the chosen method ignores (``seed``, ``min_density``, ``synflow_rounds``,
    ``input_shape``). The model must hold real weights (not on the ``meta`` device), and a budget
    that leaves some layer with no weight at all (e.g. 0.9 uniform on a 4-weight layer next to a
    large one) is refused.
    """
    sparsity, structure = validate_options(sparsity, method, structure, distribution)
    check_materialized(model)
    seed = check_seed(seed)
    if min_density is not None:
        min_density = check_float(min_density, "min_density", low=0.0, high=1.0)
    check_int(synflow_rounds, "synflow_rounds", 1)
    if input_shape is not None:
        score_fns._check_input_shape(input_shape)
    if loss_fn is not None and not callable(loss_fn):
        raise SparseforgeError(f"loss_fn={loss_fn!r} is not callable; allowed: loss_fn(output, targets) -> scalar")
    params = select_prunable(model, exclude=exclude, include_types=include_types, first_last_dense=first_last_dense)
    skipped: list[str] = []
    for name, param in list(params.items()):
        try:
            structure.check_shape(tuple(param.shape), name)
        except SparseforgeError:
            if not skip_incompatible:
                raise
            skipped.append(name)
            del params[name]
    if not params:
        raise SparseforgeError(f"no prunable layer fits structure {structure!r}; skipped {skipped[:5]}")
    if method in _NEEDS_DATA and data is None:
        raise SparseforgeError(f"method={method!r} needs data: an (inputs, targets) batch or an iterable of batches")
    _check_no_empty_layer({n: tuple(p.shape) for n, p in params.items()}, sparsity, structure, distribution)

    def build(scores: Mapping[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
        return masks_for_scores(
            scores, 1.0 - density, structure=structure, distribution=distribution, min_density=min_density
        )[0]

    if method == "synflow":
        masks = score_fns.synflow_masks(
            model,
            params,
            input_shape=_input_shape(data, input_shape),
            mask_fn=build,
            density=1.0 - sparsity,
            rounds=synflow_rounds,
        )
        targets = {n: 1.0 - float(m.float().mean()) for n, m in masks.items()}
    else:
        if method == "magnitude":
            scores = score_fns.magnitude(params)
        elif method == "random":
            scores = score_fns.random_scores(params, seed=seed)
        else:
            assert data is not None  # snip, grasp and movement (_NEEDS_DATA) were refused above without data
            if method == "snip":
                scores = score_fns.snip(model, params, data, loss_fn=loss_fn)
            elif method == "grasp":
                scores = score_fns.grasp(model, params, data, loss_fn=loss_fn)
            else:
                scores = score_fns.movement(model, params, data, loss_fn=loss_fn)
        masks, targets = masks_for_scores(
            scores, sparsity, structure=structure, distribution=distribution, min_density=min_density
        )
    state = MaskState(masks, targets=targets)
    state.skipped = skipped
    state.apply(model)
    return state
