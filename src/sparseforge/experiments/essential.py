"""The demo: the "essential sparsity" curve of a small network trained on MNIST-1D.

Train one dense model, then prune copies of it in one shot, without retraining, at increasing
sparsity with several scores (unstructured, global budget) and with N:M patterns, and measure test
accuracy. The *dropping point* of a curve is the highest sparsity whose accuracy stays within
``tolerance`` (absolute, default 1 percentage point) of the dense model; past it accuracy falls off.
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import torch

from ..errors import SparseforgeError
from ..fileio import write_text
from ..pruning import METHODS, prune
from ..structures import NM
from ..targets import select_prunable
from ..training import evaluate, train
from .datasets import load_dataset
from .models import build_model

if TYPE_CHECKING:
    from rich.progress import Progress

__all__ = ["EssentialConfig", "run_essential_sparsity", "dropping_point", "format_table", "plot"]

DEFAULT_SPARSITIES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)


@dataclass
class EssentialConfig:
    """Settings of the essential-sparsity sweep (epochs are passes over the training set)."""

    dataset: str = "mnist1d"
    model: str = "cnn"
    width: int = 128
    epochs: int = 20
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 0
    sparsities: Sequence[float] = DEFAULT_SPARSITIES
    methods: Sequence[str] = ("magnitude", "random", "snip", "synflow")
    nm_patterns: Sequence[tuple[int, int]] = ((2, 4), (1, 4), (1, 8))
    calibration_samples: int = 512
    tolerance: float = 0.01
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        for method in self.methods:
            if method not in METHODS:
                raise SparseforgeError(f"method={method!r} is not recognised; allowed: {list(METHODS)}")
        for s in self.sparsities:
            if not 0.0 <= float(s) < 1.0:
                raise SparseforgeError(f"sparsity={s!r} is outside the allowed range [0, 1)")
        if self.width < 1:
            raise SparseforgeError(f"width={self.width} is not allowed; allowed: an integer >= 1")
        if self.epochs < 1:
            raise SparseforgeError(f"epochs={self.epochs} is not allowed; allowed: an integer >= 1")
        for n, m in self.nm_patterns:
            NM(n, m)


def _untileable_layers(model: torch.nn.Module, structures: Sequence[NM]) -> list[str]:
    """Module names of prunable layers that at least one of ``structures`` cannot tile."""
    names = []
    for pname, param in select_prunable(model).items():
        for structure in structures:
            try:
                structure.check_shape(tuple(param.shape), pname)
            except SparseforgeError:
                names.append(pname.removesuffix(".weight"))
                break
    return names


def dropping_point(curve: Sequence[tuple[float, float]], dense_accuracy: float, tolerance: float) -> float:
    """Highest sparsity in ``curve`` (pairs of sparsity, accuracy) up to which accuracy stays within
    ``tolerance`` of ``dense_accuracy`` at every tested sparsity."""
    point = 0.0
    for sparsity, acc in sorted(curve):
        if acc < dense_accuracy - tolerance:
            break
        point = sparsity
    return point


def run_essential_sparsity(config: EssentialConfig | None = None, *, progress: bool = True) -> dict[str, Any]:
    """Run the sweep and return a JSON-ready dict of every measured accuracy."""
    cfg = config or EssentialConfig()
    cfg.validate()
    t0 = time.perf_counter()
    data = load_dataset(cfg.dataset, seed=42)
    model = build_model(cfg.model, data.num_features, data.num_classes, seed=cfg.seed, width=cfg.width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    train(
        model,
        (data.x_train, data.y_train),
        epochs=cfg.epochs,
        optimizer=optimizer,
        batch_size=cfg.batch_size,
        scheduler=scheduler,
        seed=cfg.seed,
        progress=progress,
        description=f"training dense {cfg.model}",
    )
    test = (data.x_test, data.y_test)
    _, dense_acc = evaluate(model, test)
    calib = (data.x_train[: cfg.calibration_samples], data.y_train[: cfg.calibration_samples])

    # Layers that some N:M pattern cannot tile (fan-in not divisible by M) stay dense in *every*
    # N:M row, so the patterns are compared on the same set of layers.
    nm_dense = _untileable_layers(model, [NM(n, m) for n, m in cfg.nm_patterns])

    jobs: list[tuple[str, str, float | None, Any]] = []
    for method in cfg.methods:
        for s in cfg.sparsities:
            jobs.append(("unstructured", method, float(s), "unstructured"))
    for method in cfg.methods:
        for n, m in cfg.nm_patterns:
            jobs.append((f"{n}:{m}", method, None, NM(n, m)))

    rows: list[dict[str, Any]] = []
    with _bar(progress, len(jobs)) as advance:
        for kind, method, sparsity, structure in jobs:
            pruned = copy.deepcopy(model)
            masks = prune(
                pruned,
                sparsity,
                method=method,
                structure=structure,
                distribution="global" if kind == "unstructured" else "uniform",
                exclude=[] if kind == "unstructured" else nm_dense,
                data=calib,
                input_shape=(data.num_features,),
                seed=cfg.seed,
            )
            _, acc = evaluate(pruned, test)
            rows.append(
                {
                    "structure": kind,
                    "method": method,
                    "sparsity": round(masks.sparsity(), 6),
                    "accuracy": acc,
                    "dense_layers": [] if kind == "unstructured" else nm_dense,
                }
            )
            advance()

    points = {}
    for method in cfg.methods:
        curve = [
            (r["sparsity"], r["accuracy"]) for r in rows if r["method"] == method and r["structure"] == "unstructured"
        ]
        points[method] = dropping_point(curve, dense_acc, cfg.tolerance)
    return {
        "config": {k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in vars(cfg).items()},
        "dataset": cfg.dataset,
        "model": cfg.model,
        "dense_accuracy": dense_acc,
        "num_classes": data.num_classes,
        "results": rows,
        "dropping_points": points,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
    }


class _bar:
    """Progress over pruning jobs (rich), silent when disabled."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled, self.total = enabled, total
        self._p: Progress | None = None

    def __enter__(self) -> Callable[[], None]:
        if not self.enabled:
            return lambda: None
        from rich.progress import Progress

        p = self._p = Progress(transient=True)
        p.__enter__()
        task = p.add_task("pruning and evaluating", total=self.total)
        return lambda: p.update(task, advance=1)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._p is not None:
            self._p.__exit__(exc_type, exc, tb)


def format_table(result: dict[str, Any]) -> Any:
    """A ``rich.table.Table``: accuracy per sparsity (rows) and method (columns)."""
    from rich.table import Table

    methods = list(dict.fromkeys(r["method"] for r in result["results"]))
    nm_dense: list[str] = next((r["dense_layers"] for r in result["results"] if r["structure"] != "unstructured"), [])
    caption = "one-shot pruning without retraining; unstructured rows use a global budget"
    if nm_dense:
        caption += f"; N:M rows keep {', '.join(nm_dense)} dense (some pattern's M does not divide its fan-in)"
    table = Table(
        title=f"essential sparsity: {result['model']} on {result['dataset']}, dense accuracy {result['dense_accuracy']:.3f}",
        caption=caption,
    )
    table.add_column("structure")
    table.add_column("sparsity", justify="right")
    for m in methods:
        table.add_column(m, justify="right")
    keys = list(dict.fromkeys((r["structure"], r["sparsity"]) for r in result["results"]))
    for structure, sparsity in keys:
        cells = []
        for m in methods:
            acc = next(
                (
                    r["accuracy"]
                    for r in result["results"]
                    if r["method"] == m and r["structure"] == structure and r["sparsity"] == sparsity
                ),
                None,
            )
            cells.append("" if acc is None else f"{acc:.3f}")
        table.add_row(structure, f"{sparsity:.2f}", *cells)
    table.add_row("dropping point", "", *[f"{result['dropping_points'][m]:.2f}" for m in methods], style="bold")
    return table


def figure(result: dict[str, Any]) -> Any:
    """The accuracy-vs-sparsity figure (matplotlib): one line per method, N:M points labelled with
    their pattern, dense and chance levels marked, the legend outside the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plotting import chance_line, legend_outside

    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    methods = list(dict.fromkeys(r["method"] for r in result["results"]))
    colors = dict(zip(methods, itertools.cycle(plt.rcParams["axes.prop_cycle"].by_key()["color"])))
    for m in methods:
        pts = sorted(
            (r["sparsity"], r["accuracy"])
            for r in result["results"]
            if r["method"] == m and r["structure"] == "unstructured"
        )
        ax.plot(
            [p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colors[m], label=f"{m} (unstructured)"
        )
        nm = sorted(
            (r["sparsity"], r["accuracy"], r["structure"])
            for r in result["results"]
            if r["method"] == m and r["structure"] != "unstructured"
        )
        if nm:
            ax.plot(
                [p[0] for p in nm],
                [p[1] for p in nm],
                marker="s",
                ls="--",
                color=colors[m],
                alpha=0.7,
                label=f"{m} (N:M)",
            )
            for x, y, pattern in nm:
                ax.annotate(pattern, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6, color=colors[m])
    ax.axhline(result["dense_accuracy"], color="black", lw=0.8, ls=":", label=f"dense ({result['dense_accuracy']:.3f})")
    chance_line(ax, int(result.get("num_classes", 10)))
    ax.set_xlabel("sparsity (fraction of prunable weights removed)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Essential sparsity, one-shot, no retraining ({result['model']} / {result['dataset']})")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    return fig


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Save :func:`figure` as a PNG (written atomically)."""
    import matplotlib.pyplot as plt

    from .plotting import save_png

    fig = figure(result)
    try:
        return save_png(fig, Path(path))
    finally:
        plt.close(fig)


def save_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write the result as JSON, atomically."""
    return write_text(path, json.dumps(result, indent=2))
