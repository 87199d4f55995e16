"""The one exception type sparseforge raises for bad input.

Every message is a single line that names the bad value and says what is allowed, so the CLI can
print it as-is and exit with status 2.
"""

from __future__ import annotations


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
