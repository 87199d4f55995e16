"""The sparse-input kernel (batch 1, sparse activations): formats, C kernel vs dense F.linear, the
PyTorch fallback, InputSparseLinear and its crossover switch, and convert / save / load / retune of
ThresholdedLinear layers (the thresholding must never be lost). No test asserts on wall time."""

from __future__ import annotations

import importlib
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from conftest import older_cpu_library, requires
from sparseforge.activations import ThresholdedLinear, drop_small
from sparseforge.errors import SparseforgeError
from sparseforge.inference import (
    FORMATS,
    InputSparseBitmask,
    InputSparseDense,
    InputSparseLinear,
    SparseLinear,
    autotune,
    convert,
    kernels,
    load_converted,
    native,
    retune,
    save_converted,
)
from sparseforge.inference.formats import Bitmask, CompactCSR
from sparseforge.inference.modules import BatchPlan

# the module, not the function of the same name that sparseforge.inference exports
convert_module = importlib.import_module("sparseforge.inference.convert")

needs_native = requires(native.native_available(), f"C kernels unavailable: {native.native_reason()}")
needs_cc = requires(bool(shutil.which("cc") or shutil.which("gcc")), "no C compiler (cc or gcc) on this machine")

TILES = (16, 32, 64, 128)


def _weight(rows: int, cols: int, density: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    if density < 1.0:
        w[torch.rand(rows, cols, generator=g) >= density] = 0.0
    return w


def _row(cols: int, active: float, seed: int = 1, threshold: float = 0.0) -> torch.Tensor:
    return autotune.sparse_input_sample(cols, active, threshold, torch.Generator().manual_seed(seed))


def _reference(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """What ThresholdedLinear computes: F.linear on the thresholded row, in float64 then rounded."""
    xd = drop_small(x.reshape(1, -1), torch.tensor(threshold))
    out = torch.nn.functional.linear(xd.double(), w.double(), None if bias is None else bias.double())
    return out.float()


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    assert got.shape == ref.shape and got.dtype == torch.float32
    scale = max(1.0, math.sqrt(ref.shape[-1]))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * scale, equal_nan=True)


def _formats(w: torch.Tensor) -> list[InputSparseDense | InputSparseBitmask]:
    return [*(InputSparseDense.from_dense(w, t) for t in TILES), InputSparseBitmask.from_dense(w)]


# --------------------------------------------------------------------------------------- formats
@given(
    rows=st.integers(1, 150),
    cols=st.integers(1, 90),
    density=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    seed=st.integers(0, 1000),
)
def test_input_sparse_formats_round_trip_exactly(rows, cols, density, seed):
    w = _weight(rows, cols, density, seed)
    for fmt in _formats(w):
        assert torch.equal(fmt.to_dense(), w), fmt.name
        again = type(fmt).from_arrays(fmt.shape, fmt.arrays(), fmt.params())
        assert torch.equal(again.to_dense(), w)
        assert fmt.nbytes == sum(a.nbytes for a in vars(fmt).values() if isinstance(a, np.ndarray))
    bm = InputSparseBitmask.from_dense(w)
    assert bm.nnz == int((w != 0).sum())
    assert bm.colptr[-1] == bm.nnz and bm.coloff.dtype == np.uint32


def test_input_sparse_formats_are_registered_and_refused_by_sparse_linear():
    assert FORMATS["input-sparse"] is InputSparseDense and FORMATS["input-sparse+bitmask"] is InputSparseBitmask
    fmt = InputSparseDense.from_dense(_weight(8, 8))
    with pytest.raises(SparseforgeError, match="not allowed in a SparseLinear"):
        SparseLinear(fmt, None, None, BatchPlan(((1, "sparse"),)))


def test_input_sparse_formats_refuse_bad_arguments_and_arrays():
    w = _weight(70, 9, 0.5)
    with pytest.raises(SparseforgeError, match=r"tile=48 is not allowed; allowed: one of \(16, 32, 64, 128\)"):
        InputSparseDense.from_dense(w, 48)
    with pytest.raises(SparseforgeError, match="dtype"):
        InputSparseDense.from_dense(w.double())
    dense = InputSparseDense.from_dense(w, 64)
    bad = dense.weight_t.copy()
    bad[0, 127] = 1.0  # a padding output (70 rows, padded to 128)
    for arrays, params in (
        ({"weight_t": bad}, {"tile": 64}),
        ({"weight_t": dense.weight_t}, {"tile": 32}),
        ({"weight_t": dense.weight_t[:5]}, {"tile": 64}),
        ({}, {"tile": 64}),
    ):
        with pytest.raises(SparseforgeError, match="input-sparse"):
            InputSparseDense.from_arrays((70, 9), arrays, params)
    bm = InputSparseBitmask.from_dense(w)
    mask = bm.mask.copy()
    mask[0, -1] |= np.uint64(1) << np.uint64(63)  # a bit in a padding output
    with pytest.raises(SparseforgeError, match="inconsistent"):
        InputSparseBitmask.from_arrays((70, 9), {"mask": mask, "values": bm.values}, {})
    with pytest.raises(SparseforgeError, match="set bits but"):
        InputSparseBitmask.from_arrays((70, 9), {"mask": bm.mask, "values": bm.values[:-1]}, {})


# ---------------------------------------------------------------------------------------- kernel
@needs_native
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 64), (65, 100), (130, 1), (200, 257), (1000, 33)])
@pytest.mark.parametrize("weight_density", [1.0, 0.5, 0.05])
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_kernel_matches_dense_on_random_rows(shape, weight_density, variant):
    rows, cols = shape
    w = _weight(rows, cols, weight_density, seed=rows * 7 + cols)
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(3))
    for fmt in _formats(w):
        for active, threshold in ((0.3, 0.0), (0.5, 0.7), (1.0, 0.0), (0.0, 0.2)):
            x = _row(cols, active, seed=cols, threshold=threshold)
            for b in (None, bias):
                y, n = kernels.input_sparse_matmul(fmt, x, threshold, b, variant=variant)
                assert y is not None and n == int((drop_small(x, torch.tensor(threshold)) != 0).sum())
                _close(y, _reference(x, w, b, threshold))


@needs_native
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_kernel_on_adversarial_rows(variant):
    rows, cols = 130, 70  # out not a multiple of any tile
    w = _weight(rows, cols, 0.6, seed=5)
    w[:, 10] = 0.0  # an empty column
    w[:, 11] = torch.linspace(-1, 1, rows) + 0.01  # a fully dense column
    w[64:128] = 0.0  # a whole empty tile (of 64 rows)
    bias = torch.randn(rows)
    rows_to_try = {
        "all zero": torch.zeros(1, cols),
        "all active": torch.randn(1, cols).abs() + 1.0,
        "first": torch.zeros(1, cols).index_fill_(1, torch.tensor([0]), 2.5),
        "last": torch.zeros(1, cols).index_fill_(1, torch.tensor([cols - 1]), -1.5),
        "middle": torch.zeros(1, cols).index_fill_(1, torch.tensor([cols // 2]), 0.75),
        "empty column only": torch.zeros(1, cols).index_fill_(1, torch.tensor([10]), 3.0),
        "dense column only": torch.zeros(1, cols).index_fill_(1, torch.tensor([11]), 3.0),
        "negative zero": torch.full((1, cols), -0.0),
    }
    for fmt in _formats(w):
        for label, x in rows_to_try.items():
            for b in (None, bias):
                y, n = kernels.input_sparse_matmul(fmt, x, 0.0, b, variant=variant)
                assert y is not None, label
                assert n == int((x != 0).sum()), label
                _close(y, _reference(x, w, b, 0.0))
        y, _ = kernels.input_sparse_matmul(fmt, torch.zeros(1, cols), 0.0, bias, variant=variant)
        assert torch.equal(y, bias.reshape(1, -1))  # nothing active: exactly the bias


@needs_native
@pytest.mark.parametrize("variant", [0, 1, 2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_inputs_propagate_as_in_dense(variant, bad):
    rows, cols = 70, 40
    w = _weight(rows, cols, 0.5, seed=2)
    w[3, 7] = 2.0  # kept at the bad input
    w[4, 7] = 0.0  # not kept there: dense gives 0 * inf = NaN
    for fmt in _formats(w):
        x = _row(cols, 0.5, seed=4, threshold=0.3)
        x[0, 7] = bad
        y, n = kernels.input_sparse_matmul(fmt, x, 0.3, None, variant=variant)
        ref = torch.nn.functional.linear(drop_small(x, torch.tensor(0.3)), w)
        assert y is not None and n == int((drop_small(x, torch.tensor(0.3)) != 0).sum())
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), (fmt.name, bad)
        assert torch.equal(torch.isposinf(y), torch.isposinf(ref))
        assert torch.equal(torch.isneginf(y), torch.isneginf(ref))
        assert torch.isnan(y[0, 4])


@needs_native
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_a_non_finite_weight_poisons_its_outputs_even_when_its_input_is_dropped(variant):
    # dense F.linear multiplies the dropped 0 by the NaN / inf weight: 0 * NaN = NaN; the kernel
    # keeps such columns active so the outputs agree
    rows, cols = 80, 33
    w = _weight(rows, cols, 0.5, seed=9)
    w[5, 2] = float("nan")
    w[70, 30] = float("inf")
    x = _row(cols, 0.4, seed=2, threshold=0.5)
    x[0, 2] = 0.1  # dropped (|x| <= 0.5)
    x[0, 30] = 0.0
    ref = torch.nn.functional.linear(drop_small(x, torch.tensor(0.5)), w)
    assert torch.isnan(ref[0, 5]) and torch.isnan(ref[0, 70])
    for fmt in _formats(w):
        y, n = kernels.input_sparse_matmul(fmt, x, 0.5, None, variant=variant)
        assert y is not None
        assert n == int((drop_small(x, torch.tensor(0.5)) != 0).sum()) + 2  # both forced columns
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), fmt.name
        finite = ~torch.isnan(ref)
        torch.testing.assert_close(y[finite], ref[finite], rtol=1e-4, atol=1e-4)


def test_the_kernel_realigns_the_layout_once_and_keeps_one_copy():
    w = _weight(100, 300, 0.5)
    for fmt in (InputSparseDense.from_dense(w), InputSparseBitmask.from_dense(w)):
        kernels.input_sparse_matmul(fmt, _row(300, 0.5))
        arrays = [a for a in vars(fmt).values() if isinstance(a, np.ndarray)]
        assert arrays and all(a.ctypes.data % kernels.INPUT_SPARSE_ALIGN == 0 for a in arrays)
        assert torch.equal(fmt.to_dense(), w)  # same content
        before = [a.ctypes.data for a in arrays]
        kernels.input_sparse_matmul(fmt, _row(300, 0.5))
        assert [a.ctypes.data for a in vars(fmt).values() if isinstance(a, np.ndarray)] == before


def test_bad_kernel_arguments_are_one_line_errors():
    fmt = InputSparseDense.from_dense(_weight(8, 10))
    for args, needle in (
        ((Bitmask.from_dense(_weight(8, 10)), torch.zeros(10)), "fmt=Bitmask is not allowed"),
        (
            (fmt, torch.zeros(11)),
            r"x=torch.float32 cpu tensor of shape \(11,\) is not allowed; allowed: a float32 CPU tensor of 10",
        ),
        ((fmt, torch.zeros(1, 10, dtype=torch.float64)), "x=torch.float64"),
        ((fmt, [0.0] * 10), "x=list"),
        ((fmt, torch.zeros(10), 0.0, torch.zeros(9)), r"bias=torch.float32 cpu tensor of shape \(9,\)"),
    ):
        with pytest.raises(SparseforgeError, match=needle):
            kernels.input_sparse_matmul(*args)


@needs_native
def test_max_active_stops_before_computing_and_counts():
    w = _weight(40, 100)
    fmt = InputSparseDense.from_dense(w)
    x = _row(100, 0.3, seed=1)
    assert kernels.input_sparse_matmul(fmt, x, 0.0, None, 29) == (None, 30)
    y, n = kernels.input_sparse_matmul(fmt, x, 0.0, None, 30)
    assert y is not None and n == 30
    assert kernels.input_sparse_matmul(fmt, x, 0.0, None, -1) == (None, 30)  # count only
    assert kernels.input_sparse_matmul(fmt, torch.zeros(100), 0.0, None, 0)[1] == 0


@needs_native
@pytest.mark.parametrize("threading", ["openmp", "pool"])
def test_results_do_not_depend_on_the_thread_count(threading):
    w = _weight(700, 600, 0.5, seed=4)
    x = _row(600, 0.6, seed=3)
    bias = torch.randn(700)
    before = native.threading_mode()
    try:
        native.set_threading(threading)
        for fmt in (InputSparseDense.from_dense(w), InputSparseBitmask.from_dense(w)):
            ref, _ = kernels.input_sparse_matmul(fmt, x, 0.0, bias, threads=1)
            for threads in (2, 3, 7):
                got, _ = kernels.input_sparse_matmul(fmt, x, 0.0, bias, threads=threads)
                assert torch.equal(got, ref), (fmt.name, threads)
    finally:
        native.set_threading(before or "pool")


@needs_native
@given(
    rows=st.integers(1, 140),
    cols=st.integers(1, 140),
    weight_density=st.sampled_from([0.0, 0.2, 0.7, 1.0]),
    active=st.floats(0.0, 1.0),
    threshold=st.sampled_from([0.0, 0.25, 1.0]),
    bias=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_kernel_property_native_equals_fallback_equals_dense(rows, cols, weight_density, active, threshold, bias, seed):
    w = _weight(rows, cols, weight_density, seed)
    b = torch.randn(rows, generator=torch.Generator().manual_seed(seed)) if bias else None
    x = _row(cols, active, seed=seed + 1, threshold=threshold)
    ref = _reference(x, w, b, threshold)
    for fmt in (InputSparseDense.from_dense(w, 64), InputSparseBitmask.from_dense(w)):
        got, n = kernels.input_sparse_matmul(fmt, x, threshold, b)
        slow, n_slow = kernels._input_sparse_torch(fmt, x.reshape(-1), threshold, b, cols)
        assert got is not None and slow is not None and n == n_slow
        _close(got, ref)
        _close(slow, got)


def test_fallback_without_the_c_library_gives_the_same_results(monkeypatch):
    w = _weight(150, 90, 0.5, seed=8)
    bias = torch.randn(150)
    x = _row(90, 0.4, seed=2, threshold=0.1)
    native_out = {}
    if native.native_available():
        for fmt in _formats(w):
            native_out[fmt.name, fmt.params().get("tile")] = kernels.input_sparse_matmul(fmt, x, 0.1, bias)
    monkeypatch.setattr(kernels, "get_library", lambda: None)
    assert not kernels.input_sparse_native()
    for fmt in _formats(w):
        got, n = kernels.input_sparse_matmul(fmt, x, 0.1, bias)
        assert got is not None
        _close(got, _reference(x, w, bias, 0.1))
        assert kernels.input_sparse_matmul(fmt, x, 0.1, bias, n - 1) == (None, n)
        if native_out:
            ref, n_native = native_out[fmt.name, fmt.params().get("tile")]
            assert n == n_native
            _close(got, ref)


# A build that targets a CPU without AVX-512 (or without AVX2) must compile and compute the same:
# a compiler wrapper swaps -march=native for an older target.
@needs_cc
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])
def test_builds_without_avx512_or_avx2_compute_the_same(tmp_path, march):
    lib = older_cpu_library(tmp_path, march)
    assert lib.sf_has_avx512() == 0 and lib.sf_has_avx2() == (1 if march == "x86-64-v3" else 0)
    w = _weight(130, 77, 0.5, seed=6)
    bias = torch.randn(130)
    x = _row(77, 0.5, seed=7, threshold=0.2)
    x[0, 3] = float("nan")
    ref = _reference(x, w, bias, 0.2)
    for fmt in _formats(w):
        out = torch.empty(1, 130)
        if isinstance(fmt, InputSparseDense):
            n = lib.sf_insparse_dense(
                fmt.weight_t.ctypes.data, fmt.tile, 130, 77, x.data_ptr(), 0.2, None, bias.data_ptr(),
                out.data_ptr(), 77, 2, 0, 2,
            )  # fmt: skip
        else:
            n = lib.sf_insparse_bitmask(
                fmt.mask.ctypes.data, fmt.colptr.ctypes.data, fmt.coloff.ctypes.data, fmt.values.ctypes.data,
                fmt.nnz, 130, 77, x.data_ptr(), 0.2, None, bias.data_ptr(), out.data_ptr(), 77, 2, 0, 2,
            )  # fmt: skip
        assert n == int((drop_small(x, torch.tensor(0.2)) != 0).sum())
        _close(out, ref)


# ---------------------------------------------------------------------------------------- module
def _module(w, bias, max_active, threshold=0.3, fmt_cls=InputSparseDense):
    return InputSparseLinear(
        fmt_cls.from_dense(w),
        max_active,
        threshold,
        0.5,
        None,
        w.clone(),
        bias,
        BatchPlan(((1, "dense"),)),
    )


def test_input_sparse_linear_switches_to_the_plain_path_above_the_crossover():
    w, bias = _weight(96, 200, seed=1), torch.randn(96)
    layer = _module(w, bias, max_active=100)
    sparse_row = _row(200, 0.3, seed=1, threshold=0.3)
    dense_row = _row(200, 0.9, seed=2, threshold=0.3)
    with torch.inference_mode():
        y_sparse = layer(sparse_row)
        y_dense = layer(dense_row)
        y_rows = layer(torch.cat([sparse_row, dense_row]))
    expect = "input-sparse" if kernels.input_sparse_native() else "plain"
    if expect == "input-sparse":
        assert layer.path_counts == {"input-sparse": 1, "above-crossover": 1, "plain": 1}
    else:  # no C library: one row runs the plain path too
        assert layer.path_counts == {"input-sparse": 0, "above-crossover": 0, "plain": 3}
    _close(y_sparse, _reference(sparse_row, w, bias, 0.3))
    _close(y_dense, _reference(dense_row, w, bias, 0.3))
    _close(y_rows, torch.cat([_reference(r, w, bias, 0.3) for r in (sparse_row, dense_row)]))
    assert layer.crossover == 0.5 and "1 row with <= 100 of 200 inputs active (50%): input-sparse" in repr(layer)


def test_input_sparse_linear_accepts_any_leading_dims_like_nn_linear():
    w = _weight(20, 30, 0.5)
    layer = _module(w, None, max_active=30, fmt_cls=InputSparseBitmask)
    ref = ThresholdedLinear(30, 20, bias=False, threshold=0.3)
    with torch.no_grad():
        ref.weight.copy_(w)
    with torch.inference_mode():
        for shape in ((30,), (1, 30), (1, 1, 30), (2, 3, 30), (0, 30)):
            x = torch.randn(*shape)
            got = layer(x)
            assert got.shape == ref(x).shape
            _close(got, ref(x))
        assert layer(torch.randn(4, 30)[:, ::1][::4]).shape == (1, 20)


def test_input_sparse_linear_refuses_bad_arguments():
    w = _weight(10, 12)
    fmt = InputSparseDense.from_dense(w)
    plan = BatchPlan(((1, "dense"),))
    for kwargs, needle in (
        ({"max_active": 13}, r"max_active=13 is not allowed; allowed: an int in \[0, 12\]"),
        ({"max_active": True}, "max_active=True"),
        ({"threshold": -1.0}, "threshold=-1.0 is not allowed"),
        ({"threshold": float("nan")}, "threshold=nan"),
        ({"input_sparsity": 1.0}, "input sparsity=1.0"),
        ({"input_packed": InputSparseDense.from_dense(_weight(10, 11))}, "of shape \\(10, 12\\)"),
        ({"input_variant": 3}, "input_variant=3"),
    ):
        args = {"input_packed": fmt, "max_active": 5, "threshold": 0.1, "input_sparsity": 0.5, **kwargs}
        with pytest.raises(SparseforgeError, match=needle):
            InputSparseLinear(
                args.pop("input_packed"), args.pop("max_active"), args.pop("threshold"), args.pop("input_sparsity"),
                None, w, None, plan, **args,
            )  # fmt: skip
    layer = InputSparseLinear(fmt, 5, 0.1, 0.5, None, w, None, plan)
    with pytest.raises(SparseforgeError, match="does not fit"):
        layer(torch.randn(1, 11))
    with pytest.raises(SparseforgeError, match="inference-only"):
        layer(torch.randn(1, 12, requires_grad=True))


# --------------------------------------------------------------------------------------- convert
def _thresholded_model(weight_density: float, input_sparsity: float, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    first = ThresholdedLinear(96, 160, threshold=0.6745, sparsity=input_sparsity)  # |N(0,1)| <= 0.6745: half
    model = nn.Sequential(first, nn.ReLU(), nn.Linear(160, 32)).eval()
    with torch.no_grad():
        first.weight.mul_((torch.rand_like(first.weight) < weight_density).float())
    return model


def _inputs() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return [torch.randn(1, 96, generator=g), torch.randn(5, 96, generator=g), torch.randn(2, 3, 96, generator=g)]


def _same_outputs(a: nn.Module, b: nn.Module) -> None:
    with torch.inference_mode():
        for x in _inputs():
            torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("autotune_on", [False, True])
def test_convert_never_loses_the_threshold_of_a_pruned_thresholded_layer(autotune_on):
    # a pruned ThresholdedLinear used to become a plain SparseLinear (a nn.Linear subclass): its
    # thresholding was silently dropped. With autotune=False the rule packs this 80 %-sparse
    # weight in CSR, so the old behaviour is deterministic here.
    model = _thresholded_model(weight_density=0.2, input_sparsity=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, report = convert(model, batch_sizes=(1, 4), autotune=autotune_on, reps=2)
    _same_outputs(fast, model)
    first = fast[0]
    assert isinstance(first, (InputSparseLinear, ThresholdedLinear))
    assert float(first.input_threshold) == pytest.approx(0.6745)
    decision = report.layers[0]
    assert decision.layer_type == "ThresholdedLinear" and decision.input_sparsity == 0.5
    if not autotune_on:  # the rule: CSR for the weight, the sparse-input kernel for one row
        assert isinstance(first, InputSparseLinear) and decision.action == "sparse"
        assert decision.format == "input-sparse+bitmask" and decision.crossover == autotune.RULE_CROSSOVER
        assert first.packed is not None and first.packed.name == "csr"
        assert first.max_active == 48
        assert "input sparsity 0.500" in str(report) and "input-sparse+bitmask by rule" in decision.reason


def test_convert_rule_keeps_an_unpruned_thresholded_layer_thresholded():
    for sparsity, expect in ((0.6, InputSparseLinear), (0.2, ThresholdedLinear)):
        model = _thresholded_model(weight_density=1.0, input_sparsity=sparsity)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fast, report = convert(model, autotune=False)
        assert type(fast[0]) is expect
        _same_outputs(fast, model)
        if expect is InputSparseLinear:
            assert report.layers[0].format == "input-sparse" and fast[0].dense_weight is not None
            assert "1 row with <= 48 of 96 inputs active" in report.layers[0].plan
        else:
            assert report.layers[0].action == "dense" and report.layers[0].crossover is None


def test_convert_keeps_thresholded_layers_when_kernels_are_unavailable(monkeypatch):
    model = _thresholded_model(weight_density=0.2, input_sparsity=0.5)
    monkeypatch.setattr(convert_module, "unavailable_reason", lambda: "no kernels here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, report = convert(model)
    assert type(fast[0]) is ThresholdedLinear and report.layers[0].action == "dense"
    _same_outputs(fast, model)


def test_a_model_without_thresholded_layers_converts_as_before():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        model[0].weight[torch.rand(64, 64) < 0.9] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, report = convert(model, autotune=False)
    assert type(fast[0]) is SparseLinear and not any(isinstance(m, InputSparseLinear) for m in fast.modules())
    assert all(d.input_sparsity is None and d.crossover is None for d in report.layers)
    assert "input sparsity" not in str(report)


def _fake_measure(times_ms):
    """A _measure_batch stand-in: ms per key from ``times_ms(key)`` (no timing at all)."""

    def measure(fns, reps, margin, predicted):
        return {k: times_ms(k) for k in fns}, None

    return measure


def test_measured_crossover_is_the_largest_fraction_up_to_which_the_kernel_wins(monkeypatch):
    w = _weight(64, 100)
    plain = autotune.LayerChoice(None, {1: "dense"}, "dense")

    def kernel_ms(key):  # dense 1.0 ms; the kernel 0.3 + 0.8 * active fraction
        return 1.0 if key == "dense" else 0.3 + 0.8 * float(key.split("@")[1])

    monkeypatch.setattr(autotune, "_measure_batch", _fake_measure(kernel_ms))
    choice = autotune.measure_input_sparse(w, None, 0.5, 0.6, plain)
    # timed at 40 % (calibrated) and 50, 62.5, 75, 87.5, 100 %: wins by 10 % up to 75 % (0.9 ms)
    assert isinstance(choice.packed, InputSparseDense)
    assert choice.crossover == 0.75 and choice.max_active == 75
    assert "crossover 75% active inputs" in choice.reason and "not at 88%" in choice.reason
    assert set(choice.timings_ms) == {"plain:dense"} | {
        f"input-sparse@{d:.3f}" for d in (0.4, 0.5, 0.625, 0.75, 0.875, 1.0)
    }

    monkeypatch.setattr(autotune, "_measure_batch", _fake_measure(lambda k: 1.0 if k == "dense" else 0.95))
    lost = autotune.measure_input_sparse(w, None, 0.5, 0.6, plain)
    assert lost.packed is None and lost.max_active == 0 and "no sparse-input kernel beat" in lost.reason


def test_measured_choice_prefers_the_weight_sparse_layout_when_it_is_faster(monkeypatch):
    w = _weight(64, 100, 0.5)
    plain = autotune.LayerChoice(None, {1: "dense"}, "dense")

    def kernel_ms(key):
        if key == "dense":
            return 1.0
        d = float(key.split("@")[1])
        return (0.2 if key.startswith("input-sparse+bitmask") else 0.4) + 0.5 * d

    monkeypatch.setattr(autotune, "_measure_batch", _fake_measure(kernel_ms))
    choice = autotune.measure_input_sparse(w, None, 0.0, 0.5, plain)
    assert isinstance(choice.packed, InputSparseBitmask) and choice.crossover == 1.0 and choice.max_active == 100


@needs_native
def test_measured_conversion_runs_end_to_end_and_reports_the_choice():
    model = _thresholded_model(weight_density=0.5, input_sparsity=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, report = convert(model, batch_sizes=(1, 4), reps=2)
    _same_outputs(fast, model)
    d = report.layers[0]
    assert "one row:" in d.reason and "plain path:" in d.reason
    assert any(k.startswith("plain:") for k in d.timings_ms)
    assert any(k.startswith("input-sparse@") for k in d.timings_ms)
    if isinstance(fast[0], InputSparseLinear) and fast[0].input_packed is not None:
        assert d.format == fast[0].input_packed.name and d.crossover is not None
        assert fast[0].max_active == math.floor(d.crossover * 96 + 1e-9)


# ----------------------------------------------------------------------------- save, load, retune
def _converted_by_rule(weight_density: float) -> tuple[nn.Sequential, nn.Module]:
    model = _thresholded_model(weight_density=weight_density, input_sparsity=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, _ = convert(model, batch_sizes=(1, 4), autotune=False)
    assert isinstance(fast[0], InputSparseLinear)
    return model, fast


@pytest.mark.parametrize("weight_density", [1.0, 0.2])
@pytest.mark.parametrize("skeleton_layer", ["thresholded", "linear"])
def test_save_load_round_trips_the_threshold_and_the_kernel_choice(tmp_path, weight_density, skeleton_layer):
    model, fast = _converted_by_rule(weight_density)
    path = save_converted(tmp_path / "m.sf.safetensors", fast)
    first = ThresholdedLinear(96, 160) if skeleton_layer == "thresholded" else nn.Linear(96, 160)
    again = load_converted(path, nn.Sequential(first, nn.ReLU(), nn.Linear(160, 32)))
    layer, orig = again[0], fast[0]
    assert isinstance(layer, InputSparseLinear)
    assert float(layer.input_threshold) == float(orig.input_threshold)
    assert float(layer.input_sparsity) == float(orig.input_sparsity)
    assert layer.max_active == orig.max_active and layer.format_names == orig.format_names
    assert layer.describe_plan() == orig.describe_plan()
    with torch.inference_mode():
        for x in _inputs():
            assert torch.equal(again(x), fast(x))
    _same_outputs(again, model)


def test_load_refuses_a_corrupted_input_sparse_entry(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    _, fast = _converted_by_rule(1.0)
    path = save_converted(tmp_path / "m.sf.safetensors", fast)
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta["sparseforge.layers"])
    layers["0"]["max_active"] = 10_000
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={**meta, "sparseforge.layers": json.dumps(layers)})
    skeleton = nn.Sequential(ThresholdedLinear(96, 160), nn.ReLU(), nn.Linear(160, 32))
    with pytest.raises(SparseforgeError, match="max_active=10000 is not allowed"):
        load_converted(tmp_path / "bad.safetensors", skeleton)
    assert type(skeleton[0]) is ThresholdedLinear  # untouched


def test_retune_keeps_the_threshold_and_falls_back_to_thresholded_linear(monkeypatch):
    model, fast = _converted_by_rule(1.0)
    monkeypatch.setattr(convert_module, "unavailable_reason", lambda: "no kernels here")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, report = retune(fast)
    assert type(again[0]) is ThresholdedLinear and report.layers[0].layer_type == "InputSparseLinear"
    assert torch.equal(again[0].input_threshold, model[0].input_threshold)
    assert torch.equal(again[0].input_sparsity, model[0].input_sparsity)
    _same_outputs(again, model)


def test_sparse_input_sample_has_the_requested_active_fraction():
    for threshold in (0.0, 0.5):
        x = _row(1000, 0.37, seed=4, threshold=threshold)
        assert int((x.abs() > threshold).sum()) == 370
        assert float(x.abs().max()) > threshold and float(x[x.abs() <= threshold].abs().max()) <= threshold


def test_bitmask_and_csr_weights_are_unaffected_by_the_new_formats():
    w = _weight(33, 70, 0.3)
    for cls in (Bitmask, CompactCSR):
        assert torch.equal(cls.from_dense(w).to_dense(), w)
