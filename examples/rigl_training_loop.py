"""Sparse training from scratch with RigL, in a plain hand-written PyTorch training loop.

The network is sparse from the first step: ``init_sparse`` draws a random mask with an ERK
layer budget (90 % zeros), and ``Sparsifier(model, opt, masks, RigL(total_steps=...))`` hooks
into the optimizer. RigL then moves connections while the model trains: every ``--every``
steps each layer drops its smallest-magnitude weights and regrows as many where the dense
gradient is largest, so the sparsity never changes. Data: MNIST-1D, generated locally.

Run::

    python examples/rigl_training_loop.py            # 5-15 s on 2 cores
    python examples/rigl_training_loop.py --tiny     # a few seconds, for the tests
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

import sparseforge as sf
from sparseforge.algorithms import RigL, init_sparse
from sparseforge.experiments.datasets import load_dataset
from sparseforge.fileio import check_output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small data and 3 short epochs (a few seconds)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 30; 3 with --tiny)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of zeros (default 0.9)")
    parser.add_argument("--every", type=int, default=None, help="steps between mask updates (default 50; 5 tiny)")
    parser.add_argument("--out", default="examples_out", help="folder for the checkpoint (default examples_out/)")
    args = parser.parse_args()
    out = check_output_dir(args.out)
    epochs = args.epochs or (3 if args.tiny else 30)
    every = args.every or (5 if args.tiny else 50)

    torch.manual_seed(0)
    data = load_dataset("mnist1d", num_samples=1000 if args.tiny else 5000)
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    batch_size = 128
    steps_per_epoch = math.ceil(len(data.x_train) / batch_size)

    masks = init_sparse(model, args.sparsity, distribution="erk", method="random", seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    rigl = RigL(total_steps=epochs * steps_per_epoch, every=every)  # updates until 75 % of training
    sparsifier = sf.Sparsifier(model, opt, masks, rigl)
    print(sparsifier)  # says the zero_state mode: 'grads' (exact for SGD) masks only the gradients

    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        model.train()
        updates_before = len(rigl.history)
        for idx in torch.randperm(len(data.x_train), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()  # the Sparsifier's hooks run here: mask gradients, count the step, update masks
        # rigl.history: (step, {layer: (n_dropped, n_grown)}) for every mask update that ran
        new = rigl.history[updates_before:]
        moved = sum(dropped for _, changes in new for dropped, _ in changes.values())
        accuracy = sf.evaluate(model, (data.x_test, data.y_test))[1]
        print(
            f"epoch {epoch:2d}: step {masks.step:4d}, {len(new)} mask updates, {moved:5d} weights moved, "
            f"sparsity {masks.sparsity():.4f}, test accuracy {accuracy:.3f}"
        )

    masks = sparsifier.finalize()
    print(sparsifier)
    total_moved = sum(dropped for _, changes in rigl.history for dropped, _ in changes.values())
    print(f"RigL: {len(rigl.history)} mask updates moved {total_moved} connections ({masks.nnz()} kept at any time)")
    print(f"final sparsity {masks.sparsity():.4f} (target {args.sparsity:.4f})")
    path = sf.save(out / "mnist1d_rigl.safetensors", model, masks)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
