"""Random Search as a baseline for sparse architecture search in the *node* space.

The seed paper ("Random Search as a Baseline for Sparse Neural Network Architecture Search")
searches the node space of an over-parameterised network for better-initialised sparse
sub-networks, trains what it finds, and compares it with random sparse configurations of the same
sparsity and with the dense parent. Its finding: the networks Random Search finds neither perform
better nor converge faster than their random counterparts.

Here the parent is an MLP (``hidden`` units per hidden layer) on MNIST-1D. A *node
configuration* at node sparsity ``s`` keeps ``round((1 - s) * hidden)`` units of every hidden
layer: a removed unit's incoming row and outgoing column are masked (its bias then reaches
nothing), so the weight sparsity follows from the node sparsity. Per seed:

1. **search**: draw ``candidates`` node configurations at random and score each, untrained, by
   its loss on a held-out validation split (the searched quantity: a better starting point in the
   loss landscape); keep the best;
2. **random**: draw one more configuration at random, with no search;
3. **random weight mask**: an unstructured random mask with as many weights per layer as the
   searched configuration keeps (the same budget, spread over all units);
4. train the three, and the dense parent, with the same optimizer, epochs and data order.

The report gives test accuracy and the epoch-by-epoch test loss (convergence) of the three, mean
+- std over seeds, and whether the searched networks beat the random ones by more than the
spread over seeds.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError, check_int

__all__ = ["RandomSearchConfig", "node_masks", "random_search", "format_table"]


@dataclass(frozen=True)
class RandomSearchConfig:
    """Settings of the baseline; ``node_sparsities`` are fractions of hidden units removed."""

    node_sparsities: tuple[float, ...] = (0.5, 0.75, 0.9)
    hidden: int = 256
    layers: int = 2
    candidates: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    samples: int = 5000
    validation: float = 0.2

    def __post_init__(self) -> None:
        for s in self.node_sparsities:
            if not isinstance(s, float | int) or not 0.0 <= s < 1.0:
                raise SparseforgeError(f"node sparsity {s!r} is not allowed; allowed: a fraction in [0, 1)")
        check_int(self.hidden, "hidden", 2)
        check_int(self.layers, "layers", 1)
        check_int(self.candidates, "candidates", 1)
        check_int(self.epochs, "epochs", 1)
        if not self.seeds:
            raise SparseforgeError("seeds is empty; allowed: at least one seed")
        if not 0.0 < self.validation < 1.0:
            raise SparseforgeError(f"validation={self.validation!r} is not allowed; allowed: a fraction in (0, 1)")
        for s in self.node_sparsities:
            if round((1 - s) * self.hidden) < 1:
                raise SparseforgeError(
                    f"node sparsity {s} leaves no unit of {self.hidden}; allowed: below {1 - 1 / self.hidden:.4f}"
                )


def _parent(features: int, classes: int, hidden: int, layers: int, seed: int) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules: list[nn.Module] = []
        width = features
        for _ in range(layers):
            modules += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        modules.append(nn.Linear(width, classes))
        return nn.Sequential(*modules)


def node_masks(model: nn.Sequential, keep: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight masks of a node configuration: ``keep[i]`` (bool, one per unit) for hidden layer ``i``.

    A removed unit loses its incoming row (layer ``i``) and its outgoing column (layer ``i + 1``).
    """
    linears = [(name, m) for name, m in model.named_children() if isinstance(m, nn.Linear)]
    if len(keep) != len(linears) - 1:
        raise SparseforgeError(f"{len(keep)} hidden-unit selections for {len(linears) - 1} hidden layers")
    masks = {f"{name}.weight": torch.ones_like(m.weight, dtype=torch.bool) for name, m in linears}
    for i, units in enumerate(keep):
        masks[f"{linears[i][0]}.weight"][~units, :] = False
        masks[f"{linears[i + 1][0]}.weight"][:, ~units] = False
    return masks


def _draw(generator: torch.Generator, hidden: int, layers: int, kept: int) -> list[torch.Tensor]:
    out = []
    for _ in range(layers):
        units = torch.zeros(hidden, dtype=torch.bool)
        units[torch.randperm(hidden, generator=generator)[:kept]] = True
        out.append(units)
    return out


def _random_weight_masks(like: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Unstructured random masks keeping as many weights per layer as ``like`` does."""
    out = {}
    for name, mask in like.items():
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[: int(mask.sum())]] = True
        out[name] = flat.reshape(mask.shape)
    return out


def _masked(parent: nn.Sequential, masks: dict[str, torch.Tensor]) -> nn.Sequential:
    import copy

    model = copy.deepcopy(parent)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return model


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float(F.cross_entropy(model(x), y))


def _train(
    model: nn.Sequential, masks: dict[str, torch.Tensor] | None, data: Any, cfg: RandomSearchConfig, seed: int
) -> dict[str, Any]:
    import sparseforge as sf
    from sparseforge.training import evaluate

    x, y = data["x_train"], data["y_train"]
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=5e-4)
    sparsifier = sf.Sparsifier(model, opt, sf.MaskState(masks), None) if masks else None
    per_epoch = -(-len(y) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * per_epoch)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
        losses.append(evaluate(model, (data["x_test"], data["y_test"]))[0])
    if sparsifier is not None:
        sparsifier.finalize()
    loss, accuracy = evaluate(model, (data["x_test"], data["y_test"]))
    kept = (
        sum(int(m.sum()) for m in masks.values())
        if masks
        else sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    )
    total = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    return {"accuracy": accuracy, "test_loss": loss, "loss_curve": losses, "weight_sparsity": 1 - kept / total}


def _data(cfg: RandomSearchConfig) -> dict[str, torch.Tensor]:
    from .datasets import load_dataset

    data = load_dataset("mnist1d", seed=42, num_samples=cfg.samples)
    n_val = max(1, int(cfg.validation * len(data.y_train)))
    return {
        "x_train": data.x_train[n_val:],
        "y_train": data.y_train[n_val:],
        "x_val": data.x_train[:n_val],
        "y_val": data.y_train[:n_val],
        "x_test": data.x_test,
        "y_test": data.y_test,
        "features": torch.tensor(data.num_features),
        "classes": torch.tensor(data.num_classes),
    }


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def random_search(cfg: RandomSearchConfig | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Run the baseline; returns per node sparsity the searched, random and dense results and a verdict."""
    cfg = cfg or RandomSearchConfig()
    data = _data(cfg)
    features, classes = int(data["features"]), int(data["classes"])
    rows: list[dict[str, Any]] = []
    dense_runs = []
    for seed in cfg.seeds:
        parent = _parent(features, classes, cfg.hidden, cfg.layers, seed)
        dense_runs.append(_train(_masked(parent, {}), None, data, cfg, seed))
    for s in cfg.node_sparsities:
        kept = round((1 - s) * cfg.hidden)
        found_runs, random_runs, weight_runs, scores = [], [], [], []
        for seed in cfg.seeds:
            parent = _parent(features, classes, cfg.hidden, cfg.layers, seed)
            generator = torch.Generator().manual_seed(10_007 * seed + int(round(1000 * s)))
            best: tuple[float, dict[str, torch.Tensor]] | None = None
            for _ in range(cfg.candidates):
                masks = node_masks(parent, _draw(generator, cfg.hidden, cfg.layers, kept))
                score = _loss(_masked(parent, masks), data["x_val"], data["y_val"])
                scores.append(score)
                if best is None or score < best[0]:
                    best = (score, masks)
            assert best is not None
            random_masks = node_masks(parent, _draw(generator, cfg.hidden, cfg.layers, kept))
            found = _train(_masked(parent, best[1]), best[1], data, cfg, seed)
            found["search_loss"] = best[0]
            random = _train(_masked(parent, random_masks), random_masks, data, cfg, seed)
            random["search_loss"] = _loss(_masked(parent, random_masks), data["x_val"], data["y_val"])
            unstructured = _random_weight_masks(best[1], generator)
            weight_runs.append(_train(_masked(parent, unstructured), unstructured, data, cfg, seed))
            found_runs.append(found)
            random_runs.append(random)
            if progress:
                print(
                    f"node sparsity {s:g} seed {seed}: searched {found['accuracy']:.4f}, random {random['accuracy']:.4f}"
                )
        f_acc = _summary([r["accuracy"] for r in found_runs])
        r_acc = _summary([r["accuracy"] for r in random_runs])
        w_acc = _summary([r["accuracy"] for r in weight_runs])
        spread = max(f_acc["std"], r_acc["std"])
        rows.append(
            {
                "node_sparsity": s,
                "weight_sparsity": found_runs[0]["weight_sparsity"],
                "searched": f_acc,
                "random": r_acc,
                "random_weight_mask": w_acc,
                "searched_init_loss": _summary([r["search_loss"] for r in found_runs]),
                "random_init_loss": _summary([r["search_loss"] for r in random_runs]),
                "searched_curve": [
                    statistics.fmean(c) for c in zip(*(r["loss_curve"] for r in found_runs), strict=True)
                ],
                "random_curve": [
                    statistics.fmean(c) for c in zip(*(r["loss_curve"] for r in random_runs), strict=True)
                ],
                "searched_beats_random": f_acc["mean"] - r_acc["mean"] > spread,
            }
        )
    dense = _summary([r["accuracy"] for r in dense_runs])
    return {
        "settings": cfg.__dict__ | {"seeds": list(cfg.seeds), "node_sparsities": list(cfg.node_sparsities)},
        "dense": dense,
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    """Markdown: test accuracy (%) of searched vs random node configurations and the dense parent."""
    dense = result["dense"]
    lines = [
        "| node sparsity | weight sparsity | searched (%) | random nodes (%) | random weight mask (%) "
        "| dense parent (%) | init. val. loss: searched / random | searched beats random? |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        f, r, w = row["searched"], row["random"], row["random_weight_mask"]
        lines.append(
            f"| {row['node_sparsity']:.0%} | {row['weight_sparsity']:.1%} | {100 * f['mean']:.2f} ± {100 * f['std']:.2f} | "
            f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} | {100 * w['mean']:.2f} ± {100 * w['std']:.2f} | "
            f"{100 * dense['mean']:.2f} ± {100 * dense['std']:.2f} | "
            f"{row['searched_init_loss']['mean']:.3f} / {row['random_init_loss']['mean']:.3f} | "
            f"{'yes' if row['searched_beats_random'] else 'no (within the spread over seeds)'} |"
        )
    return "\n".join(lines) + "\n"
