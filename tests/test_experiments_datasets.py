"""Local image data sets: CIFAR's python version (read without unpickling anything but plain data
and numpy arrays) and a folder of class sub-folders of images."""

from __future__ import annotations

import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.datasets import DATASET_SHAPES, DATASETS, load_dataset

# --- CIFAR --------------------------------------------------------------------------------------


def _batch(rng: np.random.Generator, n: int, label_key: bytes, classes: int) -> dict:
    batch = {
        b"batch_label": b"fake batch",
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in rng.integers(0, classes, size=n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    if label_key == b"fine_labels":
        batch[b"coarse_labels"] = [int(v) // 5 for v in batch[label_key]]
    return batch


def _write(path: Path, obj: object, protocol: int = 2) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def make_cifar10(parent: Path, per_batch: int = 4, n_test: int = 3, protocol: int = 2) -> list[dict]:
    """The python-version layout with ``per_batch`` samples in each of the five training batches."""
    folder = parent / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    batches = []
    for i in range(1, 6):
        batch = _batch(rng, per_batch, b"labels", 10)
        if i == 1:  # sample 0: red plane 200, green 100, blue 0, one green pixel at row 2, column 5 = 255
            batch[b"data"][0] = np.concatenate([np.full(1024, 200), np.full(1024, 100), np.zeros(1024)])
            batch[b"data"][0, 1024 + 2 * 32 + 5] = 255
        _write(folder / f"data_batch_{i}", batch, protocol)
        batches.append(batch)
    test = _batch(rng, n_test, b"labels", 10)
    _write(folder / "test_batch", test, protocol)
    _write(folder / "batches.meta", {b"label_names": [b"airplane"] * 10}, protocol)
    return batches + [test]


def make_cifar100(parent: Path) -> tuple[dict, dict]:
    folder = parent / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(3)
    train, test = _batch(rng, 12, b"fine_labels", 100), _batch(rng, 5, b"fine_labels", 100)
    train[b"fine_labels"][0] = 99
    _write(folder / "train", train)
    _write(folder / "test", test)
    return train, test


def _by_hand(raw_train: np.ndarray, raw: np.ndarray) -> np.ndarray:
    """Per-channel normalisation by the training set's mean and (population) standard deviation."""
    t = raw_train.reshape(-1, 3, 1024).astype(np.float64) / 255.0
    mean = t.mean(axis=(0, 2)).reshape(1, 3, 1, 1)
    std = t.std(axis=(0, 2)).reshape(1, 3, 1, 1)
    return (raw.reshape(-1, 3, 32, 32).astype(np.float64) / 255.0 - mean) / std


def test_cifar10_shapes_labels_and_normalisation(tmp_path):
    batches = make_cifar10(tmp_path)
    data = load_dataset("cifar10", root=tmp_path)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_train.dtype == torch.float32
    assert data.x_test.shape == (3, 3, 32, 32) and data.x_test.dtype == torch.float32
    assert data.y_train.dtype == torch.int64
    assert data.y_train.tolist() == sum((b[b"labels"] for b in batches[:5]), [])
    assert data.y_test.tolist() == batches[5][b"labels"]
    assert data.num_classes == 10 and data.num_features == 3072 and data.input_shape == (3, 32, 32)
    # per-channel statistics of the training set
    assert torch.allclose(data.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(data.x_train.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    raw_train = np.concatenate([b[b"data"] for b in batches[:5]])
    expected_test = _by_hand(raw_train, batches[5][b"data"])
    assert np.allclose(data.x_test.numpy(), expected_test, atol=1e-5)
    # layout: the first 1024 bytes are the red plane, row-major
    first = data.x_train[0]
    assert torch.all(first[0] == first[0, 0, 0]) and torch.all(first[2] == first[2, 0, 0])
    green = first[1].flatten()
    assert int(green.argmax()) == 2 * 32 + 5
    assert (green == green[0]).sum() == 1023
    assert np.isclose(float(first[1, 2, 5]), _by_hand(raw_train, raw_train[:1])[0, 1, 2, 5], atol=1e-5)


def py2_batch(data: np.ndarray, labels: list[int], label_key: bytes = b"labels") -> bytes:
    """A batch pickled as Python 2 and numpy 1 wrote the real CIFAR files: protocol 2, str as
    SHORT_BINSTRING / BINSTRING (bytes when read with encoding='bytes'), numpy.core names."""

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b

    def i(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    n, width = data.shape
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
        + b"(" + i(1) + i(n) + i(width) + b"\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
        + b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + i(0) + b"tb"
        + b"\x89" + s(data.tobytes()) + b"tb"
    )  # fmt: skip
    items = s(b"data") + array + s(label_key) + b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + items + b"u."


def test_cifar10_as_python2_wrote_it(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(11)
    raws, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        raw = rng.integers(0, 256, size=(3, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, size=3)]
        blob = py2_batch(raw, y)
        plain = pickle.loads(blob, encoding="bytes")  # the file is valid: the standard reader agrees
        assert np.array_equal(plain[b"data"], raw) and plain[b"labels"] == y
        (folder / name).write_bytes(blob)
        raws.append(raw)
        labels.append(y)
    data = load_dataset("cifar10", root=folder)
    assert data.y_train.tolist() == sum(labels[:5], []) and data.y_test.tolist() == labels[5]
    assert np.allclose(data.x_test.numpy(), _by_hand(np.concatenate(raws[:5]), raws[5]), atol=1e-5)


def test_cifar10_root_is_the_folder_or_its_parent(tmp_path):
    make_cifar10(tmp_path)
    a = load_dataset("cifar10", root=tmp_path)
    b = load_dataset("cifar10", root=str(tmp_path / "cifar-10-batches-py"))
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_pickle_protocols_and_numpy1_names(tmp_path, protocol):
    batches = make_cifar10(tmp_path / "new", protocol=protocol)
    new = load_dataset("cifar10", root=tmp_path / "new")
    assert new.y_train.tolist() == sum((b[b"labels"] for b in batches[:5]), [])
    if protocol != 2:
        return
    # files written under numpy 1 name numpy.core.multiarray (the real CIFAR files do, in GLOBAL opcodes)
    old = tmp_path / "old" / "cifar-10-batches-py"
    old.mkdir(parents=True)
    for f in (tmp_path / "new" / "cifar-10-batches-py").iterdir():
        (old / f.name).write_bytes(f.read_bytes().replace(b"numpy._core.", b"numpy.core."))
    assert b"numpy.core." in (old / "test_batch").read_bytes()
    assert torch.equal(load_dataset("cifar10", root=old).x_train, new.x_train)


def test_cifar100_fine_labels(tmp_path):
    train, test = make_cifar100(tmp_path)
    data = load_dataset("cifar100", root=tmp_path / "cifar-100-python")
    assert data.num_classes == 100
    assert data.x_train.shape == (12, 3, 32, 32) and data.x_test.shape == (5, 3, 32, 32)
    assert data.y_train.tolist() == train[b"fine_labels"] and data.y_train[0] == 99
    assert data.y_test.tolist() == test[b"fine_labels"]
    assert np.allclose(data.x_test.numpy(), _by_hand(train[b"data"], test[b"data"]), atol=1e-5)


def test_registered_names_and_shapes():
    assert {"cifar10", "cifar100", "folder", "mnist1d", "digits"} <= set(DATASETS)
    assert DATASET_SHAPES["cifar10"] == (3072, 10) and DATASET_SHAPES["cifar100"] == (3072, 100)


def test_cifar_layout_errors(tmp_path):
    with pytest.raises(SparseforgeError, match=r"dataset 'cifar10' reads a local folder, and root is not set"):
        load_dataset("cifar10")
    with pytest.raises(SparseforgeError, match=r"root '.*nowhere' does not exist; expected .*cifar-10-batches-py/"):
        load_dataset("cifar10", root=tmp_path / "nowhere")
    with pytest.raises(
        SparseforgeError, match=r"no CIFAR files in '.*' and '.*cifar-100-python' \(missing train, test\)"
    ):
        load_dataset("cifar100", root=tmp_path)
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(
        SparseforgeError, match=r"\(missing data_batch_3\); expected cifar-10-batches-py/ with data_batch_1"
    ):
        load_dataset("cifar10", root=tmp_path)


def test_cifar_content_errors(tmp_path):
    make_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    _write(train, {b"data": np.zeros((2, 1024), np.uint8), b"fine_labels": [0, 1]})
    with pytest.raises(SparseforgeError, match=r"b'data' is uint8 array \(2, 1024\); expected a uint8 array of shape"):
        load_dataset("cifar100", root=tmp_path)
    _write(train, {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]})
    with pytest.raises(SparseforgeError, match=r"b'fine_labels' holds values outside 0..99"):
        load_dataset("cifar100", root=tmp_path)
    _write(train, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    with pytest.raises(SparseforgeError, match=r"b'fine_labels' is missing or does not have 2 entries"):
        load_dataset("cifar100", root=tmp_path)
    _write(train, [1, 2, 3])
    with pytest.raises(SparseforgeError, match=r"holds a list; expected a dict"):
        load_dataset("cifar100", root=tmp_path)
    train.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(SparseforgeError, match=r"cannot be read \(.*\); expected a python-version CIFAR pickle"):
        load_dataset("cifar100", root=tmp_path)


class _RunsCommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evaluates:
    def __reduce__(self):
        return (eval, ("__import__('pathlib').Path('MARKER').touch()",))


def test_malicious_pickles_are_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    marker = tmp_path / "MARKER"
    # the whole file is the payload
    _write(batch, _RunsCommand(f"touch {marker}"))
    with pytest.raises(SparseforgeError, match=r"data_batch_2' was refused: it names (posix|os|nt)\.system"):
        load_dataset("cifar10", root=tmp_path)
    # the payload hidden inside an otherwise valid batch, under a newer protocol
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1], b"filenames": [_RunsCommand(f"touch {marker}")]}
    _write(batch, good, protocol=5)
    with pytest.raises(SparseforgeError, match=r"refused: it names (posix|os|nt)\.system"):
        load_dataset("cifar10", root=tmp_path)
    _write(batch, {b"data": _Evaluates(), b"labels": []})
    with pytest.raises(
        SparseforgeError, match=r"refused: it names (builtins|__builtin__)\.eval, which is not allowed; allowed: dicts"
    ):
        load_dataset("cifar10", root=tmp_path)
    # numpy globals other than array reconstruction are refused as well
    _write(batch, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})
    batch.write_bytes(batch.read_bytes().replace(b"numpy._core.multiarray\n_reconstruct", b"numpy\nload"))
    with pytest.raises(SparseforgeError, match=r"refused: it names numpy\.load"):
        load_dataset("cifar10", root=tmp_path)
    assert not marker.exists()


# --- a folder of images -------------------------------------------------------------------------

Image = pytest.importorskip("PIL.Image")

COLOURS = {"cat": (250, 20, 0), "ant": (10, 200, 30), "bee": (100, 90, 255)}


def _png(path: Path, colour, size=(10, 6), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)


def make_split_folder(root: Path) -> None:
    for cls, colour in COLOURS.items():
        for i in range(2):
            _png(root / "train" / cls / f"{i}.png", colour)
        _png(root / "test" / cls / "0.PNG", colour)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")


def test_folder_train_test_layout(tmp_path):
    make_split_folder(tmp_path)
    data = load_dataset("folder", root=tmp_path, image_size=8)
    assert data.classes == ("ant", "bee", "cat") and data.num_classes == 3
    assert data.x_train.shape == (6, 3, 8, 8) and data.x_test.shape == (3, 3, 8, 8)
    assert data.x_train.dtype == torch.float32 and data.input_shape == (3, 8, 8) and data.num_features == 192
    assert sorted(data.y_train.tolist()) == [0, 0, 1, 1, 2, 2] and sorted(data.y_test.tolist()) == [0, 1, 2]
    # solid colours, two training images per class: mean and std per channel over the three colours
    table = np.array([COLOURS[c] for c in ("ant", "bee", "cat")], dtype=np.float64) / 255.0
    mean, std = table.mean(axis=0), table.std(axis=0)
    for x, y in zip(torch.cat([data.x_train, data.x_test]), torch.cat([data.y_train, data.y_test]), strict=True):
        expected = (table[int(y)] - mean) / std
        assert np.allclose(x.numpy(), expected.reshape(3, 1, 1) * np.ones((3, 8, 8)), atol=1e-5)


def test_folder_default_size_and_grey_images(tmp_path):
    for cls, value in (("dark", 20), ("light", 220)):
        for i in range(3):
            _png(tmp_path / "train" / cls / f"{i}.png", value, size=(28, 28), mode="L")
        _png(tmp_path / "test" / cls / "0.png", value, size=(28, 28), mode="L")
    data = load_dataset("folder", root=tmp_path)
    assert data.x_train.shape == (6, 1, 32, 32) and data.x_test.shape == (2, 1, 32, 32)
    light = data.x_test[data.y_test == 1]
    assert torch.allclose(light, torch.ones_like(light))  # two values, equally many: +1 and -1 std
    # one colour image among grey ones: every image gets three channels
    _png(tmp_path / "test" / "light" / "1.png", (220, 0, 0), size=(28, 28))
    assert load_dataset("folder", root=tmp_path).x_train.shape == (6, 3, 32, 32)


def test_folder_single_folder_split_by_seed(tmp_path):
    for c, cls in enumerate(("b", "a")):
        for i in range(5):
            _png(tmp_path / cls / f"{i}.png", 10 + 40 * i + c, mode="L")
    data = load_dataset("folder", root=tmp_path, seed=1)
    assert data.classes == ("a", "b")
    assert data.x_train.shape[0] == 8 and data.x_test.shape[0] == 2
    assert sorted(data.y_test.tolist()) == [0, 1]  # one test image per class
    train_values = {round(float(v), 4) for v in data.x_train[:, 0, 0, 0]}
    test_values = {round(float(v), 4) for v in data.x_test[:, 0, 0, 0]}
    assert len(train_values) == 8 and len(test_values) == 2 and not train_values & test_values
    again = load_dataset("folder", root=tmp_path, seed=1)
    assert torch.equal(again.x_test, data.x_test) and torch.equal(again.y_train, data.y_train)
    others = [load_dataset("folder", root=tmp_path, seed=s).x_test for s in range(2, 8)]
    assert any(not torch.equal(o, data.x_test) for o in others)


def test_folder_errors(tmp_path):
    with pytest.raises(SparseforgeError, match=r"dataset 'folder' reads a local folder, and root is not set"):
        load_dataset("folder")
    with pytest.raises(SparseforgeError, match=r"root '.*missing' does not exist; expected class sub-folders"):
        load_dataset("folder", root=tmp_path / "missing")
    _png(tmp_path / "a" / "train" / "x" / "0.png", (1, 2, 3))
    with pytest.raises(SparseforgeError, match=r"has train/ but no test/; expected class sub-folders of images"):
        load_dataset("folder", root=tmp_path / "a")
    _png(tmp_path / "b" / "only" / "0.png", (1, 2, 3))
    with pytest.raises(SparseforgeError, match=r"has 1 class folder\(s\) \['only'\]; expected at least 2"):
        load_dataset("folder", root=tmp_path / "b")
    (tmp_path / "b" / "empty").mkdir()
    with pytest.raises(SparseforgeError, match=r"class folder '.*empty' holds no images; allowed suffixes: .bmp"):
        load_dataset("folder", root=tmp_path / "b")
    make_split_folder(tmp_path / "c")
    _png(tmp_path / "c" / "test" / "dog" / "0.png", (1, 2, 3))
    with pytest.raises(SparseforgeError, match=r"has classes \['dog'\] that '.*train' lacks"):
        load_dataset("folder", root=tmp_path / "c")
    make_split_folder(tmp_path / "d")
    (tmp_path / "d" / "train" / "bee" / "9.png").write_bytes(b"not a png")
    with pytest.raises(SparseforgeError, match=r"image '.*9\.png' cannot be read \("):
        load_dataset("folder", root=tmp_path / "d")
    for cls in ("x", "y"):
        _png(tmp_path / "e" / cls / "0.png", (1, 2, 3))
    with pytest.raises(SparseforgeError, match=r"no test images in '.*e'"):
        load_dataset("folder", root=tmp_path / "e")


def test_argument_errors(tmp_path):
    with pytest.raises(
        SparseforgeError, match=r"root='.*' does not apply to dataset 'digits'; allowed: root only with"
    ):
        load_dataset("digits", root=tmp_path)
    with pytest.raises(SparseforgeError, match=r"image_size=64 does not apply to dataset 'cifar10'"):
        load_dataset("cifar10", root=tmp_path, image_size=64)
    with pytest.raises(SparseforgeError, match=r"image_size=2 is not allowed; allowed: an integer in 4..1024"):
        load_dataset("folder", root=tmp_path, image_size=2)
    with pytest.raises(SparseforgeError, match=r"dataset='cifar' is not recognised; allowed: .*'cifar10'"):
        load_dataset("cifar")


def test_mnist1d_is_the_same_whatever_the_thread_count():
    """A sweep's worker runs with one thread, a script with all cores: the data must not differ
    (a torch mean/std sums in a thread-count-dependent order, and its last bits changed runs)."""
    import torch

    from sparseforge.experiments.datasets import load_dataset

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = load_dataset("mnist1d", seed=3, num_samples=2000)
        torch.set_num_threads(2)
        two = load_dataset("mnist1d", seed=3, num_samples=2000)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one.x_train, two.x_train) and torch.equal(one.x_test, two.x_test)
    # standardised with the training split's mean and sample std
    assert abs(float(one.x_train.double().mean())) < 1e-6
    assert abs(float(one.x_train.double().std()) - 1.0) < 1e-6
