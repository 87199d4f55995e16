"""A bool mask kept at one bit per weight while a model is being pruned.

The sequential driver finishes one layer's mask long before the run ends. A bool tensor costs a
byte per weight (a 160 M-weight model: 160 MB held through the whole run, next to the model and
the calibration activations); packed, it costs an eighth of that, and it is unpacked only when
someone reads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["BitMask"]


@dataclass(frozen=True)
class BitMask:
    """A bool mask packed eight weights to a byte (row-major order, ``True`` = kept)."""

    bits: np.ndarray
    shape: tuple[int, ...]

    @classmethod
    def pack(cls, mask: torch.Tensor) -> BitMask:
        """Pack a bool tensor (any device, any shape)."""
        if mask.dtype != torch.bool:
            raise TypeError(f"BitMask.pack needs a bool tensor, got {mask.dtype}")
        flat = mask.detach().to("cpu").contiguous().reshape(-1).numpy()
        return cls(np.packbits(flat), tuple(mask.shape))

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def unpack(self) -> torch.Tensor:
        """The mask as a new bool CPU tensor of :attr:`shape`."""
        flat = np.unpackbits(self.bits, count=self.numel).view(np.bool_)
        return torch.from_numpy(flat).reshape(self.shape)
