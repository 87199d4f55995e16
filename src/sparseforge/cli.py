"""The ``sparseforge`` command line.

Bad input prints one line, ``error: ...``, on stderr (no traceback) and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from .errors import SparseforgeError

app = typer.Typer(
    name="sparseforge",
    help="Sparse neural networks on PyTorch: prune, train sparse, run fast on a CPU, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SparseforgeError(f"{name}={text!r} is not a comma-separated list of numbers") from None


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for essential_sparsity.json and .png.")] = Path("demo_out"),
    model: Annotated[str, typer.Option(help="Built-in model: cnn or mlp.")] = "cnn",
    width: Annotated[int, typer.Option(help="Channels (cnn) or hidden units (mlp).")] = 128,
    epochs: Annotated[int, typer.Option(help="Dense training epochs (passes over the 4000 training samples).")] = 20,
    sparsities: Annotated[Optional[str], typer.Option(help="Comma-separated sparsities in [0, 1) (default 0..0.99).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated scores: magnitude, random, snip, grasp, synflow, movement.")] = "magnitude,random,snip,synflow",
    seed: Annotated[int, typer.Option(help="Seed of the model initialisation and batch order.")] = 0,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train a small model on MNIST-1D (generated locally) and draw its essential-sparsity curve.

    One-shot magnitude / random / SNIP / SynFlow pruning at sparsities 0..0.99 without retraining,
    unstructured (global budget) and N:M (2:4, 1:4, 1:8). Prints a table, writes a JSON of the
    numbers and a PNG plot into OUT.
    """
    from .experiments.essential import EssentialConfig, format_table, plot, run_essential_sparsity, save_json

    cfg = EssentialConfig(model=model, width=width, epochs=epochs, seed=seed, methods=tuple(m.strip() for m in methods.split(",") if m.strip()))
    if sparsities:
        cfg.sparsities = tuple(_parse_floats(sparsities, "sparsities"))
    result = run_essential_sparsity(cfg, progress=progress)
    console.print(format_table(result))
    json_path = save_json(result, out / "essential_sparsity.json")
    png_path = plot(result, out / "essential_sparsity.png")
    console.print(f"wrote {json_path} and {png_path} ({result['seconds']} s)")


@app.command("prune")
def prune_cmd(
    out: Annotated[Path, typer.Argument(help="Output checkpoint (.safetensors or .pt) with weights and masks.")],
    sparsity: Annotated[Optional[float], typer.Option(help="Fraction of prunable weights to remove, in [0, 1). Omit for N:M.")] = None,
    method: Annotated[str, typer.Option(help="Score: magnitude, random, snip, grasp, synflow, movement.")] = "magnitude",
    structure: Annotated[str, typer.Option(help="unstructured, N:M (kept:group, e.g. 2:4), block:RxC, channel[:DIM], fanin.")] = "unstructured",
    distribution: Annotated[str, typer.Option(help="Layer budget: uniform, er, erk, global.")] = "uniform",
    model: Annotated[str, typer.Option(help="Built-in model architecture: cnn or mlp (MNIST-1D shapes).")] = "cnn",
    checkpoint: Annotated[Optional[Path], typer.Option(help="Weights to start from (a sparseforge checkpoint); default: train 10 epochs.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(help="Module-name pattern to keep dense (repeatable).")] = None,
    seed: Annotated[int, typer.Option(help="Seed for random scores and initialisation.")] = 0,
) -> None:
    """Prune a built-in MNIST-1D model in one shot and save weights + masks."""
    import torch

    from .checkpoint import load, save
    from .experiments.datasets import load_dataset
    from .experiments.models import build_model
    from .prune import prune, validate_options
    from .report import sparsity_report
    from .training import evaluate, train

    validate_options(sparsity, method, structure, distribution)
    if out.suffix not in (".safetensors", ".pt", ".pth"):
        raise SparseforgeError(f"output {str(out)!r} has suffix {out.suffix!r}; allowed: .safetensors, .pt, .pth")
    data = load_dataset("mnist1d")
    net = build_model(model, data.num_features, data.num_classes, seed=seed)
    if checkpoint is not None:
        load(checkpoint, net)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
        train(net, (data.x_train, data.y_train), epochs=10, optimizer=opt, seed=seed, description="training dense")
    _, dense_acc = evaluate(net, (data.x_test, data.y_test))
    masks = prune(
        net, sparsity, method=method, structure=structure, distribution=distribution, exclude=exclude or (),
        data=(data.x_train[:512], data.y_train[:512]), seed=seed,
    )
    _, acc = evaluate(net, (data.x_test, data.y_test))
    sparsity_report(net, data.x_test[:1], masks=masks)
    path = save(out, net, masks)
    console.print(f"test accuracy {dense_acc:.3f} dense -> {acc:.3f} pruned; wrote {path}")


@app.command()
def report(
    checkpoint: Annotated[Path, typer.Argument(help="A sparseforge checkpoint (.safetensors or .pt).")],
    model: Annotated[str, typer.Option(help="Built-in model architecture the checkpoint belongs to: cnn or mlp.")] = "cnn",
) -> None:
    """Print the per-layer sparsity and FLOPs report of a saved built-in model."""
    import torch

    from .checkpoint import load
    from .experiments.models import build_model
    from .report import sparsity_report

    net = build_model(model, 40, 10)
    masks = load(checkpoint, net)
    sparsity_report(net, torch.zeros(1, 40), masks=masks)


@app.command()
def bench(
    model: Annotated[Optional[Path], typer.Option(help="A safetensors state dict of Linear layers; default: the built-in 4-layer 4096x4096 MLP.")] = None,
    sparsities: Annotated[str, typer.Option(help="Comma-separated fractions of zeros, N:M patterns (kept:group) and/or block:RxC:S (R x C blocks, S zero) and/or channel:S (S of the output neurons removed); default: the standard set of make bench.")] = "",
    batches: Annotated[str, typer.Option(help="Comma-separated batch sizes (input rows per forward).")] = "1,16,128",
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the JSON results.")] = Path("bench_inference.json"),
    quick: Annotated[bool, typer.Option(help="A < 1 minute run (0.9 sparsity, batches 1 and 16, fewer repeats).")] = False,
) -> None:
    """Time dense torch vs torch CSR vs sparseforge's packed kernels, with the machine's bandwidth."""
    from .inference.bench import DEFAULT_PATTERNS, format_table, parse_pattern, run_inference_bench

    patterns = [parse_pattern(item) for item in (v.strip() for v in sparsities.split(",")) if item] or list(DEFAULT_PATTERNS)
    sizes = []
    for item in (v.strip() for v in batches.split(",") if v.strip()):
        if not item.isdigit() or int(item) < 1:
            raise SparseforgeError(f"batches={batches!r} must be comma-separated positive integers")
        sizes.append(int(item))
    if quick and not sparsities.strip():
        patterns = [0.9]
    if quick and batches == "1,16,128":
        sizes = [1, 16]
    rows = run_inference_bench(tuple(patterns), tuple(sizes), model_path=model, json_out=json_out, quick=quick)
    console.print(format_table(rows), markup=False, highlight=False, soft_wrap=True)
    console.print(f"wrote {json_out}")


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app; bad input becomes one line on stderr and exit status 2."""
    try:
        app(args=argv, standalone_mode=False)
    except SparseforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        # Usage errors of the (vendored) click parser carry their own message and exit code.
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        raise

if __name__ == "__main__":
    main()
