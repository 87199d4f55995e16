"""``sparseforge report``: per-layer sparsity (and FLOPs, given the model) of a saved checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app
from .prune import MODEL_HELP


@app.command()
def report(
    checkpoint: Annotated[Path, typer.Argument(help="A sparseforge checkpoint (.safetensors or .pt).")],
    model: Annotated[
        str | None,
        typer.Option(help=MODEL_HELP + " Optional: without it the report is read from the file alone (no FLOPs)."),
    ] = None,
    input_shape: Annotated[
        str | None,
        typer.Option(help="Shape of one input sample for per-sample FLOPs, e.g. 40 or 3,32,32 (with --model)."),
    ] = None,
) -> None:
    """Print the per-layer sparsity of a saved checkpoint; every tensor is verified against its checksum first."""
    import torch

    from ..checkpoint import load, read_checkpoint
    from ..experiments.models import model_from_spec
    from ..fileio import check_input_file
    from ..report import checkpoint_report, sparsity_report
    from .prune import _parse_shape

    check_input_file(checkpoint, "checkpoint")
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
