"""``sparseforge validate``: experiment configs (YAML) checked, and their grids expanded, without running."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, console


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="An experiment config (YAML).", show_default=False)],
    runs: Annotated[bool, typer.Option("--runs", help="List every run of the grid with its key.")] = False,
) -> None:
    """Check an experiment config without running it: every key, and every run its grid expands into."""
    from ..experiments.config import load_runs

    parsed, expanded = load_runs(config)
    combinations = 1
    for values in parsed.grid.values():
        combinations *= len(values)
    merged = combinations * len(parsed.seeds) - len(expanded)
    if runs:
        from rich.table import Table

        table = Table(title=f"runs of {parsed.name}")
        table.add_column("key")
        table.add_column("run")
        table.add_column("epochs", justify="right")
        for run in expanded:
            table.add_row(run.key, run.label, str(run.config.training.total_epochs))
        console.print(table)
    note = f"; {merged} duplicate runs merged (dense runs ignore the sparsity settings)" if merged else ""
    console.print(
        f"{config}: valid; {len(expanded)} runs ({combinations} grid combination{'s' * (combinations != 1)} "
        f"x {len(parsed.seeds)} seed{'s' * (len(parsed.seeds) != 1)}{note})"
    )
