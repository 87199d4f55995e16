"""``sparseforge report``: per-layer sparsity (and FLOPs, given the model) of a saved checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import SparseforgeError
from .app import app, console
from .prune import MODEL_HELP


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == b"SQLite format 3\x00"
    except OSError:
        return False


@app.command()
def report(
    checkpoint: Annotated[
        Path, typer.Argument(help="A sparseforge checkpoint (.safetensors or .pt), or a results store (SQLite).")
    ],
    model: Annotated[
        str | None,
        typer.Option(help=MODEL_HELP + " Optional: without it the report is read from the file alone (no FLOPs)."),
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(help="Shape of one input sample for per-sample FLOPs, e.g. 40 or 3,32,32 (with --model)."),
    ] = None,
    out: Annotated[
        Path, typer.Option(help="Results store: folder for the tables (Markdown, CSV) and the plots (PNG).")
    ] = Path("report"),
    experiment: Annotated[str | None, typer.Option(help="Results store: only this experiment.")] = None,
) -> None:
    """Per-layer sparsity of a checkpoint (every tensor verified first), or, for a results store, tables of
    mean ± std over seeds by method x sparsity x training length and the plots."""
    import torch

    from ..checkpoint import load, read_checkpoint
    from ..experiments.models import model_from_spec
    from ..fileio import check_input_file
    from ..report import checkpoint_report, sparsity_report
    from .prune import _parse_shape

    check_input_file(checkpoint, "checkpoint")
    if _is_sqlite(checkpoint) or checkpoint.suffix.lower() in (".sqlite", ".sqlite3", ".db"):
        if model is not None or input_shape is not None:
            raise SparseforgeError("--model and --input-shape apply to checkpoints, not to a results store")
        from ..experiments.summary import write_report

        written = write_report(checkpoint, out, experiment=experiment)
        console.print(Path(written["markdown"]).read_text(encoding="utf-8"))
        console.print(f"wrote {', '.join(str(p) for p in written.values())}")
        return
    shape = _parse_shape(input_shape) if input_shape is not None else None
    if model is None:
        weights, masks = read_checkpoint(checkpoint)
        checkpoint_report(weights, masks)
        return
    net = model_from_spec(model)
    masks = load(checkpoint, net)
    if shape is None and model in ("mlp", "cnn"):
        shape = (40,)
    sparsity_report(net, torch.zeros(1, *shape) if shape is not None else None, masks=masks)
