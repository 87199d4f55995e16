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

__all__ = ["Dataset", "DATASETS", "DATASET_SHAPES", "load_batch", "load_dataset"]


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
        "mnist1d",
        (x_train - mean) / std,
        torch.as_tensor(np.asarray(data["y"]), dtype=torch.int64),
        (x_test - mean) / std,
        torch.as_tensor(np.asarray(data["y_test"]), dtype=torch.int64),
        10,
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
#: (features, classes) of each built-in dataset, known without building it
DATASET_SHAPES = {"mnist1d": (40, 10), "digits": (64, 10)}


def load_dataset(name: str = "mnist1d", *, seed: int = 42, num_samples: int = 5000) -> Dataset:
    """Build a dataset in memory. ``num_samples`` applies to MNIST-1D (train + test, 80/20)."""
    if name not in DATASETS:
        raise SparseforgeError(f"dataset={name!r} is not recognised; allowed: {sorted(DATASETS)}")
    if num_samples < 10:
        raise SparseforgeError(f"num_samples={num_samples} is too small; allowed: >= 10")
    return DATASETS[name](seed, num_samples)


def load_batch(spec: str, *, samples: int = 512, seed: int = 42) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(inputs, targets)`` batch of at most ``samples`` rows, as a command line names it.

    ``spec`` is a built-in dataset (``mnist1d``, ``digits``: the first ``samples`` training rows)
    or a ``.safetensors`` / ``.pt`` file holding two tensors named ``inputs`` and ``targets``
    (a ``.pt`` file is read with ``weights_only=True``: nothing is unpickled).
    """
    from pathlib import Path

    from ..fileio import check_input_file, describe_read_error

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise SparseforgeError(f"samples={samples!r} is not allowed; allowed: an integer >= 1")
    if spec in DATASETS:
        data = load_dataset(spec, seed=seed)
        return data.x_train[:samples], data.y_train[:samples]
    path = Path(spec)
    if path.suffix not in (".safetensors", ".pt", ".pth"):
        raise SparseforgeError(
            f"data={spec!r} is not recognised; allowed: {', '.join(sorted(DATASETS))}, or a .safetensors / .pt "
            "file with tensors 'inputs' and 'targets'"
        )
    check_input_file(path, "data file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(str(path))
        else:
            tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise SparseforgeError(f"data file {str(path)!r} cannot be read ({describe_read_error(exc)})") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(tensors.get(k), torch.Tensor) for k in ("inputs", "targets")
    ):
        found = sorted(tensors)[:5] if isinstance(tensors, dict) else type(tensors).__name__
        raise SparseforgeError(f"data file {str(path)!r} has no tensors 'inputs' and 'targets' (found {found})")
    x, y = tensors["inputs"], tensors["targets"]
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise SparseforgeError(
            f"data file {str(path)!r}: 'inputs' {tuple(x.shape)} and 'targets' {tuple(y.shape)} must be non-empty "
            "with the same number of rows"
        )
    return x[:samples], y[:samples]
