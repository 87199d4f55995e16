"""Iterative magnitude pruning (IMP) with weight rewinding: lottery tickets.

Frankle & Carbin (2019) train a dense network, prune a fraction ``p`` of the surviving weights
by *global* magnitude, rewind the survivors to their values at initialisation and retrain;
repeated ``rounds`` times. Frankle et al. (2020, "Linear mode connectivity and the lottery
ticket hypothesis") rewind to an early training step ``k`` instead ("late rewinding"), which
makes IMP work for deeper networks. ``rewind_step=0`` is the original LTH.

Driver::

    masks, history = imp(model, make_optimizer, train_fn, final_sparsity=0.9, rounds=3, rewind_step=20)

* ``make_optimizer(model) -> torch.optim.Optimizer`` builds a fresh optimizer (called once per
  round, so optimizer state such as momentum is reset after every prune step).
* ``train_fn(model, optimizer, info: IMPRound) -> Any`` trains the model in the caller's own loop
  (e.g. :func:`sparseforge.train`). From round 1 on a :class:`~sparseforge.sparsifier.Sparsifier`
  is attached to ``optimizer``, so the pruned weights stay exactly zero in any loop.
  ``info.start_step`` says which step training resumes from (``rewind_step``), for callers who
  also want to rewind a learning-rate schedule. Its return value is kept in the history.

Rewind snapshot: ``rewind_step = k`` counts completed optimizer steps of the first (dense) round.
``k = 0`` copies the model before training; ``k > 0`` is captured by an optimizer step post hook
registered on round 0's optimizer, right after its ``k``-th step. The snapshot is the whole
``state_dict`` of the (unwrapped) model, parameters and buffers, each tensor **cloned**, so later
training can never change it (it is never a reference to live storage). Rewinding copies it back
with ``load_state_dict`` (a copy again) and re-applies the masks. If round 0 takes fewer than
``k`` steps, :class:`SparseforgeError` is raised after round 0 (the step count is only known
then). ``rewind_step=None`` disables rewinding: each round fine-tunes the trained weights.

Pruning schedule: round ``r`` (1-based) targets sparsity ``s_r = 1 - (1 - final_sparsity)^(r /
rounds)`` over the prunable weights, i.e. each round removes the fraction ``p = 1 - (1 -
final_sparsity)^(1/rounds)`` of the *surviving* weights; the kept count is exact
(``round((1 - s_r) * total)``). Scores are ``|W|`` of the surviving weights; already-pruned weights
can never return. One global threshold over all prunable layers, with a per-layer floor
``min_density`` (default: a tenth of the round's average density) against layer collapse.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_float, check_sparsity
from ..masks import MaskState, check_materialized, unwrap
from ..pruning import masks_for_scores
from ..sparsifier import Sparsifier, check_optimizer_owns
from ..targets import DEFAULT_PRUNABLE_TYPES, ExcludeItem, select_prunable

__all__ = [
    "IMPRound",
    "IMPRoundRecord",
    "IMPHistory",
    "imp",
    "round_sparsities",
    "prune_surviving",
    "clone_state",
]


@dataclass(frozen=True)
class IMPRound:
    """What ``train_fn`` is told about the round it trains.

    ``round``: 0 for the dense first training, 1..rounds for the sparse retrainings.
    ``sparsity``: target fraction of zeros over the prunable weights (0.0 in round 0).
    ``start_step``: completed optimizer steps the weights correspond to when training starts
    (0 in round 0; ``rewind_step`` after a rewind; 0 when rewinding is disabled).
    """

    round: int
    sparsity: float
    start_step: int


@dataclass(frozen=True)
class IMPRoundRecord:
    """One round's outcome. ``sparsity`` is measured (fraction of zeros over prunable weights)."""

    round: int
    target_sparsity: float
    sparsity: float
    steps: int
    train_result: Any
    eval_result: Any


@dataclass
class IMPHistory:
    """Per-round records, the per-round prune fraction and the rewind snapshot (cloned tensors)."""

    rounds: list[IMPRoundRecord] = field(default_factory=list)
    prune_fraction: float = 0.0
    rewind_step: int | None = 0
    snapshot: dict[str, torch.Tensor] | None = None


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of ``unwrap(model).state_dict()``: every tensor detached and cloned."""
    return {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}


def round_sparsities(final_sparsity: float, rounds: int) -> list[float]:
    """Target sparsity after each of ``rounds`` equal-fraction prune steps, ending at ``final_sparsity``."""
    final = check_sparsity(final_sparsity, "final_sparsity")
    _check_positive_int(rounds, "rounds")
    return [1.0 - (1.0 - final) ** (r / rounds) for r in range(1, rounds + 1)]


@torch.no_grad()
def prune_surviving(
    params: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor] | None,
    sparsity: float,
    *,
    min_density: float | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Global magnitude masks at ``sparsity`` that keep only weights that ``current`` keeps.

    Scores are ``|W|``; positions ``current`` prunes get score ``-1`` (below every magnitude), so
    a new mask is a subset of the old one whenever it keeps no more weights. Returns masks and
    per-layer target sparsities (see :func:`sparseforge.pruning.masks_for_scores`). ``current``
    must hold a mask shaped like every weight of ``params``.
    """
    if current is not None:
        for name, weight in params.items():
            mask = current.get(name) if isinstance(current, Mapping) else None
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(weight.shape):
                got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise SparseforgeError(
                    f"current mask for {name!r} is {got}; allowed: a bool tensor of shape {tuple(weight.shape)}"
                )
    scores: dict[str, torch.Tensor] = {}
    for name, weight in params.items():
        score = weight.detach().abs().float()
        if current is not None:
            score = torch.where(current[name].to(score.device), score, torch.full_like(score, -1.0))
        scores[name] = score
    masks, targets = masks_for_scores(scores, sparsity, distribution="global", min_density=min_density)
    if current is not None:
        for name, mask in masks.items():
            if bool((mask & ~current[name].to(mask.device)).any()):
                raise SparseforgeError(
                    f"sparsity={sparsity} would regrow pruned weights of {name!r}; allowed: a sparsity not "
                    "below the current one and a min_density not above the current layer densities"
                )
    return masks, targets


def _check_positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SparseforgeError(f"{name}={value!r} is not allowed; allowed: an integer >= 1")
    return value


def _check_callable(value: Any, name: str) -> None:
    if not callable(value):
        raise SparseforgeError(f"{name}={value!r} is not callable; allowed: a function")


def _measured_sparsity(params: Mapping[str, torch.Tensor]) -> float:
    total = sum(p.numel() for p in params.values())
    zeros = sum(int((p.detach() == 0).sum()) for p in params.values())
    return zeros / total if total else 0.0


def imp(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    train_fn: Callable[[nn.Module, torch.optim.Optimizer, IMPRound], Any],
    *,
    final_sparsity: float,
    rounds: int,
    rewind_step: int | None = 0,
    eval_fn: Callable[[nn.Module], Any] | None = None,
    exclude: Sequence[ExcludeItem] = (),
    first_last_dense: bool = False,
    include_types: Sequence[type[nn.Module]] = DEFAULT_PRUNABLE_TYPES,
    min_density: float | None = None,
) -> tuple[MaskState, IMPHistory]:
    """Run IMP with rewinding on ``model`` in place; return the final masks and the history.

    Args:
        model: the dense model at initialisation (a DDP wrapper is fine; the snapshot is taken
            from the bare model). It ends trained, pruned to ``final_sparsity``.
        make_optimizer: ``make_optimizer(model)`` -> a new optimizer; called once per round.
        train_fn: ``train_fn(model, optimizer, info)`` trains one round (see module docs).
        final_sparsity: fraction of zeros over the prunable weights after the last round, in (0, 1).
        rounds: number of prune-rewind-retrain rounds (>= 1), after one dense training (round 0).
        rewind_step: completed optimizer steps of round 0 whose weights survivors rewind to;
            0 = original lottery tickets, small k = late rewinding, ``None`` = no rewinding.
        eval_fn: optional ``eval_fn(model)`` run after every round; its result is recorded.
        exclude: module-name patterns or types kept dense (see ``select_prunable``).
        first_last_dense: keep the first and last prunable layers dense.
        include_types: module types whose weights are prunable.
        min_density: least fraction of each layer kept by the global threshold (default: a tenth
            of the round's average density).

    Returns ``(masks, history)``; ``masks.step`` counts the optimizer steps of the weights'
    trajectory: ``start_step`` plus the steps of the last round.
    """
    final = check_sparsity(final_sparsity, "final_sparsity")
    if final <= 0.0:
        raise SparseforgeError(f"final_sparsity={final_sparsity!r} is not allowed; allowed: a float in (0, 1)")
    _check_positive_int(rounds, "rounds")
    if rewind_step is not None and (
        isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0
    ):
        raise SparseforgeError(f"rewind_step={rewind_step!r} is not allowed; allowed: an integer >= 0 or None")
    _check_callable(make_optimizer, "make_optimizer")
    _check_callable(train_fn, "train_fn")
    if eval_fn is not None:
        _check_callable(eval_fn, "eval_fn")
    if min_density is not None:
        min_density = check_float(min_density, "min_density", low=0.0, high=1.0 - final)
    check_materialized(model)
    params = select_prunable(
        unwrap(model), exclude=exclude, include_types=include_types, first_last_dense=first_last_dense
    )
    targets = round_sparsities(final, rounds)
    history = IMPHistory(prune_fraction=1.0 - (1.0 - final) ** (1.0 / rounds), rewind_step=rewind_step)

    # Round 0: dense training; capture the rewind snapshot (a clone) at step k.
    optimizer = make_optimizer(model)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SparseforgeError(
            f"make_optimizer returned a {type(optimizer).__name__}; allowed: a torch.optim.Optimizer"
        )
    check_optimizer_owns(optimizer, params)  # else round 0 would train nothing that is pruned later
    steps = [0]
    if rewind_step == 0:
        history.snapshot = clone_state(model)

    def count_and_capture(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        steps[0] += 1
        if rewind_step is not None and steps[0] == rewind_step:
            history.snapshot = clone_state(model)

    handle = optimizer.register_step_post_hook(count_and_capture)
    try:
        result = train_fn(model, optimizer, IMPRound(0, 0.0, 0))
    finally:
        handle.remove()
    if rewind_step is not None and history.snapshot is None:
        raise SparseforgeError(
            f"rewind_step={rewind_step} was never reached: round 0 took {steps[0]} optimizer steps; "
            f"allowed: rewind_step <= {steps[0]}"
        )
    history.rounds.append(
        IMPRoundRecord(0, 0.0, _measured_sparsity(params), steps[0], result, eval_fn(model) if eval_fn else None)
    )

    masks: MaskState | None = None
    for r, sparsity in enumerate(targets, start=1):
        current = None if masks is None else {n: masks[n] for n in masks.names()}
        new_masks, layer_targets = prune_surviving(params, current, sparsity, min_density=min_density)
        if history.snapshot is not None:
            unwrap(model).load_state_dict(history.snapshot)  # copies values; the snapshot stays untouched
        start = rewind_step if rewind_step is not None else 0
        masks = MaskState(new_masks, step=start, targets=layer_targets)
        optimizer = make_optimizer(model)
        sparsifier = Sparsifier(model, optimizer, masks)  # applies the masks at once
        try:
            result = train_fn(model, optimizer, IMPRound(r, sparsity, start))
        finally:
            masks = sparsifier.finalize()
        history.rounds.append(
            IMPRoundRecord(
                r, sparsity, _measured_sparsity(params), masks.step - start, result, eval_fn(model) if eval_fn else None
            )
        )
    assert masks is not None
    return masks, history
