"""The interface every training-time sparsity algorithm implements.

An algorithm says only how masks *change*; the :class:`~sparseforge.sparsifier.Sparsifier` owns
the masks, the hooks and the optimizer-state bookkeeping. Steps count completed optimizer steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..sparsifier import Sparsifier

__all__ = ["Algorithm"]


class Algorithm:
    """Base class: a static mask (never updates). Subclasses override what they need."""

    #: Whether :meth:`update` reads ``sparsifier.dense_grads`` (captured only before update steps).
    needs_dense_grads: bool = False

    def attach(self, sparsifier: Sparsifier) -> None:
        """Called once when the sparsifier is created."""

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
