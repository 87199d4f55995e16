"""save/load: exact round trips in both formats, refusal of bad checkpoints, atomic writes."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import sparseforge
from sparseforge import MaskState, SparseforgeError, load, save


def make_model(seed: int = 0, hidden: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 4))


def sparse_model():
    model = make_model()
    model.train()
    model(torch.randn(16, 6))  # non-trivial BatchNorm running stats and num_batches_tracked
    masks = sparseforge.prune(model, sparsity=0.7)
    masks.step = 17
    masks.targets = {"0.weight": 0.7, "3.weight": 0.7000000000000001}
    return model, masks


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_exact(tmp_path, suffix):
    model, masks = sparse_model()
    path = save(tmp_path / f"ckpt{suffix}", model, masks)
    assert path.exists()
    assert os.listdir(tmp_path) == [f"ckpt{suffix}"]  # no temp file left behind
    other = make_model(seed=1)
    loaded = load(path, other)
    assert_same_state(snapshot(other), snapshot(model))
    assert isinstance(loaded, MaskState)
    assert loaded.names() == masks.names()
    for name in masks:
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], masks[name])
    assert loaded.step == 17
    assert loaded.targets == masks.targets  # floats bit-exact


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip_without_masks_and_explicit_format(tmp_path, suffix):
    model, _ = sparse_model()
    path = save(tmp_path / "plain.bin", model, format="safetensors" if suffix == ".safetensors" else "torch")
    other = make_model(seed=2)
    assert load(path, other, format="safetensors" if suffix == ".safetensors" else "torch") is None
    assert_same_state(snapshot(other), snapshot(model))


def test_formats_are_what_they_claim(tmp_path):
    from safetensors.torch import load_file

    model, masks = sparse_model()
    save(tmp_path / "a.safetensors", model, masks)
    tensors = load_file(str(tmp_path / "a.safetensors"))
    assert "0.weight" in tensors and any(k.endswith("0.weight") and k != "0.weight" for k in tensors)
    save(tmp_path / "a.pt", model, masks)
    payload = torch.load(str(tmp_path / "a.pt"), weights_only=True)
    assert set(payload) == {"model", "masks"}


class Wrapper(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.module = m


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_saved_names_are_canonical(tmp_path, suffix):
    model, masks = sparse_model()
    path = save(tmp_path / f"w{suffix}", Wrapper(model), masks)
    other = make_model(seed=3)
    loaded = load(path, other)  # bare model loads a checkpoint saved from a wrapper
    assert_same_state(snapshot(other), snapshot(model))
    assert loaded.names() == ["0.weight", "3.weight"]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_random_bytes_refused(tmp_path, suffix):
    path = tmp_path / f"junk{suffix}"
    path.write_bytes(os.urandom(2048))
    model = make_model()
    before = snapshot(model)
    with pytest.raises(SparseforgeError) as e:
        load(path, model)
    assert "\n" not in str(e.value) and "junk" in str(e.value)
    assert_same_state(snapshot(model), before)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_refused(tmp_path, suffix):
    model, masks = sparse_model()
    path = save(tmp_path / f"t{suffix}", model, masks)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    target = make_model(seed=4)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert "\n" not in str(e.value) and "t" + suffix in str(e.value)
    assert_same_state(snapshot(target), before)


def test_missing_file_and_bad_format(tmp_path):
    with pytest.raises(SparseforgeError) as e:
        load(tmp_path / "nothing.pt", make_model())
    assert "nothing.pt" in str(e.value)
    with pytest.raises(SparseforgeError) as e:
        save(tmp_path / "x.bin", make_model(), format="onnx")
    assert "'onnx'" in str(e.value)


def test_torch_file_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(SparseforgeError) as e:
        load(path, make_model())
    assert "'model'" in str(e.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_shape_mismatch_refused_model_unchanged(tmp_path, suffix):
    model, masks = sparse_model()
    path = save(tmp_path / f"s{suffix}", model, masks)
    other = make_model(seed=5, hidden=12)
    before = snapshot(other)
    with pytest.raises(SparseforgeError) as e:
        load(path, other)
    msg = str(e.value)
    assert "\n" not in msg and "(10, 6)" in msg and "(12, 6)" in msg
    assert_same_state(snapshot(other), before)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_missing_and_extra_keys_refused(tmp_path, suffix):
    model, masks = sparse_model()
    path = save(tmp_path / f"k{suffix}", model, masks)
    bigger = nn.Sequential(*make_model(seed=6), nn.Linear(4, 2))
    before = snapshot(bigger)
    with pytest.raises(SparseforgeError) as e:
        load(path, bigger)
    assert "4.weight" in str(e.value) and "\n" not in str(e.value)
    assert_same_state(snapshot(bigger), before)
    # the other way round: the checkpoint has keys the model lacks
    torch.manual_seed(7)
    big = nn.Sequential(*make_model(seed=7), nn.Linear(4, 2))
    path2 = save(tmp_path / f"big{suffix}", big)
    small = make_model(seed=8)
    before = snapshot(small)
    with pytest.raises(SparseforgeError) as e:
        load(path2, small)
    assert "4.weight" in str(e.value) and "unexpected" in str(e.value)
    assert_same_state(snapshot(small), before)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_masks_not_matching_model_refused(tmp_path, suffix):
    model, _ = sparse_model()
    wrong = MaskState({"0.weight": torch.ones(6, 10, dtype=torch.bool), "9.weight": torch.ones(2, dtype=torch.bool)})
    path = save(tmp_path / f"m{suffix}", model, MaskState({"0.weight": torch.ones(6, 10, dtype=torch.bool)}))
    target = make_model(seed=9)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert "(6, 10)" in str(e.value)
    assert_same_state(snapshot(target), before)
    path = save(tmp_path / f"n{suffix}", model, MaskState({"9.weight": wrong["9.weight"]}))
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert "'9.weight'" in str(e.value)
    assert_same_state(snapshot(target), before)


def _failing_writer(path, *args, **kwargs):
    with open(path, "wb") as f:
        f.write(b"partial checkpoint bytes")
    raise OSError("disk full (simulated)")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch, suffix):
    import safetensors.torch

    model, masks = sparse_model()
    if suffix == ".safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", lambda t, p, metadata=None: _failing_writer(p))
    else:
        monkeypatch.setattr(torch, "save", lambda obj, p, *a, **k: _failing_writer(p))
    dest = tmp_path / f"new{suffix}"
    with pytest.raises(OSError):
        save(dest, model, masks)
    assert not dest.exists()
    assert os.listdir(tmp_path) == []  # no temp files

    # An existing checkpoint keeps its old content.
    monkeypatch.undo()
    old = save(tmp_path / f"old{suffix}", model, masks)
    old_bytes = old.read_bytes()
    if suffix == ".safetensors":
        monkeypatch.setattr(safetensors.torch, "save_file", lambda t, p, metadata=None: _failing_writer(p))
    else:
        monkeypatch.setattr(torch, "save", lambda obj, p, *a, **k: _failing_writer(p))
    with pytest.raises(OSError):
        save(old, make_model(seed=11), masks)
    assert old.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == [f"old{suffix}"]
    monkeypatch.undo()
    assert load(old, make_model(seed=12)).step == 17


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_load_into_module_prefixed_wrapper(tmp_path, suffix):
    # Names are matched canonically in both directions: a checkpoint of the bare model loads into a
    # wrapper whose keys start with ``module.`` (like DDP), and its masks resolve there.
    model, masks = sparse_model()
    path = save(tmp_path / f"bare{suffix}", model, masks)
    inner = make_model(seed=13)
    wrapped = Wrapper(inner)
    assert next(iter(wrapped.state_dict())).startswith("module.")
    loaded = load(path, wrapped)
    assert_same_state(snapshot(inner), snapshot(model))
    assert loaded.resolve(wrapped)["0.weight"] is inner[0].weight


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_empty_mask_state_round_trips_the_same_in_both_formats(tmp_path, suffix: str) -> None:
    model = nn.Linear(3, 2)
    sparseforge.save(tmp_path / f"m{suffix}", model, sparseforge.MaskState())
    loaded = sparseforge.load(tmp_path / f"m{suffix}", nn.Linear(3, 2))
    assert loaded is not None and len(loaded) == 0


def test_saved_file_is_readable_by_group_and_others(tmp_path) -> None:
    import os
    import stat

    path = sparseforge.save(tmp_path / "m.safetensors", nn.Linear(3, 2))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
