"""Run one experiment of a config: build it, train it epoch by epoch with a checkpoint after every
epoch, and resume it bitwise where a killed process left off.

Everything a run depends on comes from its resolved config and seed:

* the model's initialisation (``seed``), the data (``data.seed``), the masks (``seed``);
* the data order: epoch ``e`` shuffles with a generator seeded from ``(seed, e)``, so an epoch
  replayed after a crash visits the samples in the same order;
* the learning rate: a per-step schedule (warm-up, then constant / cosine / step);
* the global torch RNG state, saved with every checkpoint.

The checkpoint after epoch ``e`` holds the model, optimizer, scheduler, sparsifier (masks and
algorithm state), RNG state, step count and the metrics so far, written to a temporary file
and renamed (a kill during the write leaves the previous checkpoint intact). A run killed at
any moment and resumed from its last checkpoint ends with bitwise the same weights, masks and
metrics as a run that was never interrupted (one torch thread; see the guide).

Training FLOPs count what an ideal sparse implementation executes: 3 x the forward FLOPs of the
kept weights (forward, and backward for inputs and weights) per sample, with each epoch's masks
taken as the mean of its first and last step's (the dense gradients RigL computes at its update
steps are not counted).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError
from .config import ExperimentConfig, Run

__all__ = ["CHECKPOINT_FORMAT", "Setup", "build", "lr_factor", "run_experiment", "sparse_init_"]

CHECKPOINT_FORMAT = "sparseforge-run-checkpoint"
CHECKPOINT_VERSION = 1


@dataclass
class Setup:
    """A run ready to train (built by :func:`build`)."""

    config: ExperimentConfig
    seed: int
    model: nn.Module
    data: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sparsifier: Any | None
    steps_per_epoch: int
    total_steps: int
    epochs: int
    positions: dict[str, int] = field(default_factory=dict)


def lr_factor(step: int, total: int, config: ExperimentConfig) -> float:
    """The learning-rate multiplier after ``step`` completed steps of ``total`` (a pure function)."""
    schedule = config.schedule
    warmup = int(round(schedule.warmup * total))
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule.name == "constant":
        return 1.0
    if schedule.name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    passed = sum(1 for m in schedule.milestones if step >= m * total)
    return float(schedule.gamma**passed)


def sparse_init_(model: nn.Module, masks: Any) -> None:
    """Rescale each output neuron's kept weights by ``sqrt(fan_in / kept fan_in)``, in place.

    PyTorch's default initialisation draws a neuron's weights with a variance proportional to
    1 / fan_in; with most inputs masked, the output variance shrinks by the kept fraction.
    Scaling each row by ``sqrt(fan_in / kept)`` gives every neuron the variance of a dense one
    with its actual (sparse) fan-in, the "sparse initialisation" of Evci et al. (2022).
    Rows with nothing kept are left at zero.
    """
    with torch.no_grad():
        for name, param in masks.resolve(model).items():
            mask = masks[name]
            rows = mask.reshape(mask.shape[0], -1)
            kept = rows.sum(dim=1).to(param.dtype)
            fan_in = rows.shape[1]
            scale = torch.where(kept > 0, torch.sqrt(fan_in / kept.clamp(min=1)), torch.zeros_like(kept))
            param.mul_(scale.reshape(-1, *([1] * (param.dim() - 1))))


def _optimizer(model: nn.Module, config: ExperimentConfig) -> torch.optim.Optimizer:
    spec = config.optimizer
    params = model.parameters()
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.nesterov
        )
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def _model(config: ExperimentConfig, data: Any, seed: int) -> nn.Module:
    from .models import MODELS, build_model, model_from_spec

    features, classes = data.num_features, data.num_classes
    if config.model.name in MODELS:
        shape = getattr(data, "input_shape", None)
        return build_model(config.model.name, features, classes, seed=seed, width=config.model.width, input_shape=shape)
    if config.model.width is not None:
        raise SparseforgeError(
            f"model.width applies to the built-in models {', '.join(MODELS)}, not {config.model.name!r}"
        )
    return model_from_spec(config.model.name, in_features=features, num_classes=classes, seed=seed)


def _sparse_ift(model: nn.Module, config: ExperimentConfig, seed: int, example: torch.Tensor) -> Any:
    """The model rewritten into its Sparse-IFT form (in place), and its masks; ``None`` when off.
    ``example``: a training batch, which traces the model for Sparse Wide."""
    spec = config.model.sparse_ift
    if spec is None:
        return None
    from ..layers import transform

    _, masks = transform(model, spec.kind, config.sparsity.target, exclude=spec.exclude, seed=seed, example=example)
    return masks


def _sparsifier(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: ExperimentConfig,
    seed: int,
    total: int,
    given: Any = None,
) -> Any:
    """Masks and the algorithm of the config (``None`` for dense); ``given``: Sparse-IFT's masks."""
    import sparseforge as sf
    from sparseforge import algorithms as alg
    from sparseforge.structures import parse_structure

    spec: Any = config.algorithm  # one of the schema's algorithm models, told apart by name
    sparsity = config.sparsity
    name = spec.name
    if name == "dense":
        return None
    structure = parse_structure(sparsity.structure)

    def at(fraction: float) -> int:
        return max(1, int(fraction * total))

    algorithm: Any = None
    if name == "gmp":
        masks = sf.MaskState({n: torch.ones_like(p, dtype=torch.bool) for n, p in sf.select_prunable(model).items()})
        algorithm = alg.GMP(
            sparsity.target, start=int(spec.start * total), end=at(spec.end), every=spec.every,
            distribution=sparsity.distribution,
        )  # fmt: skip
    elif name == "granet":
        masks = alg.init_sparse(
            model, spec.initial_sparsity, distribution=sparsity.distribution, seed=seed, structure=structure
        )
        algorithm = alg.GraNet(
            sparsity.target, prune_start=0, prune_end=at(spec.prune_end), distribution=sparsity.distribution,
            end=at(spec.end), alpha=spec.alpha, every=spec.every, seed=seed,
        )  # fmt: skip
    else:
        start_structure = "fanin" if name == "srigl" and sparsity.structure == "unstructured" else structure
        masks = given
        if masks is None:
            masks = alg.init_sparse(
                model, sparsity.target, distribution=sparsity.distribution, seed=seed, structure=start_structure
            )
        if name in ("set", "rigl", "snfs"):
            cls = {"set": alg.SET, "rigl": alg.RigL, "snfs": alg.SNFS}[name]
            algorithm = cls(end=at(spec.end), alpha=spec.alpha, every=spec.every, seed=seed)
        elif name == "srigl":
            algorithm = alg.SRigL(
                end=at(spec.end), alpha=spec.alpha, every=spec.every, seed=seed, gamma_sal=spec.gamma_sal
            )
    if sparsity.init == "sparse":
        sparse_init_(model, masks)
    return sf.Sparsifier(model, optimizer, masks, algorithm)


def data_key(config: ExperimentConfig) -> str:
    """What the run's data set depends on: runs with equal keys train on equal data."""
    return config.data.model_dump_json()


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int, samples: int, root: str | None, image_size: int | None) -> Any:
    """A data set, built or read once per process (runs only read it)."""
    from .datasets import load_dataset

    return load_dataset(name, seed=seed, num_samples=samples, root=root, image_size=image_size)


def load_data(config: ExperimentConfig) -> Any:
    """The run's data set, built (MNIST-1D, digits) or read from its folder; once per process."""
    spec = config.data
    return _dataset(spec.name, spec.seed, spec.samples, spec.root, spec.image_size)


def build(config: ExperimentConfig, seed: int, data: Any | None = None) -> Setup:
    """Model, data, optimizer, per-step LR schedule and sparsifier of one run (deterministic in ``seed``).

    ``data``: the run's data set when the caller already has it (:func:`load_data` of a config
    with the same :func:`data_key`); runs only read it.
    """
    if data is None:
        data = load_data(config)
    model = _model(config, data, seed)
    with torch.random.fork_rng(devices=[]):  # the new layers' initialisation, from the seed
        torch.manual_seed(seed)
        ift_masks = _sparse_ift(model, config, seed, data.x_train[:2])
    optimizer = _optimizer(model, config)
    per_epoch = -(-len(data.y_train) // config.training.batch_size)
    epochs = config.training.total_epochs
    total = per_epoch * epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sparsifier = _sparsifier(model, optimizer, config, seed, total, ift_masks)
    positions = _positions(model, data.x_train[:1])
    return Setup(config, seed, model, data, optimizer, scheduler, sparsifier, per_epoch, total, epochs, positions)


def _positions(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Output positions per sample of every Linear / Conv layer (1 for a Linear on flat inputs)."""
    found: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):

            def hook(mod: nn.Module, inputs: Any, output: torch.Tensor, name: str = name) -> None:
                found[name] = int(output.numel() // output.shape[0] // output.shape[1 if output.dim() > 2 else -1])

            handles.append(module.register_forward_hook(hook))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return found


def forward_flops(setup: Setup) -> float:
    """FLOPs of one forward pass of one sample over the kept weights (2 per multiply-add)."""
    masks = setup.sparsifier.masks if setup.sparsifier is not None else None
    total = 0.0
    for name, module in setup.model.named_modules():
        if name not in setup.positions:
            continue
        weight_name = f"{name}.weight" if name else "weight"
        kept = (
            float(masks[weight_name].sum())
            if masks is not None and weight_name in masks.names()
            else float(module.weight.numel())
        )
        total += 2.0 * kept * setup.positions[name]
    return total


def _sparsity(setup: Setup) -> float:
    return float(setup.sparsifier.masks.sparsity()) if setup.sparsifier is not None else 0.0


def _mask_snapshot(setup: Setup) -> dict[str, torch.Tensor]:
    if setup.sparsifier is None:
        return {}
    return {name: mask.clone() for name, mask in setup.sparsifier.masks.items()}


def mask_change(initial: dict[str, torch.Tensor], setup: Setup) -> float:
    """Fraction of mask entries (over all masked weights) that differ from ``initial``; 0 for dense."""
    if setup.sparsifier is None or not initial:
        return 0.0
    changed = total = 0
    for name, mask in setup.sparsifier.masks.items():
        changed += int((mask != initial[name]).sum())
        total += mask.numel()
    return changed / max(1, total)


# -- checkpoints ----------------------------------------------------------------------------------------


def _checkpoint_state(
    setup: Setup,
    run: Run,
    epoch: int,
    step: int,
    history: list[dict[str, Any]],
    flops: float,
    initial: dict[str, torch.Tensor],
) -> dict[str, Any]:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "key": run.key,
        "config": run.config.model_dump(mode="json"),
        "seed": run.seed,
        "epoch": epoch,
        "step": step,
        "flops": flops,
        "model": setup.model.state_dict(),
        "optimizer": setup.optimizer.state_dict(),
        "scheduler": setup.scheduler.state_dict(),
        "sparsifier": setup.sparsifier.state_dict() if setup.sparsifier is not None else None,
        "rng": torch.get_rng_state(),
        "history": history,
        "initial_masks": initial,
    }


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsynced, then renamed over it."""
    from ..fileio import atomic_write

    atomic_write(path, lambda tmp: torch.save(state, tmp), what="checkpoint")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _differences(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")] if a != b else []


def load_checkpoint(path: Path, run: Run) -> dict[str, Any]:
    """Read a run checkpoint (``weights_only``: nothing is unpickled) and check it belongs to ``run``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  # any unreadable file is one line
        raise SparseforgeError(
            f"checkpoint {str(path)!r} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "delete it to start the run again"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise SparseforgeError(f"checkpoint {str(path)!r} is not a sparseforge run checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise SparseforgeError(
            f"checkpoint {str(path)!r} has version {state.get('version')!r}; allowed: {CHECKPOINT_VERSION}"
        )
    if state.get("key") != run.key or state.get("seed") != run.seed:
        differ = _differences(state.get("config"), run.config.model_dump(mode="json"))
        if state.get("seed") != run.seed:
            differ.append("seed")
        raise SparseforgeError(
            f"checkpoint {str(path)!r} belongs to another config; keys that differ: {', '.join(differ[:8]) or 'the run key'}"
        )
    return state


def _restore(setup: Setup, state: dict[str, Any]) -> None:
    setup.model.load_state_dict(state["model"])
    setup.optimizer.load_state_dict(state["optimizer"])
    setup.scheduler.load_state_dict(state["scheduler"])
    if setup.sparsifier is not None:
        setup.sparsifier.load_state_dict(state["sparsifier"])
    torch.set_rng_state(state["rng"])


# -- the run ----------------------------------------------------------------------------------------------


def _epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed((seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.randperm(n, generator=generator)


def run_experiment(
    run: Run,
    *,
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = True,
    store: Any | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    loggers: Sequence[Any] = (),
    data: Any | None = None,
) -> dict[str, Any]:
    """Train one run to the end and return its summary (final accuracy, sparsity, FLOPs, seconds).

    Args:
        checkpoint: a file written after every epoch; with ``resume`` and an existing file of this
            run, training continues after its last epoch.
        store: a :class:`~.store.ResultsStore`; the run is marked started, each epoch's metrics
            are logged, and the summary is stored at the end.
        on_epoch: called with each epoch's metrics (progress bars).
        loggers: :class:`~.loggers.Logger` objects (TensorBoard, MLflow) told about the run,
            each epoch's metrics and the end.
        data: the run's data set, already built (see :func:`build`); default: built here.
    """
    config = run.config
    setup = build(config, run.seed, data)
    path = Path(checkpoint) if checkpoint is not None else None
    history: list[dict[str, Any]] = []
    start_epoch, step, flops = 1, 0, 0.0
    if path is not None and resume and path.exists():
        state = load_checkpoint(path, run)
        _restore(setup, state)
        history = list(state["history"])
        initial = dict(state["initial_masks"])
        start_epoch, step, flops = int(state["epoch"]) + 1, int(state["step"]), float(state["flops"])
    else:
        torch.manual_seed(run.seed)  # the global RNG (dropout, ...) from the seed, not from what ran before
        initial = _mask_snapshot(setup)
    if store is not None:
        from .store import code_version, machine_info

        store.start(run.key, machine=machine_info(), version=code_version())
        for done in history:  # epochs a previous attempt finished (idempotent)
            store.log_epoch(run.key, done["epoch"], done["step"], _numbers(done))
    for logger in loggers:
        logger.start(run.key, run.label, config.model_dump(mode="json"))
        for done in history:
            logger.log(done["step"], _present(done))
    data = setup.data
    x, y = data.x_train, data.y_train
    batch = config.training.batch_size
    started = time.perf_counter()
    from ..training import evaluate

    for epoch in range(start_epoch, setup.epochs + 1):
        setup.model.train()
        order = _epoch_order(run.seed, epoch, len(y))
        flops_start = forward_flops(setup)
        loss_sum, seen = 0.0, 0
        for i in range(0, len(y), batch):
            idx = order[i : i + batch]
            setup.optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(setup.model(x[idx]), y[idx])
            loss.backward()
            setup.optimizer.step()
            setup.scheduler.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            seen += len(idx)
        flops += 3.0 * 0.5 * (flops_start + forward_flops(setup)) * seen
        metrics: dict[str, Any] = {
            "epoch": epoch,
            "step": step,
            "train_loss": loss_sum / seen,
            "sparsity": _sparsity(setup),
            "mask_change": mask_change(initial, setup),
            "train_flops": flops,
            "lr": setup.optimizer.param_groups[0]["lr"],
        }
        if epoch % config.evaluation.every == 0 or epoch == setup.epochs:
            metrics["test_loss"], metrics["accuracy"] = evaluate(setup.model, (data.x_test, data.y_test))
        history.append(metrics)
        if path is not None:
            save_checkpoint(path, _checkpoint_state(setup, run, epoch, step, history, flops, initial))
        if store is not None:
            store.log_epoch(run.key, epoch, step, _numbers(metrics))
        for logger in loggers:
            logger.log(step, _present(metrics))
        if on_epoch is not None:
            on_epoch(metrics)
    last = history[-1]
    summary = {
        "accuracy": last.get("accuracy"),
        "test_loss": last.get("test_loss"),
        "train_loss": last["train_loss"],
        "sparsity": last["sparsity"],
        "mask_change": last["mask_change"],
        "train_flops": last["train_flops"],
        "epochs": setup.epochs,
        "steps": step,
        "seconds": time.perf_counter() - started,
    }
    if store is not None:
        store.finish(run.key, summary)
    for logger in loggers:
        logger.finish(summary)
    return summary


def _present(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if k not in ("epoch", "step") and v is not None}


def _numbers(metrics: dict[str, Any]) -> dict[str, float | None]:
    return {k: v for k, v in metrics.items() if k not in ("epoch", "step")}
