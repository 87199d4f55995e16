"""A plain training loop that works with any model, optimizer and data.

Sparsity needs nothing from this loop: a :class:`~sparseforge.sparsifier.Sparsifier` attached to
the optimizer keeps the model sparse in *any* loop. ``train`` is a convenience with progress and
per-epoch metrics::

    history = sparseforge.train(model, (x_train, y_train), epochs=10, optimizer=opt,
                                eval_data=(x_test, y_test))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .errors import SparseforgeError, check_int, check_seed
from .masks import check_module

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID
    from typing_extensions import TypeIs  # typing.TypeIs is Python 3.13+; typing_extensions comes with torch

__all__ = ["EpochMetrics", "TrainHistory", "batches", "evaluate", "train"]

Batch = tuple[torch.Tensor, torch.Tensor]
Data = tuple[torch.Tensor, torch.Tensor] | Iterable[Batch]


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    steps: int
    train_loss: float
    eval_loss: float | None
    eval_accuracy: float | None


@dataclass
class TrainHistory:
    epochs: list[EpochMetrics] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float | None:
        return self.epochs[-1].eval_accuracy if self.epochs else None


def _is_tensor_pair(data: object) -> TypeIs[tuple[torch.Tensor, torch.Tensor]]:
    return isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data)


def _check_data(data: object, name: str) -> None:
    """Refuse data that can yield no batch: an empty or mismatched ``(x, y)`` pair, a bare tensor,
    a string or a non-iterable (an empty iterable is caught when an epoch yields nothing)."""
    if _is_tensor_pair(data):
        x, y = data
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y):
            raise SparseforgeError(
                f"{name} has inputs of shape {tuple(x.shape)} and targets of shape {tuple(y.shape)}; "
                "allowed: equal lengths along dim 0"
            )
        if len(x) == 0:
            raise SparseforgeError(f"{name} is empty (0 samples); allowed: at least one sample")
        return
    if isinstance(data, (torch.Tensor, str, bytes)) or not hasattr(data, "__iter__"):
        raise SparseforgeError(
            f"{name} is a {type(data).__name__}; allowed: an (inputs, targets) tensor pair or an iterable of batches"
        )


def _check_loss_fn(loss_fn: object) -> None:
    if not callable(loss_fn):
        raise SparseforgeError(f"loss_fn={loss_fn!r} is not callable; allowed: loss_fn(output, targets) -> scalar")


def _check_learning_rates(optimizer: torch.optim.Optimizer, has_scheduler: bool) -> None:
    """Every group's ``lr`` must be a finite number >= 0, and not all 0 unless a scheduler sets them."""
    rates = []
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        value = float(lr) if isinstance(lr, (int, float, torch.Tensor)) and not isinstance(lr, bool) else math.nan
        if not math.isfinite(value) or value < 0:
            raise SparseforgeError(
                f"optimizer param_groups[{i}]['lr']={lr!r} is not allowed; allowed: a finite number > 0"
            )
        rates.append(value)
    if rates and all(r == 0 for r in rates) and not has_scheduler:
        raise SparseforgeError(
            f"optimizer lr={rates[0]!r} in every param group: training would change nothing; allowed: lr > 0 "
            "(or a scheduler that raises it)"
        )


def batches(
    data: Data, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterable[Batch]:
    """Yield batches from a ``(x, y)`` tensor pair (optionally shuffled) or pass an iterable through.

    ``batch_size`` (samples per batch, >= 1) applies to tensor pairs.
    """
    batch_size = check_int(batch_size, "batch_size", 1)
    if not _is_tensor_pair(data):
        yield from data
        return
    x, y = data
    if len(x) != len(y):
        raise SparseforgeError(f"inputs have {len(x)} rows but targets have {len(y)}; allowed: equal lengths")
    order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
    for start in range(0, len(x), batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data: Data,
    *,
    batch_size: int = 1024,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> tuple[float, float]:
    """Mean loss and top-1 accuracy (fraction in [0, 1]) of ``model`` on ``data`` (eval mode).

    ``batch_size``: samples per forward (>= 1), for a tensor pair.
    """
    check_module(model)
    check_int(batch_size, "batch_size", 1)
    _check_loss_fn(loss_fn)
    _check_data(data, "data")
    was_training = model.training
    model.eval()
    total, correct, loss_sum = 0, 0, 0.0
    try:
        for x, y in batches(data, batch_size):
            out = model(x)
            loss_sum += float(loss_fn(out, y)) * len(y)
            correct += int((out.argmax(dim=-1) == y).sum())
            total += len(y)
    finally:
        model.train(was_training)
    if total == 0:
        raise SparseforgeError("evaluation data is empty; allowed: at least one sample")
    return loss_sum / total, correct / total


def train(
    model: nn.Module,
    train_data: Data,
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    batch_size: int = 128,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    eval_data: Data | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    seed: int = 0,
    progress: bool = True,
    description: str = "training",
) -> TrainHistory:
    """Train for ``epochs`` epochs (one epoch = one pass over ``train_data``).

    ``train_data`` is a ``(x, y)`` tensor pair (shuffled each epoch with a generator seeded by
    ``seed``) or any iterable of batches (a ``DataLoader``). ``scheduler`` steps once per epoch.
    Shows a progress bar (rich) unless ``progress=False``; returns per-epoch metrics.

    Refused before the first step: ``epochs`` or ``batch_size`` (samples) not an integer >= 1, an
    empty or mismatched tensor pair, an optimizer that holds none of the model's parameters, a
    negative / NaN / infinite learning rate, or lr = 0 in every group without a scheduler. An
    iterable that yields no batch in an epoch raises at the end of that epoch.
    """
    check_module(model)
    epochs = check_int(epochs, "epochs", 1)
    batch_size = check_int(batch_size, "batch_size", 1)
    seed = check_seed(seed)
    _check_loss_fn(loss_fn)
    _check_data(train_data, "train_data")
    if eval_data is not None:
        _check_data(eval_data, "eval_data")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SparseforgeError(f"optimizer is a {type(optimizer).__name__}; allowed: a torch.optim.Optimizer")
    model_params = {id(p) for p in model.parameters()}
    if not any(id(p) in model_params for group in optimizer.param_groups for p in group["params"]):
        raise SparseforgeError(
            "the optimizer holds none of the model's parameters; allowed: an optimizer built over model.parameters()"
        )
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise SparseforgeError(
            f"scheduler is a {type(scheduler).__name__}; allowed: None or an LR scheduler with step()"
        )
    _check_learning_rates(optimizer, scheduler is not None)
    generator = torch.Generator().manual_seed(seed)
    history = TrainHistory()
    steps = 0
    bar = _Progress(progress, description, epochs)
    with bar:
        for epoch in range(1, epochs + 1):
            model.train()
            loss_sum, seen = 0.0, 0
            for x, y in batches(train_data, batch_size, shuffle=True, generator=generator):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                steps += 1
                loss_sum += float(loss.detach()) * len(y)
                seen += len(y)
            if seen == 0:
                raise SparseforgeError(
                    f"train_data yielded no batch in epoch {epoch}; allowed: at least one batch per epoch"
                )
            if scheduler is not None:
                scheduler.step()
            eval_loss = eval_acc = None
            if eval_data is not None:
                eval_loss, eval_acc = evaluate(model, eval_data, loss_fn=loss_fn)
            metrics = EpochMetrics(epoch, steps, loss_sum / max(seen, 1), eval_loss, eval_acc)
            history.epochs.append(metrics)
            bar.advance(metrics)
    return history


class _Progress:
    """A rich progress bar over epochs that is silent when disabled."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self.enabled = enabled
        self.description = description
        self.total = total
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
                transient=True,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.description, total=self.total, metrics="")
        return self

    def advance(self, m: EpochMetrics) -> None:
        if self._progress is not None and self._task is not None:  # both set by __enter__
            acc = f" acc {m.eval_accuracy:.3f}" if m.eval_accuracy is not None else ""
            self._progress.update(self._task, advance=1, metrics=f"loss {m.train_loss:.3f}{acc}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.__exit__(exc_type, exc, tb)
