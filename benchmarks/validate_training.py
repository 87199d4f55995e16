"""Validate the sparse-training algorithms against the papers' claims on MNIST-1D.

Every method trains the same MLP (40-256-256-10) with the same optimizer (SGD, momentum 0.9,
lr 0.1, weight decay 5e-4, cosine schedule over the run) for the same number of epochs per
training run; 3 seeds each; test accuracy on 1000 held-out samples. Multi-run methods (IMP,
one-shot, soups) train several runs of that length, which the table states.

    .venv/bin/python benchmarks/validate_training.py [--seeds 3] [--epochs 30] [--workers 2]

Writes benchmarks/results/training_validation.json, a markdown table to stdout and
benchmarks/results/training_validation.md, and docs/training_validation.png.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SPARSITIES = (0.8, 0.9, 0.95)
NM_PATTERNS = ("2:4", "1:4", "1:8")
LR, MOMENTUM, WD, BATCH, WIDTH = 0.1, 0.9, 5e-4, 128, 256


@functools.lru_cache(maxsize=1)
def _data():  # type: ignore[no-untyped-def]
    """MNIST-1D, generated once per worker process."""
    from sparseforge.experiments.datasets import load_dataset

    return load_dataset("mnist1d", seed=42)


def _setup(seed: int):  # type: ignore[no-untyped-def]
    from sparseforge.experiments.models import build_model

    data = _data()
    model = build_model("mlp", data.num_features, data.num_classes, seed=seed, width=WIDTH)
    return data, model


def _optimizer(model: torch.nn.Module, weight_decay: float = WD) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=weight_decay)


def _fit(model, data, optimizer, epochs: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    from sparseforge.training import train

    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    train(
        model,
        (data.x_train, data.y_train),
        epochs=epochs,
        optimizer=optimizer,
        batch_size=BATCH,
        scheduler=sched,
        seed=seed,
        progress=False,
    )


def _acc(model, data) -> float:  # type: ignore[no-untyped-def]
    from sparseforge.training import evaluate

    return evaluate(model, (data.x_test, data.y_test))[1]


def _steps(data, epochs: int) -> int:  # type: ignore[no-untyped-def]
    return epochs * -(-len(data.y_train) // BATCH)


def run_job(method: str, setting: str, seed: int, epochs: int) -> dict[str, Any]:
    """Train one (method, sparsity or N:M pattern, seed) and return its test accuracy."""
    torch.set_num_threads(1)
    import sparseforge as sf
    from sparseforge import algorithms as alg
    from sparseforge.structures import ConstantFanIn

    t0 = time.perf_counter()
    data, model = _setup(seed)
    total = _steps(data, epochs)
    extra: dict[str, Any] = {}
    sparsity = float(setting) if setting not in NM_PATTERNS and setting != "dense" else None
    dst = dict(total_steps=total, alpha=0.3, every=50, seed=seed)

    def sparse_run(masks, algorithm=None) -> None:  # type: ignore[no-untyped-def]
        opt = _optimizer(model)
        sparsifier = sf.Sparsifier(model, opt, masks, algorithm)
        _fit(model, data, opt, epochs, seed)
        final = sparsifier.finalize()
        extra["sparsity"] = round(final.sparsity(), 6)

    if method == "dense":
        _fit(model, data, _optimizer(model), epochs, seed)
    elif method in ("static-uniform", "static-erk"):
        dist = method.split("-")[1]
        sparse_run(alg.init_sparse(model, sparsity, distribution=dist, method="random", seed=seed))
    elif method == "gmp":
        masks = sf.MaskState({n: torch.ones_like(p, dtype=torch.bool) for n, p in sf.select_prunable(model).items()})
        sparse_run(masks, alg.GMP(sparsity, start=int(0.25 * total), end=int(0.75 * total), every=50))
    elif method in ("set", "rigl", "snfs"):
        cls = {"set": alg.SET, "rigl": alg.RigL, "snfs": alg.SNFS}[method]
        sparse_run(alg.init_sparse(model, sparsity, distribution="erk", seed=seed), cls(**dst))
    elif method == "granet":
        initial = 0.5
        masks = alg.init_sparse(model, initial, distribution="erk", seed=seed)
        sparse_run(masks, alg.GraNet(sparsity, prune_start=0, prune_end=int(0.5 * total), distribution="global", **dst))
    elif method == "srigl":
        masks = sf.prune(model, sparsity, method="random", structure=ConstantFanIn(), distribution="erk", seed=seed)
        sparse_run(masks, alg.SRigL(**dst))
    elif method in ("imp", "oneshot"):
        rounds = 3 if method == "imp" else 1
        k = _steps(data, 1)  # late rewinding to the end of epoch 1

        def train_fn(m, opt, info):  # type: ignore[no-untyped-def]
            _fit(m, data, opt, epochs, seed + info.round)

        masks, history = alg.imp(model, _optimizer, train_fn, final_sparsity=sparsity, rounds=rounds, rewind_step=k)
        extra["sparsity"] = round(masks.sparsity(), 6)
        extra["trainings"] = rounds + 1
    elif method == "soups":
        _fit(model, data, _optimizer(model), epochs, seed)
        decays = (1e-4, 5e-4, 1e-3)

        def make_opt(m, ing):  # type: ignore[no-untyped-def]
            return _optimizer(m, ing.weight_decay)

        def train_fn(m, opt, ing):  # type: ignore[no-untyped-def]
            _fit(m, data, opt, epochs, ing.seed)

        masks, history = alg.sparse_model_soups(
            model,
            make_opt,
            train_fn,
            final_sparsity=sparsity,
            cycles=3,
            ingredients=3,
            eval_fn=lambda m: _acc(m, data),
            seeds=[seed * 10 + i for i in range(3)],
            weight_decays=decays,
        )
        last = history.cycles[-1]
        extra.update(
            sparsity=round(masks.sparsity(), 6),
            trainings=1 + 3 * 3,
            ingredients=last.ingredient_metrics,
            best_ingredient=max(last.ingredient_metrics),
            mean_ingredient=statistics.fmean(last.ingredient_metrics),
        )
    elif method in ("sr-ste", "pgf"):
        opt = _optimizer(model)
        if method == "sr-ste":
            nm = alg.srste(model, opt, setting, decay=2e-4)
        else:
            nm = alg.progressive_gradient_flow(model, opt, setting, total_steps=total)
        _fit(model, data, opt, epochs, seed)
        masks = nm.finalize()
        extra["sparsity"] = round(masks.sparsity(), 6)
    else:
        raise ValueError(f"unknown method {method!r}")
    return {
        "method": method,
        "setting": setting,
        "seed": seed,
        "accuracy": _acc(model, data),
        "seconds": round(time.perf_counter() - t0, 2),
        **extra,
    }


METHODS = ["static-uniform", "static-erk", "gmp", "set", "rigl", "snfs", "granet", "srigl", "oneshot", "imp", "soups"]


def jobs(seeds: int) -> list[tuple[str, str, int]]:
    out = [("dense", "dense", s) for s in range(seeds)]
    out += [(m, str(sp), s) for m in METHODS for sp in SPARSITIES for s in range(seeds)]
    out += [(m, p, s) for m in ("sr-ste", "pgf") for p in NM_PATTERNS for s in range(seeds)]
    return out


def summarise(rows: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, float, int]]:
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r["setting"])].append(r["accuracy"])
    return {k: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v)) for k, v in groups.items()}


def markdown(rows: list[dict[str, Any]]) -> str:
    s = summarise(rows)
    dense = s[("dense", "dense")]
    lines = [
        f"Dense: **{dense[0]:.3f} ± {dense[1]:.3f}** (n={dense[2]})",
        "",
        "| method | training runs | " + " | ".join(f"{sp:.0%}" for sp in SPARSITIES) + " |",
        "|---|---:|" + "---:|" * len(SPARSITIES),
    ]
    runs = {"imp": "4 (dense + 3 rounds)", "oneshot": "2 (dense + 1 round)", "soups": "10 (dense + 3 cycles x 3)"}
    for m in METHODS:
        cells = []
        for sp in SPARSITIES:
            mean, std, _ = s[(m, str(sp))]
            cells.append(f"{mean:.3f} ± {std:.3f}")
        lines.append(f"| {m} | {runs.get(m, '1')} | " + " | ".join(cells) + " |")
    soup_rows = [r for r in rows if r["method"] == "soups"]
    if soup_rows:
        lines += [
            "",
            "| soups vs their last-cycle ingredients | " + " | ".join(f"{sp:.0%}" for sp in SPARSITIES) + " |",
            "|---|" + "---:|" * len(SPARSITIES),
        ]
        for label, key in (
            ("soup", "accuracy"),
            ("best ingredient", "best_ingredient"),
            ("mean ingredient", "mean_ingredient"),
        ):
            cells = [
                f"{statistics.fmean(r[key] for r in soup_rows if r['setting'] == str(sp)):.3f}" for sp in SPARSITIES
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| N:M recipe | " + " | ".join(NM_PATTERNS) + " |", "|---|" + "---:|" * len(NM_PATTERNS)]
    for m in ("sr-ste", "pgf"):
        cells = [f"{s[(m, p)][0]:.3f} ± {s[(m, p)][1]:.3f}" for p in NM_PATTERNS]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseforge.experiments.plotting import chance_line, legend_outside, save_png

    s = summarise(rows)
    fig, ax = plt.subplots(figsize=(9.5, 4.8), dpi=110)
    colors = plt.get_cmap("tab20").colors
    for i, m in enumerate(METHODS):
        means = [s[(m, str(sp))][0] for sp in SPARSITIES]
        stds = [s[(m, str(sp))][1] for sp in SPARSITIES]
        ax.errorbar(
            SPARSITIES,
            means,
            yerr=stds,
            marker="os^D"[i % 4],
            ms=3,
            capsize=2,
            label=m,
            color=colors[(2 * i) % 20 if i < 10 else 2 * (i - 10) + 1],
            ls="-" if i < 8 else "--",
        )
    for j, recipe in enumerate(("sr-ste", "pgf")):  # N:M points, each labelled with its pattern
        xs = [1.0 - int(p.split(":")[0]) / int(p.split(":")[1]) for p in NM_PATTERNS]
        ys = [s[(recipe, p)][0] for p in NM_PATTERNS]
        ax.scatter(
            xs, ys, marker="*^"[j], s=40, color="black" if j == 0 else "dimgrey", zorder=3, label=f"{recipe} (N:M)"
        )
        for x, y, p in zip(xs, ys, NM_PATTERNS, strict=True):
            ax.annotate(p, (x, y), textcoords="offset points", xytext=(4, -9 if j else 3), fontsize=6)
    dense = s[("dense", "dense")][0]
    ax.axhline(dense, color="black", ls=":", lw=1, label="dense")
    chance_line(ax, 10)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy (mean ± std, 3 seeds)")
    ax.set_title("Sparse training on MNIST-1D, MLP 40-256-256-10")
    ax.grid(alpha=0.3)
    legend_outside(ax)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these methods (plus dense)")
    parser.add_argument("--from-json", type=Path, help="re-make the table and plot from a saved JSON, training nothing")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(args.from_json.read_text())["rows"]
        plot(rows, ROOT / "docs" / "training_validation.png")
        print(markdown(rows))
        return
    todo = jobs(args.seeds)
    if args.only:
        todo = [j for j in todo if j[0] in args.only or j[0] == "dense"]
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = {pool.submit(run_job, m, st, sd, args.epochs): (m, st, sd) for m, st, sd in todo}
        for i, fut in enumerate(as_completed(futures), 1):
            row = fut.result()
            rows.append(row)
            print(
                f"[{i}/{len(todo)}] {row['method']:>14} {row['setting']:>5} seed {row['seed']}: "
                f"{row['accuracy']:.3f} ({row['seconds']} s)",
                file=sys.stderr,
                flush=True,
            )
    rows.sort(key=lambda r: (r["method"], r["setting"], r["seed"]))
    from sparseforge.fileio import write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "lr": LR,
        "momentum": MOMENTUM,
        "weight_decay": WD,
        "batch": BATCH,
        "width": WIDTH,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch": torch.__version__,
        "rows": rows,
    }
    write_text(RESULTS / "training_validation.json", json.dumps(payload, indent=2))
    if not args.only:
        table = markdown(rows)
        write_text(RESULTS / "training_validation.md", table + "\n")
        plot(rows, ROOT / "docs" / "training_validation.png")
        print(table)
    print(f"total {payload['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
