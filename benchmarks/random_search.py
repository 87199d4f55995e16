"""The Random Search baseline for sparse architecture search, on MNIST-1D.

    .venv/bin/python benchmarks/random_search.py [--quick]

Writes benchmarks/results/random_search.json and random_search.md (see
sparseforge.experiments.random_search for what is searched and compared).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from sparseforge.experiments.random_search import RandomSearchConfig, format_table, random_search
from sparseforge.fileio import write_text

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings (seconds), for a smoke test")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = (
        RandomSearchConfig(node_sparsities=(0.5,), hidden=32, candidates=4, seeds=(0, 1), epochs=2, samples=500)
        if args.quick
        else RandomSearchConfig()
    )
    started = time.perf_counter()
    result = random_search(cfg, progress=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__, "threads": 1}
    result["command"] = " ".join(
        ["python", "benchmarks/random_search.py", *(argv if argv is not None else sys.argv[1:])]
    )
    table = format_table(result)
    s = result["settings"]
    text = (
        f"MLP 40-{s['hidden']}x{s['layers']}-10 parent; per seed, "
        f"{s['candidates']} random node configurations scored untrained by validation loss, the best trained; "
        "one random configuration, and an unstructured random mask with the best one's per-layer budget, "
        f"trained the same way; {s['epochs']} epochs, SGD lr {s['lr']} cosine; "
        f"seeds {s['seeds']}; test accuracy mean ± std. Command: `{result['command']}` "
        f"(torch {torch.__version__}, 1 thread, {result['seconds']} s).\n\n{table}"
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_text(args.out_dir / "random_search.json", json.dumps(result, indent=1) + "\n")
    write_text(args.out_dir / "random_search.md", text)
    print(table)
    return result


if __name__ == "__main__":
    main()
