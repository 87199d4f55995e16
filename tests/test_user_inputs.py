"""The user's model (by import path) and data (by file) as the command line reads them: every bad
input is one line naming the value and what is wrong."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.datasets import load_batch
from sparseforge.experiments.models import model_from_spec


def test_builtin_and_factory_models(tmp_path, monkeypatch):
    assert isinstance(model_from_spec("mlp"), nn.Module)
    (tmp_path / "zoo.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.fc = torch.nn.Linear(3, 2)\n"
        "INSTANCE = torch.nn.Linear(5, 5)\n"
        "def broken():\n"
        "    raise RuntimeError('needs a config\\nsecond line')\n"
        "def not_a_module():\n"
        "    return [1]\n"
        "VALUE = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(model_from_spec("zoo:Net").fc, nn.Linear)  # a class is called
    assert isinstance(model_from_spec(f"{tmp_path / 'zoo.py'}:INSTANCE"), nn.Linear)  # an instance is used as is
    # the factory runs under the given seed, and the global RNG is left alone
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b = model_from_spec("zoo:Net", seed=5), model_from_spec("zoo:Net", seed=5)
    assert torch.equal(a.fc.weight, b.fc.weight) and torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("", "is empty"),
        ("resnet50", "neither a built-in model"),
        ("zoo:missing", "has no attribute 'missing'"),
        ("zoo:broken", "calling the factory with no arguments failed (RuntimeError: needs a config)"),
        ("zoo:not_a_module", "returned a list"),
        ("zoo:VALUE", "names a int"),
        ("no/such/file.py:f", "'no/such/file.py' does not exist"),
        ("bad_syntax.py:f", "importing 'bad_syntax.py' failed (SyntaxError"),
    ],
)
def test_bad_model_specs(spec, needle, tmp_path, monkeypatch):
    (tmp_path / "zoo.py").write_text(
        "def broken():\n    raise RuntimeError('needs a config\\nsecond line')\n"
        "def not_a_module():\n    return [1]\nVALUE = 3\n"
    )
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SparseforgeError) as info:
        model_from_spec(spec)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_a_directory_given_as_model_file(tmp_path):
    (tmp_path / "d.py").mkdir()
    with pytest.raises(SparseforgeError, match="is a directory"):
        model_from_spec(f"{tmp_path / 'd.py'}:f")


def test_load_batch_from_builtin_and_files(tmp_path):
    from safetensors.torch import save_file

    x, y = load_batch("digits", samples=7)
    assert x.shape == (7, 64) and y.shape == (7,)
    save_file({"inputs": torch.arange(12.0).reshape(6, 2), "targets": torch.arange(6)}, str(tmp_path / "d.safetensors"))
    x, y = load_batch(str(tmp_path / "d.safetensors"), samples=4)
    assert torch.equal(x, torch.arange(8.0).reshape(4, 2)) and torch.equal(y, torch.arange(4))
    torch.save({"inputs": torch.ones(3, 2), "targets": torch.zeros(3)}, tmp_path / "d.pt")
    assert load_batch(str(tmp_path / "d.pt"))[0].shape == (3, 2)


def test_bad_data(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.ones(2)}, str(tmp_path / "keys.safetensors"))
    save_file({"inputs": torch.ones(3, 2), "targets": torch.ones(2)}, str(tmp_path / "rows.safetensors"))
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    (tmp_path / "folder.pt").mkdir()
    cases = [
        ("imagenet", "data='imagenet' is not recognised"),
        (str(tmp_path / "missing.pt"), "does not exist"),
        (str(tmp_path / "folder.pt"), "is a directory"),
        (str(tmp_path / "keys.safetensors"), "no tensors 'inputs' and 'targets' (found ['x'])"),
        (str(tmp_path / "rows.safetensors"), "the same number of rows"),
        (str(tmp_path / "junk.pt"), "cannot be read"),
    ]
    for spec, needle in cases:
        with pytest.raises(SparseforgeError) as info:
            load_batch(spec)
        assert needle in str(info.value) and "\n" not in str(info.value), (spec, str(info.value))
    with pytest.raises(SparseforgeError, match="samples=0"):
        load_batch("digits", samples=0)
