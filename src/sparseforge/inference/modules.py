"""Inference-only modules that run a packed sparse weight (or, per batch size, the dense one).

:class:`SparseLinear` replaces ``nn.Linear`` and 1x1 ``nn.Conv1d`` / ``nn.Conv2d`` (stride 1,
no padding, no groups). It has no parameters, only buffers: it cannot be trained, and calling
it with grad enabled on an input that requires grad raises :class:`SparseforgeError`.
:class:`InputSparseLinear` replaces a :class:`~sparseforge.activations.ThresholdedLinear`: it
drops the small inputs as that layer does and, for one input row, runs the sparse-input kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..activations.thresholded import drop_small
from ..errors import SparseforgeError, check_sparsity
from .epilogue import activation_code, apply_activation
from .formats import INPUT_SPARSE_FORMATS, InputSparseBitmask, InputSparseDense, PackedFormat
from .kernels import input_sparse_matmul, input_sparse_native, kernel_available_for, sparse_matmul_tensor

__all__ = ["BatchPlan", "SparseLinear", "InputSparseLinear", "INPUT_PATHS"]

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
        activation: an activation applied to the output (the fused epilogue, see
            :mod:`.epilogue`): ``"relu"``, ``"gelu"``, ``"gelu_tanh"``, ``"silu"`` or ``None``. The
            pairs kernel applies it in registers; every other path with PyTorch.
        transposed_output: return the pairs kernel's output as a transposed view (strides
            ``(1, ld)``), which a following pairs layer reads without a copy; ``convert`` sets it
            where the next consumer is such a layer. Other paths return ordinary tensors.

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
        activation: str | None = None,
        transposed_output: bool = False,
    ) -> None:
        super().__init__()
        activation_code(activation)  # refuses an unknown name
        if not isinstance(transposed_output, bool):
            raise SparseforgeError(f"transposed_output={transposed_output!r} is not allowed; allowed: True or False")
        if layout not in LAYOUTS:
            raise SparseforgeError(f"layout={layout!r} is not allowed; allowed: {LAYOUTS}")
        if packed is None and dense_weight is None:
            raise SparseforgeError("SparseLinear needs a packed or a dense weight; got neither")
        for fmt in (packed, extra):
            if fmt is not None and fmt.name in INPUT_SPARSE_FORMATS:
                raise SparseforgeError(
                    f"format {fmt.name!r} is not allowed in a SparseLinear; allowed: a weight format (sparse-input formats run in InputSparseLinear)"
                )
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
        self.activation = activation
        self.transposed_output = transposed_output
        #: name of the activation module this layer's epilogue replaced (now ``nn.Identity``), set
        #: by ``convert``; saved so that loading the file into the original model fuses it again
        self.fused_from: str | None = None
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
        act = f", activation={self.activation}" if self.activation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format_names}, layout={self.layout}, plan=[{self.describe_plan()}]{act}"

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
            return sparse_matmul_tensor(
                fmt,
                x2,
                bias=self._buffers["bias"],
                activation=self.activation,
                transposed_output=self.transposed_output,
            )
        if self.dense_weight is None:
            # Kernels vanished after conversion (not expected): rebuild the dense weight once.
            assert self.packed is not None  # __init__ refuses neither a packed nor a dense weight
            self.dense_weight = self.packed.to_dense()
        return apply_activation(torch.nn.functional.linear(x2, self.dense_weight, self.bias), self.activation)

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


#: The paths :class:`InputSparseLinear` counts in ``path_counts``: ``"input-sparse"`` (one row, the
#: sparse-input kernel ran), ``"above-crossover"`` (one row with more active inputs than
#: ``max_active``: the plain path ran), ``"plain"`` (several rows, no sparse-input packing, or no
#: C library: the plain path on the thresholded input).
INPUT_PATHS = ("input-sparse", "above-crossover", "plain")


class InputSparseLinear(SparseLinear):
    """A linear layer that drops its small inputs and, for one row, reads only the active inputs' weights.

    What :func:`~.convert.convert` makes of a :class:`~sparseforge.activations.ThresholdedLinear`:
    every input entry with ``|x| <= threshold`` is zeroed (as ``drop_small`` does: NaN is kept),
    then ``y = x' @ W.T + b``. The thresholding is never skipped, whichever path runs:

    * one input row, ``input_packed`` set and the C kernels loaded: the sparse-input kernel
      (:func:`~.kernels.input_sparse_matmul`) counts the active inputs first and multiplies only
      when there are at most ``max_active`` of them (the crossover: above it the kernel is no
      faster than the plain path, which then runs instead);
    * otherwise the plain path of the inherited :class:`SparseLinear` (``packed`` / ``extra`` /
      the dense weight, by ``plan``) on the thresholded input.

    Args:
        input_packed: the sparse-input packing (:class:`~.formats.InputSparseDense` or
            :class:`~.formats.InputSparseBitmask`) of the weight, or ``None`` (one row runs the
            plain path too).
        max_active: the most active inputs (a count, ``0 .. in_features``) for which one row runs
            the sparse-input kernel.
        threshold: inputs of magnitude at most this (in the input's units) are dropped; finite, >= 0.
        input_sparsity: the fraction of inputs the threshold was calibrated to drop, in [0, 1)
            (informational: what ``convert`` timed the kernel at).
        packed: the plain path's packed weight, as for :class:`SparseLinear` (layout ``"linear"``).
        dense_weight: the float32 dense weight, kept when the plan uses the dense path.
        bias: float32 ``(out_features,)`` or ``None``.
        plan: the plain path per number of input rows, as for :class:`SparseLinear`.
        shape: ``(out_features, in_features)`` when neither weight gives it.
        extra: a second packed format of the plain path, as for :class:`SparseLinear`.
        input_variant: the sparse-input kernel's instruction set (2 AVX-512, 1 AVX2, 0 portable C;
            ``None``: the best one).

    ``path_counts`` (attribute, not saved) counts the calls per path of :data:`INPUT_PATHS`.
    """

    input_threshold: torch.Tensor
    input_sparsity: torch.Tensor

    def __init__(
        self,
        input_packed: InputSparseDense | InputSparseBitmask | None,
        max_active: int,
        threshold: float,
        input_sparsity: float,
        packed: PackedFormat | None,
        dense_weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        plan: BatchPlan,
        shape: tuple[int, int] | None = None,
        extra: PackedFormat | None = None,
        input_variant: int | None = None,
    ) -> None:
        super().__init__(packed, dense_weight, bias, plan, "linear", shape, extra)
        if input_packed is not None and (
            not isinstance(input_packed, (InputSparseDense, InputSparseBitmask))
            or input_packed.shape != (self.out_features, self.in_features)
        ):
            raise SparseforgeError(
                f"input_packed={type(input_packed).__name__} is not allowed; allowed: an InputSparseDense or "
                f"InputSparseBitmask of shape {(self.out_features, self.in_features)}, or None"
            )
        if isinstance(max_active, bool) or not isinstance(max_active, int) or not 0 <= max_active <= self.in_features:
            raise SparseforgeError(
                f"max_active={max_active!r} is not allowed; allowed: an int in [0, {self.in_features}] (in_features)"
            )
        value = float(threshold) if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) else None
        if value is None or not math.isfinite(value) or value < 0:
            raise SparseforgeError(f"threshold={threshold!r} is not allowed; allowed: a finite number >= 0")
        if input_variant is not None and input_variant not in (0, 1, 2):
            raise SparseforgeError(f"input_variant={input_variant!r} is not allowed; allowed: 0, 1, 2 or None")
        self.register_buffer("input_threshold", torch.tensor(value, dtype=torch.float32))
        self.register_buffer(
            "input_sparsity", torch.tensor(check_sparsity(input_sparsity, "input sparsity"), dtype=torch.float32)
        )
        self.input_packed = input_packed
        self.max_active = int(max_active)
        self.input_variant = input_variant
        self.path_counts: dict[str, int] = dict.fromkeys(INPUT_PATHS, 0)

    @property
    def crossover(self) -> float:
        """``max_active / in_features``: the largest fraction of active inputs the kernel runs at."""
        return self.max_active / self.in_features if self.in_features else 1.0

    @property
    def format_names(self) -> str:
        """The sparse-input format (``"input-sparse"``, ``"input-sparse+bitmask"``) when one row can
        run it, else the plain formats as for :class:`SparseLinear` (``"none"``: dense)."""
        return self.input_packed.name if self.input_packed is not None else super().format_names

    def describe_plan(self) -> str:
        """``"1 row with <= 2048 of 4096 inputs active: input-sparse; else rows 1+: dense"``."""
        plain = super().describe_plan()
        if self.input_packed is None:
            return f"thresholded; {plain}"
        return (
            f"1 row with <= {self.max_active} of {self.in_features} inputs active ({self.crossover:.0%}): "
            f"{self.input_packed.name}; else {plain}"
        )

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, input_threshold={float(self.input_threshold):.4g}, "
            f"input_sparsity={float(self.input_sparsity):.3f}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise SparseforgeError(
                f"input shape {tuple(x.shape)} does not fit: expected (..., {self.in_features}), given {tuple(x.shape)}"
            )
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        threshold = self._buffers["input_threshold"]
        assert threshold is not None  # registered in __init__
        if x2.shape[0] == 1 and self.input_packed is not None and input_sparse_native():
            y, _ = input_sparse_matmul(
                self.input_packed,
                x2,
                threshold.item(),
                self._buffers["bias"],
                self.max_active,
                variant=self.input_variant,
            )
            if y is not None:
                self.path_counts["input-sparse"] += 1
                return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
            self.path_counts["above-crossover"] += 1
        else:
            self.path_counts["plain"] += 1
        y = self._matmul_rows(drop_small(x2, threshold.to(x2.dtype)))
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
