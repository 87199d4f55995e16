"""save/load: exact round trips in both formats, refusal of bad checkpoints, atomic writes,
checksums of every tensor, mask validation and file-system errors."""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
import zlib
from pathlib import Path

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
    assert set(payload) == {"model", "masks", "checksums"}


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
    torch.save({"weights": torch.zeros(2), "epoch": 3}, path)  # neither a checkpoint nor a state dict
    with pytest.raises(SparseforgeError) as e:
        load(path, make_model())
    assert "no 'model' entry" in str(e.value) and "nor a plain state dict" in str(e.value)
    torch.save({"weights": torch.zeros(2)}, path)  # a state dict of another model
    with pytest.raises(SparseforgeError, match="does not match the model: missing"):
        load(path, make_model())


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
    with pytest.raises(SparseforgeError) as e:  # the OSError becomes a one-line error naming the file
        save(dest, model, masks)
    assert str(e.value) == f"checkpoint {str(dest)!r}: disk full (simulated)"
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
    with pytest.raises(SparseforgeError, match="disk full"):
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


# ------------------------------------------------------------------ integrity: checksums, masks
MASK = "__sparseforge_mask__."  # how a file names the mask of parameter NAME: MASK + NAME
SUFFIXES = [".safetensors", ".pt"]


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def small_masks() -> MaskState:
    g = torch.Generator().manual_seed(1)
    return MaskState(
        {"0.weight": torch.rand(6, 4, generator=g) > 0.5, "2.weight": torch.rand(3, 6, generator=g) > 0.5},
        step=3,
        targets={"0.weight": 0.5, "2.weight": 0.5},
    )


def crc(t: torch.Tensor) -> int:
    """CRC-32 of a tensor's row-major bytes continued over "DTYPE[SHAPE]", computed without sparseforge."""
    flat = t.detach().contiguous().reshape(-1)
    data = zlib.crc32(flat.view(torch.uint8).numpy().tobytes()) if flat.numel() else 0
    return zlib.crc32(f"{str(t.dtype).split('.')[-1]}{list(t.shape)}".encode(), data)


def safetensors_layout(path: Path) -> tuple[dict[str, tuple[str, list[int], int]], dict[str, str]]:
    """{name: (dtype, shape, absolute offset of its first byte)} and the metadata, from the header."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])  # 8-byte little-endian header length
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    return {k: (v["dtype"], v["shape"], 8 + n + v["data_offsets"][0]) for k, v in header.items()}, meta


def flip_byte(path: Path, offset: int, bits: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= bits
    path.write_bytes(bytes(data))


def write_raw(path: Path, weights: dict, masks: dict | None = None, *, checksums: bool = True, tamper=None) -> Path:
    """A checkpoint laid out the way sparseforge stores one, written here without sparseforge.

    ``tamper(weights, masks)`` runs after the checksum table is made (to damage the data).
    """
    weights, masks = dict(weights), (dict(masks) if masks is not None else None)
    table = {k: crc(v) for k, v in weights.items()}
    table.update({MASK + k: crc(m) for k, m in (masks or {}).items()})
    if tamper is not None:
        tamper(weights, masks)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().clone() for k, v in weights.items()}
        meta = {"sparseforge": "1"}
        if masks is not None:
            tensors.update({MASK + k: m.contiguous().clone() for k, m in masks.items()})
            meta.update({"masks": "1", "step": "4", "targets": "{}"})
        if checksums:
            meta["sparseforge.tensor_crc32"] = json.dumps(table)
        save_file(tensors, str(path), metadata=meta)
    else:
        payload: dict = {"model": {k: v.detach() for k, v in weights.items()}}
        if masks is not None:
            payload["masks"] = {"masks": masks, "step": 4, "targets": {}}
        if checksums:
            payload["checksums"] = table
        torch.save(payload, str(path))
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_checksums_are_the_crc32_of_every_weight_and_mask(tmp_path, suffix):
    model, masks = small_model(), small_masks()
    path = save(tmp_path / f"c{suffix}", model, masks)
    expected = {k: crc(v) for k, v in model.state_dict().items()}
    expected.update({MASK + k: crc(m) for k, m in masks.items()})
    assert len(expected) == 6
    if suffix == ".safetensors":
        table = json.loads(safetensors_layout(path)[1]["sparseforge.tensor_crc32"])
    else:
        table = torch.load(str(path), weights_only=True)["checksums"]
    assert table == expected


def test_flipped_exponent_byte_of_a_weight_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file

    model, masks = small_model(), small_masks()
    path = save(tmp_path / "w.safetensors", model, masks)
    layout, _ = safetensors_layout(path)
    dtype, shape, start = layout["2.weight"]
    assert (dtype, shape) == ("F32", [3, 6])
    flip_byte(path, start + 4 * 5 + 3, 0x40)  # element 5; its last byte holds the sign and 7 exponent bits
    damaged = load_file(str(path))["2.weight"]  # the file still parses: only the checksum can tell
    assert damaged.flatten()[5] != model[2].weight.flatten()[5]
    target = small_model(seed=1)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert str(e.value) == f"checkpoint {str(path)!r}: tensor '2.weight' fails its checksum (the file is corrupted)"
    assert_same_state(snapshot(target), before)


def test_damaged_dtype_in_the_header_is_refused_naming_the_tensor(tmp_path):
    """The checksum covers dtype and shape: F32 -> I32 keeps every size and offset valid."""
    from safetensors.torch import load_file

    model = small_model()
    path = save(tmp_path / "h.safetensors", model)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8 : 8 + n]
    entry = b'"0.bias":{"dtype":"F32"'
    assert header.count(entry) == 1
    at = 8 + header.index(entry) + len(entry) - 4  # the "F" of F32
    flip_byte(path, at, ord("F") ^ ord("I"))
    assert load_file(str(path))["0.bias"].dtype == torch.int32  # still a valid file
    target = small_model(seed=1)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert str(e.value) == f"checkpoint {str(path)!r}: tensor '0.bias' fails its checksum (the file is corrupted)"
    assert_same_state(snapshot(target), before)


def test_flipped_byte_of_a_mask_is_refused_naming_the_mask(tmp_path):
    model, masks = small_model(), small_masks()
    path = save(tmp_path / "m.safetensors", model, masks)
    layout, _ = safetensors_layout(path)
    dtype, shape, start = layout[MASK + "0.weight"]
    assert (dtype, shape) == ("BOOL", [6, 4])
    flip_byte(path, start + 7, 0x01)  # still a valid bool, but the other one
    target = small_model(seed=1)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert str(e.value) == f"checkpoint {str(path)!r}: mask '0.weight' fails its checksum (the file is corrupted)"
    assert_same_state(snapshot(target), before)


def test_flipped_byte_in_a_torch_file_is_refused_naming_the_tensor(tmp_path):
    model, masks = small_model(), small_masks()
    path = save(tmp_path / "w.pt", model, masks)
    data = path.read_bytes()
    weight_bytes = model[0].weight.detach().numpy().tobytes()
    assert data.count(weight_bytes) == 1  # torch stores the tensor's bytes uncompressed
    flip_byte(path, data.index(weight_bytes) + 4 * 2 + 3, 0x40)
    target = small_model(seed=1)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert str(e.value) == f"checkpoint {str(path)!r}: tensor '0.weight' fails its checksum (the file is corrupted)"
    assert_same_state(snapshot(target), before)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_files_saved_without_checksums_still_load(tmp_path, suffix):
    model, masks = small_model(), small_masks()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    path = write_raw(tmp_path / f"old{suffix}", weights, dict(masks.items()), checksums=False)
    target = small_model(seed=1)
    loaded = load(path, target)
    expected = {k: v * masks[k] if k in masks else v for k, v in weights.items()}  # load applies the masks
    assert_same_state(snapshot(target), expected)
    assert loaded.names() == ["0.weight", "2.weight"] and loaded.step == 4
    for name in masks:
        assert torch.equal(loaded[name], masks[name])


def _transpose_weight(w, m):
    w["0.weight"] = w["0.weight"].t().contiguous()  # Linear(4, 6): (6, 4) stored as (4, 6)


def _transpose_mask(w, m):
    m["0.weight"] = m["0.weight"].t().contiguous()


def _uint8_mask(w, m):
    m["2.weight"] = m["2.weight"].to(torch.uint8)


def _float_mask(w, m):
    m["2.weight"] = m["2.weight"].float()


def _mask_of_no_parameter(w, m):
    m["1.weight"] = torch.ones(6, 6, dtype=torch.bool)


def _missing_weight(w, m):
    del w["2.bias"]


def _unexpected_weight(w, m):
    w["9.weight"] = torch.zeros(2, 2)


def _damaged_bias(w, m):
    w["0.bias"] = w["0.bias"] + 1.0


# kind -> (how the file differs from a good one, whether its table matches it, words the error must hold)
REFUSALS = {
    "weight transposed": (_transpose_weight, True, ["'0.weight'", "(4, 6)", "(6, 4)"]),
    "mask transposed": (_transpose_mask, True, ["mask '0.weight'", "(4, 6)", "(6, 4)"]),
    "mask uint8": (_uint8_mask, True, ["mask '2.weight'", "torch.uint8", "allowed: torch.bool"]),
    "mask float": (_float_mask, True, ["mask '2.weight'", "torch.float32", "allowed: torch.bool"]),
    "mask of no weight": (_mask_of_no_parameter, True, ["mask '1.weight'", "names no weight"]),
    "missing weight": (_missing_weight, True, ["missing ['2.bias']"]),
    "unexpected weight": (_unexpected_weight, True, ["unexpected ['9.weight']"]),
    "checksum": (_damaged_bias, False, ["tensor '0.bias' fails its checksum"]),
    "mask uint8, no checksums": (_uint8_mask, None, ["mask '2.weight'", "torch.uint8"]),
    "weight transposed, no checksums": (_transpose_weight, None, ["'0.weight'", "(4, 6)"]),
}


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("kind", list(REFUSALS))
def test_every_refused_load_leaves_every_parameter_untouched(tmp_path, suffix, kind):
    change, table_matches, words = REFUSALS[kind]
    source = small_model(seed=0)
    weights = {k: v.clone() for k, v in source.state_dict().items()}
    masks = dict(small_masks().items())
    if table_matches is True:  # the file is consistent in itself, but wrong for the model
        change(weights, masks)
        path = write_raw(tmp_path / f"bad{suffix}", weights, masks)
    elif table_matches is False:  # the data was changed after its checksums were taken
        path = write_raw(tmp_path / f"bad{suffix}", weights, masks, tamper=change)
    else:
        change(weights, masks)
        path = write_raw(tmp_path / f"bad{suffix}", weights, masks, checksums=False)
    target = small_model(seed=1)
    before = {n: p.detach().clone() for n, p in target.named_parameters()}
    buffers = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint {str(path)!r}")
    for word in words:
        assert word in msg, (word, msg)
    for name, param in target.named_parameters():
        assert torch.equal(param, before[name]), name
    assert_same_state(snapshot(target), buffers)


def test_torch_file_with_a_weight_that_is_not_a_tensor_is_refused(tmp_path):
    weights = dict(small_model().state_dict())
    weights["0.bias"] = [0.0] * 6
    path = tmp_path / "list.pt"
    torch.save({"model": weights}, str(path))
    target = small_model(seed=1)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert str(e.value) == f"checkpoint {str(path)!r}: weight '0.bias' is a list; allowed: a tensor"
    assert_same_state(snapshot(target), before)


# ------------------------------------------------------------------ file-system errors
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_load_of_a_directory_says_it_is_a_directory(tmp_path, suffix):
    folder = tmp_path / f"dir{suffix}"
    folder.mkdir()
    with pytest.raises(SparseforgeError) as e:
        load(folder, small_model())
    assert str(e.value) == f"checkpoint {str(folder)!r} is a directory; allowed: a file"
    assert "does not exist" not in str(e.value)


def test_load_of_a_missing_file_or_folder(tmp_path):
    with pytest.raises(SparseforgeError) as e:
        load(tmp_path / "none.safetensors", small_model())
    assert str(e.value) == f"checkpoint {str(tmp_path / 'none.safetensors')!r} does not exist"
    with pytest.raises(SparseforgeError) as e:
        load(tmp_path / "nofolder" / "x.pt", small_model())
    assert "does not exist" in str(e.value) and f"no such directory {str(tmp_path / 'nofolder')!r}" in str(e.value)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_to_a_directory_or_into_a_missing_folder_is_refused(tmp_path, suffix):
    folder = tmp_path / f"dir{suffix}"
    folder.mkdir()
    with pytest.raises(SparseforgeError) as e:
        save(folder, small_model())
    assert str(e.value) == f"checkpoint {str(folder)!r} is a directory; allowed: a file path"
    target = tmp_path / "missing" / f"x{suffix}"
    with pytest.raises(SparseforgeError) as e:
        save(target, small_model())
    assert str(e.value) == f"checkpoint {str(target)!r}: no such directory {str(target.parent)!r}"
    assert not target.parent.exists()  # not created
    assert sorted(os.listdir(tmp_path)) == [f"dir{suffix}"]


def _raise_eacces(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("where", ["mkstemp", "replace"])
def test_save_permission_denied_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, suffix, where):
    path = save(tmp_path / f"p{suffix}", small_model(), small_masks())
    old = path.read_bytes()
    with monkeypatch.context() as m:
        m.setattr(tempfile if where == "mkstemp" else os, where, _raise_eacces)
        with pytest.raises(SparseforgeError) as e:
            save(path, small_model(seed=5))
    assert str(e.value) == f"checkpoint {str(path)!r}: permission denied"
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_save_disk_full_is_one_line(tmp_path, monkeypatch, suffix):
    import safetensors.torch

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    monkeypatch.setattr(torch, "save", no_space)
    path = tmp_path / f"full{suffix}"
    with pytest.raises(SparseforgeError) as e:
        save(path, small_model())
    assert str(e.value) == f"checkpoint {str(path)!r}: no space left on the device"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_load_permission_denied(tmp_path, monkeypatch, suffix):
    import safetensors

    path = save(tmp_path / f"r{suffix}", small_model())
    target = small_model(seed=1)
    before = snapshot(target)
    with monkeypatch.context() as m:  # the check before reading
        m.setattr(os, "access", lambda *a, **k: False)
        with pytest.raises(SparseforgeError) as e:
            load(path, target)
    assert str(e.value) == f"checkpoint {str(path)!r}: permission denied (not readable)"
    with monkeypatch.context() as m:  # denied while reading (e.g. changed in between)
        m.setattr(safetensors, "safe_open", _raise_eacces)
        m.setattr(torch, "load", _raise_eacces)
        with pytest.raises(SparseforgeError) as e:
            load(path, target)
    assert str(e.value) == f"checkpoint {str(path)!r}: permission denied"
    assert_same_state(snapshot(target), before)


def test_atomic_write_is_still_importable_from_checkpoint():
    from sparseforge import fileio
    from sparseforge.checkpoint import atomic_write

    assert atomic_write is fileio.atomic_write


def test_mask_of_a_buffer_is_refused(tmp_path):
    model = make_model()  # 1.running_mean is a buffer, not a parameter
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    path = write_raw(tmp_path / "buf.safetensors", weights, {"1.running_mean": torch.ones(10, dtype=torch.bool)})
    target = make_model(seed=1)
    before = snapshot(target)
    with pytest.raises(SparseforgeError) as e:
        load(path, target)
    assert "mask '1.running_mean' names no parameter of the model" in str(e.value) and "\n" not in str(e.value)
    assert_same_state(snapshot(target), before)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_checkpoint_returns_verified_weights_and_masks_without_a_model(tmp_path, suffix):
    from sparseforge.checkpoint import read_checkpoint

    model, masks = small_model(), small_masks()
    path = save(tmp_path / f"r{suffix}", model, masks)
    weights, loaded = read_checkpoint(path)
    expected = model.state_dict()
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert loaded.names() == masks.names() and loaded.step == 3
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    bad = write_raw(tmp_path / f"bad{suffix}", dict(expected), dict(masks.items()), tamper=_damaged_bias)
    with pytest.raises(SparseforgeError) as e:
        read_checkpoint(bad)
    assert str(e.value) == f"checkpoint {str(bad)!r}: tensor '0.bias' fails its checksum (the file is corrupted)"
    # a uint8 copy of a bool mask has the same bytes, but the checksum covers the dtype too
    bad = write_raw(tmp_path / f"u8{suffix}", dict(expected), dict(masks.items()), tamper=_uint8_mask)
    with pytest.raises(SparseforgeError) as e:
        read_checkpoint(bad)
    assert str(e.value) == f"checkpoint {str(bad)!r}: mask '2.weight' fails its checksum (the file is corrupted)"


def test_plain_state_dicts_load_as_weights_without_masks(tmp_path):
    """A user's own ``torch.save(model.state_dict())`` (or a DDP one, with ``module.`` keys) and
    a plain safetensors file load into the model with the same name and shape checks."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    for name in ("plain.pt", "ddp.pt", "plain.safetensors"):
        target = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        assert sparseforge.load(tmp_path / name, target) is None
        for (k, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
            assert torch.equal(a, b), (name, k)
    wrong = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(SparseforgeError, match="shape"):
        sparseforge.load(tmp_path / "plain.pt", wrong)
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(SparseforgeError, match="neither a sparseforge checkpoint .* nor a plain state dict"):
        sparseforge.load(tmp_path / "list.pt", wrong)
