"""Sparse inference benchmark: torch dense vs torch CSR vs sparseforge (prints a table, saves JSON).

    python benchmarks/bench_inference.py                 # full: 4x 4096x4096 MLP, 0.5/0.7/0.9/0.95/2:4/block, batch 1/16/128
    python benchmarks/bench_inference.py --quick         # < 1 minute
    python benchmarks/bench_inference.py --model m.safetensors --sparsities 0.9 --batches 1 16
    python benchmarks/bench_inference.py --sparsities block:8x8:0.7 block:4x4:0.9 channel:0.5   # structured
    python benchmarks/bench_inference.py --quick --busy  # quick, with the busy-machine column

Busy-machine column (on by default, off with --quick unless --busy; --no-busy skips it): every
pattern is also converted while os.cpu_count() busy-loop processes keep every core busy; both
converted models are then timed on the quiet machine, interleaved ("busy-conv" speedup and
"busy/idle" ratio; target >= 0.85 in every row).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparseforge.errors import SparseforgeError
from sparseforge.fileio import write_text
from sparseforge.inference.bench import (
    DEFAULT_PATTERNS,
    format_markdown,
    format_table,
    parse_pattern,
    run_inference_bench,
)


def _pattern(text: str) -> float | str:
    try:
        return parse_pattern(text)
    except SparseforgeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--sparsities", nargs="+", type=_pattern, default=None, help="fractions of zeros, n:m, block:RxC:S or channel:S"
    )
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--model", default=None, help="safetensors state dict of Linear layers")
    p.add_argument("--json", default="bench_inference.json")
    p.add_argument(
        "--busy",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also convert on a machine kept busy by busy-loop processes (default: on, off with --quick)",
    )
    a = p.parse_args()
    sparsities = tuple(a.sparsities) if a.sparsities else ((0.9,) if a.quick else DEFAULT_PATTERNS)
    batches = tuple(a.batches) if a.batches else ((1, 16) if a.quick else (1, 16, 128))
    import os
    import sys

    print(f"load average before: {os.getloadavg()}", file=sys.stderr, flush=True)
    rows = run_inference_bench(
        sparsities,
        batches,
        model_path=a.model,
        json_out=a.json,
        quick=a.quick,
        progress=lambda msg: print(msg, file=sys.stderr, flush=True),
        busy=a.busy,
    )
    print(format_table(rows))
    md = Path(a.json).with_suffix(".md")
    write_text(md, format_markdown(rows) + "\n")
    print(f"saved {a.json} and {md}")


if __name__ == "__main__":
    main()
