"""The interface every training-time sparsity algorithm implements.

An algorithm says only how masks *change*; the :class:`~sparseforge.sparsifier.Sparsifier` owns
the masks, the hooks and the optimizer-state bookkeeping. Steps count completed optimizer steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..masks import MaskState
    from ..sparsifier import Sparsifier

__all__ = ["Algorithm"]


class Algorithm:
    """Base class: a static mask (never updates). Subclasses override what they need."""

    #: Whether :meth:`update` reads ``sparsifier.dense_grads`` (captured only before update steps).
    needs_dense_grads: bool = False

    #: Set True by an algorithm that writes weights or optimizer state other than through
    #: ``sparsifier.change_masks`` (e.g. in :meth:`update` or its own hooks), so pruned weights
    #: must be re-masked after every step: ``zero_state="auto"`` then picks ``"step"`` and an
    #: explicit ``"grads"`` is refused. Every built-in algorithm changes weights only through
    #: ``change_masks`` (which zeroes dropped weights and their state, and sets grown ones), so
    #: ``"grads"`` is exact for them with SGD, Adam and AdamW.
    requires_step_masking: bool = False

    def check(self, masks: MaskState) -> None:
        """Raise :class:`~sparseforge.errors.SparseforgeError` if this algorithm cannot run from ``masks``.

        Called by the Sparsifier before it touches weights, optimizer state or hooks, so a refused
        combination leaves everything as it was. The default accepts any masks.
        """

    def attach(self, sparsifier: Sparsifier) -> None:
        """Called once when the sparsifier is created (after :meth:`check` passed)."""

    def detach(self) -> None:
        """Called by ``Sparsifier.finalize()``."""

    def is_update_step(self, step: int) -> bool:
        """Whether masks change right after completed optimizer step ``step`` (1-based)."""
        return False

    def update(self, sparsifier: Sparsifier, step: int) -> None:
        """Change masks through ``sparsifier.change_masks(...)``."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
