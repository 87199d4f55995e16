"""Schedules: end points, clamping, monotonicity and validation."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparseforge.errors import SparseforgeError
from sparseforge.schedules import UpdateSchedule, cosine_drop_fraction, cubic_sparsity


def test_cubic_end_points_and_clamping() -> None:
    kw = dict(initial=0.2, final=0.9, start=100, end=500)
    assert cubic_sparsity(0, **kw) == 0.2
    assert cubic_sparsity(100, **kw) == 0.2
    assert cubic_sparsity(500, **kw) == pytest.approx(0.9)
    assert cubic_sparsity(10_000, **kw) == 0.9
    # hand-computed midpoint: 0.9 + (0.2 - 0.9) * (1 - 0.5) ** 3
    assert cubic_sparsity(300, **kw) == pytest.approx(0.9 - 0.7 / 8)


def test_cubic_degenerate_window_is_a_step() -> None:
    assert cubic_sparsity(9, initial=0.0, final=0.5, start=10, end=10) == 0.0
    assert cubic_sparsity(10, initial=0.0, final=0.5, start=10, end=10) == 0.5


@given(st.floats(0, 0.99), st.floats(0, 0.99), st.integers(0, 50), st.integers(1, 200))
def test_cubic_is_monotone_and_bounded(initial: float, final: float, start: int, length: int) -> None:
    end = start + length
    values = [cubic_sparsity(t, initial=initial, final=final, start=start, end=end) for t in range(end + 5)]
    lo, hi = min(initial, final), max(initial, final)
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in values)
    pairs = list(pairwise(values))
    if final >= initial:
        assert all(b >= a - 1e-12 for a, b in pairs)
    else:
        assert all(b <= a + 1e-12 for a, b in pairs)


def test_cosine_end_points() -> None:
    assert cosine_drop_fraction(0, alpha=0.3, end=1000) == pytest.approx(0.3)
    assert cosine_drop_fraction(500, alpha=0.3, end=1000) == pytest.approx(0.15)
    assert cosine_drop_fraction(1000, alpha=0.3, end=1000) == 0.0
    assert cosine_drop_fraction(5000, alpha=0.3, end=1000) == 0.0
    assert cosine_drop_fraction(250, alpha=0.3, end=1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))


@given(st.floats(0.01, 0.99), st.integers(1, 300))
def test_cosine_is_non_increasing(alpha: float, end: int) -> None:
    values = [cosine_drop_fraction(t, alpha=alpha, end=end) for t in range(end + 3)]
    assert all(b <= a + 1e-12 for a, b in pairwise(values))
    assert all(0.0 <= v <= alpha for v in values)


def test_update_schedule_steps() -> None:
    sched = UpdateSchedule(start=0, end=50, every=10)
    assert [t for t in range(0, 80) if sched.is_update_step(t)] == [10, 20, 30, 40, 50]
    assert sched.count() == 5
    sched = UpdateSchedule(start=25, end=60, every=10)
    assert [t for t in range(0, 80) if sched.is_update_step(t)] == [25, 35, 45, 55]
    assert sched.count() == 4
    assert UpdateSchedule(start=0, end=9, every=10).count() == 0


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: UpdateSchedule(start=0, end=10, every=0), "every=0"),
        (lambda: UpdateSchedule(start=0, end=10, every=-3), "every=-3"),
        (lambda: UpdateSchedule(start=20, end=10, every=1), "end=10 is before start=20"),
        (lambda: UpdateSchedule(start=-1, end=10, every=1), "start=-1"),
        (lambda: cosine_drop_fraction(1, alpha=0.0, end=10), "alpha=0.0"),
        (lambda: cosine_drop_fraction(1, alpha=1.0, end=10), "alpha=1.0"),
        (lambda: cosine_drop_fraction(1, alpha=1.5, end=10), "alpha=1.5"),
        (lambda: cosine_drop_fraction(1, alpha=0.3, end=0), "end=0"),
        (lambda: cubic_sparsity(1, initial=0.0, final=1.0, start=0, end=10), "final=1.0"),
        (lambda: cubic_sparsity(1, initial=0.0, final=0.5, start=10, end=5), "end=5 is before start=10"),
    ],
)
def test_validation_errors_are_one_line(call, needle: str) -> None:
    with pytest.raises(SparseforgeError) as err:
        call()
    message = str(err.value)
    assert needle in message and "\n" not in message and "allowed" in message
