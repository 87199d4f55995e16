"""The typer application every command module registers on."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="sparseforge",
    help="Sparse neural networks on PyTorch: prune, train sparse, run fast on a CPU, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Results go to stdout; progress bars and notes to stderr (so `> file` keeps only results).
console = Console()
err_console = Console(stderr=True)
