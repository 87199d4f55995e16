"""Schedules: pure, clamped functions of the optimizer step, plus *when* masks update.

Steps count completed optimizer steps (1-based: step 1 is the state after the first step).

* :func:`cubic_sparsity` -- Zhu & Gupta (2017) gradual pruning: sparsity (fraction of zeros)
  rises from ``initial`` at ``start`` to ``final`` at ``end`` along a cubic, flat outside.
* :func:`cosine_drop_fraction` -- RigL's drop fraction for dynamic sparse training:
  ``alpha / 2 * (1 + cos(pi * t / end))``, 0 from ``end`` on.
* :class:`UpdateSchedule` -- masks update at steps ``start, start + every, ...`` up to ``end``.

Invalid arguments raise :class:`~sparseforge.errors.SparseforgeError` when the schedule is
built, before any training starts.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

from .errors import SparseforgeError, check_float, check_int, check_seed

__all__ = [
    "UpdateSchedule",
    "check_drop_fraction",
    "check_float",
    "check_int",
    "check_seed",
    "check_window",
    "cosine_drop_fraction",
    "cubic_sparsity",
]


def _check_int(value: object, name: str, minimum: int) -> int:
    return check_int(value, name, minimum)


def _check_fraction(value: object, name: str, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        v = math.nan
    else:
        v = float(value)
    lo_ok = v > 0.0 if low_open else v >= 0.0
    hi_ok = v < 1.0 if high_open else v <= 1.0
    if not (lo_ok and hi_ok):
        allowed = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise SparseforgeError(f"{name}={value!r} is outside the allowed range {allowed}")
    return v


def check_drop_fraction(alpha: float, name: str = "alpha") -> float:
    """Return ``alpha`` as a float if it lies in the open interval (0, 1), else raise."""
    return _check_fraction(alpha, name, low_open=True, high_open=True)


def check_window(start: int, end: int, names: tuple[str, str] = ("start", "end")) -> None:
    """Raise unless ``start`` and ``end`` are integer steps >= 0 with ``end >= start``.

    ``names`` are the caller's argument names, used in the message (e.g. ``prune_start``).
    """
    check_int(start, names[0], 0)
    check_int(end, names[1], 0)
    if end < start:
        raise SparseforgeError(f"{names[1]}={end} is before {names[0]}={start}; allowed: {names[1]} >= {names[0]}")


_check_window = check_window


def cubic_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """Sparsity (fraction of zeros) at ``step`` on the Zhu & Gupta cubic schedule.

    ``s_t = final + (initial - final) * (1 - (t - start) / (end - start)) ** 3`` for
    ``start <= t <= end``; ``initial`` before ``start`` and ``final`` from ``end`` on (clamped).
    ``initial`` and ``final`` are sparsities in [0, 1); ``start``/``end`` are steps.
    """
    check_int(step, "step")
    initial = _check_fraction(initial, "initial", low_open=False, high_open=True)
    final = _check_fraction(final, "final", low_open=False, high_open=True)
    _check_window(start, end)
    if step < start or (step == start and end > start):
        return initial
    if step >= end:
        return final
    remaining = 1.0 - (step - start) / (end - start)
    return final + (initial - final) * remaining**3


def cosine_drop_fraction(step: int, *, alpha: float, end: int) -> float:
    """Fraction of each layer's active weights that a DST update drops at ``step``.

    ``alpha / 2 * (1 + cos(pi * step / end))`` for ``0 <= step < end``, 0 from ``end`` on.
    ``alpha`` is the initial drop fraction in (0, 1); ``end`` (steps) must be >= 1.
    """
    check_int(step, "step")
    alpha = check_drop_fraction(alpha)
    _check_int(end, "end", 1)
    if step >= end:
        return 0.0
    return alpha / 2.0 * (1.0 + math.cos(math.pi * max(step, 0) / end))


@dataclass(frozen=True)
class UpdateSchedule:
    """Masks update after steps ``start, start + every, start + 2 * every, ... <= end``.

    Args:
        start: first eligible step (0 means the first update happens at step ``every``).
        end: last eligible step (inclusive).
        every: steps between updates, >= 1.

    Step 0 (before any optimizer step) is never an update step.
    """

    start: int
    end: int
    every: int

    def __post_init__(self) -> None:
        _check_int(self.every, "every", 1)
        _check_window(self.start, self.end)

    def is_update_step(self, step: int) -> bool:
        """Whether masks change right after completed optimizer step ``step``."""
        return 1 <= step and self.start <= step <= self.end and (step - self.start) % self.every == 0

    def count(self) -> int:
        """How many update steps the schedule has in total."""
        first = self.start if self.start >= 1 else self.every
        return 0 if first > self.end else (self.end - first) // self.every + 1
