"""Reports of a results store: tables of mean +- std over seeds, and the plots a person looks at first.

Runs are grouped by *method* (the settings that differ between the runs of an experiment, other
than the sparsity target, the training multiplier and the seed), *sparsity* (the target) and
*length* (the training multiplier). Each group's numbers are the mean and the sample standard
deviation over its seeds (std 0 for one seed); only ``done`` runs count.

Written (atomically) into the output folder:

* ``results.md`` and ``results.csv``: method x sparsity x length: accuracy, final sparsity,
  training FLOPs, seeds;
* ``accuracy_vs_sparsity.png``: accuracy (%) against sparsity (%), one line per method and
  length, error bars = std over seeds, a dense reference band, chance level;
* ``accuracy_vs_flops.png``: accuracy against training FLOPs (log scale);
* ``mask_change.png``: fraction of the mask that differs from the initial one, per epoch;
* ``layer_sparsity.png``: per-layer sparsity of one run (the most accurate sparse one), read
  from its final checkpoint.
"""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SparseforgeError
from .config import flatten
from .store import ResultsStore, RunRecord

__all__ = ["Group", "group_runs", "write_report"]

_SEPARATE = ("sparsity.target", "training.multiplier")


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys, lists as tuples (comparable and hashable)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in flatten(config).items()}


@dataclass
class Group:
    """The runs of one method x sparsity x length, over seeds."""

    method: str
    sparsity: float
    multiplier: float
    runs: list[RunRecord] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [float(r.summary[key]) for r in self.runs if r.summary and r.summary.get(key) is not None]

    def mean(self, key: str) -> float:
        values = self.values(key)
        return statistics.fmean(values) if values else math.nan

    def std(self, key: str) -> float:
        values = self.values(key)
        return statistics.stdev(values) if len(values) > 1 else 0.0

    @property
    def dense(self) -> bool:
        return all(r.config["algorithm"]["name"] == "dense" for r in self.runs)


def _method(flat: dict[str, Any], varying: Sequence[str]) -> str:
    name = str(flat.get("algorithm.name", "?"))
    extra = [f"{k.removeprefix('algorithm.')}={flat[k]}" for k in varying if k in flat]
    return f"{name} ({', '.join(extra)})" if extra else name


def group_runs(records: Sequence[RunRecord]) -> list[Group]:
    """Done runs grouped by method x sparsity target x training multiplier, in a stable order."""
    done = [r for r in records if r.status == "done" and r.summary]
    if not done:
        return []
    flats = [_flatten(r.config) for r in done]
    keys = sorted({k for f in flats for k in f})
    varying = []
    for k in keys:
        if k in (*_SEPARATE, "seeds", "name", "grid", "algorithm.name"):
            continue
        if k.startswith("algorithm."):  # an algorithm's parameter matters where runs of that algorithm differ in it
            by_name: dict[str, set[str]] = defaultdict(set)
            for f in flats:
                if k in f:
                    by_name[str(f["algorithm.name"])].add(repr(f[k]))
            if any(len(v) > 1 for v in by_name.values()):
                varying.append(k)
        elif len({repr(f.get(k)) for f in flats}) > 1:
            varying.append(k)
    groups: dict[tuple[str, float, float], Group] = {}
    for record, flat in zip(done, flats, strict=True):
        method = _method(flat, varying)
        key = (method, float(flat.get("sparsity.target", 0.0)), float(flat.get("training.multiplier", 1.0)))
        groups.setdefault(key, Group(*key)).runs.append(record)
    order = {name: i for i, name in enumerate(dict.fromkeys(k[0] for k in groups))}
    return [groups[k] for k in sorted(groups, key=lambda k: (order[k[0]], k[2], k[1]))]


def _pm(mean: float, std: float, scale: float = 100.0, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"


def markdown_table(groups: Sequence[Group]) -> str:
    """Method x sparsity x length: accuracy (%), sparsity reached (%), training FLOPs, seeds."""
    lines = [
        "| method | sparsity target | length | accuracy (%) | sparsity (%) | training FLOPs (vs dense) | seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    dense_flops = {g.multiplier: g.mean("train_flops") for g in groups if g.dense}
    for g in groups:
        flops = g.mean("train_flops")
        ref = dense_flops.get(g.multiplier)
        relative = f" ({flops / ref:.2f}x)" if ref and not math.isnan(flops) else ""
        lines.append(
            f"| {g.method} | {'-' if g.dense else f'{g.sparsity:.0%}'} | {g.multiplier:g}x | "
            f"{_pm(g.mean('accuracy'), g.std('accuracy'))} | {_pm(g.mean('sparsity'), g.std('sparsity'), digits=1)} | "
            f"{flops:.3g}{relative} | {len(g.runs)} |"
        )
    return "\n".join(lines) + "\n"


def csv_table(groups: Sequence[Group]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        [
            "method",
            "sparsity_target",
            "multiplier",
            "accuracy_mean",
            "accuracy_std",
            "sparsity_mean",
            "train_flops_mean",
            "seeds",
        ]
    )
    for g in groups:
        writer.writerow(
            [
                g.method,
                g.sparsity,
                g.multiplier,
                g.mean("accuracy"),
                g.std("accuracy"),
                g.mean("sparsity"),
                g.mean("train_flops"),
                len(g.runs),
            ]
        )
    return out.getvalue()


# -- plots --------------------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10})
    fig, ax = plt.subplots(figsize=(width, height))
    ax.grid(alpha=0.3)
    return fig, ax


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _classes(records: Sequence[RunRecord]) -> int | None:
    from .datasets import DATASET_SHAPES

    names = {r.config["data"]["name"] for r in records}
    shapes = {DATASET_SHAPES.get(n, (None, None))[1] for n in names}
    return shapes.pop() if len(shapes) == 1 else None


def plot_accuracy(groups: Sequence[Group], path: Path, *, x: str, title: str) -> Path:
    """Accuracy (%) vs sparsity (%) or vs training FLOPs, one line per method and length."""
    from .plotting import legend_outside, save_png

    fig, ax = _figure()
    lines: dict[tuple[str, float], list[Group]] = defaultdict(list)
    for g in groups:
        lines[(g.method, g.multiplier)].append(g)
    multipliers = sorted({g.multiplier for g in groups})
    styles = ["-", "--", ":", "-."]
    for (method, multiplier), members in lines.items():
        label = method if len(multipliers) == 1 else f"{method}, {multiplier:g}x"
        style = styles[multipliers.index(multiplier) % len(styles)]
        ys = [100 * m.mean("accuracy") for m in members]
        errs = [100 * m.std("accuracy") for m in members]
        if x == "sparsity":
            if all(m.dense for m in members):
                y, e = ys[0], errs[0]
                ax.axhline(y, color="black", lw=1, ls=style, label=f"{label} ({y:.1f}%)")
                ax.axhspan(y - e, y + e, color="black", alpha=0.08)
                continue
            xs = [100 * m.mean("sparsity") for m in members]
        else:
            xs = [m.mean("train_flops") for m in members]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        ax.errorbar(
            [xs[i] for i in order], [ys[i] for i in order], yerr=[errs[i] for i in order],
            marker="o", ms=4, capsize=3, ls=style, label=label,
        )  # fmt: skip
    classes = _classes([r for g in groups for r in g.runs])
    if classes:
        ax.axhline(
            100.0 / classes, color="grey", lw=0.8, ls="--", label=f"chance (1/{classes} = {100.0 / classes:.0f}%)"
        )
        ax.set_ylim(bottom=0)
    ax.set_ylabel("test accuracy (%), mean ± std over seeds")
    if x == "sparsity":
        ax.set_xlabel("sparsity (% of prunable weights that are zero)")
    else:
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (forward + backward over the kept weights, whole run)")
    ax.set_title(title)
    legend_outside(ax)
    try:
        return Path(save_png(fig, path))
    finally:
        _close(fig)


def plot_mask_change(store: ResultsStore, groups: Sequence[Group], path: Path, title: str) -> Path:
    """Mask change (% of mask entries that differ from the initial masks) per epoch, mean over seeds."""
    from .plotting import legend_outside, save_png

    fig, ax = _figure()
    for g in groups:
        if g.dense:
            continue
        series = [store.metrics(r.key) for r in g.runs]
        epochs = sorted(set.intersection(*(set(s) for s in series))) if series else []
        if not epochs:
            continue
        ys = [100 * statistics.fmean(float(s[e].get("mask_change") or 0.0) for s in series) for e in epochs]
        ax.plot(epochs, ys, marker=".", label=f"{g.method}, {g.sparsity:.0%}, {g.multiplier:g}x")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mask change (% of entries unlike the initial mask)")
    ax.set_title(title)
    if ax.get_lines():
        legend_outside(ax)
    try:
        return Path(save_png(fig, path))
    finally:
        _close(fig)


def plot_layer_sparsity(record: RunRecord, checkpoint: Path, path: Path) -> Path | None:
    """Per-layer sparsity of one run from its final checkpoint (``None`` without one)."""
    import torch

    from .plotting import save_png

    if not checkpoint.is_file():
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sparsifier = state.get("sparsifier")
    if not sparsifier:
        return None
    masks = sparsifier["masks"]["masks"]
    names = list(masks)
    values = [100.0 * (1.0 - float(masks[n].float().mean())) for n in names]
    sizes = [masks[n].numel() for n in names]
    fig, ax = _figure(height=max(2.5, 0.35 * len(names) + 1))
    ax.barh(range(len(names)), values, color="tab:blue")
    ax.set_yticks(range(len(names)), [f"{n} ({s:,})" for n, s in zip(names, sizes, strict=True)])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (% of the layer's weights that are zero)")
    ax.set_title(f"per-layer sparsity: {record.label}")
    for i, v in enumerate(values):
        ax.text(min(v + 1, 92), i, f"{v:.1f}%", va="center", fontsize=8)
    try:
        return Path(save_png(fig, path))
    finally:
        _close(fig)


def write_report(
    store_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, experiment: str | None = None
) -> dict[str, Path]:
    """Write the tables and plots of a store's done runs into ``out_dir``; returns what was written."""
    from ..fileio import check_output_dir, write_text
    from .sweep import checkpoint_path

    store = ResultsStore(store_path)
    try:
        records = store.runs(experiment=experiment)
        groups = group_runs(records)
        if not groups:
            which = f" of experiment {experiment!r}" if experiment else ""
            counts = store.counts()
            raise SparseforgeError(
                f"results store {str(store_path)!r} has no finished runs{which} to report "
                f"({', '.join(f'{n} {s}' for s, n in counts.items() if n) or 'no runs'})"
            )
        out = check_output_dir(out_dir, "report folder")
        names = sorted({r.experiment for g in groups for r in g.runs})
        title = ", ".join(names)
        written = {
            "markdown": write_text(out / "results.md", f"# {title}\n\n" + markdown_table(groups)),
            "csv": write_text(out / "results.csv", csv_table(groups)),
            "accuracy_vs_sparsity": plot_accuracy(groups, out / "accuracy_vs_sparsity.png", x="sparsity", title=title),
            "accuracy_vs_flops": plot_accuracy(groups, out / "accuracy_vs_flops.png", x="flops", title=title),
            "mask_change": plot_mask_change(store, groups, out / "mask_change.png", title),
        }
        sparse = [r for g in groups if not g.dense for r in g.runs]
        if sparse:
            best = max(sparse, key=lambda r: float((r.summary or {}).get("accuracy") or 0.0))
            layer = plot_layer_sparsity(best, checkpoint_path(store_path, best.key), out / "layer_sparsity.png")
            if layer is not None:
                written["layer_sparsity"] = layer
        return written
    finally:
        store.close()
