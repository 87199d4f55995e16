"""ProSparse: progressive L1 regularisation of the MLP hidden activations during fine-tuning.

ProSparse (Song et al. 2024) first swaps the MLP activation to ReLU (:func:`swap_activation`),
then fine-tunes with an L1 penalty ``lambda(step) * mean |h|`` on the MLP hidden activations
``h``, where ``lambda`` rises in stages, each along a quarter sine: in stage ``i`` (``T_i`` steps,
ending at ``lambda_i``) it goes from ``lambda_{i-1}`` to ``lambda_i`` as
``lambda_{i-1} + (lambda_i - lambda_{i-1}) * sin(pi/2 * t / T_i)``, with ``lambda_0 = 0``. The
smooth rise avoids the radical shift in the activation distribution a constant penalty causes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_int
from ..masks import check_module, unwrap
from .sites import find_mlps

__all__ = ["ActivationL1", "ProSparseSchedule"]


@dataclass(frozen=True)
class ProSparseSchedule:
    """The L1 factor per step: ``stages`` is a sequence of ``(steps, final factor)`` pairs.

    After the last stage the factor stays at the last stage's final factor.
    """

    stages: tuple[tuple[int, float], ...]

    def __post_init__(self) -> None:
        if not self.stages:
            raise SparseforgeError("ProSparse stages are empty; allowed: at least one (steps, factor) pair")
        previous = 0.0
        for i, stage in enumerate(self.stages):
            if not (isinstance(stage, tuple) and len(stage) == 2):
                raise SparseforgeError(f"ProSparse stage {i} is {stage!r}; allowed: a (steps, factor) pair")
            steps, factor = stage
            check_int(steps, f"stage {i} steps", minimum=1)
            if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
                raise SparseforgeError(f"stage {i} factor={factor!r} is not allowed; allowed: a finite number >= 0")
            if factor < previous:
                raise SparseforgeError(
                    f"stage {i} factor {factor} is below the previous stage's {previous}; allowed: non-decreasing factors"
                )
            previous = float(factor)

    @classmethod
    def from_pairs(cls, stages: Sequence[Sequence[float]]) -> ProSparseSchedule:
        """From a list of ``[steps, factor]`` pairs (e.g. read from a config)."""
        return cls(tuple((s[0], s[1]) for s in stages))  # type: ignore[misc]

    @property
    def steps(self) -> int:
        """Steps in all stages together."""
        return sum(int(s) for s, _ in self.stages)

    def factor(self, step: int) -> float:
        """The L1 factor at ``step`` (0-based; ``steps`` and beyond give the last factor)."""
        step = check_int(step, "step", minimum=0)
        start, previous = 0, 0.0
        for steps, final in self.stages:
            if step < start + steps:
                return previous + (final - previous) * math.sin(0.5 * math.pi * (step - start) / steps)
            start, previous = start + steps, float(final)
        return previous


class ActivationL1:
    """Hooks that sum ``mean |h|`` of every MLP hidden activation of a forward, for a penalty.

    Use as a context manager around training; after each forward, :meth:`take` returns the sum
    over MLPs of the mean absolute hidden activation (a differentiable scalar) and resets it::

        with ActivationL1(model) as l1:
            loss = task_loss(model(x)) + schedule.factor(step) * l1.take()
    """

    def __init__(self, model: nn.Module) -> None:
        model = unwrap(check_module(model))
        self.layers = {site.down: model.get_submodule(site.down) for site in find_mlps(model)}
        self._terms: list[torch.Tensor] = []
        self._handles: list[Any] = []

    def _hook(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self._terms.append(inputs[0].abs().mean())

    def __enter__(self) -> ActivationL1:
        self._handles = [layer.register_forward_pre_hook(self._hook) for layer in self.layers.values()]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._terms = []

    def take(self) -> torch.Tensor:
        """The penalty of the forwards since the last call (0 if none), and reset."""
        terms, self._terms = self._terms, []
        if not terms:
            return torch.zeros(())
        return torch.stack(terms).sum()
