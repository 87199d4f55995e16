"""The built-in demo: a shipped config run end to end, then the best sparse model run fast.

1. the config ``configs/demo.yaml`` (dense vs static ERK vs SET vs RigL vs GMP at 90 % on
   MNIST-1D, 2 seeds) runs into ``OUT/results.sqlite`` on local worker processes;
2. the report (tables and plots) is written into ``OUT``;
3. the most accurate sparse run is rebuilt from its final checkpoint, converted with
   :func:`sparseforge.inference.convert`, and timed against its dense self at batch 1 and 64
   (interleaved calls, median).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

__all__ = ["DEMO_CONFIG", "DemoResult", "demo_config_path", "run_demo", "speedup_of_best"]

DEMO_CONFIG = "demo.yaml"


def demo_config_path() -> Path:
    """The shipped demo config (a file inside the installed package)."""
    return Path(str(resources.files("sparseforge.experiments") / "configs" / DEMO_CONFIG))


@dataclass
class DemoResult:
    store: Path
    written: dict[str, Path]
    table: str
    best: str
    accuracy: float
    speed: dict[int, dict[str, Any]]


def speedup_of_best(
    store_path: Path, *, batch_sizes: tuple[int, ...] = (1, 64), rounds: int = 200
) -> tuple[Any, dict[int, dict[str, Any]]]:
    """``(record, {batch: {dense_ms, sparse_ms, speedup, layers}})`` for the most accurate sparse run."""
    from ..inference import convert
    from ..inference.bench import _interleaved_ms
    from .runner import build
    from .store import ResultsStore
    from .sweep import checkpoint_path

    with ResultsStore(store_path) as store:
        sparse = [r for r in store.runs(status="done") if r.config["algorithm"]["name"] != "dense" and r.summary]
    if not sparse:
        raise RuntimeError("no finished sparse run to convert")
    best = max(sparse, key=lambda r: float(r.summary["accuracy"]))  # type: ignore[index]
    from .config import parse_config

    config = parse_config(best.config)
    setup = build(config, best.seed)
    state = torch.load(checkpoint_path(store_path, best.key), map_location="cpu", weights_only=True)
    model = setup.model
    model.load_state_dict(state["model"])
    model.eval()
    with warnings.catch_warnings():  # the caller reports dense-kept and noisy layers itself
        warnings.simplefilter("ignore")
        fast, report = convert(model, batch_sizes=batch_sizes)
    speed: dict[int, dict[str, Any]] = {}
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in batch_sizes:
            x = torch.randn(batch, setup.data.num_features, generator=generator)
            calls: dict[str, Callable[[], object]] = {
                "dense": functools.partial(model, x),
                "sparse": functools.partial(fast, x),
            }
            times = _interleaved_ms(calls, rounds)
            speed[batch] = {
                "dense_ms": times["dense"],
                "sparse_ms": times["sparse"],
                "speedup": times["dense"] / times["sparse"],
                "sparse_layers": len(report.sparse_layers),
                "layers": len(report.layers),
                "under_load": len(report.under_load_layers),
            }
    return best, speed


def run_demo(
    out: str | os.PathLike[str],
    *,
    workers: int = 2,
    progress: bool = True,
    config: str | os.PathLike[str] | None = None,
) -> DemoResult:
    """Run the shipped config (or ``config``) into ``out``, write its report there, and time the best sparse model."""
    from ..fileio import check_output_dir
    from .config import load_runs
    from .summary import write_report
    from .sweep import run_sweep

    folder = check_output_dir(out, "demo folder")
    _, runs = load_runs(config if config is not None else demo_config_path())
    store = folder / "results.sqlite"
    threads = max(1, (os.cpu_count() or 1) // workers)
    run_sweep(runs, store, workers=workers, threads=threads, progress=progress)
    written = write_report(store, folder)
    best, speed = speedup_of_best(store)
    return DemoResult(
        store,
        written,
        written["markdown"].read_text(encoding="utf-8"),
        best.label,
        float((best.summary or {})["accuracy"]),
        speed,
    )
