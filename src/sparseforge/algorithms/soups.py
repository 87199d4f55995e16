"""Sparse Model Soups (Zimmer et al., 2024): prune, retrain several copies, average them.

Each cycle ``c = 1..cycles``:

1. prune the current model by global magnitude of its surviving weights to sparsity
   ``s_c = 1 - (1 - final_sparsity)^(c / cycles)`` (as in :mod:`~sparseforge.algorithms.imp`);
2. retrain ``ingredients`` copies on that *same* mask, each with its own seed (the caller's batch
   order, dropout, ...) and optionally its own weight decay, each under a
   :class:`~sparseforge.sparsifier.Sparsifier` so its pruned weights stay exactly zero;
3. average the copies' ``state_dict`` entries (``"uniform"`` soup) or greedily add copies in order
   of their ``eval_fn`` score while the soup's score does not drop (``"greedy"``, Wortsman et al.
   2022). An average of weights that are zero at the same positions is zero there, so the soup
   keeps the mask exactly;
4. evaluate soup and ingredients, and start the next cycle from the soup.

Callables (plain functions; module-level ones when ``workers > 1`` with ``start_method="spawn"``):

* ``make_optimizer(model, ingredient: Ingredient) -> Optimizer``; use ``ingredient.weight_decay``
  when it is not ``None``.
* ``train_fn(model, optimizer, ingredient) -> Any``; use ``ingredient.seed`` for the batch order.
  The global torch RNG is also seeded with ``ingredient.seed`` around the call (and restored).
* ``eval_fn(model) -> float`` (higher is better, e.g. accuracy on held-out data). Optional for
  the uniform soup; required for the greedy one.

Float entries of the state dict (weights, biases, BatchNorm running statistics) are averaged;
integer entries (``num_batches_tracked``) are taken from the first ingredient.

Parallelism: ``workers=1`` (default) trains the copies one after another in this process.
``workers > 1`` trains them in a pool of ``min(workers, ingredients)`` processes
(``torch.multiprocessing``), each with ``torch.set_num_threads(1)``; ``start_method="fork"``
(default, POSIX) lets closures be used, ``"spawn"`` needs picklable callables.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_float, check_seed, check_sparsity
from ..masks import MaskState, check_materialized, unwrap
from ..sparsifier import Sparsifier
from ..targets import DEFAULT_PRUNABLE_TYPES, ExcludeItem, select_prunable
from .imp import prune_surviving, round_sparsities

__all__ = ["Ingredient", "SoupCycle", "SoupHistory", "average_states", "sparse_model_soups", "SOUP_KINDS"]

SOUP_KINDS = ("uniform", "greedy")


@dataclass(frozen=True)
class Ingredient:
    """One copy to retrain: ``cycle`` (1-based), ``index`` (0-based), its seed and weight decay."""

    cycle: int
    index: int
    seed: int
    weight_decay: float | None
    sparsity: float


@dataclass(frozen=True)
class SoupCycle:
    """One cycle's outcome.

    ``sparsity``: measured fraction of zeros over the prunable weights of the soup.
    ``soup_metric`` / ``ingredient_metrics``: ``eval_fn`` results (``None`` without ``eval_fn``).
    ``in_soup``: indices of the ingredients averaged into the soup.
    """

    cycle: int
    target_sparsity: float
    sparsity: float
    soup_metric: float | None
    ingredient_metrics: list[float | None]
    ingredient_results: list[Any]
    in_soup: list[int]

    @property
    def best_ingredient_metric(self) -> float | None:
        values = [m for m in self.ingredient_metrics if m is not None]
        return max(values) if values else None


@dataclass
class SoupHistory:
    cycles: list[SoupCycle] = field(default_factory=list)


def average_states(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Entry-wise mean of floating-point tensors; other entries come from the first state.

    The mean is ``sum(states) / len(states)``, accumulated in the tensors' dtype in order.
    """
    if not states:
        raise SparseforgeError("average_states got no states; allowed: at least one state dict")
    keys = list(states[0])
    for i, state in enumerate(states[1:], start=1):
        if list(state) != keys:
            raise SparseforgeError(f"state {i} has keys {sorted(state)[:3]}...; expected the keys of state 0")
        for key in keys:
            if tuple(state[key].shape) != tuple(states[0][key].shape) or state[key].dtype != states[0][key].dtype:
                raise SparseforgeError(
                    f"state {i}[{key!r}] has shape {tuple(state[key].shape)} and dtype {state[key].dtype}; "
                    f"allowed: those of state 0, {tuple(states[0][key].shape)} and {states[0][key].dtype}"
                )
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        first = states[0][key]
        if first.is_floating_point():
            total = first.detach().clone()
            for state in states[1:]:
                total += state[key].detach()
            out[key] = total / len(states)
        else:
            out[key] = first.detach().clone()
    return out


# -- training one ingredient ----------------------------------------------------------------------


@dataclass
class _Job:
    model: nn.Module
    masks: dict[str, torch.Tensor]
    targets: dict[str, float]
    make_optimizer: Callable[[nn.Module, Ingredient], torch.optim.Optimizer]
    train_fn: Callable[[nn.Module, torch.optim.Optimizer, Ingredient], Any]
    eval_fn: Callable[[nn.Module], float] | None


def _train_ingredient(job: _Job, ingredient: Ingredient) -> tuple[dict[str, torch.Tensor], Any, float | None]:
    model = copy.deepcopy(job.model)
    masks = MaskState({n: m.clone() for n, m in job.masks.items()}, targets=job.targets)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ingredient.seed)
        optimizer = job.make_optimizer(model, ingredient)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise SparseforgeError(
                f"make_optimizer returned a {type(optimizer).__name__}; allowed: a torch.optim.Optimizer"
            )
        sparsifier = Sparsifier(model, optimizer, masks)
        try:
            result = job.train_fn(model, optimizer, ingredient)
        finally:
            sparsifier.finalize()
    metric = job.eval_fn(model) if job.eval_fn is not None else None
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, result, metric


_WORKER_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _WORKER_JOB
    torch.set_num_threads(1)
    _WORKER_JOB = job


def _worker(ingredient: Ingredient) -> tuple[dict[str, torch.Tensor], Any, float | None]:
    assert _WORKER_JOB is not None
    return _train_ingredient(_WORKER_JOB, ingredient)


def _train_all(job: _Job, ingredients: list[Ingredient], workers: int, start_method: str) -> list[tuple]:
    n = min(workers, len(ingredients))
    if n <= 1:
        return [_train_ingredient(job, ing) for ing in ingredients]
    import torch.multiprocessing as mp

    ctx = mp.get_context(start_method)
    with ctx.Pool(n, initializer=_init_worker, initargs=(job,)) as pool:
        return pool.map(_worker, ingredients, chunksize=1)


# -- the driver -------------------------------------------------------------------------------


def _greedy(
    model: nn.Module, states: list[dict[str, torch.Tensor]], metrics: list[float], eval_fn: Callable[[nn.Module], float]
) -> tuple[dict[str, torch.Tensor], list[int], float]:
    order = sorted(range(len(states)), key=lambda i: (-metrics[i], i))
    chosen = [order[0]]
    best_state, best = states[order[0]], metrics[order[0]]
    for i in order[1:]:
        candidate = average_states([states[j] for j in chosen + [i]])
        model.load_state_dict(candidate)
        score = eval_fn(model)
        if score >= best:
            chosen.append(i)
            best_state, best = candidate, score
    return best_state, sorted(chosen), best


def sparse_model_soups(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module, Ingredient], torch.optim.Optimizer],
    train_fn: Callable[[nn.Module, torch.optim.Optimizer, Ingredient], Any],
    *,
    final_sparsity: float,
    cycles: int,
    ingredients: int = 3,
    eval_fn: Callable[[nn.Module], float] | None = None,
    seeds: Sequence[int] | None = None,
    weight_decays: Sequence[float] | None = None,
    soup: str = "uniform",
    workers: int = 1,
    start_method: str = "fork",
    exclude: Sequence[ExcludeItem] = (),
    first_last_dense: bool = False,
    include_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    min_density: float | None = None,
) -> tuple[MaskState, SoupHistory]:
    """Run Sparse Model Soups on ``model`` in place; return the final masks and per-cycle records.

    Args:
        model: the starting model, usually trained dense (a bare ``nn.Module``; a DDP wrapper is
            unwrapped). It ends as the last cycle's soup at ``final_sparsity``.
        final_sparsity: fraction of zeros over the prunable weights after the last cycle, in (0, 1).
        cycles: prune-retrain-average cycles (>= 1).
        ingredients: copies retrained per cycle (>= 1).
        seeds: one seed per ingredient (default ``0..ingredients-1``); cycle ``c`` uses
            ``seed + 1000 * (c - 1)`` so every cycle sees new batch orders.
        weight_decays: optional one weight decay per ingredient (passed in ``Ingredient``).
        soup: ``"uniform"`` (average all) or ``"greedy"`` (needs ``eval_fn``).
        workers: processes training ingredients in parallel (1 = sequential, in this process).
        start_method: ``"fork"`` or ``"spawn"`` for ``workers > 1``.
        exclude: as in :func:`~sparseforge.algorithms.imp.imp`.
        first_last_dense: as in :func:`~sparseforge.algorithms.imp.imp`.
        include_types: as in :func:`~sparseforge.algorithms.imp.imp`.
        min_density: as in :func:`~sparseforge.algorithms.imp.imp`.
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    if final <= 0.0:
        raise SparseforgeError(f"final_sparsity={final_sparsity!r} is not allowed; allowed: a float in (0, 1)")
    for value, name in ((cycles, "cycles"), (ingredients, "ingredients"), (workers, "workers")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SparseforgeError(f"{name}={value!r} is not allowed; allowed: an integer >= 1")
    if soup not in SOUP_KINDS:
        raise SparseforgeError(f"soup={soup!r} is not recognised; allowed: {list(SOUP_KINDS)}")
    if soup == "greedy" and eval_fn is None:
        raise SparseforgeError("soup='greedy' needs eval_fn (a held-out score, higher is better); pass eval_fn")
    if start_method not in ("fork", "spawn", "forkserver"):
        raise SparseforgeError(f"start_method={start_method!r} is not allowed; allowed: 'fork', 'spawn', 'forkserver'")
    for fn, name in ((make_optimizer, "make_optimizer"), (train_fn, "train_fn")):
        if not callable(fn):
            raise SparseforgeError(f"{name}={fn!r} is not callable; allowed: a function")
    if eval_fn is not None and not callable(eval_fn):
        raise SparseforgeError(f"eval_fn={eval_fn!r} is not callable; allowed: None or eval_fn(model) -> float")
    seeds = list(range(ingredients)) if seeds is None else [check_seed(s, "seeds item") for s in seeds]
    if len(seeds) != ingredients:
        raise SparseforgeError(f"seeds has {len(seeds)} entries; allowed: exactly ingredients={ingredients}")
    if weight_decays is not None:
        weight_decays = list(weight_decays)
        if len(weight_decays) != ingredients:
            raise SparseforgeError(
                f"weight_decays has {len(weight_decays)} entries; allowed: exactly ingredients={ingredients}"
            )
        weight_decays = [check_float(w, "weight_decays item", low=0.0) for w in weight_decays]
    decays: Sequence[float | None] = weight_decays or [None] * ingredients
    recipes = list(zip(seeds, decays, strict=True))
    repeated = next((r for i, r in enumerate(recipes) if r in recipes[:i]), None)
    if repeated is not None:
        raise SparseforgeError(
            f"seeds={seeds!r} repeat seed {repeated[0]} with the same weight decay: those ingredients would be "
            "identical copies; allowed: distinct seeds (or distinct weight_decays)"
        )
    if min_density is not None:
        min_density = check_float(min_density, "min_density", low=0.0, high=1.0 - final)
    check_materialized(model)

    base = unwrap(model)
    params = select_prunable(base, exclude=exclude, include_types=include_types, first_last_dense=first_last_dense)
    history = SoupHistory()
    current: dict[str, torch.Tensor] | None = None
    masks = MaskState()
    for c, sparsity in enumerate(round_sparsities(final, cycles), start=1):
        current, targets = prune_surviving(params, current, sparsity, min_density=min_density)
        masks = MaskState(current, targets=targets)
        masks.apply(base)
        batch = [
            Ingredient(c, i, seeds[i] + 1000 * (c - 1), None if weight_decays is None else weight_decays[i], sparsity)
            for i in range(ingredients)
        ]
        job = _Job(base, current, targets, make_optimizer, train_fn, eval_fn)
        outputs = _train_all(job, batch, workers, start_method)
        states = [o[0] for o in outputs]
        metrics = [o[2] for o in outputs]
        if soup == "greedy":
            assert eval_fn is not None  # soup='greedy' without eval_fn was refused above
            soup_state, in_soup, soup_metric = _greedy(base, states, metrics, eval_fn)
        else:
            soup_state, in_soup = average_states(states), list(range(ingredients))
            soup_metric = None
        base.load_state_dict(soup_state)
        masks.apply(base)  # a no-op on the values (the average is already zero there); guards the invariant
        if soup_metric is None and eval_fn is not None:
            soup_metric = eval_fn(base)
        zeros = sum(int((p.detach() == 0).sum()) for p in params.values())
        total = sum(p.numel() for p in params.values())
        history.cycles.append(
            SoupCycle(c, sparsity, zeros / total, soup_metric, metrics, [o[1] for o in outputs], in_soup)
        )
    return masks, history
