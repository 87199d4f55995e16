"""Validate the sparse-training methods against the papers' claims, through the experiments system.

Runs the shipped configs (``validation.yaml``: MLP on MNIST-1D, every method at 80/90/95 %, RigL's
update interval, 1x/2x/5x training, sparse vs plain initialisation; ``validation_cnn.yaml``: a
1-D CNN on MNIST-1D; ``validation_cifar10.yaml``: ResNet-20 on CIFAR-10 when ``--cifar10 DIR``
names a local copy) into one results store, kill-safe (``--resume`` continues where a killed run
stopped), then reads the store and marks each claim held or not:

* **held**: the claimed difference has the claimed sign (mean over seeds);
* **within noise**: it has the other sign, by less than the standard error of the difference;
* **not held**: the other sign, by more than that.

    .venv/bin/python benchmarks/validate_training.py [--workers 2] [--cifar10 DIR] [--report-only]

Writes benchmarks/results/training_validation.{md,json} and docs/training_validation.png.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.config import flatten

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "sparseforge" / "experiments" / "configs"
RESULTS = ROOT / "benchmarks" / "results"
STORE = ROOT / ".cache" / "validation" / "results.sqlite"
STUDIES = {"mlp": "validation.yaml", "cnn": "validation_cnn.yaml", "cifar10": "validation_cifar10.yaml"}
EXPERIMENTS = {"mlp": "validation-mlp", "cnn": "validation-cnn", "cifar10": "validation-cifar10"}
SCRATCH = ("static", "set", "rigl", "snfs", "srigl")  # the methods that start sparse
METHOD_ORDER = ("dense", "static", "set", "rigl", "snfs", "srigl", "gmp", "granet")


# -- running ---------------------------------------------------------------------------------------


def study_runs(study: str, cifar10: Path | None) -> list[Any]:
    """The runs of one shipped config (CIFAR-10: its ``data.root`` set to the local copy)."""
    from sparseforge.experiments.config import load_runs

    return load_runs(CONFIGS / STUDIES[study], data_root=cifar10 if study == "cifar10" else None)[1]


def run_studies(studies: Sequence[str], store: Path, workers: int, cifar10: Path | None) -> None:
    from sparseforge.experiments.sweep import preflight, run_sweep

    planned = {study: study_runs(study, cifar10) for study in studies}
    if "cifar10" in planned:  # a missing or wrong folder fails now, not after an hour of the others
        preflight(planned["cifar10"][:1])
    store.parent.mkdir(parents=True, exist_ok=True)
    for study, runs in planned.items():
        print(f"{study}: {len(runs)} runs into {store}", file=sys.stderr, flush=True)
        result = run_sweep(runs, store, workers=workers, resume=True, progress=sys.stderr.isatty())
        print(f"{study}: {result}", file=sys.stderr, flush=True)


# -- reading the store -----------------------------------------------------------------------------


#: The settings a run is selected by, with the values the shipped configs default to.
DEFAULTS = {
    "algorithm.every": 100,
    "sparsity.distribution": "erk",
    "sparsity.init": "dense",
    "training.multiplier": 1.0,
}


@dataclass
class Runs:
    """Done runs of one study, selectable by method and settings."""

    rows: list[tuple[dict[str, Any], dict[str, Any]]]  # (flat config, summary)

    def pick(self, method: str, sparsity: float | None = None, **settings: Any) -> list[float]:
        """Test accuracies (fractions) of the runs of ``method`` with these settings, one per seed."""
        want = {**DEFAULTS, **{k.replace("__", "."): v for k, v in settings.items()}}
        out = []
        for flat, summary in self.rows:
            if flat["algorithm.name"] != method:
                continue
            if method != "dense" and sparsity is not None and not math.isclose(flat["sparsity.target"], sparsity):
                continue
            if method == "dense":  # dense runs carry no sparsity settings
                if not math.isclose(float(flat["training.multiplier"]), float(want["training.multiplier"])):
                    continue
            elif any(k in flat and flat[k] != v for k, v in want.items()):
                continue
            out.append(float(summary["accuracy"]))
        return out


def load_study(store: Path, study: str) -> Runs:
    from sparseforge.experiments.store import ResultsStore

    s = ResultsStore(store)
    try:
        records = s.runs(experiment=EXPERIMENTS[study])
    finally:
        s.close()
    return Runs([(flatten(r.config), r.summary) for r in records if r.status == "done" and r.summary])


def kept_zeros(store: Path, study: str) -> dict[str, tuple[int, int]]:
    """Per method (1x, default settings): kept weights exactly 0 at the end, and kept weights, over its runs."""
    from sparseforge.experiments.store import ResultsStore
    from sparseforge.experiments.sweep import checkpoint_path

    s = ResultsStore(store)
    try:
        records = s.runs(experiment=EXPERIMENTS[study])
    finally:
        s.close()
    out: dict[str, tuple[int, int]] = {}
    for record in records:
        flat = flatten(record.config)
        name = flat["algorithm.name"]
        if name in ("dense",) or any(flat.get(k, v) != v for k, v in DEFAULTS.items()):
            continue
        path = checkpoint_path(store, record.key)
        if record.status != "done" or not path.is_file():
            continue
        state = torch.load(path, map_location="cpu", weights_only=True)
        masks = state["sparsifier"]["masks"]["masks"]
        zeros, kept = out.get(name, (0, 0))
        for pname, mask in masks.items():
            weight = state["model"][pname]
            zeros += int(((weight == 0) & mask).sum())
            kept += int(mask.sum())
        out[name] = (zeros, kept)
    return out


# -- verdicts ---------------------------------------------------------------------------------------


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def verdict(a: Sequence[float], b: Sequence[float], margin: float = 0.0) -> tuple[str, float, float]:
    """Is ``mean(a) >= mean(b) - margin``? ``(verdict, difference a - b + margin, its standard error)``."""
    if not a or not b:
        return "not run", math.nan, math.nan
    diff = statistics.fmean(a) - statistics.fmean(b) + margin
    se = math.sqrt(
        (statistics.variance(a) / len(a) if len(a) > 1 else 0.0)
        + (statistics.variance(b) / len(b) if len(b) > 1 else 0.0)
    )
    if diff >= 0:
        return "held", diff, se
    return ("within noise" if -diff <= se else "**not held**"), diff, se


def pm(values: Sequence[float]) -> str:
    m, s = mean_std(values)
    return "—" if math.isnan(m) else f"{100 * m:.1f} ± {100 * s:.1f}"


@dataclass
class Claim:
    text: str
    source: str
    setting: str
    left: tuple[str, Sequence[float]]
    right: tuple[str, Sequence[float]]
    margin: float = 0.0

    def row(self) -> dict[str, Any]:
        v, diff, se = verdict(self.left[1], self.right[1], self.margin)
        return {
            "claim": self.text,
            "source": self.source,
            "setting": self.setting,
            "left": self.left[0],
            "left_acc": mean_std(self.left[1])[0],
            "right": self.right[0],
            "right_acc": mean_std(self.right[1])[0],
            "margin": self.margin,
            "difference": diff,
            "standard_error": se,
            "verdict": v,
        }


def claims(mlp: Runs, cnn: Runs | None, cifar: Runs | None) -> list[Claim]:
    out: list[Claim] = []
    models: list[tuple[str, Runs, tuple[float, ...]]] = [("MLP", mlp, (0.8, 0.9, 0.95))]
    models += [(name, r, (0.8, 0.9)) for name, r in (("CNN", cnn), ("ResNet-20", cifar)) if r is not None and r.rows]
    for model, runs, sparsities in models:
        for s in sparsities:
            at = f"{model}, {s:.0%}, 1x"
            p = _at(runs.pick, sparsity=s)
            out += [
                Claim("RigL ≥ SET", "Evci et al. 2020 (RigL)", at, ("RigL", p("rigl")), ("SET", p("set"))),
                Claim("SET ≥ static", "Mocanu et al. 2018 (SET)", at, ("SET", p("set")), ("static", p("static"))),
                Claim("SNFS ≥ SET", "Dettmers & Zettlemoyer 2019", at, ("SNFS", p("snfs")), ("SET", p("set"))),
                Claim(
                    "SRigL within 1 point of RigL",
                    "Lasby et al. 2023 (SRigL)",
                    at,
                    ("SRigL", p("srigl")),
                    ("RigL", p("rigl")),
                    0.01,
                ),
                Claim("GraNet ≥ RigL", "Liu et al. 2021 (GraNet)", at, ("GraNet", p("granet")), ("RigL", p("rigl"))),
                Claim(
                    "pruning from dense (GMP) ≥ RigL at equal epochs",
                    "Evci et al. 2020 (RigL), Gale et al. 2019",
                    at,
                    ("GMP", p("gmp")),
                    ("RigL", p("rigl")),
                ),
            ]
    for s in (0.8, 0.9, 0.95):
        at = f"MLP, {s:.0%}"
        out.append(
            Claim(
                "ERK ≥ uniform layer-wise sparsity (static masks)",
                "Evci et al. 2020 (RigL)",
                at,
                ("ERK", mlp.pick("static", s)),
                ("uniform", mlp.pick("static", s, sparsity__distribution="uniform")),
            )
        )
    for s in (0.8, 0.9):
        at = f"MLP, {s:.0%}"
        rigl5 = mlp.pick("rigl", s, training__multiplier=5.0)
        out += [
            Claim(
                "RigL at 5x ≥ GMP at 1x",
                "Evci et al. 2020 (RigL)",
                at,
                ("RigL 5x", rigl5),
                ("GMP 1x", mlp.pick("gmp", s)),
            ),
            Claim(
                "RigL at 5x within 1 point of dense at 1x",
                "Evci et al. 2020 (RigL)",
                at,
                ("RigL 5x", rigl5),
                ("dense 1x", mlp.pick("dense")),
                0.01,
            ),
        ]
        for m in ("static", "rigl"):
            gap1 = _gaps(mlp.pick("dense"), mlp.pick(m, s))
            gap5 = _gaps(mlp.pick("dense", training__multiplier=5.0), mlp.pick(m, s, training__multiplier=5.0))
            out.append(
                Claim(
                    f"longer training narrows {m}'s gap to dense (same length)",
                    "Evci et al. 2020 (RigL); Liu et al. 2022",
                    at,
                    ("gap at 1x", gap1),
                    ("gap at 5x", gap5),
                )
            )
        best = max((mlp.pick("rigl", s, algorithm__every=e) for e in (50, 100, 200)), key=lambda v: mean_std(v)[0])
        out.append(
            Claim(
                "RigL every 100 steps within 1 point of the best of 50/100/200",
                "Evci et al. 2020 (RigL)",
                at,
                ("every 100", mlp.pick("rigl", s)),
                ("best interval", best),
                0.01,
            )
        )
        for m in ("static", "set", "rigl", "snfs", "srigl"):
            out.append(
                Claim(
                    f"sparse-fan-in init ≥ plain init ({m})",
                    "Evci et al. 2022 (gradient flow)",
                    at,
                    ("sparse init", mlp.pick(m, s, sparsity__init="sparse")),
                    ("plain init", mlp.pick(m, s)),
                )
            )
    return out


def _at(fn: Callable[..., list[float]], **bound: Any) -> Callable[..., list[float]]:
    def call(method: str, **more: Any) -> list[float]:
        return fn(method, **{**bound, **more})

    return call


def _gaps(dense: Sequence[float], sparse: Sequence[float]) -> list[float]:
    """Dense mean minus each sparse seed: a larger value is a larger gap (the claim's sign flips)."""
    if not dense or not sparse:
        return []
    d = statistics.fmean(dense)
    return [d - x for x in sparse]


# -- tables ---------------------------------------------------------------------------------------


def method_table(runs: Runs, sparsities: Sequence[float], **settings: Any) -> list[str]:
    head = "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |"
    lines = [head, "|---|" + "---:|" * len(sparsities)]
    dense = runs.pick("dense", **settings)
    lines.append("| dense | " + " | ".join(pm(dense) for _ in sparsities) + " |")
    for m in METHOD_ORDER[1:]:
        cells = [pm(runs.pick(m, s, **settings)) for s in sparsities]
        if any(c != "—" for c in cells):
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def length_table(runs: Runs) -> list[str]:
    cols = [(s, x) for s in (0.8, 0.9) for x in (1.0, 2.0, 5.0)]
    lines = [
        "| method | " + " | ".join(f"{s:.0%} {x:g}x" for s, x in cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| dense | " + " | ".join(pm(runs.pick("dense", training__multiplier=x)) for _, x in cols) + " |",
    ]
    for m in SCRATCH:
        lines.append(f"| {m} | " + " | ".join(pm(runs.pick(m, s, training__multiplier=x)) for s, x in cols) + " |")
    return lines


def setting_table(runs: Runs, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> list[str]:
    lines = ["| method | setting | 80% | 90% |", "|---|---|---:|---:|"]
    for method, label, settings in rows:
        cells = [pm(runs.pick(method, s, **settings)) for s in (0.8, 0.9)]
        lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    return lines


def claims_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| claim | source | setting | compared | difference (points) | verdict |",
        "|---|---|---|---|---:|---|",
    ]
    for r in rows:
        diff = "—" if math.isnan(r["difference"]) else f"{100 * r['difference']:+.1f} ± {100 * r['standard_error']:.1f}"
        compared = f"{r['left']} {100 * r['left_acc']:.1f} vs {r['right']} {100 * r['right_acc']:.1f}"
        if r["left"].startswith("gap"):
            compared = f"{r['left']} {100 * r['left_acc']:.1f} vs {r['right']} {100 * r['right_acc']:.1f}"
        lines.append(f"| {r['claim']} | {r['source']} | {r['setting']} | {compared} | {diff} | {r['verdict']} |")
    return lines


def summary_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per claim: per model, how many settings held and the differences in points."""
    models: list[str] = []
    by_claim: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        model = r["setting"].split(",")[0]
        if model not in models:
            models.append(model)
        by_claim.setdefault((r["claim"], r["source"]), {}).setdefault(model, []).append(r)
    lines = ["| claim | source | " + " | ".join(models) + " |", "|---|---|" + "---|" * len(models)]
    for (claim, source), per_model in by_claim.items():
        cells = []
        for model in models:
            found = per_model.get(model, [])
            if not found:
                cells.append("")
                continue
            held = sum(r["verdict"] == "held" for r in found)
            noise = sum(r["verdict"] == "within noise" for r in found)
            diffs = ", ".join("—" if math.isnan(r["difference"]) else f"{100 * r['difference']:+.1f}" for r in found)
            if held == len(found):
                word = "held"
            elif held + noise == len(found):
                word = "held or within noise" if held else "within noise"
            else:
                word = "**not held**" if held == 0 else f"held {held} of {len(found)}"
            cells.append(f"{word} ({diffs})")
        lines.append(f"| {claim} | {source} | " + " | ".join(cells) + " |")
    return lines


def plot(mlp: Runs, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparseforge.experiments.plotting import save_png

    plt.rcParams.update({"font.size": 10})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    xs = (1.0, 2.0, 5.0)
    for ax, s in zip(axes, (0.8, 0.9), strict=True):
        for m in ("dense", *SCRATCH):
            points = [mean_std(mlp.pick(m, s, training__multiplier=x)) for x in xs]
            ax.errorbar(
                xs,
                [100 * p[0] for p in points],
                yerr=[100 * p[1] for p in points],
                marker="o",
                capsize=3,
                ls="--" if m == "dense" else "-",
                color="black" if m == "dense" else None,
                label=m,
            )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(xs, [f"{x:g}x" for x in xs])
        ax.set_xlabel("training length (x 30 epochs)")
        ax.set_title(f"MNIST-1D MLP, {s:.0%} sparse (dense: 0%)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%), mean ± std over 3 seeds")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    try:
        save_png(fig, path)
    finally:
        plt.close(fig)


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--store", type=Path, default=STORE)
    parser.add_argument("--cifar10", type=Path, default=None, help="a local CIFAR-10 (python-pickle batches)")
    parser.add_argument("--report-only", action="store_true", help="read the store; train nothing")
    args = parser.parse_args()
    studies = ["mlp", "cnn"] + (["cifar10"] if args.cifar10 else [])
    try:
        return _main(args, studies)
    except SparseforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(
            f"interrupted; the results store {args.store} keeps every finished run: run the same command to resume",
            file=sys.stderr,
        )
        raise SystemExit(130) from None


def _main(args: argparse.Namespace, studies: list[str]) -> None:
    t0 = time.perf_counter()
    if not args.report_only:
        run_studies(studies, args.store, args.workers, args.cifar10)
    seconds = time.perf_counter() - t0
    mlp = load_study(args.store, "mlp")
    cnn = load_study(args.store, "cnn")
    cifar = load_study(args.store, "cifar10") if args.cifar10 else None
    rows = [c.row() for c in claims(mlp, cnn, cifar)]
    zeros = {study: kept_zeros(args.store, study) for study in ("mlp", "cnn")}
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("held", "within noise", "**not held**", "not run")}
    lines = [
        f"{counts['held']} of {len(rows)} comparisons held, {counts['within noise']} within noise, "
        f"{counts['**not held**']} not held"
        + (f", {counts['not run']} not run" if counts["not run"] else "")
        + ". Test accuracy (%), mean ± std over 3 seeds.",
        "",
        "**Summary.** Per claim and model: the verdict over the settings compared, with each",
        "difference in points (left − right, + the margin the claim allows; sparsities in order).",
        "",
        *summary_table(rows),
        "",
        "**Every comparison.** Difference ± its standard error over seeds.",
        "",
        *claims_table(rows),
        "",
        "**MLP, every method, 1x (30 epochs).**",
        "",
        *method_table(mlp, (0.8, 0.9, 0.95)),
        "",
        "**MLP, training length** (1x = 30 epochs; dense at the same length).",
        "",
        *length_table(mlp),
        "",
        "**MLP, RigL's update interval, layer-wise distribution and initialisation** (1x).",
        "",
        *setting_table(
            mlp,
            [
                ("rigl", "every 50 steps", {"algorithm__every": 50}),
                ("rigl", "every 100 steps", {}),
                ("rigl", "every 200 steps", {"algorithm__every": 200}),
                ("static", "uniform", {"sparsity__distribution": "uniform"}),
                ("static", "ERK", {}),
                *[(m, "sparse-fan-in init", {"sparsity__init": "sparse"}) for m in SCRATCH],
                *[(m, "plain init", {}) for m in SCRATCH],
            ],
        ),
        "",
        "**CNN (1-D, 32 channels), every method, 1x (30 epochs).**",
        "",
        *method_table(cnn, (0.8, 0.9)),
        "",
        "**Kept weights exactly 0 at the end of training** (1x runs, all seeds and sparsities).",
        "",
        "| method | MLP | CNN |",
        "|---|---:|---:|",
    ]
    for m in METHOD_ORDER[1:]:
        cells = []
        for study in ("mlp", "cnn"):
            z, k = zeros[study].get(m, (0, 0))
            cells.append(f"{z} of {k:,}" if k else "—")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if cifar is not None:
        lines += ["", "**CIFAR-10 ResNet-20, 1x.**", "", *method_table(cifar, (0.8, 0.9))]
    table = "\n".join(lines) + "\n"
    from sparseforge.fileio import write_text

    RESULTS.mkdir(parents=True, exist_ok=True)
    write_text(RESULTS / "training_validation.md", table)
    command, seconds = "python benchmarks/validate_training.py", round(seconds, 1)
    previous = RESULTS / "training_validation.json"
    if args.report_only and previous.is_file():  # the tables are re-read; the run that made them is kept
        before = json.loads(previous.read_text(encoding="utf-8"))
        command, seconds = before.get("command", command), before.get("seconds", seconds)
    payload = {
        "command": command,
        "seconds": seconds,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "claims": rows,
        "kept_zeros": {s: {m: list(v) for m, v in z.items()} for s, z in zeros.items()},
    }
    write_text(RESULTS / "training_validation.json", json.dumps(payload, indent=2, default=str))
    plot(mlp, ROOT / "docs" / "training_validation.png")
    print(table)
    print(f"total {seconds:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
