"""Inference-only modules that run a packed sparse weight (or, per batch size, the dense one).

:class:`SparseLinear` replaces ``nn.Linear`` and 1x1 ``nn.Conv1d`` / ``nn.Conv2d`` (stride 1,
no padding, no groups). It has no parameters, only buffers: it cannot be trained, and calling
it with grad enabled on an input that requires grad raises :class:`SparseforgeError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SparseforgeError
from .formats import PackedFormat
from .kernels import kernel_available_for, sparse_matmul_tensor

__all__ = ["BatchPlan", "SparseLinear"]

LAYOUTS = ("linear", "conv1d", "conv2d")


@dataclass(frozen=True)
class BatchPlan:
    """Which path runs for which number of input rows (batch x leading dims).

    ``steps`` is a tuple of ``(max_rows, path)`` sorted by ``max_rows``; ``path`` is ``"sparse"`` or
    ``"dense"``; rows above the last bound use the last path.
    """

    steps: tuple[tuple[int, str], ...]

    def path_for(self, rows: int) -> str:
        for bound, path in self.steps:
            if rows <= bound:
                return path
        return self.steps[-1][1]

    @property
    def paths(self) -> set[str]:
        return {p for _, p in self.steps}

    def describe(self) -> str:
        parts, lo = [], 1
        for bound, path in self.steps:
            parts.append(f"rows {lo}-{bound}: {path}")
            lo = bound + 1
        parts[-1] = parts[-1].split(":")[0].rsplit("-", 1)[0] + "+:" + parts[-1].split(":")[1]
        return "; ".join(parts)

    @staticmethod
    def from_choices(choices: dict[int, str]) -> BatchPlan:
        """Plan from measured winners ``{batch_rows: path}``: each bucket ends at a measured size."""
        if not choices:
            raise SparseforgeError("a batch plan needs at least one measured batch size; allowed: a non-empty dict")
        steps = tuple(sorted((int(b), p) for b, p in choices.items()))
        merged: list[tuple[int, str]] = []
        for bound, path in steps:
            if merged and merged[-1][1] == path:
                merged[-1] = (bound, path)
            else:
                merged.append((bound, path))
        return BatchPlan(tuple(merged))


class SparseLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` packed; accepts ``(..., in_features)`` like ``nn.Linear``.

    Args:
        packed: the packed weight (plan path ``"sparse"``), or ``None`` when only the dense path is kept.
        dense_weight: the float32 dense weight, kept only when the plan uses the dense path.
        bias: float32 ``(out_features,)`` or ``None``.
        plan: which path runs for how many input rows: ``"sparse"`` (``packed``), ``"dense"``, or
            the name of ``extra``.
        layout: ``"linear"``, ``"conv1d"`` (input ``(N, C, L)``) or ``"conv2d"`` (``(N, C, H, W)``).
        shape: ``(out_features, in_features)`` when neither weight gives it.
        extra: a second packing of the same weight in another format, for the batch sizes where
            it is faster (say bitmask at batch 1 and CSR above); plan path ``extra.name``.

    ``tuned_batch_sizes`` (attribute, not saved) holds the batch sizes ``convert`` measured, which
    :func:`~.convert.retune` measures again by default; ``None`` when unknown (then the plan's bounds).
    """

    # buffers (registered in __init__), typed here for nn.Module.__getattr__
    dense_weight: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        packed: PackedFormat | None,
        dense_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        plan: BatchPlan,
        layout: str = "linear",
        shape: tuple[int, int] | None = None,
        extra: PackedFormat | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise SparseforgeError(f"layout={layout!r} is not allowed; allowed: {LAYOUTS}")
        if packed is None and dense_weight is None:
            raise SparseforgeError("SparseLinear needs a packed or a dense weight; got neither")
        if extra is not None and (
            packed is None or extra.name in ("sparse", "dense", packed.name) or extra.shape != packed.shape
        ):
            raise SparseforgeError(
                f"extra format {extra.name!r} is not allowed here; allowed: a packed weight of the same shape in a format other than the main one"
            )
        allowed = {"sparse", "dense"} | ({extra.name} if extra is not None else set())
        if not plan.paths <= allowed:
            raise SparseforgeError(
                f"plan paths {sorted(plan.paths - allowed)} are not allowed; allowed: {sorted(allowed)}"
            )
        if "sparse" in plan.paths and packed is None:
            raise SparseforgeError("plan uses the sparse path but no packed weight was given")
        if "dense" in plan.paths and dense_weight is None:
            raise SparseforgeError("plan uses the dense path but no dense weight was given")
        self.packed = packed
        self.extra = extra
        self.tuned_batch_sizes: tuple[int, ...] | None = None
        self.plan = plan
        self.layout = layout
        if shape:
            self.out_features, self.in_features = shape
        elif packed is not None:
            self.out_features, self.in_features = packed.shape
        else:
            assert dense_weight is not None  # refused above: neither a packed nor a dense weight
            self.out_features, self.in_features = tuple(dense_weight.shape)
        self.register_buffer(
            "dense_weight", None if dense_weight is None else dense_weight.detach().to(torch.float32).contiguous()
        )
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32).contiguous())

    @property
    def format_names(self) -> str:
        """``"csr"``, ``"csr+bitmask"`` (main + extra), or ``"none"``."""
        if self.packed is None:
            return "none"
        return self.packed.name + (f"+{self.extra.name}" if self.extra is not None else "")

    def format_for(self, rows: int) -> PackedFormat | None:
        """The packed weight that runs for ``rows`` input rows, ``None`` on the dense path."""
        path = self.plan.path_for(rows)
        if path == "dense":
            return None
        return self.packed if path == "sparse" else self.extra

    def describe_plan(self) -> str:
        """The plan with format names: ``"rows 1-1: bitmask; rows 2+: csr"``."""
        text = self.plan.describe()
        if self.packed is not None:
            text = text.replace(": sparse", f": {self.packed.name}")
        return text

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_names}, layout={self.layout}, plan=[{self.describe_plan()}]"

    def _check_input(self, x: torch.Tensor) -> None:
        if x.requires_grad and torch.is_grad_enabled():
            raise SparseforgeError(
                "SparseLinear is inference-only: got an input that requires grad with grad enabled; "
                "allowed: torch.inference_mode() / torch.no_grad() or a detached input"
            )
        if x.dtype != torch.float32:
            raise SparseforgeError(f"input dtype {x.dtype} is not supported; allowed: torch.float32")
        if not x.is_cpu:
            raise SparseforgeError(f"input device {x.device} is not supported; allowed: cpu")

    def _matmul_rows(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2`` is ``(rows, in_features)``; returns ``(rows, out_features)``."""
        fmt = self.format_for(x2.shape[0])
        if fmt is not None and kernel_available_for(fmt):
            # direct buffer lookup: nn.Module.__getattr__ costs ~1 us per call
            return sparse_matmul_tensor(fmt, x2, bias=self._buffers["bias"])
        if self.dense_weight is None:
            # Kernels vanished after conversion (not expected): rebuild the dense weight once.
            assert self.packed is not None  # __init__ refuses neither a packed nor a dense weight
            self.dense_weight = self.packed.to_dense()
        return torch.nn.functional.linear(x2, self.dense_weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.layout == "linear":
            if x.dim() < 1 or x.shape[-1] != self.in_features:
                raise SparseforgeError(
                    f"input shape {tuple(x.shape)} does not fit: expected (..., {self.in_features}), given {tuple(x.shape)}"
                )
            if x.dim() == 2:  # the common case: no reshapes (each costs ~1 us at batch 1)
                return self._matmul_rows(x)
            lead = x.shape[:-1]
            y = self._matmul_rows(x.reshape(-1, self.in_features))
            return y.reshape(*lead, self.out_features)
        spatial = 1 if self.layout == "conv1d" else 2
        if x.dim() not in (spatial + 1, spatial + 2) or x.shape[-spatial - 1] != self.in_features:
            want = "(N, C, L)" if spatial == 1 else "(N, C, H, W)"
            raise SparseforgeError(
                f"input shape {tuple(x.shape)} does not fit: expected {want} with C={self.in_features}, given {tuple(x.shape)}"
            )
        moved = x.movedim(-spatial - 1, -1)
        lead = moved.shape[:-1]
        y = self._matmul_rows(moved.reshape(-1, self.in_features)).reshape(*lead, self.out_features)
        return y.movedim(-1, -spatial - 1)
