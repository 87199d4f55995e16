"""Statistics of a linear layer's inputs over the calibration tokens, accumulated in fp32.

One :class:`InputStats` per ``nn.Linear`` (or GPT-2 ``Conv1D``) of the block being calibrated.
Every method reads what it needs from it: Wanda and RIA the column norms ``||X_j||_2``, SparseGPT
the Hessian ``H = 2 X^T X / tokens``, DSnoT the per-column mean and variance. A token is one row
of the layer's input (batch x sequence positions flattened).

Inputs are checked for NaN and Inf once, when the sums are first read (a NaN or Inf input makes
the sum of squares of its column NaN or Inf, so nothing slips through), not on every batch.
"""

from __future__ import annotations

import torch

from ..errors import SparseforgeError

__all__ = ["InputStats"]


class InputStats:
    """Running fp32 sums over the input rows ``x`` (shape ``(..., in_features)``) of one layer.

    Args:
        in_features: the layer's input width.
        hessian: also accumulate ``X^T X`` (``in_features``\\ :sup:`2` floats; SparseGPT needs it).
        device: where the sums live (default: the CPU). Put them on the model's GPU to accumulate
            ``X^T X`` there; the column sums are float64, so the device must support float64
            (not Apple's ``mps``). Inputs given to :meth:`add` are moved to this device.
        means: also accumulate the column sums (for :meth:`mean` and :meth:`variance`, which
            DSnoT reads); Wanda, RIA and SparseGPT need only the sums of squares (and ``X^T X``),
            so the driver leaves them out for those, which saves one pass over every input.
    """

    def __init__(
        self,
        in_features: int,
        *,
        hessian: bool = False,
        device: torch.device | str | None = None,
        means: bool = True,
    ) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise SparseforgeError(f"in_features={in_features!r} is not allowed; allowed: an integer >= 1")
        try:
            where = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as err:
            raise SparseforgeError(f"device={device!r} is not allowed; allowed: a torch.device or its name") from err
        if where.type in ("mps", "meta"):
            raise SparseforgeError(
                f"device={device!r} cannot hold the float64 sums of InputStats; allowed: 'cpu', 'cuda' or None"
            )
        if not isinstance(means, bool):
            raise SparseforgeError(f"means={means!r} is not allowed; allowed: True or False")
        self.in_features = in_features
        self.tokens = 0
        self.checked = False  # whether the sums were found finite since the last add
        self.sums: torch.Tensor | None = torch.zeros(in_features, dtype=torch.float64, device=where) if means else None
        self.sq_sums = torch.zeros(in_features, dtype=torch.float64, device=where)
        self.xtx: torch.Tensor | None = (
            torch.zeros(in_features, in_features, dtype=torch.float32, device=where) if hessian else None
        )

    @property
    def device(self) -> torch.device:
        """Where the sums live (inputs are moved here by :meth:`add`)."""
        return self.sq_sums.device

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of input rows (any float dtype; accumulated in fp32, column sums in fp64)."""
        if x.shape[-1] != self.in_features:
            raise SparseforgeError(f"input of width {x.shape[-1]} given to statistics of width {self.in_features}")
        rows = x.detach().reshape(-1, self.in_features).to(device=self.sq_sums.device, dtype=torch.float32)
        self.tokens += rows.shape[0]
        self.checked = False
        if self.sums is not None:
            self.sums += rows.sum(dim=0, dtype=torch.float64)
        self.sq_sums += rows.pow(2).sum(dim=0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx.addmm_(rows.T, rows)

    def _need_tokens(self) -> None:
        """At least one token, and finite inputs (checked once on the sums of squares)."""
        if self.tokens == 0:
            raise SparseforgeError("no calibration tokens reached this layer; allowed: at least one")
        if not self.checked:
            if not bool(torch.isfinite(self.sq_sums).all()):
                raise SparseforgeError("calibration inputs contain NaN or Inf; allowed: finite activations")
            self.checked = True

    def _need_sums(self) -> torch.Tensor:
        self._need_tokens()
        if self.sums is None:
            raise SparseforgeError("these statistics were gathered without means=True; the input means need it")
        return self.sums

    def col_norms(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens, per input column (fp32), as Wanda and RIA use it."""
        self._need_tokens()
        return self.sq_sums.sqrt().to(torch.float32)

    def mean(self) -> torch.Tensor:
        """Mean of each input column over the tokens (fp32)."""
        return (self._need_sums() / self.tokens).to(torch.float32)

    def variance(self) -> torch.Tensor:
        """Population variance of each input column over the tokens (fp32, clamped at 0)."""
        mean = self._need_sums() / self.tokens
        return (self.sq_sums / self.tokens - mean.pow(2)).clamp_min(0).to(torch.float32)

    def hessian(self) -> torch.Tensor:
        """``H = 2 X^T X / tokens`` (fp32), SparseGPT's layer-wise Hessian of the squared error."""
        self._need_tokens()
        if self.xtx is None:
            raise SparseforgeError("these statistics were gathered without hessian=True; SparseGPT needs it")
        return self.xtx * (2.0 / self.tokens)
