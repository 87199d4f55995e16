"""Prune *your own* model in one shot, then fine-tune it sparse in *your own* training loop.

Shows the dense-to-sparse workflow on a small MLP defined right here (scikit-learn's 8x8 digits,
shipped with the package, nothing downloaded):

1. train it dense for a few epochs (a plain PyTorch loop);
2. ``sf.prune``: 80 % magnitude pruning with an ERK budget, the classifier kept dense;
3. fine-tune with ``sf.Sparsifier(model, opt, masks)`` attached: the *same* loop, unchanged;
4. ``finalize()``, check that every pruned weight is still exactly 0, print the sparsity report;
5. ``sf.save`` / ``sf.load`` round trip into a fresh model.

Run::

    python examples/prune_and_finetune.py            # 5-10 s on 2 cores
    python examples/prune_and_finetune.py --tiny     # 1 epoch each, for the tests
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import sparseforge as sf
from sparseforge.experiments.datasets import load_dataset
from sparseforge.fileio import check_output_dir


class DigitsMLP(nn.Module):
    """The user's model: any nn.Module works; sparseforge prunes its Linear/Conv weights."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, seed: int) -> None:
    """One epoch of a plain training loop: forward, loss, backward, step. Nothing sparse here."""
    model.train()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    for idx in order.split(64):
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="1 dense + 1 fine-tuning epoch (a few seconds)")
    parser.add_argument("--sparsity", type=float, default=0.8, help="fraction of zeros (default 0.8)")
    parser.add_argument("--out", default="examples_out", help="folder for the checkpoint (default examples_out/)")
    args = parser.parse_args()
    out = check_output_dir(args.out)  # created if missing; checked before any work
    dense_epochs, finetune_epochs = (1, 1) if args.tiny else (20, 10)

    torch.manual_seed(0)
    data = load_dataset("digits", seed=0)
    test = (data.x_test, data.y_test)
    model = DigitsMLP()

    # 1. dense training
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    for epoch in range(dense_epochs):
        train_epoch(model, opt, data.x_train, data.y_train, seed=epoch)
    acc_dense = sf.evaluate(model, test)[1]

    # 2. one-shot pruning (in place); the masks say which weights are kept
    masks = sf.prune(model, sparsity=args.sparsity, method="magnitude", distribution="erk", exclude=["classifier"])
    acc_pruned = sf.evaluate(model, test)[1]

    # 3. sparse fine-tuning: attach a Sparsifier to a new optimizer, then the same loop as before
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
    sparsifier = sf.Sparsifier(model, opt, masks)
    print(sparsifier)
    for epoch in range(finetune_epochs):
        train_epoch(model, opt, data.x_train, data.y_train, seed=100 + epoch)
    masks = sparsifier.finalize()  # hooks removed: a plain nn.Module with zeros in it
    acc_finetuned = sf.evaluate(model, test)[1]

    # 4. pruned weights stayed exactly 0 through every optimizer step (weight decay included)
    params = dict(model.named_parameters())
    revived = sum(int(torch.count_nonzero(params[name].detach()[~mask])) for name, mask in masks.items())
    print(f"pruned weights that are not exactly 0: {revived}")
    assert revived == 0
    report = sf.sparsity_report(model, data.x_test[:1], masks=masks)
    print(f"sparsity over the pruned layers: {report.prunable_sparsity:.4f} (target {args.sparsity:.4f})")
    print(f"sparsity over all parameters:    {report.total_sparsity:.4f}")

    # 5. save and load (weights + masks, CRC-checked) into a fresh model
    path = sf.save(out / "digits_mlp_sparse.safetensors", model, masks)
    fresh = DigitsMLP()
    loaded = sf.load(path, fresh)
    theirs = fresh.state_dict()
    same = all(torch.equal(value, theirs[key]) for key, value in model.state_dict().items())
    same = same and loaded is not None and all(torch.equal(masks[n], loaded[n]) for n in masks)
    print(f"saved {path}; reloaded weights and masks identical: {same}")
    assert same and sf.evaluate(fresh, test)[1] == acc_finetuned

    print(f"test accuracy: dense {acc_dense:.3f} -> pruned {acc_pruned:.3f} -> fine-tuned {acc_finetuned:.3f}")


if __name__ == "__main__":
    main()
