"""``sparseforge bench``: dense torch vs torch CSR vs sparseforge's packed kernels."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SparseforgeError
from .app import app, console, err_console
from .outputs import outputs_of

#: Largest batch the benchmark accepts (a 4096-wide fp32 input of this many rows is 1 GiB).
MAX_BATCH = 65536


@app.command()
def bench(
    ctx: typer.Context,
    model: Annotated[
        Path | None,
        typer.Option(help="A safetensors state dict of Linear layers; default: the built-in 4-layer 4096x4096 MLP."),
    ] = None,
    sparsities: Annotated[
        str,
        typer.Option(
            help="Comma-separated fractions of zeros, N:M patterns (kept:group) and/or block:RxC:S (R x C blocks, S zero) and/or channel:S (S of the output neurons removed); default: the standard set of make bench."
        ),
    ] = "",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes (input rows per forward).")] = "1,16,128",
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path(
        "bench_inference.json"
    ),
    quick: Annotated[
        bool, typer.Option(help="A < 1 minute run (0.9 sparsity, batches 1 and 16, fewer repeats).")
    ] = False,
    busy: Annotated[
        bool | None,
        typer.Option(
            "--busy/--no-busy",
            help="Also convert while busy-loop processes keep every core busy, then time both models on the quiet machine (default: on, off with --quick).",
        ),
    ] = None,
) -> None:
    """Time dense torch vs torch CSR vs sparseforge's packed kernels, with the machine's bandwidth."""
    from ..fileio import check_input_file, check_output_file
    from ..inference.bench import DEFAULT_PATTERNS, format_table, parse_pattern, run_inference_bench

    patterns = [parse_pattern(item) for item in (v.strip() for v in sparsities.split(",")) if item] or list(
        DEFAULT_PATTERNS
    )
    sizes = []
    for item in (v.strip() for v in batches.split(",") if v.strip()):
        if not item.isdigit() or not 1 <= int(item) <= MAX_BATCH:
            raise SparseforgeError(
                f"batches={batches!r} is not allowed; allowed: comma-separated integers in [1, {MAX_BATCH}]"
            )
        sizes.append(int(item))
    if not sizes:
        raise SparseforgeError(f"batches={batches!r} names no batch size; allowed: comma-separated positive integers")
    if quick and not sparsities.strip():
        patterns = [0.9]
    if quick and batches == "1,16,128":
        sizes = [1, 16]
    if model is not None:
        check_input_file(model, "model file")
    json_out = check_output_file(json_out, "--json output", suffixes=(".json",))
    with err_console.status("benchmarking ...") as status:
        rows = run_inference_bench(
            tuple(patterns),
            tuple(sizes),
            model_path=model,
            json_out=json_out,
            quick=quick,
            busy=busy,
            progress=lambda msg: status.update(f"benchmarking: {msg}"),
        )
    outputs_of(ctx).wrote(json_out)
    console.print(format_table(rows), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {json_out}")
