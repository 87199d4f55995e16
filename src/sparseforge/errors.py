"""The one exception type sparseforge raises for bad input.

Every message is a single line that names the bad value and says what is allowed, so the CLI can
print it as-is and exit with status 2.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["SparseforgeError", "check_density", "check_float", "check_int", "check_seed", "check_sparsity"]


class SparseforgeError(ValueError):
    """Bad input to sparseforge: a one-line message naming the value and what is allowed."""


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    """Return ``sparsity`` as a float if it lies in [0, 1), else raise :class:`SparseforgeError`."""
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise SparseforgeError(f"{name}={sparsity!r} is not a number; allowed: a float in [0, 1)") from None
    if not (0.0 <= value < 1.0):
        raise SparseforgeError(f"{name}={sparsity!r} is outside the allowed range [0, 1)")
    return value


def check_density(density: float, name: str = "density") -> float:
    """Return ``density`` as a float if it lies in (0, 1], else raise :class:`SparseforgeError`."""
    try:
        value = float(density)
    except (TypeError, ValueError):
        raise SparseforgeError(f"{name}={density!r} is not a number; allowed: a float in (0, 1]") from None
    if not (0.0 < value <= 1.0):
        raise SparseforgeError(f"{name}={density!r} is outside the allowed range (0, 1]")
    return value


def check_int(value: object, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an ``int`` if it is an integer (not a bool) in ``[minimum, maximum]``, else raise.

    NumPy integers are accepted; floats (even ``2.0``), bools, strings and ``None`` are not.
    """
    if minimum is not None and maximum is not None:
        allowed = f"an integer in [{minimum}, {maximum}]"
    else:
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        allowed += f" <= {maximum}" if maximum is not None else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SparseforgeError(f"{name}={value!r} is not allowed; allowed: {allowed}")
    out = int(value)
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise SparseforgeError(f"{name}={value!r} is not allowed; allowed: {allowed}")
    return out


_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def check_seed(value: object, name: str = "seed") -> int:
    """Return a random seed as an ``int``; anything but an integer (not a bool) in
    ``[-2**63, 2**64 - 1]`` (torch's seed range) raises."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise SparseforgeError(f"{name}={value!r} is not an integer; allowed: an int seed")
    if not _SEED_RANGE[0] <= int(value) <= _SEED_RANGE[1]:
        raise SparseforgeError(f"{name}={value!r} is out of range; allowed: an int in [-2**63, 2**64 - 1]")
    return int(value)


def check_float(
    value: object,
    name: str,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float if it is a real number (not a bool, not NaN) in the given interval.

    The interval is ``[low, high]`` with either end open on request; with the default infinite
    ends, only finite values pass.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        v = math.nan
    else:
        v = float(value)
    ok = (v > low if low_open else v >= low) and (v < high if high_open else v <= high) and math.isfinite(v)
    if not ok:
        lo = "(-inf" if low == -math.inf else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high == math.inf else f"{high:g}{')' if high_open else ']'}"
        allowed = f"{lo}, {hi}"
        raise SparseforgeError(f"{name}={value!r} is not allowed; allowed: a finite number in {allowed}")
    return v
