"""Offline datasets: generated or shipped inside packages, never downloaded.

* ``mnist1d``: MNIST-1D (Greydanus, 2020), generated locally by ``mnist1d.make_dataset``
  (40 features, 10 classes; 4000 train / 1000 test by default).
* ``digits``: scikit-learn's 8x8 digits, shipped with the package (64 features, 10 classes).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SparseforgeError

__all__ = ["Dataset", "DATASETS", "load_dataset"]


@dataclass(frozen=True)
class Dataset:
    """Train/test tensors. ``x`` is float32 ``(n, features)``, ``y`` int64 class labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])


def _missing(package: str) -> SparseforgeError:
    return SparseforgeError(
        f"dataset needs the '{package}' package, which is not installed; allowed fix: "
        "pip install 'sparseforge[experiments]' (make demo / make test install it)"
    )


def _mnist1d(seed: int, num_samples: int) -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise _missing("mnist1d") from None
    args = get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    data = make_dataset(args)  # generated in memory; nothing is read from or written to disk
    x_train = torch.as_tensor(np.asarray(data["x"]), dtype=torch.float32)
    x_test = torch.as_tensor(np.asarray(data["x_test"]), dtype=torch.float32)
    mean, std = x_train.mean(), x_train.std()
    return Dataset(
        "mnist1d", (x_train - mean) / std, torch.as_tensor(np.asarray(data["y"]), dtype=torch.int64),
        (x_test - mean) / std, torch.as_tensor(np.asarray(data["y_test"]), dtype=torch.int64), 10,
    )


def _digits(seed: int, num_samples: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise _missing("scikit-learn") from None
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(y))
    return Dataset("digits", x[:split], y[:split], x[split:], y[split:], 10)


DATASETS = {"mnist1d": _mnist1d, "digits": _digits}


def load_dataset(name: str = "mnist1d", *, seed: int = 42, num_samples: int = 5000) -> Dataset:
    """Build a dataset in memory. ``num_samples`` applies to MNIST-1D (train + test, 80/20)."""
    if name not in DATASETS:
        raise SparseforgeError(f"dataset={name!r} is not recognised; allowed: {sorted(DATASETS)}")
    if num_samples < 10:
        raise SparseforgeError(f"num_samples={num_samples} is too small; allowed: >= 10")
    return DATASETS[name](seed, num_samples)
