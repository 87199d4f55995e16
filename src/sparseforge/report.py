"""``sparsity_report``: per-layer shape, nnz, sparsity and FLOPs, with totals.

FLOPs convention: one multiply-add = 2 FLOPs, counted per sample (per input row of a Linear;
per output position of a convolution unless ``example_input`` tells the spatial size). Sparse
FLOPs count only the nonzero weights (what an ideal sparse kernel executes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .masks import MaskState, canonical_name
from .targets import DEFAULT_PRUNABLE_TYPES

__all__ = ["LayerStats", "SparsityReport", "checkpoint_report", "sparsity_report"]


@dataclass(frozen=True)
class LayerStats:
    """One prunable layer's weight statistics. ``sparsity`` is the fraction of zeros."""

    name: str
    shape: tuple[int, ...]
    numel: int
    #: Weights counted as kept: the mask's count for a masked layer, else the nonzero weights.
    nnz: int
    sparsity: float
    dense_flops: int
    sparse_flops: int
    #: In the pruning budget: masked (when masks are given) or of a prunable type (when not).
    prunable: bool = True
    #: Kept positions of the layer's mask (``None``: no mask for this layer).
    mask_kept: int | None = None
    #: Weights that are actually nonzero (they can exceed ``mask_kept`` if a mask was not applied).
    nonzero: int = 0


@dataclass
class SparsityReport:
    """Per-layer statistics plus totals over all parameters and over prunable weights."""

    layers: list[LayerStats] = field(default_factory=list)
    total_params: int = 0
    total_nnz: int = 0
    prunable_params: int = 0
    prunable_nnz: int = 0
    dense_flops: int = 0
    sparse_flops: int = 0
    flops_note: str = ""
    #: What the "prunable" totals cover: the masked layers (masks given) or every Linear/Conv layer.
    budget: str = "masked layers"

    @property
    def total_sparsity(self) -> float:
        return 1.0 - self.total_nnz / self.total_params if self.total_params else 0.0

    @property
    def prunable_sparsity(self) -> float:
        return 1.0 - self.prunable_nnz / self.prunable_params if self.prunable_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_sparsity"] = self.total_sparsity
        out["prunable_sparsity"] = self.prunable_sparsity
        return out

    @property
    def unapplied(self) -> list[str]:
        """Masked layers with nonzero weights outside their mask (the mask was not applied)."""
        return [layer.name for layer in self.layers if layer.mask_kept is not None and layer.nonzero > layer.mask_kept]

    def to_table(self) -> Any:
        """A ``rich.table.Table`` of the report; every count column says where it comes from."""
        from rich.table import Table

        masked = self.budget == "masked layers"
        caption = self.flops_note
        if masked:
            caption += ". kept (mask): positions the mask keeps; nonzero: weights that are not 0"
        else:
            caption += (
                ". No masks given: sparsity is the fraction of weights that are exactly 0, and the total covers "
                "every Linear/Conv layer, including any left dense; pass masks= for the pruning budget"
            )
        if self.unapplied:
            caption += f". WARNING: {', '.join(self.unapplied[:3])} have nonzero weights outside their masks"
        table = Table(title="sparsity report", caption=caption)
        columns = [
            "layer",
            "shape",
            *(["kept (mask)"] if masked else []),
            "nonzero",
            "sparsity",
            "dense FLOPs",
            "sparse FLOPs",
        ]
        for col in columns:
            table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for layer in self.layers:
            kept = [f"{layer.mask_kept:,}" if layer.mask_kept is not None else "-"] if masked else []
            table.add_row(
                layer.name if layer.prunable else f"{layer.name} (not masked)",
                "x".join(map(str, layer.shape)),
                *kept,
                f"{layer.nonzero:,}",
                f"{layer.sparsity:.4f}",
                f"{layer.dense_flops:,}",
                f"{layer.sparse_flops:,}",
            )
        label = "masked layers total" if masked else "all Linear/Conv weights"
        count = f"{self.prunable_nnz:,} / {self.prunable_params:,}"
        table.add_row(
            label,
            "",
            *([count] if masked else []),
            "" if masked else count,
            f"{self.prunable_sparsity:.4f}",
            f"{self.dense_flops:,}",
            f"{self.sparse_flops:,}",
            style="bold",
        )
        table.add_row(
            "all parameters",
            "",
            *([""] if masked else []),
            f"{self.total_nnz:,} / {self.total_params:,}",
            f"{self.total_sparsity:.4f}",
            "",
            "",
            style="bold",
        )
        return table


def _print_table(report: SparsityReport) -> None:
    """Print the table; at least 120 columns wide when the output is not a terminal (a pipe or a
    file would otherwise get rich's 80 columns and cut the layer names)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    console.print(report.to_table())


def _positions_per_sample(model: nn.Module, example_input: Any) -> dict[int, int]:
    """Run one forward pass and record, per module id, output positions per sample."""
    positions: dict[int, int] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Linear):
            positions[id(module)] = max(1, output.numel() // output.shape[-1] // max(1, batch))
        else:  # convolution: (N, C, *spatial)
            positions[id(module)] = max(1, output[0, 0].numel()) if output.dim() > 2 else 1

    first = example_input[0] if isinstance(example_input, (tuple, list)) else example_input
    batch = int(first.shape[0]) if first.dim() > 0 else 1
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, DEFAULT_PRUNABLE_TYPES)]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_input) if isinstance(example_input, (tuple, list)) else model(example_input)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return positions


def sparsity_report(
    model: nn.Module,
    example_input: Any = None,
    *,
    masks: MaskState | None = None,
    show: bool = True,
) -> SparsityReport:
    """Report per-layer and total sparsity and FLOPs of ``model``; print it when ``show``.

    Each layer shows its actual nonzero weights and, with ``masks``, the count its mask keeps
    (``nnz``, sparsity and FLOPs follow the mask where there is one). With ``masks``, the
    "prunable" totals count only the masked layers (the pruning budget, the sparsity that was
    pruned); without them they cover every Linear/Conv layer, including layers left dense, and are
    labelled so (``report.budget``). FLOP totals always cover every Linear/Conv layer. With
    ``example_input`` (a batch), FLOPs are per sample including spatial positions; without it,
    per input row (Linear) or per output position (convolutions).
    """
    positions = _positions_per_sample(model, example_input) if example_input is not None else {}
    report = SparsityReport(budget="masked layers" if masks is not None else "all Linear/Conv layers")
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            report.total_params += p.numel()
            report.total_nnz += int(torch.count_nonzero(p.detach()))
    seen.clear()
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, DEFAULT_PRUNABLE_TYPES) or not isinstance(weight, nn.Parameter):
            continue
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        name = f"{canonical_name(module_name)}.weight"
        in_budget = masks is None or name in masks
        nonzero = int(torch.count_nonzero(weight.detach()))
        mask_kept = masks.nnz(name) if masks is not None and name in masks else None
        nnz = mask_kept if mask_kept is not None else nonzero
        pos = positions.get(id(module), 1)
        stats = LayerStats(
            name=name,
            shape=tuple(weight.shape),
            numel=weight.numel(),
            nnz=nnz,
            sparsity=1.0 - nnz / weight.numel(),
            dense_flops=2 * weight.numel() * pos,
            sparse_flops=2 * nnz * pos,
            prunable=in_budget,
            mask_kept=mask_kept,
            nonzero=nonzero,
        )
        report.layers.append(stats)
        if in_budget:
            report.prunable_params += stats.numel
            report.prunable_nnz += stats.nnz
        report.dense_flops += stats.dense_flops
        report.sparse_flops += stats.sparse_flops
    report.flops_note = (
        "FLOPs per sample (2 per multiply-add)"
        if example_input is not None
        else "FLOPs per input row / per conv output position (2 per multiply-add); pass example_input for per-sample"
    )
    if show:
        _print_table(report)
    return report


def checkpoint_report(
    weights: dict[str, torch.Tensor], masks: MaskState | None = None, *, show: bool = True
) -> SparsityReport:
    """Report of a saved state dict alone, without its model: one row per weight of 2+ dimensions.

    With ``masks``, the masked tensors form the budget (as in :func:`sparsity_report`); without,
    every 2+-dimensional floating-point tensor does. FLOPs need the model and are left at 0.
    """
    report = SparsityReport(budget="masked layers" if masks is not None else "all Linear/Conv layers")
    for name, value in weights.items():
        report.total_params += value.numel()
        report.total_nnz += int(torch.count_nonzero(value))
        if value.dim() < 2 or not value.is_floating_point():
            continue
        nonzero = int(torch.count_nonzero(value))
        mask_kept = masks.nnz(name) if masks is not None and name in masks else None
        nnz = mask_kept if mask_kept is not None else nonzero
        in_budget = masks is None or name in masks
        report.layers.append(
            LayerStats(
                name=name,
                shape=tuple(value.shape),
                numel=value.numel(),
                nnz=nnz,
                sparsity=1.0 - nnz / max(1, value.numel()),
                dense_flops=0,
                sparse_flops=0,
                prunable=in_budget,
                mask_kept=mask_kept,
                nonzero=nonzero,
            )
        )
        if in_budget:
            report.prunable_params += value.numel()
            report.prunable_nnz += nnz
    report.flops_note = "from the file alone: FLOPs need the model (--model)"
    if show:
        _print_table(report)
    return report
