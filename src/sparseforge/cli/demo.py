"""``sparseforge demo``: the built-in comparison run end to end; ``sparseforge essential``: the
essential-sparsity curve of a small model on MNIST-1D."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SparseforgeError
from .app import app, console
from .outputs import outputs_of


def parse_floats(text: str, name: str) -> list[float]:
    """Comma-separated numbers, or a one-line error naming the option."""
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparseforgeError(f"{name}={text!r} is not a comma-separated list of numbers") from None


@app.command()
def demo(
    ctx: typer.Context,
    out: Annotated[
        Path, typer.Option(help="Folder for the results store, tables and plots (created if missing).")
    ] = Path("demo_out"),
    workers: Annotated[int, typer.Option(help="Runs at once.")] = 2,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Compare dense, static ERK, SET, RigL and GMP at 90 % sparsity on MNIST-1D (2 seeds each), write
    the tables and plots, then convert the most accurate sparse model and time it against dense.

    The config is shipped with sparseforge (sparseforge/experiments/configs/demo.yaml); finished runs
    in OUT/results.sqlite are not run again.
    """
    from ..experiments.demo import run_demo

    if workers < 1 or workers > 64:
        raise SparseforgeError(f"--workers {workers} is not allowed; allowed: 1 to 64")
    outputs = outputs_of(ctx)
    result = run_demo(out, workers=workers, progress=progress)
    for path in (result.store, *result.written.values()):
        outputs.wrote(path)
    console.print(result.table)
    console.print(f"most accurate sparse run: {result.best} ({100 * result.accuracy:.2f} % test accuracy)")
    for batch, row in result.speed.items():
        console.print(
            f"  batch {batch}: dense {row['dense_ms']:.3f} ms, converted {row['sparse_ms']:.3f} ms: "
            f"{row['speedup']:.2f}x ({row['sparse_layers']} of {row['layers']} layers packed)"
        )
    busy = max(row["under_load"] for row in result.speed.values())
    if busy:
        console.print(
            f"  (other processes kept the CPU busy while convert measured {busy} layer(s): these timings and its "
            "choices are noisy; sparseforge.inference.retune re-measures on a quiet machine)"
        )
    console.print(f"results store, tables and plots in {out}/ (sparseforge results {result.store})")


@app.command()
def essential(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Folder for essential_sparsity.json and .png (created if missing).")] = Path(
        "essential_out"
    ),
    model: Annotated[str, typer.Option(help="Built-in model: cnn or mlp.")] = "cnn",
    width: Annotated[int, typer.Option(help="Channels (cnn) or hidden units (mlp).")] = 128,
    epochs: Annotated[int, typer.Option(help="Dense training epochs (passes over the 4000 training samples).")] = 20,
    sparsities: Annotated[
        str | None, typer.Option(help="Comma-separated sparsities in [0, 1) (default 0..0.99).")
    ] = None,
    methods: Annotated[
        str, typer.Option(help="Comma-separated scores: magnitude, random, snip, grasp, synflow, movement.")
    ] = "magnitude,random,snip,synflow",
    seed: Annotated[int, typer.Option(help="Seed of the model initialisation and batch order.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a small model on MNIST-1D (generated locally) and draw its essential-sparsity curve.

    One-shot magnitude / random / SNIP / SynFlow pruning at sparsities 0..0.99 without retraining,
    unstructured (global budget) and N:M (2:4, 1:4, 1:8). Prints a table, writes a JSON of the
    numbers and a PNG plot into OUT.
    """
    from ..experiments.essential import EssentialConfig, format_table, plot, run_essential_sparsity, save_json
    from ..experiments.models import MODELS
    from ..fileio import check_output_dir
    from ..pruning import METHODS

    # everything that can be checked is checked before the training starts
    if model not in MODELS:
        raise SparseforgeError(f"--model {model!r} is not a built-in model; allowed: {', '.join(MODELS)}")
    names = tuple(m.strip() for m in methods.split(",") if m.strip())
    if not names:
        raise SparseforgeError(f"--methods {methods!r} names no method; allowed: {', '.join(METHODS)}")
    cfg = EssentialConfig(model=model, width=width, epochs=epochs, seed=seed, methods=names)
    if sparsities is not None:
        values = parse_floats(sparsities, "sparsities")
        if not values:
            raise SparseforgeError(f"sparsities={sparsities!r} names no sparsity; allowed: numbers in [0, 1)")
        cfg.sparsities = tuple(values)
    cfg.validate()
    folder = check_output_dir(out)
    outputs = outputs_of(ctx)
    result = run_essential_sparsity(cfg, progress=progress)
    console.print(format_table(result))
    json_path = outputs.wrote(save_json(result, folder / "essential_sparsity.json"))
    png_path = outputs.wrote(plot(result, folder / "essential_sparsity.png"))
    console.print(f"wrote {json_path} and {png_path} ({result['seconds']} s)")
