"""Sparsity structures: which sets of weights may be kept or removed together.

Each structure reduces a weight to a *tile view* ``(groups, candidates)`` of candidate scores and
keeps an exact number of candidates per group with one deterministic top-k:

| structure | groups | candidates |
|---|---|---|
| `Unstructured` | 1 | every weight |
| `NM(n_keep, m)` | each run of `m` inputs | the `m` weights; keeps `n_keep` |
| `ConstantFanIn` | each output row | the row's weights |
| `Block(r, c)` | 1 | `r x c` blocks (summed scores) |
| `Channel(dim)` | 1 | slices along `dim` (summed scores) |

Conventions:

* ``density`` = fraction of weights kept = ``1 - sparsity``.
* A weight of shape ``(out, in, *kernel)`` is viewed as ``(out, in * prod(kernel))``; the second
  axis is the *input* (reduction) axis. ``NM`` groups run along it, so they work for Linear and
  Conv weights alike.
* The number kept is exact: ``mask.sum() == structure.kept_count(shape, density)``.
* Ties are broken by index order in the tile view: among equal scores the lower index is kept.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import SparseforgeError

__all__ = [
    "Structure",
    "Unstructured",
    "NM",
    "Block",
    "Channel",
    "ConstantFanIn",
    "parse_structure",
    "topk_mask",
]


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _as_2d_shape(shape: Sequence[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    return shape[0], math.prod(shape[1:])


def _is_int(value: object) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` in Python, never a size here)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_density(density: float) -> float:
    try:
        d = float(density)
    except (TypeError, ValueError):
        raise SparseforgeError(f"density={density!r} is not a number; allowed: a float in [0, 1]") from None
    if not (0.0 <= d <= 1.0) or math.isnan(d):
        raise SparseforgeError(f"density={density!r} is outside the allowed range [0, 1]")
    return d


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep exactly ``k`` entries of every row of a 2-D ``scores`` tensor.

    The ``k`` largest scores per row are kept; ties at the threshold go to the lowest column
    index, so the result is deterministic. Runs in O(numel) (one ``topk`` for the threshold, no
    full sort). Returns a bool tensor shaped like ``scores``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise SparseforgeError(f"topk_mask needs a 2-D tensor, got {shape}; allowed: a 2-D torch.Tensor")
    rows, cols = scores.shape
    if not _is_int(k) or not (0 <= k <= cols):
        raise SparseforgeError(f"k={k!r} is not allowed; allowed: an integer in [0, {cols}]")
    if k == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    if k == cols:
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise SparseforgeError("scores contain NaN; allowed: finite or infinite values only")
    threshold = torch.topk(scores, k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above = scores > threshold
    at = scores == threshold
    need = k - above.sum(dim=1, keepdim=True)
    # Among the entries equal to the threshold, keep the first `need` ones in index order.
    first_ties = at & (torch.cumsum(at, dim=1) <= need)
    return above | first_ties


class Structure(ABC):
    """How weights are grouped for pruning. Subclasses implement the tile view."""

    #: Density the structure itself fixes (``NM``), or ``None`` when any density is allowed.
    fixed_density: float | None = None

    # a hook, deliberately not abstract: the default accepts every shape; structures with tiles override it
    def check_shape(self, shape: Sequence[int], name: str = "weight") -> None:  # noqa: B027
        """Raise :class:`SparseforgeError` if this structure cannot tile ``shape``."""

    @abstractmethod
    def kept_count(self, shape: Sequence[int], density: float | None = None) -> int:
        """Exact number of weights kept for a weight of ``shape`` at ``density`` (kept fraction)."""

    @abstractmethod
    def mask_from_scores(self, scores: torch.Tensor, density: float | None = None) -> torch.Tensor:
        """Bool mask shaped like ``scores`` keeping the highest-scoring tiles at ``density``."""

    def resolve_density(self, density: float | None) -> float:
        """The density this structure will use for a requested ``density``."""
        if self.fixed_density is not None:
            if density is not None and abs(_check_density(density) - self.fixed_density) > 1e-9:
                raise SparseforgeError(
                    f"density={density!r} conflicts with {self!r}, which keeps exactly "
                    f"{self.fixed_density:g} of the weights; pass density=None"
                )
            return self.fixed_density
        if density is None:
            raise SparseforgeError(f"{self!r} needs a density in [0, 1], got None")
        return _check_density(density)


@dataclass(frozen=True)
class Unstructured(Structure):
    """Any individual weight may be removed."""

    def kept_count(self, shape: Sequence[int], density: float | None = None) -> int:
        return _round_half_up(self.resolve_density(density) * math.prod(shape))

    def mask_from_scores(self, scores: torch.Tensor, density: float | None = None) -> torch.Tensor:
        k = self.kept_count(scores.shape, density)
        return topk_mask(scores.detach().reshape(1, -1), k).reshape(scores.shape)


@dataclass(frozen=True)
class ConstantFanIn(Structure):
    """Every output row keeps the same number of weights (SRigL's constant fan-in)."""

    def kept_count(self, shape: Sequence[int], density: float | None = None) -> int:
        rows, fan_in = _as_2d_shape(shape)
        return rows * _round_half_up(self.resolve_density(density) * fan_in)

    def mask_from_scores(self, scores: torch.Tensor, density: float | None = None) -> torch.Tensor:
        rows, fan_in = _as_2d_shape(scores.shape)
        k = _round_half_up(self.resolve_density(density) * fan_in)
        return topk_mask(scores.detach().reshape(rows, fan_in), k).reshape(scores.shape)


@dataclass(frozen=True)
class NM(Structure):
    """Keep ``n_keep`` weights in every group of ``m`` consecutive inputs (e.g. ``NM(2, 4)``).

    ``n_keep`` counts *kept* weights (JaxPruner's convention; SparseGPT's ``prunen`` counts the
    zeroed ones). The density is fixed at ``n_keep / m``. Allowed: integers ``1 <= n_keep <= m``
    (``n_keep = 0`` would prune every weight; ``n_keep = m`` keeps all of them).
    """

    n_keep: int
    m: int

    def __post_init__(self) -> None:
        n, m = self.n_keep, self.m
        if not _is_int(n) or not _is_int(m) or not 1 <= n <= m:
            raise SparseforgeError(f"NM(n_keep={n!r}, m={m!r}) is invalid; allowed: integers 1 <= n_keep <= m")

    def __repr__(self) -> str:
        return f"NM({self.n_keep}, {self.m})"

    # a read-only property over the base's (writable) class attribute; structures are frozen dataclasses
    @property
    def fixed_density(self) -> float:  # type: ignore[override]
        return self.n_keep / self.m

    def check_shape(self, shape: Sequence[int], name: str = "weight") -> None:
        _, fan_in = _as_2d_shape(shape)
        if fan_in % self.m != 0:
            raise SparseforgeError(
                f"{name} has {fan_in} inputs per output (shape {tuple(shape)}), which {self!r} "
                f"cannot split into groups of m={self.m}; allowed: input size divisible by {self.m}"
            )

    def kept_count(self, shape: Sequence[int], density: float | None = None) -> int:
        self.resolve_density(density)
        self.check_shape(shape)
        return math.prod(shape) // self.m * self.n_keep

    def mask_from_scores(self, scores: torch.Tensor, density: float | None = None) -> torch.Tensor:
        self.resolve_density(density)
        self.check_shape(scores.shape)
        groups = scores.detach().reshape(-1, self.m)
        return topk_mask(groups, self.n_keep).reshape(scores.shape)


@dataclass(frozen=True)
class Block(Structure):
    """Keep or remove whole ``rows x cols`` blocks of the 2-D weight view (scores summed)."""

    rows: int
    cols: int

    def __post_init__(self) -> None:
        if not _is_int(self.rows) or not _is_int(self.cols) or self.rows < 1 or self.cols < 1:
            raise SparseforgeError(
                f"Block(rows={self.rows!r}, cols={self.cols!r}) is invalid; allowed: positive integers"
            )

    def check_shape(self, shape: Sequence[int], name: str = "weight") -> None:
        out, fan_in = _as_2d_shape(shape)
        if out % self.rows or fan_in % self.cols:
            raise SparseforgeError(
                f"{name} of 2-D view {out}x{fan_in} cannot be tiled by {self!r}; allowed: "
                f"rows divisible by {self.rows} and inputs divisible by {self.cols}"
            )

    def _n_blocks(self, shape: Sequence[int]) -> int:
        out, fan_in = _as_2d_shape(shape)
        return (out // self.rows) * (fan_in // self.cols)

    def kept_count(self, shape: Sequence[int], density: float | None = None) -> int:
        self.check_shape(shape)
        blocks = _round_half_up(self.resolve_density(density) * self._n_blocks(shape))
        return blocks * self.rows * self.cols

    def mask_from_scores(self, scores: torch.Tensor, density: float | None = None) -> torch.Tensor:
        self.check_shape(scores.shape)
        out, fan_in = _as_2d_shape(scores.shape)
        br, bc = out // self.rows, fan_in // self.cols
        tiles = scores.detach().reshape(br, self.rows, bc, self.cols).sum(dim=(1, 3))
        k = _round_half_up(self.resolve_density(density) * br * bc)
        keep = topk_mask(tiles.reshape(1, -1), k).reshape(br, 1, bc, 1)
        return keep.expand(br, self.rows, bc, self.cols).reshape(scores.shape).clone()


@dataclass(frozen=True)
class Channel(Structure):
    """Keep or remove whole slices along ``dim`` (0: output channels/neurons, 1: inputs)."""

    dim: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.dim) or self.dim < 0:
            raise SparseforgeError(f"Channel(dim={self.dim!r}) is invalid; allowed: a non-negative integer")

    def check_shape(self, shape: Sequence[int], name: str = "weight") -> None:
        if self.dim >= max(len(shape), 1):
            raise SparseforgeError(f"Channel(dim={self.dim}) does not fit {name} of shape {tuple(shape)}")

    def kept_count(self, shape: Sequence[int], density: float | None = None) -> int:
        self.check_shape(shape)
        size = shape[self.dim]
        return _round_half_up(self.resolve_density(density) * size) * (math.prod(shape) // size)

    def mask_from_scores(self, scores: torch.Tensor, density: float | None = None) -> torch.Tensor:
        self.check_shape(scores.shape)
        moved = scores.detach().movedim(self.dim, 0)
        size = moved.shape[0]
        slice_scores = moved.reshape(size, -1).sum(dim=1)
        k = _round_half_up(self.resolve_density(density) * size)
        keep = topk_mask(slice_scores.reshape(1, -1), k).reshape(size, *([1] * (moved.dim() - 1)))
        return keep.expand(moved.shape).movedim(0, self.dim).contiguous()


_NM_RE = re.compile(r"^(\d+):(\d+)$")
_BLOCK_RE = re.compile(r"^block:(\d+)x(\d+)$")
_CHANNEL_RE = re.compile(r"^channel(?::(\d+))?$")


def parse_structure(text: str | Structure) -> Structure:
    """Turn a CLI-style name into a :class:`Structure`.

    Allowed: ``unstructured``, ``N:M`` (kept:group, e.g. ``2:4``), ``block:RxC``, ``channel`` or
    ``channel:DIM``, ``fanin`` (constant fan-in). A :class:`Structure` passes through unchanged.
    """
    if isinstance(text, Structure):
        return text
    allowed = "unstructured, N:M (e.g. 2:4), block:RxC (e.g. block:4x4), channel[:DIM], fanin"
    if not isinstance(text, str):
        raise SparseforgeError(f"structure={text!r} is not recognised; allowed: {allowed}")
    key = text.strip().lower()
    if key == "unstructured":
        return Unstructured()
    if key in ("fanin", "constant-fan-in", "constant_fan_in"):
        return ConstantFanIn()
    if m := _NM_RE.match(key):
        return NM(int(m.group(1)), int(m.group(2)))
    if m := _BLOCK_RE.match(key):
        return Block(int(m.group(1)), int(m.group(2)))
    if m := _CHANNEL_RE.match(key):
        return Channel(int(m.group(1) or 0))
    raise SparseforgeError(f"structure={text!r} is not recognised; allowed: {allowed}")
