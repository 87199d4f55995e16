"""Validate the multi-run training methods on MNIST-1D: one-shot pruning, IMP, model soups, N:M recipes.

The single-run methods (static, GMP, SET, RigL, SNFS, SRigL, GraNet) are validated through the
experiments system (``benchmarks/validate_training.py``, shipped configs); these methods train
several runs per result, which that system's runner does not express, so they keep this script.
Every run trains the same MLP (40-256-256-10) with the same optimizer as the shipped validation
config (SGD, momentum 0.9, lr 0.1, weight decay 5e-4, cosine schedule over the run) for the same
number of epochs per training run; 3 seeds each; test accuracy on 1000 held-out samples.

    .venv/bin/python benchmarks/validate_multirun.py [--seeds 3] [--epochs 30] [--workers 2]

Writes benchmarks/results/multirun_validation.json and benchmarks/results/multirun_validation.md.
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
    from sparseforge import algorithms as alg

    t0 = time.perf_counter()
    data, model = _setup(seed)
    total = _steps(data, epochs)
    extra: dict[str, Any] = {}
    sparsity = float(setting) if setting not in NM_PATTERNS and setting != "dense" else None

    if method == "dense":
        _fit(model, data, _optimizer(model), epochs, seed)
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


METHODS = ["oneshot", "imp", "soups"]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="run only these methods (plus dense)")
    parser.add_argument("--from-json", type=Path, help="re-make the table from a saved JSON, training nothing")
    args = parser.parse_args()
    if args.from_json:
        rows = json.loads(args.from_json.read_text())["rows"]
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
    write_text(RESULTS / "multirun_validation.json", json.dumps(payload, indent=2))
    if not args.only:
        table = markdown(rows)
        write_text(RESULTS / "multirun_validation.md", table + "\n")
        print(table)
    print(f"total {payload['seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
