"""``convert(model)``: replace pruned Linear / 1x1 Conv layers by fast packed inference modules.

The input model is deep-copied unless ``inplace=True``. Every eligible layer (``nn.Linear``,
``nn.Conv1d`` / ``nn.Conv2d`` with kernel size 1, stride 1, padding 0, dilation 1, groups 1,
float32 weights on CPU) becomes a :class:`~.modules.SparseLinear` whose path per batch size
(rows = batch x leading dims) is chosen by measurement (``autotune=True``) or by a rule.
Layers where dense wins everywhere stay ``nn.Linear``/``nn.Conv`` and are listed in the report
with the reason (a warning also says how many). Layers of other types or dtypes are listed as
skipped. A model with no Linear / Conv layer at all raises :class:`SparseforgeError`.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SparseforgeError
from .autotune import LayerChoice, measure_layer, rule_layer
from .kernels import kernels_available, unavailable_reason
from .modules import BatchPlan, SparseLinear

__all__ = ["LayerDecision", "ConversionReport", "convert"]


@dataclass(frozen=True)
class LayerDecision:
    """What convert did with one layer: ``action`` is ``"sparse"``, ``"dense"`` or ``"skipped"``."""

    name: str
    layer_type: str
    shape: tuple[int, ...]
    sparsity: float
    action: str
    format: str | None
    plan: str
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)


@dataclass
class ConversionReport:
    """Per-layer decisions of :func:`convert`; ``str(report)`` is a readable table."""

    layers: list[LayerDecision]
    batch_sizes: tuple[int, ...]
    autotune: bool

    @property
    def sparse_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.action == "sparse"]

    @property
    def dense_layers(self) -> list[str]:
        return [d.name for d in self.layers if d.action != "sparse"]

    def __str__(self) -> str:
        head = f"sparseforge.convert: {len(self.sparse_layers)} of {len(self.layers)} layers run sparse (batch sizes {list(self.batch_sizes)}, {'measured autotune' if self.autotune else 'rule, no measurement'})"
        lines = [head]
        for d in self.layers:
            lines.append(f"  {d.name or '<root>'} [{d.layer_type} {'x'.join(map(str, d.shape))}, sparsity {d.sparsity:.3f}] -> {d.action.upper()}"
                         f"{' ' + d.format if d.format else ''}: {d.reason}")
        return "\n".join(lines)


def _conv_is_pointwise(m: nn.Module) -> bool:
    k = m.kernel_size
    return (all(s == 1 for s in k) and all(s == 1 for s in m.stride) and all(d == 1 for d in m.dilation)
            and m.groups == 1 and m.padding in ((0,), (0, 0), "valid") and m.padding_mode == "zeros")


def _weight_2d(m: nn.Module) -> torch.Tensor:
    w = m.weight.detach()
    return w.reshape(w.shape[0], -1) if w.dim() > 2 else w


def _skip_reason(m: nn.Module) -> str | None:
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not _conv_is_pointwise(m):
        return "only 1x1 convolutions with stride 1, padding 0, dilation 1, groups 1 are converted"
    if m.weight.dtype != torch.float32:
        return f"weight dtype {m.weight.dtype} is not supported (float32 only)"
    if m.weight.device.type != "cpu":
        return f"weight on {m.weight.device} (cpu only)"
    if m.bias is not None and m.bias.dtype != torch.float32:
        return f"bias dtype {m.bias.dtype} is not supported (float32 only)"
    return None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def build_module(m: nn.Module, choice: LayerChoice) -> SparseLinear:
    """A :class:`SparseLinear` for layer ``m`` following ``choice`` (keeps the dense weight only if needed)."""
    plan = BatchPlan.from_choices(choice.choices)
    w = _weight_2d(m)
    layout = "linear" if isinstance(m, nn.Linear) else ("conv1d" if isinstance(m, nn.Conv1d) else "conv2d")
    dense = w.clone().contiguous() if "dense" in plan.paths else None
    return SparseLinear(choice.packed, dense, m.bias, plan, layout, shape=tuple(w.shape), extra=choice.extra)


def convert(
    model: nn.Module,
    *,
    batch_sizes: tuple[int, ...] = (1,),
    autotune: bool = True,
    inplace: bool = False,
    reps: int = 5,
    min_sparsity: float = 0.0,
    max_formats: int = 2,
) -> tuple[nn.Module, ConversionReport]:
    """Return ``(converted_model, report)`` with pruned layers packed for fast CPU inference.

    Args:
        model: a model whose ``nn.Linear`` / 1x1 conv weights contain exact zeros.
        batch_sizes: input rows per call to tune for (batch x leading dims); each one is measured.
        autotune: measure every candidate format against dense (``True``) or use the rule in
            :func:`.autotune.rule_layer` (``False``).
        inplace: modify ``model`` itself instead of a deep copy.
        reps: timed calls per candidate and batch size (median is used).
        min_sparsity: layers with a lower sparsity (fraction of zeros) stay dense without timing.
        max_formats: packed formats a layer may keep (1 or 2): with 2, a second format is kept
            for the batch sizes where it beats the first by the margin (more memory, faster).

    Raises:
        SparseforgeError: if the model has no Linear / Conv layer, or an argument is invalid.
    """
    sizes = tuple(int(b) for b in batch_sizes)
    if not sizes or any(b < 1 for b in sizes):
        raise SparseforgeError(f"batch_sizes={batch_sizes!r} is not allowed; allowed: a non-empty tuple of ints >= 1")
    if reps < 1:
        raise SparseforgeError(f"reps={reps!r} is not allowed; allowed: an int >= 1")
    if max_formats not in (1, 2):
        raise SparseforgeError(f"max_formats={max_formats!r} is not allowed; allowed: 1 or 2")
    if not (0.0 <= float(min_sparsity) < 1.0):
        raise SparseforgeError(f"min_sparsity={min_sparsity!r} is outside the allowed range [0, 1)")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    if not layers:
        raise SparseforgeError(f"nothing to convert: {type(model).__name__} has no nn.Linear or 1x1 nn.Conv1d/Conv2d layer")
    out = model if inplace else copy.deepcopy(model)
    decisions: list[LayerDecision] = []
    kernel_problem = unavailable_reason()
    if kernel_problem:
        warnings.warn(f"sparseforge.convert: kernels unavailable, every layer stays dense: {kernel_problem}", stacklevel=2)
    with torch.inference_mode():
        for name, _ in layers:
            m = out.get_submodule(name) if name else out
            w = m.weight
            shape = tuple(w.shape)
            kind = type(m).__name__
            skip = _skip_reason(m)
            # reported for skipped layers too (fp16, GPU, 3x3 conv); nan only where it cannot be read
            sparsity = float((w == 0).float().mean()) if w.numel() and w.device.type != "meta" else float("nan")
            if skip is not None:
                decisions.append(LayerDecision(name, kind, shape, sparsity, "skipped", None, "-", skip))
                continue
            if kernel_problem:
                decisions.append(LayerDecision(name, kind, shape, sparsity, "dense", None, "all: dense", kernel_problem))
                continue
            if sparsity <= min_sparsity or sparsity == 0.0:
                decisions.append(LayerDecision(name, kind, shape, sparsity, "dense", None, "all: dense",
                                               f"sparsity {sparsity:.3f} <= min_sparsity {min_sparsity} (no zeros to exploit)"))
                continue
            try:
                choice = measure_layer(_weight_2d(m), m.bias, sizes, reps=reps, max_formats=max_formats) if autotune else rule_layer(_weight_2d(m), sizes)
            except Exception as exc:  # a kernel that fails to compile must never crash convert
                warnings.warn(f"sparseforge.convert: kernel failed for {name!r}, left dense: {type(exc).__name__}: {exc}", stacklevel=2)
                decisions.append(LayerDecision(name, kind, shape, sparsity, "dense", None, "all: dense", f"kernel failed: {type(exc).__name__}"))
                continue
            if choice.packed is None:
                decisions.append(LayerDecision(name, kind, shape, sparsity, "dense", None, "all: dense", choice.reason, choice.timings_ms))
                continue
            new = build_module(m, choice)
            if name:
                _set_submodule(out, name, new)
            else:
                out = new
            decisions.append(LayerDecision(name, kind, shape, sparsity, "sparse", new.format_names, new.describe_plan(), choice.reason, choice.timings_ms))
    report = ConversionReport(decisions, sizes, autotune)
    n_dense = len(report.dense_layers)
    if not report.sparse_layers:
        warnings.warn(f"sparseforge.convert: nothing converted, all {n_dense} layers run dense (see report)", stacklevel=2)
    elif n_dense:
        warnings.warn(f"sparseforge.convert: {n_dense} of {len(decisions)} layers run dense: {', '.join(report.dense_layers)} (see report)", stacklevel=2)
    return out, report
