"""load_converted checks the whole file against the skeleton before it replaces any layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseforge
from sparseforge.errors import SparseforgeError
from sparseforge.inference import SparseLinear, convert, load_converted, save_converted


def _converted(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
    sparseforge.prune(model, 0.9)  # the LayerNorm is not prunable: it stays as it is
    fast, report = convert(model, autotune=False)  # the rule: CSR at density <= 0.25
    assert report.sparse_layers == ["0", "2"]
    return model, save_converted(tmp_path / "m.safetensors", fast)


@pytest.mark.parametrize(
    ("skeleton", "needle"),
    [
        (
            lambda: nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 9), nn.LayerNorm(8)),
            "layer '2' is a Linear of (out, in) shape (9, 16) there; the file holds (out, in) shape (8, 16)",
        ),
        (
            lambda: nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(9)),
            "has shape (8,), the skeleton expects (9,)",
        ),
        (lambda: nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.Identity()), "differing entries"),
    ],
)
def test_a_refused_file_leaves_the_skeleton_untouched(tmp_path, skeleton, needle):
    _, path = _converted(tmp_path)
    target = skeleton()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(SparseforgeError) as info:
        load_converted(path, target)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert not any(isinstance(m, SparseLinear) for m in target.modules())  # no layer was replaced
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_matching_skeleton_gets_the_same_outputs(tmp_path):
    model, path = _converted(tmp_path)
    target = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
    loaded = load_converted(path, target)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    assert isinstance(loaded[0], SparseLinear) and isinstance(loaded[2], SparseLinear)


def test_save_converted_refuses_what_is_not_a_module(tmp_path):
    for bad, needle in ((None, "model is a NoneType"), ({"0.weight": torch.ones(2, 2)}, "model is a dict")):
        with pytest.raises(SparseforgeError, match=needle):
            save_converted(tmp_path / "m.safetensors", bad)
    assert not list(tmp_path.iterdir())


def test_a_model_with_every_layer_kept_dense_saves_and_loads(tmp_path):
    """convert may keep every layer dense (another machine, a busy one): saving must still work."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    sparseforge.prune(model, 0.2)  # density 0.8 > the rule's 0.25: every layer stays dense
    fast, report = convert(model, autotune=False)
    assert report.sparse_layers == []
    path = save_converted(tmp_path / "dense.safetensors", fast)
    loaded = load_converted(path, nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
    x = torch.randn(3, 16)
    with torch.inference_mode():
        assert torch.equal(loaded(x), model(x))


def test_a_layers_only_file_holds_the_packed_layers_alone_and_keeps_the_rest(tmp_path):
    from safetensors import safe_open

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
    sparseforge.prune(model, 0.9)
    with torch.no_grad():
        model[3].weight.uniform_(0.5, 2.0)  # not the default ones: must come from the skeleton below
    fast, _ = convert(model, autotune=False)
    path = save_converted(tmp_path / "layers.safetensors", fast, layers_only=True)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert keys and all(k.split(".")[0] in {"0", "2"} for k in keys)  # no LayerNorm entry
    target = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.LayerNorm(8))
    target[3].load_state_dict(model[3].state_dict())
    loaded = load_converted(path, target)
    assert isinstance(loaded[0], SparseLinear) and isinstance(loaded[2], SparseLinear)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    with pytest.raises(SparseforgeError, match="layers_only='yes' is not allowed"):
        save_converted(tmp_path / "x.safetensors", fast, layers_only="yes")
