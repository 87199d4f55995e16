"""``sparseforge prune``: prune the user's model (built-in or given by import path) in one shot."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import SparseforgeError
from .app import app, console, err_console
from .outputs import outputs_of

_SUFFIXES = (".safetensors", ".pt", ".pth")
_NEEDS_DATA = ("snip", "grasp", "movement")

MODEL_HELP = (
    "The model to prune: a built-in name (mlp, cnn: built for the inputs of --data, MNIST-1D's 40 by default) or a factory "
    "given by import path, package.module:factory or path/to/file.py:factory (called with no arguments)."
)


def _check_forward(net: Any, x: Any, model: str, data: str) -> None:
    """Run ``net`` once on ``x`` (no gradients); a failure is one line naming model and data."""
    import torch

    was_training = net.training
    try:
        net.eval()
        with torch.no_grad():
            net(x)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise SparseforgeError(
            f"--model {model} cannot run on {data} (inputs of shape {tuple(x.shape[1:])}): {type(exc).__name__}: {reason}"
        ) from None
    finally:
        net.train(was_training)


def _parse_shape(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise SparseforgeError(
            f"--input-shape {text!r} is not allowed; allowed: comma-separated positive integers, e.g. 3,32,32"
        )
    return tuple(int(p) for p in parts)


@app.command("prune")
def prune_cmd(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(help="Output checkpoint (.safetensors, .pt or .pth) with weights and masks.")],
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Trained weights of the model: a sparseforge checkpoint or a plain state dict (.safetensors or .pt). Without it the model's initial weights are pruned (pruning at initialisation)."
        ),
    ] = None,
    sparsity: Annotated[
        float | None,
        typer.Option(
            help="Fraction of prunable weights to remove, in [0, 1). Omit with an N:M structure, which fixes it."
        ),
    ] = None,
    method: Annotated[
        str, typer.Option(help="Score: magnitude, random, snip, grasp, synflow, movement.")
    ] = "magnitude",
    structure: Annotated[
        str, typer.Option(help="unstructured, N:M (kept:group, e.g. 2:4), block:RxC, channel[:DIM], fanin.")
    ] = "unstructured",
    distribution: Annotated[str, typer.Option(help="Layer budget: uniform, er, erk, global.")] = "uniform",
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="Module-name pattern to keep dense (repeatable), e.g. classifier or 'blocks.*.attn'."),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="Data for snip, grasp, movement (and the input shape of synflow): mnist1d, digits, or a .safetensors/.pt file with tensors 'inputs' and 'targets'."
        ),
    ] = None,
    samples: Annotated[int, typer.Option(help="Rows of --data used for the scores.")] = 512,
    input_shape: Annotated[
        str | None, typer.Option(help="Input shape of one sample for synflow without --data, e.g. 40 or 3,32,32.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of random scores and of a built-in model's initialisation.")] = 0,
) -> None:
    """Prune YOUR model in one shot and save its weights and masks.

    Example: sparseforge prune out.safetensors --model mypkg.models:build --checkpoint trained.pt --sparsity 0.9
    """
    import torch

    from ..checkpoint import load, save
    from ..distributions import DISTRIBUTIONS
    from ..experiments.datasets import DATASET_SHAPES, load_batch
    from ..experiments.models import MODELS, model_from_spec
    from ..fileio import check_input_file, check_output_file
    from ..pruning import METHODS, prune, validate_options
    from ..report import sparsity_report
    from ..structures import parse_structure
    from ..targets import select_prunable

    # 1. everything that needs no model: output path, options, files
    out = check_output_file(out, "output", suffixes=_SUFFIXES)
    if method not in METHODS:
        raise SparseforgeError(f"method={method!r} is not recognised; allowed: {list(METHODS)}")
    if distribution not in DISTRIBUTIONS:
        raise SparseforgeError(f"distribution={distribution!r} is not recognised; allowed: {list(DISTRIBUTIONS)}")
    parsed = parse_structure(structure)
    fixed = parsed.fixed_density
    if fixed is not None and sparsity is not None and abs(sparsity - (1.0 - fixed)) > 1e-9:
        raise SparseforgeError(
            f"--sparsity {sparsity} conflicts with --structure {structure}, which fixes the sparsity at {1 - fixed:g}; "
            "omit --sparsity"
        )
    if fixed is None and sparsity is None:
        raise SparseforgeError(f"--structure {structure} needs --sparsity (a fraction of zeros in [0, 1))")
    validate_options(sparsity, method, parsed, distribution)
    if method in _NEEDS_DATA and data is None:
        raise SparseforgeError(
            f"--method {method} needs --data (mnist1d, digits, or a .safetensors/.pt file with 'inputs' and 'targets')"
        )
    shape = _parse_shape(input_shape) if input_shape is not None else None
    if samples < 1:
        raise SparseforgeError(f"--samples {samples} is not allowed; allowed: an integer >= 1")
    if model is None:
        raise SparseforgeError(
            "prune needs the model to prune: --model mlp|cnn (built-in) or --model package.module:factory "
            "(or path/to/file.py:factory), with --checkpoint WEIGHTS for its trained weights"
        )
    if checkpoint is not None:
        check_input_file(checkpoint, "checkpoint")

    # 2. the model and its weights; then structure and exclude patterns against every layer.
    # A built-in model is built for the data's features (a data file is read now for that).
    batch = None
    features, classes = 40, 10
    if data is not None and model in MODELS:
        if data in DATASET_SHAPES:
            features, classes = DATASET_SHAPES[data]
        else:
            batch = load_batch(data, samples=samples, seed=seed)
            features = int(batch[0][0].numel())
            classes = max(10, int(batch[1].max()) + 1) if not batch[1].is_floating_point() else 10
    net = model_from_spec(model, in_features=features, num_classes=classes, seed=seed)
    before = None
    if checkpoint is not None:
        before = load(checkpoint, net)
    prunable = select_prunable(net, exclude=exclude or ())
    for name, param in prunable.items():
        parsed.check_shape(tuple(param.shape), name)
    if method == "synflow" and shape is None and data is None:
        if model in MODELS:
            shape = (features,)
        else:
            raise SparseforgeError("--method synflow needs the input shape: --input-shape (e.g. 3,32,32) or --data")
    zeros = sum(int((p == 0).sum()) for p in prunable.values())
    total = sum(p.numel() for p in prunable.values())
    start = (
        f"masks of sparsity {before.sparsity():.4f}"
        if before is not None
        else f"{zeros / total:.4f} of the prunable weights already zero"
        if zeros
        else "dense"
    )

    # 3. the data, and one forward pass on two samples: model and data must agree before the work
    if data is not None and batch is None:
        batch = load_batch(data, samples=samples, seed=seed)
    probe = batch[0][:2] if batch is not None else (torch.zeros(2, *shape) if shape is not None else None)
    if probe is not None:
        _check_forward(net, probe, model, data if data is not None else f"--input-shape {input_shape}")
    if checkpoint is None:
        err_console.print(
            "note: no --checkpoint, so the model's initial weights are pruned (pruning at initialisation)",
            soft_wrap=True,
        )
    with err_console.status(f"scoring {len(prunable)} layers with {method} ..."):
        masks = prune(
            net,
            sparsity,
            method=method,
            structure=parsed,
            distribution=distribution,
            exclude=exclude or (),
            data=batch,
            input_shape=shape,
            seed=seed,
        )
    example = batch[0][:1] if batch is not None else (torch.zeros(1, *shape) if shape is not None else None)
    if example is None and model in MODELS:
        example = torch.zeros(1, features)
    sparsity_report(net, example, masks=masks)
    path = outputs_of(ctx).wrote(save(out, net, masks))
    console.print(
        f"pruned {model} ({start} before) to sparsity {masks.sparsity():.4f} over {len(masks)} masked layers; wrote {path}"
    )
