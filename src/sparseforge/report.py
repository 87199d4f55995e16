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

__all__ = ["LayerStats", "SparsityReport", "sparsity_report"]


@dataclass(frozen=True)
class LayerStats:
    """One prunable layer's weight statistics. ``sparsity`` is the fraction of zeros."""

    name: str
    shape: tuple[int, ...]
    numel: int
    nnz: int
    sparsity: float
    dense_flops: int
    sparse_flops: int
    #: In the pruning budget: masked (when masks are given) or of a prunable type (when not).
    prunable: bool = True


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

    def to_table(self) -> Any:
        """A ``rich.table.Table`` of the report."""
        from rich.table import Table

        table = Table(title="sparsity report", caption=self.flops_note)
        for col in ("layer", "shape", "nnz", "sparsity", "dense FLOPs", "sparse FLOPs"):
            table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for layer in self.layers:
            table.add_row(
                layer.name if layer.prunable else f"{layer.name} (not masked)", "x".join(map(str, layer.shape)), f"{layer.nnz:,}", f"{layer.sparsity:.4f}",
                f"{layer.dense_flops:,}", f"{layer.sparse_flops:,}",
            )
        table.add_row(
            "prunable total", "", f"{self.prunable_nnz:,} / {self.prunable_params:,}",
            f"{self.prunable_sparsity:.4f}", f"{self.dense_flops:,}", f"{self.sparse_flops:,}", style="bold",
        )
        table.add_row(
            "all parameters", "", f"{self.total_nnz:,} / {self.total_params:,}", f"{self.total_sparsity:.4f}",
            "", "", style="bold",
        )
        return table


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

    nnz comes from ``masks`` when given, else from the weights' actual nonzeros. With ``masks``,
    the prunable totals count only the masked layers (the pruning budget); FLOP totals always
    cover every Linear/Conv layer, masked or not. With
    ``example_input`` (a batch), FLOPs are per sample including spatial positions; without it,
    per input row (Linear) or per output position (convolutions).
    """
    positions = _positions_per_sample(model, example_input) if example_input is not None else {}
    report = SparsityReport()
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            report.total_params += p.numel()
            report.total_nnz += int(torch.count_nonzero(p.detach()))
    seen.clear()
    for module_name, module in model.named_modules():
        if not isinstance(module, DEFAULT_PRUNABLE_TYPES) or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        weight = module.weight
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        name = f"{canonical_name(module_name)}.weight"
        in_budget = masks is None or name in masks
        if masks is not None and name in masks:
            nnz = masks.nnz(name)
        else:
            nnz = int(torch.count_nonzero(weight.detach()))
        pos = positions.get(id(module), 1)
        stats = LayerStats(
            name=name, shape=tuple(weight.shape), numel=weight.numel(), nnz=nnz,
            sparsity=1.0 - nnz / weight.numel(), dense_flops=2 * weight.numel() * pos, sparse_flops=2 * nnz * pos,
            prunable=in_budget,
        )
        report.layers.append(stats)
        if in_budget:
            report.prunable_params += stats.numel
            report.prunable_nnz += stats.nnz
        report.dense_flops += stats.dense_flops
        report.sparse_flops += stats.sparse_flops
    report.flops_note = (
        "FLOPs per sample (2 per multiply-add)" if example_input is not None
        else "FLOPs per input row / per conv output position (2 per multiply-add); pass example_input for per-sample"
    )
    if show:
        from rich.console import Console

        Console().print(report.to_table())
    return report
