"""Experiments: ``validate`` a config, ``run`` its grid into a results store, list ``results``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from .app import app, console
from .outputs import outputs_of

if TYPE_CHECKING:
    from ..experiments.config import Run


@app.command()
def validate(
    config: Annotated[Path, typer.Argument(help="An experiment config (YAML).", show_default=False)],
    runs: Annotated[bool, typer.Option("--runs", help="List every run of the grid with its key.")] = False,
) -> None:
    """Check an experiment config without running it: every key, and every run its grid expands into."""
    from ..experiments.config import load_runs

    parsed, expanded = load_runs(config)
    combinations = parsed.combinations
    merged = combinations * len(parsed.seeds) - len(expanded)
    if runs:
        _print_runs(parsed.name, expanded)
    why = "dense runs ignore the sparsity settings" + ("; sub-grids may share runs" if len(parsed.grids) > 1 else "")
    note = f"; {merged} duplicate runs merged ({why})" if merged else ""
    console.print(
        f"{config}: valid; {len(expanded)} runs ({combinations} grid combination{'s' * (combinations != 1)} "
        f"x {len(parsed.seeds)} seed{'s' * (len(parsed.seeds) != 1)}{note})"
    )


STORE_HELP = "Results store (SQLite file); created when missing."


@app.command()
def run(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="An experiment config (YAML).", show_default=False)],
    store: Annotated[Path, typer.Option(help=STORE_HELP)] = Path("runs/results.sqlite"),
    workers: Annotated[int, typer.Option(help="Runs at once (local backend).")] = 1,
    threads: Annotated[int | None, typer.Option(help="Torch threads per run; default cores / workers.")] = None,
    backend: Annotated[str, typer.Option(help="local (worker processes) or ray.")] = "local",
    address: Annotated[str | None, typer.Option(help="Ray cluster address; default a local Ray instance.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue unfinished runs from their checkpoints.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the runs the grid expands into; run nothing.")
    ] = False,
    tensorboard: Annotated[
        Path | None, typer.Option(help="Also log to TensorBoard event files in this folder.")
    ] = None,
    mlflow: Annotated[
        str | None, typer.Option(help="Also log to MLflow at this tracking URI (e.g. http://localhost:5000).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars (on stderr).")] = True,
) -> None:
    """Run every experiment of a config (grid x seeds) into a results store; finished runs are skipped."""
    from ..experiments.config import load_runs

    parsed, expanded = load_runs(config)
    if dry_run:
        _print_runs(parsed.name, expanded)
        console.print(f"{len(expanded)} runs; nothing was run (--dry-run)")
        return
    from ..experiments.loggers import LoggerSpec
    from ..experiments.sweep import run_sweep

    loggers = [LoggerSpec("tensorboard", str(tensorboard))] if tensorboard is not None else []
    loggers += [LoggerSpec("mlflow", mlflow)] if mlflow is not None else []

    if store == Path("runs/results.sqlite"):
        store.parent.mkdir(exist_ok=True)  # the default folder
    # the store is consistent at every moment (one transaction per write) and checkpoints are
    # written atomically: after Ctrl-C, finished runs are kept and --resume continues the others
    outputs_of(ctx).wrote(store)
    result = run_sweep(
        expanded,
        store,
        workers=workers,
        threads=threads,
        backend=backend,
        address=address,
        resume=resume,
        loggers=loggers,
        progress=progress,
    )
    console.print(
        f"{len(result.done)} runs done, {len(result.failed)} failed, {len(result.skipped)} already done"
        f"{f', {len(result.retried)} retried after a worker died' if result.retried else ''} "
        f"in {result.seconds:.0f} s; results in {store}"
    )
    if result.failed:
        console.print(f"failed runs and their errors: sparseforge results {store} --status failed")


def _print_runs(name: str, expanded: Sequence[Run]) -> None:
    from rich.table import Table

    table = Table(title=f"runs of {name}")
    table.add_column("key")
    table.add_column("run")
    table.add_column("epochs", justify="right")
    for item in expanded:
        table.add_row(item.key, item.label, str(item.config.training.total_epochs))
    console.print(table)


@app.command()
def results(
    store: Annotated[Path, typer.Argument(help="A results store (SQLite file).", show_default=False)],
    experiment: Annotated[str | None, typer.Option(help="Only runs of this experiment (config name).")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs in this state: pending, running, done, failed.")] = None,
) -> None:
    """List the runs of a results store with their state and final numbers."""
    from rich.table import Table

    from ..experiments.store import ResultsStore
    from ..fileio import check_input_file

    check_input_file(store, "results store")
    with ResultsStore(store) as opened:
        records = opened.runs(experiment=experiment, status=status)
        counts = opened.counts()
    table = Table(title=f"{store}")
    for column in ("key", "experiment", "run", "status", "accuracy", "sparsity", "epochs", "note"):
        table.add_column(column, justify="right" if column in ("accuracy", "sparsity", "epochs") else "left")
    for r in records:
        summary = r.summary or {}
        accuracy = summary.get("accuracy")
        table.add_row(
            r.key,
            r.experiment,
            r.label,
            r.status,
            f"{100 * accuracy:.2f}%" if isinstance(accuracy, float) else "-",
            f"{100 * summary['sparsity']:.1f}%" if "sparsity" in summary else "-",
            str(summary.get("epochs", "-")),
            r.error or (f"{r.attempts} attempts" if r.attempts > 1 else ""),
        )
    console.print(table)
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()) + f"; {len(records)} shown")
