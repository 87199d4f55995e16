"""Packed formats round-trip exactly, and every kernel matches dense matmul."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import requires
from sparseforge.errors import SparseforgeError
from sparseforge.inference import kernels
from sparseforge.inference.formats import Bitmask, BlockSparse, CompactCSR, CompactDense, PackedNM
from sparseforge.inference.kernels import KernelRunner, kernels_available, numba_available, sparse_matmul

needs_kernels = requires(kernels_available(), "numba kernels unavailable")  # fails instead under CI=true


@st.composite
def sparse_weights(draw, row_mult: int = 1, col_mult: int = 1):
    rows = draw(st.integers(1, 12)) * row_mult
    cols = draw(st.integers(1, 20)) * col_mult
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]))
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random((rows, cols)) >= density] = 0.0
    return torch.from_numpy(w)


def nm_weight(w: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    groups = w.reshape(w.shape[0], -1, m)
    order = groups.abs().argsort(dim=2, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, order[:, :, :n_keep], True)
    return (groups * keep).reshape(w.shape)


@given(sparse_weights())
def test_csr_round_trip(w):
    fmt = CompactCSR.from_dense(w)
    assert torch.equal(fmt.to_dense(), w)
    assert fmt.nnz == int((w != 0).sum())
    assert fmt.indices.dtype == np.uint16 and fmt.indptr.dtype == np.int32


@given(sparse_weights())
def test_bitmask_round_trip(w):
    fmt = Bitmask.from_dense(w)
    assert torch.equal(fmt.to_dense(), w)
    again = Bitmask.from_arrays(fmt.shape, fmt.arrays(), fmt.params())
    assert torch.equal(again.to_dense(), w)
    assert np.array_equal(again.rowptr, fmt.rowptr)


@given(sparse_weights(col_mult=4), st.sampled_from([(1, 4), (2, 4), (3, 4)]))
def test_nm_round_trip(w, nm):
    n_keep, m = nm
    w = nm_weight(w, n_keep, m)
    assert PackedNM.fits(w, n_keep, m)
    fmt = PackedNM.from_dense(w, n_keep, m)
    assert fmt.values.shape == (w.shape[0], w.shape[1] // m * n_keep)
    assert torch.equal(fmt.to_dense(), w)
    assert torch.equal(PackedNM.from_arrays(fmt.shape, fmt.arrays(), fmt.params()).to_dense(), w)


@given(sparse_weights(row_mult=2, col_mult=4))
def test_block_round_trip(w):
    fmt = BlockSparse.from_dense(w, 2, 4)
    assert torch.equal(fmt.to_dense(), w)
    assert torch.equal(BlockSparse.from_arrays(fmt.shape, fmt.arrays(), fmt.params()).to_dense(), w)


@given(sparse_weights(), st.integers(0, 2**31 - 1))
def test_compact_dense_round_trip(w, seed):
    rng = np.random.default_rng(seed)
    w = w.clone()
    w[torch.from_numpy(rng.random(w.shape[0]) < 0.4)] = 0.0  # whole rows (output channels) gone
    w[:, torch.from_numpy(rng.random(w.shape[1]) < 0.3)] = 0.0  # and whole input columns
    fmt = CompactDense.from_dense(w)
    nz = w != 0
    assert fmt.weight.shape == (int(nz.any(dim=1).sum()), int(nz.any(dim=0).sum()))
    assert CompactDense.area(w) == pytest.approx(fmt.weight.size / w.numel() if w.numel() else 1.0)
    assert torch.equal(fmt.to_dense(), w)
    assert torch.equal(CompactDense.from_arrays(fmt.shape, fmt.arrays(), fmt.params()).to_dense(), w)


def test_compact_dense_inconsistent_arrays_are_refused():
    fmt = CompactDense.from_dense(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 4.0]]))
    assert fmt.rows.tolist() == [0, 2] and fmt.cols.tolist() == [0, 1, 2]
    for bad in (
        {"rows": np.array([2, 0], dtype=np.uint16)},  # not increasing
        {"cols": np.array([0, 1, 3], dtype=np.uint16)},  # out of range
        {"weight": fmt.weight[:, :2].copy()},  # wrong shape
        {"rows": fmt.rows.astype(np.int32)},
    ):  # wrong index dtype
        with pytest.raises(SparseforgeError, match="compact arrays are inconsistent"):
            CompactDense.from_arrays(fmt.shape, fmt.arrays() | bad, {})


def test_special_values_round_trip():
    w = torch.tensor([[float("nan"), 0.0, float("inf")], [-float("inf"), 1e-38, -0.0]])
    for fmt in (CompactCSR.from_dense(w), Bitmask.from_dense(w)):
        back = fmt.to_dense()
        assert torch.equal(torch.isnan(back), torch.isnan(w))
        assert torch.equal(back[~torch.isnan(w)], w[~torch.isnan(w)])


def test_wide_layers_use_int32_indices():
    w = torch.zeros(2, 70000)
    w[0, 69999] = 3.0
    fmt = CompactCSR.from_dense(w)
    assert fmt.indices.dtype == np.int32
    assert torch.equal(fmt.to_dense(), w)


def test_nm_rejects_a_denser_group():
    w = torch.ones(2, 8)
    with pytest.raises(SparseforgeError, match="not NM"):
        PackedNM.from_dense(w, 2, 4)
    with pytest.raises(SparseforgeError, match="multiple of m"):
        PackedNM.from_dense(torch.zeros(2, 6), 2, 4)


def test_non_float32_weight_is_refused():
    with pytest.raises(SparseforgeError, match="float64"):
        CompactCSR.from_dense(torch.zeros(3, 3, dtype=torch.float64))


def test_inconsistent_arrays_are_refused():
    fmt = CompactCSR.from_dense(torch.eye(4))
    arrays = fmt.arrays() | {"indices": np.array([0, 1, 2, 9], dtype=np.uint16)}
    with pytest.raises(SparseforgeError, match="inconsistent"):
        CompactCSR.from_arrays(fmt.shape, arrays, {})
    bm = Bitmask.from_dense(torch.eye(4))
    with pytest.raises(SparseforgeError, match="set bits"):
        Bitmask.from_arrays(bm.shape, {"mask": bm.mask, "values": bm.values[:3]}, {})


def _all_formats(w: torch.Tensor):
    fmts = [CompactCSR.from_dense(w), Bitmask.from_dense(w), CompactDense.from_dense(w)]
    if w.shape[1] % 4 == 0:
        fmts.append(PackedNM.from_dense(nm_weight(w, 2, 4), 2, 4))
        if w.shape[0] % 2 == 0:
            fmts.append(BlockSparse.from_dense(w, 2, 4))
    return fmts


@needs_kernels
@pytest.mark.parametrize("shape", [(7, 13), (16, 64), (1, 1), (130, 72)])
@pytest.mark.parametrize("batch", [1, 3, 300])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("engine", ["default", "numba"])
def test_kernels_match_dense(shape, batch, density, engine, monkeypatch):
    """Every format against dense, on the default engine (C where built) and on the Numba fallback."""
    if engine == "numba":
        if not numba_available():
            pytest.fail("the Numba fallback must be installed with the package's kernels extra")
        monkeypatch.setattr(kernels, "get_library", lambda: None)  # as if no C compiler
    rng = np.random.default_rng(hash((shape, batch, density)) % 2**32)
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) >= density] = 0.0
    w[0, :] = 0.0  # an empty row
    x = rng.standard_normal((batch, shape[1])).astype(np.float32)
    for fmt in _all_formats(torch.from_numpy(w)):
        ref = x @ fmt.to_dense().numpy().T
        got = sparse_matmul(fmt, x)
        assert got.shape == (batch, shape[0]) and got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=fmt.name)


@needs_kernels
@pytest.mark.parametrize("batch", [1, 5])
def test_threaded_runner_matches_serial(batch):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((257, 96)).astype(np.float32)
    w[rng.random(w.shape) < 0.8] = 0.0
    w[100:140] = 0.0
    x = rng.standard_normal((batch, 96)).astype(np.float32)
    runner = KernelRunner(threads=3, min_rows_per_thread=1)
    for fmt in _all_formats(torch.from_numpy(w[:256])):
        serial = sparse_matmul(fmt, x, KernelRunner(threads=1))
        threaded = sparse_matmul(fmt, x, runner)
        np.testing.assert_array_equal(serial, threaded)  # rows never split: bitwise equal


@needs_kernels
def test_kernels_on_adversarial_values():
    w = torch.zeros(4, 8)
    w[1, 7] = 1e30
    w[2, 0] = -1e-30
    fmt = CompactCSR.from_dense(w)
    x = np.full((1, 8), 1e9, dtype=np.float32)
    got = sparse_matmul(fmt, x)
    assert np.isinf(got[0, 1]) and got[0, 0] == 0.0 and got[0, 3] == 0.0
