"""Perplexity of a small pretrained decoder LM under one-shot pruning (magnitude, Wanda, SparseGPT, RIA).

Model: the Llama-style LM that :mod:`sparseforge.experiments.stdlib_lm` trains offline on the
Python standard library's source (``.cache/stdlib-llama``, size ``small``; built with the same
function when the folder is missing). Every linear layer of its decoder blocks (attention q/k/v/o,
MLP gate/up/down) is pruned with :func:`sparseforge.oneshot.prune_model`; embeddings and the LM
head stay dense.

Data: held-out perplexity over the first consecutive windows of ``heldout.txt`` (files never
trained on); calibration: seeded random windows of ``calibration.txt`` (training-split text), one
set per calibration seed. Magnitude pruning uses no calibration data, so it runs once.

Per method, sparsity (50 %, 60 %, 70 %, 2:4, 4:8) and seed: perplexity, measured sparsity of the
pruned layers and wall time of the prune call. The table gives mean +- standard deviation over
seeds and says, per sparsity, whether SparseGPT <= Wanda < magnitude (lower perplexity is better).

Usage: ``python benchmarks/bench_decoder.py [--quick] [--model-dir DIR] [--seeds 3]``; writes
``benchmarks/results/decoder.json`` and ``decoder.md``. On a machine busy with other work the
timings are not final (the load average before and after is recorded).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import os
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sparseforge.experiments import stdlib_lm
from sparseforge.fileio import write_text
from sparseforge.oneshot import prune_model
from sparseforge.oneshot.evaluate import perplexity
from sparseforge.oneshot.io import calibration_ids, load_transformer, text_windows

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_MODEL_DIR = HERE.parent / ".cache" / "stdlib-llama"

METHODS = ("magnitude", "wanda", "sparsegpt", "ria")
SPARSITIES = ("50%", "60%", "70%", "2:4", "4:8")
QUICK_SPARSITIES = ("50%", "2:4")


def _oneshot_helpers() -> Any:
    """benchmarks/bench_oneshot.py as a module (its machine description and summaries are shared)."""
    module = sys.modules.get("bench_oneshot")
    if module is None:
        spec = importlib.util.spec_from_file_location("bench_oneshot", HERE / "bench_oneshot.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_oneshot"] = module
        spec.loader.exec_module(module)
    return module


def parse_sparsity(label: str) -> tuple[float | None, str]:
    """``(sparsity, structure)`` for ``prune_model`` from ``"50%"`` or ``"2:4"``."""
    if ":" in label:
        return None, label
    return float(label.rstrip("%")) / 100.0, "unstructured"


def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": list(values),
    }


def ordering(cells: dict[str, dict[str, Any]]) -> dict[str, bool | None]:
    """Whether SparseGPT <= Wanda and Wanda < magnitude (mean perplexity), per pair; None when a method is missing."""

    def mean(method: str) -> float | None:
        cell = cells.get(method)
        return None if cell is None else float(cell["perplexity"]["mean"])

    sgpt, wanda, mag = mean("sparsegpt"), mean("wanda"), mean("magnitude")
    out: dict[str, bool | None] = {
        "sparsegpt_le_wanda": None if sgpt is None or wanda is None else sgpt <= wanda,
        "wanda_lt_magnitude": None if wanda is None or mag is None else wanda < mag,
    }
    out["holds"] = None if None in out.values() else bool(out["sparsegpt_le_wanda"] and out["wanda_lt_magnitude"])
    return out


def run(
    model_dir: Path,
    *,
    methods: Sequence[str],
    sparsities: Sequence[str],
    seeds: Sequence[int],
    samples: int,
    windows: int,
    seqlen: int | None,
    batch_size: int = 8,
    log: Any = print,
) -> dict[str, Any]:
    """Prune a fresh copy of the dense model per method, sparsity and seed; the measured cells."""
    dense, tokenizer, kind = load_transformer(model_dir)
    if kind != "decoder":
        raise SystemExit(f"{model_dir} holds an {kind}; a decoder (causal LM) is needed")
    context = int(dense.config.max_position_embeddings)
    seqlen = min(256, context) if seqlen is None else seqlen
    heldout = text_windows(tokenizer, model_dir / stdlib_lm.HELDOUT_FILE, windows, seqlen)
    dense_nll, tokens = perplexity(dense, heldout, batch_size)
    log(f"dense: perplexity {math.exp(dense_nll):.3f} over {windows} x {seqlen} held-out tokens")
    calibrations = {
        s: calibration_ids(tokenizer, model_dir / stdlib_lm.CALIBRATION_FILE, samples, seqlen, s) for s in seeds
    }
    cells: dict[str, dict[str, dict[str, Any]]] = {label: {} for label in sparsities}
    for label in sparsities:
        sparsity, structure = parse_sparsity(label)
        for method in methods:
            ppls, secs, runs = [], [], []
            for seed in seeds[:1] if method == "magnitude" else seeds:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                report = prune_model(
                    model,
                    calibrations[seed],
                    method=method,
                    sparsity=sparsity,
                    structure=structure,
                    progress=False,
                    batch_size=batch_size,
                )
                seconds = time.perf_counter() - t0
                nll, _ = perplexity(model, heldout, batch_size)
                layer_sparsities = [float((~mask).double().mean()) for _, mask in report.masks.items()]
                ppls.append(math.exp(nll))
                secs.append(seconds)
                runs.append(
                    {
                        "seed": None if method == "magnitude" else seed,
                        "perplexity": ppls[-1],
                        "seconds": seconds,
                        "layers": len(report.layers),
                        "sparsity": report.masks.sparsity(),
                        "layer_sparsity_min": min(layer_sparsities),
                        "layer_sparsity_max": max(layer_sparsities),
                    }
                )
                log(
                    f"  {method:<9} {label:<4} seed {runs[-1]['seed']}: perplexity {ppls[-1]:.3f}  "
                    f"sparsity {report.masks.sparsity():.4f} ({len(report.layers)} layers)  {seconds:.1f} s"
                )
                del model
            cells[label][method] = {"perplexity": _summary(ppls), "seconds": _summary(secs), "runs": runs}
        order = ordering(cells[label])
        log(f"{label}: SparseGPT <= Wanda < magnitude: {order['holds']}")
    return {
        "model_dir": str(model_dir),
        "model": {
            "parameters": sum(p.numel() for p in dense.parameters()),
            "layers": int(dense.config.num_hidden_layers),
            "hidden": int(dense.config.hidden_size),
            "intermediate": int(dense.config.intermediate_size),
            "vocab": int(dense.config.vocab_size),
            "context": context,
        },
        "settings": {
            "seeds": list(seeds),
            "calibration_samples": samples,
            "seqlen": seqlen,
            "heldout_windows": windows,
            "heldout_tokens_scored": tokens,
            "batch_size": batch_size,
            "methods": list(methods),
            "sparsities": list(sparsities),
        },
        "dense": {"perplexity": math.exp(dense_nll), "nll": dense_nll},
        "cells": cells,
        "ordering": {label: ordering(cells[label]) for label in sparsities},
    }


def _run_part(kwargs: dict[str, Any]) -> dict[str, Any]:
    return run(**kwargs)


def run_parallel(jobs: int, **kwargs: Any) -> dict[str, Any]:
    """:func:`run` with the sparsities split over ``jobs`` worker processes (same numbers, in order)."""
    sparsities = list(kwargs.pop("sparsities"))
    jobs = max(1, min(jobs, len(sparsities)))
    if jobs == 1:
        return run(sparsities=sparsities, **kwargs)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parts = [sparsities[i::jobs] for i in range(jobs)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        results = list(pool.map(_run_part, [{**kwargs, "sparsities": part} for part in parts]))
    merged = results[0]
    cells = {label: r["cells"][label] for r in results for label in r["cells"]}
    merged["cells"] = {label: cells[label] for label in sparsities}
    merged["ordering"] = {label: ordering(cells[label]) for label in sparsities}
    merged["settings"]["sparsities"] = sparsities
    merged["settings"]["jobs"] = jobs
    return merged


def _pm(s: dict[str, Any]) -> str:
    return f"{s['mean']:.2f} ± {s['std']:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """Perplexity per sparsity (rows) and method (columns), and whether the ordering holds."""
    methods = result["settings"]["methods"]
    dense = f"{result['dense']['perplexity']:.2f}"
    lines = [
        "| sparsity | " + " | ".join(methods) + " | SparseGPT ≤ Wanda < magnitude |",
        "|---|" + "---|" * len(methods) + "---|",
        "| dense | " + " | ".join(dense for _ in methods) + " | — |",
    ]
    for label, cells in result["cells"].items():
        holds = result["ordering"][label]["holds"]
        word = "—" if holds is None else ("yes" if holds else "no")
        lines.append(f"| {label} | " + " | ".join(_pm(cells[m]["perplexity"]) for m in methods) + f" | {word} |")
    return "\n".join(lines)


def format_markdown(result: dict[str, Any]) -> str:
    m, s, model = result["machine"], result["settings"], result["model"]
    load = result["load_average"]
    seconds = {
        method: statistics.fmean(v for cells in result["cells"].values() for v in cells[method]["seconds"]["values"])
        for method in s["methods"]
    }
    verdicts = [v["holds"] for v in result["ordering"].values()]
    return "\n".join(
        [
            format_table(result),
            "",
            f"Held-out perplexity (lower is better) of the standard-library Llama ({model['parameters']:,} parameters: "
            f"{model['layers']} blocks, width {model['hidden']}, MLP {model['intermediate']}, vocabulary "
            f"{model['vocab']}) over {s['heldout_windows']} consecutive windows of {s['seqlen']} tokens of held-out "
            f"files ({s['heldout_tokens_scored']} tokens scored). Mean ± standard deviation over "
            f"{len(s['seeds'])} calibration seed(s) of {s['calibration_samples']} random {s['seqlen']}-token windows "
            "of training-split text; magnitude uses no calibration data and runs once. "
            f"The ordering SparseGPT ≤ Wanda < magnitude holds at {sum(bool(v) for v in verdicts)} of "
            f"{len(verdicts)} sparsities.",
            "",
            "Mean wall time of one prune call (calibration forwards included): "
            + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
            + ".",
            "",
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; torch {m['torch']}, "
            f"transformers {m['transformers']}, Python {m['python']}; {m['date']}. "
            f"Load average (1, 5, 15 min) before {load['before']}, after {load['after']}"
            + (
                " — the machine was busy with other work: the timings are not final."
                if result["busy"]
                else "; on a machine shared with other work, timings are not final."
            ),
            "",
            f"Command: `{result['command']}`",
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model-dir", default=None, help=f"the model folder (default {DEFAULT_MODEL_DIR})")
    parser.add_argument("--size", default="small", help="size to train when the model folder is missing")
    parser.add_argument("--seeds", type=int, default=None, help="calibration seeds (default 3; 1 with --quick)")
    parser.add_argument("--calibration", type=int, default=None, help="calibration windows (default 128; 8 quick)")
    parser.add_argument("--windows", type=int, default=None, help="held-out windows (default 64; 8 quick)")
    parser.add_argument("--seqlen", type=int, default=None, help="tokens per window (default min(256, context))")
    parser.add_argument("--methods", default=None, help=f"comma-separated, default {','.join(METHODS)}")
    parser.add_argument("--sparsities", default=None, help=f"comma-separated, default {','.join(SPARSITIES)}")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes, each taking some of the sparsities")
    parser.add_argument("--quick", action="store_true", help="1 seed, few windows, 50%% and 2:4 only")
    parser.add_argument("--out-dir", default=str(RESULTS), help="where decoder.json and decoder.md go")
    args = parser.parse_args(argv)
    helpers = _oneshot_helpers()
    quick = args.quick
    model_dir = Path(args.model_dir) if args.model_dir else DEFAULT_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        print(f"{model_dir} is missing: training it ({args.size}) ...", file=sys.stderr)
        stdlib_lm.train(model_dir, args.size, progress=True)
    seeds = list(range(args.seeds if args.seeds is not None else (1 if quick else 3)))
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else list(METHODS)
    default_sparsities = QUICK_SPARSITIES if quick else SPARSITIES
    sparsities = [s.strip() for s in args.sparsities.split(",")] if args.sparsities else list(default_sparsities)
    samples = args.calibration if args.calibration is not None else (8 if quick else 128)
    windows = args.windows if args.windows is not None else (8 if quick else 64)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    command = "python benchmarks/bench_decoder.py" + "".join(f" {shlex.quote(a)}" for a in argv_list)
    before = helpers._load()
    machine = helpers.machine_info()
    t0 = time.perf_counter()
    result = run_parallel(
        args.jobs,
        model_dir=model_dir,
        methods=methods,
        sparsities=sparsities,
        seeds=seeds,
        samples=samples,
        windows=windows,
        seqlen=args.seqlen,
        batch_size=args.batch_size,
    )
    after = helpers._load()
    cores = os.cpu_count() or 1
    busy = before is not None and before[0] > 0.5 * cores
    info_path = model_dir / stdlib_lm.INFO_FILE
    trained = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else {}
    result = {
        "benchmark": "one-shot pruning of the standard-library Llama: held-out perplexity",
        "command": command,
        "machine": machine,
        "load_average": {"before": before, "after": after},
        "busy": busy,
        "total_seconds": time.perf_counter() - t0,
        "quick": quick,
        "training": {k: trained[k] for k in ("size", "seed", "steps", "batch", "train_seconds") if k in trained},
        **result,
    }
    markdown = format_markdown(result)
    print()
    print(markdown)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "decoder.json", json.dumps(result, indent=2) + "\n")
    write_text(out / "decoder.md", markdown)
    return result


if __name__ == "__main__":
    main()
