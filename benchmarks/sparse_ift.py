"""Sparse-IFT against dense at equal FLOPs, through the experiments system.

Runs the shipped configs into one results store (resumable), then writes a table per study of
test accuracy beside dense's and whether each beats it by more than the standard error of the
difference:

- ``mlp`` (``sparse_ift.yaml``): the MNIST-1D MLP, its hidden layer replaced by Sparse Parallel,
  Factorized or Doped, or its hidden widths widened (Sparse Wide), at 50/75/90 %, static and RigL
  masks, three seeds; then the best two at five times the epochs;
- ``cnn`` (``sparse_ift_cnn.yaml``): the MNIST-1D 1-D CNN, its inner convolutions replaced or its
  hidden widths widened, the same grid, with sparse and with the default initialisation.

    .venv/bin/python benchmarks/sparse_ift.py [--study mlp|cnn|all] [--workers 2] [--report-only]

Writes benchmarks/results/sparse_ift.md / .json (mlp) and sparse_ift_cnn.md / .json (cnn).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.config import flatten, load_runs
from sparseforge.experiments.store import ResultsStore
from sparseforge.fileio import write_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "sparseforge" / "experiments" / "configs"
STORE = ROOT / ".cache" / "sparse_ift" / "results.sqlite"
RESULTS = ROOT / "benchmarks" / "results"
#: study -> (config file, experiment name, results file stem)
STUDIES = {
    "mlp": ("sparse_ift.yaml", "sparse-ift-mlp", "sparse_ift"),
    "cnn": ("sparse_ift_cnn.yaml", "sparse-ift-cnn", "sparse_ift_cnn"),
    "cifar10": ("sparse_ift_cifar10.yaml", "sparse-ift-cifar10", "sparse_ift_cifar10"),
}
KINDS = ("wide", "parallel", "factorized", "doped")
SPARSITIES = (0.5, 0.75, 0.9)
INITS = {
    "sparse": "Sparse initialisation (each kept row rescaled to its sparse fan-in, `sparsity.init: sparse`)",
    "dense": "The layers' default initialisation (`sparsity.init: dense`)",
}


def _pm(values: list[float]) -> str:
    if not values:
        return "—"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def _verdict(a: list[float], b: list[float]) -> str:
    if not a or not b:
        return "not run"
    diff = statistics.fmean(a) - statistics.fmean(b)
    se = math.sqrt(sum(statistics.variance(v) / len(v) for v in (a, b) if len(v) > 1))
    if diff > se:
        return f"beats dense ({100 * diff:+.1f})"
    if diff >= -se:
        return f"level with dense ({100 * diff:+.1f})"
    return f"below dense ({100 * diff:+.1f})"


def table(store: Path, experiment: str = "sparse-ift-mlp") -> tuple[str, list[dict[str, object]]]:
    """The Markdown table of ``experiment``'s finished runs, and its rows as data."""
    s = ResultsStore(store)
    try:
        records = [r for r in s.runs(experiment=experiment) if r.status == "done" and r.summary]
    finally:
        s.close()
    acc: dict[tuple[str, str, float, float, str], list[float]] = {}
    for r in records:
        f = flatten(r.config)
        kind = f.get("model.sparse_ift.kind") or "dense"
        sparsity = 0.0 if kind == "dense" else float(f["sparsity.target"])
        init = "dense" if kind == "dense" else str(f.get("sparsity.init", "dense"))
        key = (kind, f["algorithm.name"], sparsity, float(f["training.multiplier"]), init)
        acc.setdefault(key, []).append(float(r.summary["accuracy"]))
    dense = acc.get(("dense", "dense", 0.0, 1.0, "dense"), [])
    lines = [
        f"Dense: **{_pm(dense)}** % (n={len(dense)}). Test accuracy (%), mean ± std over seeds; "
        "every row has the dense model's multiply-adds.",
    ]
    rows: list[dict[str, object]] = [
        {"kind": "dense", "algorithm": "dense", "sparsity": 0.0, "init": "dense", "accuracy": dense, "verdict": "-"}
    ]
    inits = [i for i in INITS if any(k[4] == i and k[0] != "dense" and k[3] == 1.0 for k in acc)]
    for init in inits:
        if len(inits) > 1:
            lines += ["", f"{INITS[init]}:"]
        lines += [
            "",
            "| transformation | masks | " + " | ".join(f"{s:.0%}" for s in SPARSITIES) + " |",
            "|---|---|" + "---|" * len(SPARSITIES),
        ]
        for kind in KINDS:
            for algo in ("static", "rigl"):
                cells = []
                for sp in SPARSITIES:
                    values = acc.get((kind, algo, sp, 1.0, init), [])
                    verdict = _verdict(values, dense)
                    cells.append(f"{_pm(values)}: {verdict}")
                    rows.append(
                        {"kind": kind, "algorithm": algo, "sparsity": sp, "init": init, "accuracy": values,
                         "verdict": verdict}
                    )  # fmt: skip
                lines.append(f"| {kind} | {algo} | " + " | ".join(cells) + " |")
    dense5 = acc.get(("dense", "dense", 0.0, 5.0, "dense"), [])
    longer = [(k, v) for k, v in acc.items() if k[3] == 5.0 and k[0] != "dense"]
    if dense5 and longer:
        lines += [
            "",
            f"Five times the epochs (150): dense **{_pm(dense5)}** %.",
            "",
            "| transformation | masks | sparsity | accuracy (%) | against dense at 5x |",
            "|---|---|---:|---:|---|",
        ]
        for (kind, algo, sp, _, init), values in sorted(longer):
            verdict = _verdict(values, dense5)
            lines.append(f"| {kind} | {algo} | {sp:.0%} | {_pm(values)} | {verdict} |")
            rows.append(
                {
                    "kind": kind,
                    "algorithm": algo,
                    "sparsity": sp,
                    "init": init,
                    "multiplier": 5.0,
                    "accuracy": values,
                    "verdict": verdict,
                }
            )
    return "\n".join(lines) + "\n", rows


def plot(rows: list[dict[str, object]], path: Path, title: str) -> Path:
    """Accuracy against sparsity per transformation and mask algorithm (mean ± std over seeds), dense as a band.

    The sparse initialisation's rows where the study has them, else the default one; 1x epochs only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseforge.experiments.plotting import legend_outside, save_png

    def mean_std(values: object) -> tuple[float, float]:
        v = [100 * float(x) for x in values]  # type: ignore[attr-defined]
        return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0

    dense = next(r for r in rows if r["kind"] == "dense")
    init = "sparse" if any(r["init"] == "sparse" for r in rows) else "dense"
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    try:
        m, sd = mean_std(dense["accuracy"])
        ax.axhline(m, color="black", lw=1.2, label=f"dense ({m:.1f} ± {sd:.1f})")
        ax.axhspan(m - sd, m + sd, color="black", alpha=0.08, lw=0)
        for index, kind in enumerate(KINDS):
            for algo, style in (("static", "--"), ("rigl", "-")):
                points = [
                    r for r in rows
                    if r["kind"] == kind and r["algorithm"] == algo and r["init"] == init and "multiplier" not in r
                    and r["accuracy"]
                ]  # fmt: skip
                if not points:
                    continue
                stats = [mean_std(r["accuracy"]) for r in points]
                x = [100 * float(r["sparsity"]) for r in points]  # type: ignore[arg-type]
                ax.errorbar(
                    x, [a for a, _ in stats], yerr=[b for _, b in stats], ls=style, marker="o", ms=3, capsize=2,
                    color=f"C{index}", label=f"{kind}, {algo}",
                )  # fmt: skip
        ax.set_xlabel("sparsity of the transformed layers, % (same FLOPs as dense)")
        ax.set_ylabel("test accuracy, %")
        ax.set_title(f"{title} ({'sparse' if init == 'sparse' else 'default'} initialisation)", fontsize=9)
        ax.grid(alpha=0.3)
        legend_outside(ax)
        return Path(save_png(fig, path))
    finally:
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=[*STUDIES, "all"], default="all")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument("--report-only", action="store_true", help="read the store; train nothing")
    parser.add_argument("--cifar10", type=Path, default=None, help="a local CIFAR-10 copy (the cifar10 study)")
    args = parser.parse_args()
    studies = [s for s in STUDIES if s != "cifar10" or args.cifar10] if args.study == "all" else [args.study]
    if "cifar10" in studies and args.cifar10 is None and not args.report_only:
        parser.error("--study cifar10 needs --cifar10 DIR (a local CIFAR-10 copy; nothing is downloaded)")
    for study in studies:
        config, experiment, stem = STUDIES[study]
        started = time.perf_counter()
        try:
            if not args.report_only:
                from sparseforge.experiments.sweep import run_sweep

                _, runs = load_runs(CONFIGS / config, data_root=args.cifar10 if study == "cifar10" else None)
                args.store.parent.mkdir(parents=True, exist_ok=True)
                run_sweep(runs, args.store, workers=args.workers, resume=True, progress=sys.stderr.isatty())
            text, rows = table(args.store, experiment)
        except SparseforgeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print(
                f"interrupted; {args.store} keeps every finished run: run the same command to resume", file=sys.stderr
            )
            raise SystemExit(130) from None
        RESULTS.mkdir(parents=True, exist_ok=True)
        write_text(RESULTS / f"{stem}.md", text)
        if any(r["accuracy"] for r in rows if r["kind"] == "dense"):
            data = "CIFAR-10, ResNet-20" if study == "cifar10" else f"MNIST-1D ({study})"
            plot(rows, ROOT / "docs" / f"{stem}.png", f"Sparse-IFT on {data}, mean ± std over seeds")
        payload = {
            "command": f"python benchmarks/sparse_ift.py --study {study}",
            "seconds": round(time.perf_counter() - started, 1),
            "workers": args.workers,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "rows": rows,
        }
        if not args.report_only:
            write_text(RESULTS / f"{stem}.json", json.dumps(payload, indent=2) + "\n")
        print(text)


if __name__ == "__main__":
    main()
