"""Offline datasets: generated, shipped inside packages, or read from a local folder; never downloaded.

* ``mnist1d``: MNIST-1D (Greydanus, 2020), generated locally by ``mnist1d.make_dataset``
  (40 features, 10 classes; 4000 train / 1000 test by default).
* ``digits``: scikit-learn's 8x8 digits, shipped with the package (64 features, 10 classes).
* ``cifar10`` / ``cifar100``: CIFAR from a local copy of its "python version"
  (``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``;
  ``cifar-100-python/`` with ``train`` and ``test``, fine labels); ``root`` is that folder or
  the folder holding it. The files are pickles: they are read by an unpickler that builds only
  dicts, lists, bytes, str, int and numpy arrays, and refuses any other object without running it.
* ``folder``: a folder of class sub-folders of images (``root/train/<class>/`` and
  ``root/test/<class>/``, or ``root/<class>/`` split 80/20 per class by ``seed``), read with
  Pillow and resized to ``image_size`` x ``image_size``; classes are the sorted folder names.

Images are float32 ``(n, channels, height, width)``, normalised per channel by the training
set's mean and standard deviation.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import SparseforgeError

__all__ = [
    "Dataset",
    "DATASETS",
    "DATASET_SHAPES",
    "IMAGE_SUFFIXES",
    "LOCAL_DATASETS",
    "load_batch",
    "load_dataset",
]


@dataclass(frozen=True)
class Dataset:
    """Train/test tensors. ``x`` is float32 ``(n, features)`` or ``(n, C, H, W)``, ``y`` int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    #: class names where the data set has them (``folder``: the sub-folder names)
    classes: tuple[str, ...] = ()

    @property
    def num_features(self) -> int:
        """Values per sample (``C * H * W`` for images)."""
        return math.prod(self.x_train.shape[1:])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape: ``(features,)`` or ``(C, H, W)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])


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
    # standardised in float64 with NumPy's (single-threaded, fixed-order) sums: a torch reduction
    # sums in an order that depends on the thread count, and its last bits would change the data
    x_train = np.asarray(data["x"], dtype=np.float64)
    x_test = np.asarray(data["x_test"], dtype=np.float64)
    mean, std = x_train.mean(), x_train.std(ddof=1)
    return Dataset(
        "mnist1d",
        torch.as_tensor((x_train - mean) / std, dtype=torch.float32),
        torch.as_tensor(np.asarray(data["y"]), dtype=torch.int64),
        torch.as_tensor((x_test - mean) / std, dtype=torch.float32),
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


# --- CIFAR (python version): pickles read by a restricted unpickler -------------------------

_CIFAR: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], bytes, int]] = {
    # name: (folder, training files, test files, label key, classes)
    "cifar10": ("cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels", 10),
    "cifar100": ("cifar-100-python", ("train",), ("test",), b"fine_labels", 100),
}


class _Refused(pickle.UnpicklingError):
    pass


def _latin1(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes under protocol 2; only str to latin-1 bytes."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _Refused(f"_codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle may name: numpy's array/dtype reconstruction and latin-1 bytes."""
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for package in ("numpy.core", "numpy._core"):  # files written under numpy 1 and numpy 2
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]
    allowed[("_codecs", "encode")] = _latin1
    return allowed


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, bytes, str, numbers and numpy arrays; any other global is refused
    before it is called, so a file whose pickle would run code (``os.system`` ...) runs nothing."""

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="bytes")  # Python 2's str (keys, raw array data) -> bytes
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        found = self._allowed.get((module, name))
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("a persistent id")


def _read_cifar_file(path: Path, label_key: bytes, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(data uint8 (n, 3072), labels int64 (n,))`` of one CIFAR batch file."""
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f).load()
    except _Refused as exc:
        raise SparseforgeError(
            f"CIFAR file {str(path)!r} was refused: it names {exc}, which is not allowed; allowed: dicts, lists, "
            "bytes, str, int and numpy arrays (the python-version CIFAR format)"
        ) from None
    except Exception as exc:
        raise SparseforgeError(
            f"CIFAR file {str(path)!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]}); "
            "expected a python-version CIFAR pickle"
        ) from None
    if not isinstance(batch, dict):
        raise SparseforgeError(
            f"CIFAR file {str(path)!r} holds a {type(batch).__name__}; expected a dict with b'data' and {label_key!r}"
        )
    key = label_key.decode()
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(label_key, batch.get(key))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise SparseforgeError(
            f"CIFAR file {str(path)!r}: b'data' is {found}; expected a uint8 array of shape (n, 3072)"
        )
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise SparseforgeError(
            f"CIFAR file {str(path)!r}: {label_key!r} is missing or does not have {len(data)} entries; "
            f"expected a list of {len(data)} class indices"
        )
    if isinstance(labels, list) and not all(type(v) is int for v in labels):
        raise SparseforgeError(f"CIFAR file {str(path)!r}: {label_key!r} holds non-integers; expected class indices")
    y = np.asarray(labels)
    if y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= classes)):
        raise SparseforgeError(
            f"CIFAR file {str(path)!r}: {label_key!r} holds values outside 0..{classes - 1}; expected class indices"
        )
    return data, y.astype(np.int64)


def _root_dir(name: str, root: Path | None, expected: str) -> Path:
    if root is None:
        raise SparseforgeError(f"dataset {name!r} reads a local folder, and root is not set; allowed: root={expected}")
    path = Path(root).expanduser()
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise SparseforgeError(f"dataset {name!r}: root {str(path)!r} {what}; expected {expected}")
    return path


def _normalise(train: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - mean) / std`` per channel, by the training set's statistics (in place on float copies)."""
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(1e-6)
    return train.sub_(mean).div_(std), test.sub_(mean).div_(std)


def _images(data: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, C, H, W)`` -> float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(data)).to(torch.float32).div_(255.0)


def _cifar(name: str, root: Path | None) -> Dataset:
    folder, train_files, test_files, label_key, classes = _CIFAR[name]
    files = train_files + test_files
    layout = f"{folder}/ with {', '.join(files)} (the python version)"
    base = _root_dir(name, root, f"the folder {layout}, or the folder holding it")
    candidates = [base, base / folder] if base.name != folder else [base]
    for where in candidates:
        if all((where / f).is_file() for f in files):
            break
    else:
        looked = " and ".join(repr(str(c)) for c in candidates)
        missing = [f for f in files if not (candidates[-1] / f).is_file()]
        raise SparseforgeError(
            f"dataset {name!r}: no CIFAR files in {looked} (missing {', '.join(missing)}); expected {layout}"
        )

    def read(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_read_cifar_file(where / f, label_key, classes) for f in names]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x_train, y_train = read(train_files)
    x_test, y_test = read(test_files)
    # each row: 1024 red, 1024 green, 1024 blue values, each a 32x32 image in row-major order
    train, test = _normalise(_images(x_train.reshape(-1, 3, 32, 32)), _images(x_test.reshape(-1, 3, 32, 32)))
    return Dataset(name, train, torch.from_numpy(y_train), test, torch.from_numpy(y_test), classes)


# --- a folder of class sub-folders of images ----------------------------------------------------

#: file suffixes read as images by the ``folder`` data set (others are skipped)
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_FOLDER_LAYOUT = "class sub-folders of images: train/<class>/ and test/<class>/, or <class>/ (split by seed)"


def _class_folders(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(where: Path) -> list[Path]:
    return sorted(
        p for p in where.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def _collect(where: Path, classes: list[str], need_all: bool) -> list[tuple[Path, int]]:
    items: list[tuple[Path, int]] = []
    for index, cls in enumerate(classes):
        folder = where / cls
        files = _image_files(folder) if folder.is_dir() else []
        if not files and need_all:
            raise SparseforgeError(
                f"dataset 'folder': class folder {str(folder)!r} holds no images; allowed suffixes: "
                f"{', '.join(IMAGE_SUFFIXES)}"
            )
        items += [(f, index) for f in files]
    return items


def _read_images(items: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, bool]:
    """uint8 ``(n, size, size, 3)`` and whether every image was grey."""
    from PIL import Image

    out = np.empty((len(items), size, size, 3), dtype=np.uint8)
    grey = True
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as image:
                is_grey = image.mode in _GREY_MODES
                image = image.convert("L" if is_grey else "RGB").resize((size, size), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.uint8)
        except Exception as exc:
            raise SparseforgeError(
                f"dataset 'folder': image {str(path)!r} cannot be read ({type(exc).__name__}: {str(exc)[:200]})"
            ) from None
        grey = grey and is_grey
        out[i] = pixels[:, :, None] if pixels.ndim == 2 else pixels
    return out, grey


def _split(items: list[tuple[Path, int]], classes: int, seed: int) -> tuple[list[Any], list[Any]]:
    """Per class, a seeded 20 % (at least one image of a class with two or more) goes to the test set."""
    generator = torch.Generator().manual_seed(seed)
    train: list[tuple[Path, int]] = []
    test: list[tuple[Path, int]] = []
    for cls in range(classes):
        members = [item for item in items if item[1] == cls]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_test = min(max(1, round(0.2 * len(members))), len(members) - 1)
        test += [members[i] for i in order[:n_test]]
        train += [members[i] for i in order[n_test:]]
    return train, test


def _folder(seed: int, root: Path | None, image_size: int) -> Dataset:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise _missing("pillow") from None
    base = _root_dir("folder", root, _FOLDER_LAYOUT)
    train_dir, test_dir = base / "train", base / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        present, absent = (train_dir, "test") if train_dir.is_dir() else (test_dir, "train")
        raise SparseforgeError(
            f"dataset 'folder': {str(base)!r} has {present.name}/ but no {absent}/; expected {_FOLDER_LAYOUT}"
        )
    if train_dir.is_dir():
        classes = _class_folders(train_dir)
        unknown = sorted(set(_class_folders(test_dir)) - set(classes))
        if unknown:
            raise SparseforgeError(
                f"dataset 'folder': {str(test_dir)!r} has classes {unknown} that {str(train_dir)!r} lacks; "
                "expected the test classes among the training classes"
            )
        where = train_dir
    else:
        classes = _class_folders(base)
        where = base
    if len(classes) < 2:
        raise SparseforgeError(
            f"dataset 'folder': {str(where)!r} has {len(classes)} class folder(s) {classes}; expected at least 2 "
            f"{_FOLDER_LAYOUT}"
        )
    if train_dir.is_dir():
        train_items = _collect(train_dir, classes, need_all=True)
        test_items = _collect(test_dir, classes, need_all=False)
    else:
        train_items, test_items = _split(_collect(base, classes, need_all=True), len(classes), seed)
    if not test_items:
        raise SparseforgeError(
            f"dataset 'folder': no test images in {str(base)!r}; expected test/<class>/ images, or classes of "
            "two or more images to split"
        )
    generator = torch.Generator().manual_seed(seed)  # rows shuffled: the first rows hold every class
    train_items = [train_items[i] for i in torch.randperm(len(train_items), generator=generator).tolist()]
    test_items = [test_items[i] for i in torch.randperm(len(test_items), generator=generator).tolist()]
    x_train, grey_train = _read_images(train_items, image_size)
    x_test, grey_test = _read_images(test_items, image_size)
    channels = slice(0, 1) if grey_train and grey_test else slice(0, 3)
    train, test = _normalise(
        _images(x_train.transpose(0, 3, 1, 2)[:, channels]), _images(x_test.transpose(0, 3, 1, 2)[:, channels])
    )
    return Dataset(
        "folder",
        train,
        torch.tensor([c for _, c in train_items], dtype=torch.int64),
        test,
        torch.tensor([c for _, c in test_items], dtype=torch.int64),
        len(classes),
        tuple(classes),
    )


_Loader = Callable[[int, int, "Path | None", int], Dataset]

DATASETS: dict[str, _Loader] = {
    "mnist1d": lambda seed, samples, root, size: _mnist1d(seed, samples),
    "digits": lambda seed, samples, root, size: _digits(seed, samples),
    "cifar10": lambda seed, samples, root, size: _cifar("cifar10", root),
    "cifar100": lambda seed, samples, root, size: _cifar("cifar100", root),
    "folder": lambda seed, samples, root, size: _folder(seed, root, size),
}
#: data sets read from a local folder (``root``)
LOCAL_DATASETS = ("cifar10", "cifar100", "folder")
#: (features, classes) of each built-in dataset, known without building it (``folder``: unknown)
DATASET_SHAPES = {"mnist1d": (40, 10), "digits": (64, 10), "cifar10": (3072, 10), "cifar100": (3072, 100)}


def load_dataset(
    name: str = "mnist1d",
    *,
    seed: int = 42,
    num_samples: int = 5000,
    root: str | Path | None = None,
    image_size: int | None = None,
) -> Dataset:
    """Build a dataset in memory.

    ``num_samples`` applies to MNIST-1D (train + test, 80/20); ``seed`` makes MNIST-1D, shuffles
    ``digits`` and ``folder`` and splits a ``folder`` without train/ and test/. ``root`` is the
    local folder of ``cifar10``, ``cifar100`` and ``folder`` (and only of those);
    ``image_size`` (default 32) is the side ``folder`` images are resized to.
    """
    if name not in DATASETS:
        raise SparseforgeError(f"dataset={name!r} is not recognised; allowed: {sorted(DATASETS)}")
    if num_samples < 10:
        raise SparseforgeError(f"num_samples={num_samples} is too small; allowed: >= 10")
    if root is not None and name not in LOCAL_DATASETS:
        raise SparseforgeError(
            f"root={str(root)!r} does not apply to dataset {name!r}; allowed: root only with {', '.join(LOCAL_DATASETS)}"
        )
    if image_size is not None:
        if name != "folder":
            raise SparseforgeError(
                f"image_size={image_size!r} does not apply to dataset {name!r}; allowed: image_size only with folder"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or not 4 <= image_size <= 1024:
            raise SparseforgeError(f"image_size={image_size!r} is not allowed; allowed: an integer in 4..1024")
    path = Path(root) if root is not None else None
    return DATASETS[name](seed, num_samples, path, image_size or 32)


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
