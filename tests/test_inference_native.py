"""The compiled C kernels (native.py, csrc/spmm.c): correctness vs dense, threading, build cache, fallbacks."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import requires
from sparseforge.inference import SparseLinear, convert, kernels, native
from sparseforge.inference.formats import Bitmask, BlockSparse, CompactCSR
from sparseforge.inference.kernels import KernelRunner, sparse_matmul
from sparseforge.inference.modules import BatchPlan

# Both fail instead of skipping under CI=true (see conftest.requires).
needs_native = requires(native.native_available(), f"C kernels unavailable: {native.native_reason()}")
needs_cc = requires(bool(shutil.which("cc") or shutil.which("gcc")), "no C compiler (cc or gcc) on this machine")


def _weight(rows: int, cols: int, density: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[rng.random((rows, cols)) >= density] = 0.0
    return w


def _check(fmt, x: np.ndarray, w: np.ndarray, **kw) -> np.ndarray:
    got = sparse_matmul(fmt, x, **kw)
    ref = (torch.from_numpy(x).double() @ torch.from_numpy(w).double().T).float().numpy()
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(
        got, ref, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(x).max()) * np.sqrt(w.shape[1])), err_msg=fmt.name
    )
    return got


@needs_native
@pytest.mark.parametrize("shape", [(7, 13), (1, 1), (33, 64), (70, 200), (64, 129)])
@pytest.mark.parametrize("batch", [1, 2, 9, 16, 40, 300])
@pytest.mark.parametrize("density", [0.0, 0.03, 0.3, 0.5, 0.9, 1.0])
def test_native_matches_dense(shape, batch, density):
    w = _weight(*shape, density, seed=shape[0] * 1000 + batch)
    w[shape[0] // 2, :] = 0.0  # an empty row in the middle
    x = np.random.default_rng(batch).standard_normal((batch, shape[1])).astype(np.float32)
    for fmt in (CompactCSR.from_dense(w), Bitmask.from_dense(w)):
        assert kernels.has_native_kernel(fmt)
        _check(fmt, x, w)


@needs_native
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_both_spmv_variants_match_dense(monkeypatch, variant):
    w = _weight(300, 520, 0.4, seed=3)
    x = np.random.default_rng(0).standard_normal((1, 520)).astype(np.float32)
    monkeypatch.setattr(kernels, "CSR_SPMV_VARIANT", variant)
    monkeypatch.setattr(kernels, "BITMASK_SPMV_VARIANT", variant)
    for fmt in (CompactCSR.from_dense(w), Bitmask.from_dense(w)):
        _check(fmt, x, w)


@needs_native
def test_all_zero_layer_and_dense_last_row():
    x = np.ones((3, 100), dtype=np.float32)
    zero = np.zeros((5, 100), dtype=np.float32)
    assert sparse_matmul(CompactCSR.from_dense(zero), x[:0]).shape == (0, 5)  # empty batch
    for fmt in (CompactCSR.from_dense(zero), Bitmask.from_dense(zero)):
        assert np.array_equal(sparse_matmul(fmt, x), np.zeros((3, 5), np.float32))
        assert np.array_equal(sparse_matmul(fmt, x[:1]), np.zeros((1, 5), np.float32))
    # all values in the last rows: the expand kernel must not read past the values array
    w = np.zeros((4, 256), dtype=np.float32)
    w[-1] = np.arange(1, 257, dtype=np.float32) / 256
    w[-2, :3] = 1.0
    for b in (1, 7):
        _check(Bitmask.from_dense(w), np.random.default_rng(b).standard_normal((b, 256)).astype(np.float32), w)


@needs_native
def test_int32_indices_for_wide_layers():
    w = np.zeros((3, 70000), dtype=np.float32)
    w[0, 69999], w[2, 5], w[2, 65536] = 3.0, -1.0, 2.0
    fmt = CompactCSR.from_dense(w)
    assert fmt.indices.dtype == np.int32
    x = np.random.default_rng(0).standard_normal((2, 70000)).astype(np.float32)
    for b in (1, 2):
        _check(fmt, x[:b], w)


@pytest.fixture(params=["openmp", "pool"])
def threading(request):
    """Run the test under each threading runtime of the C library, then restore the default."""
    before = native.threading_mode()
    got = native.set_threading(request.param)
    if request.param == "openmp" and not native.get_library().sf_openmp_available():
        assert got == "pool"  # built without OpenMP: the pool stands in
    else:
        assert got == request.param
    yield got
    native.set_threading(before)


@needs_native
@pytest.mark.parametrize("batch", [1, 24])
def test_results_do_not_depend_on_thread_count(monkeypatch, batch, threading):
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0)  # use the threads even for this small layer
    w = _weight(1003, 300, 0.2, seed=5)
    w[100:300] = 0.0  # unbalanced rows
    x = np.random.default_rng(1).standard_normal((batch, 300)).astype(np.float32)
    for fmt in (CompactCSR.from_dense(w), Bitmask.from_dense(w)):
        one = sparse_matmul(fmt, x, KernelRunner(threads=1))
        _check(fmt, x, w)
        for t in (2, 3, 7):
            np.testing.assert_array_equal(one, sparse_matmul(fmt, x, KernelRunner(threads=t)))


@needs_native
def test_both_threading_runtimes_give_identical_results(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0)
    w = _weight(700, 257, 0.1, seed=8)
    before = native.threading_mode()
    try:
        outs = {}
        for mode in ("pool", "openmp"):
            native.set_threading(mode)
            for batch in (1, 5, 40):
                x = np.random.default_rng(batch).standard_normal((batch, 257)).astype(np.float32)
                outs[mode, batch] = [
                    sparse_matmul(f, x, KernelRunner(threads=2))
                    for f in (CompactCSR.from_dense(w), Bitmask.from_dense(w))
                ]
        for batch in (1, 5, 40):
            for a, b in zip(outs["pool", batch], outs["openmp", batch], strict=True):
                np.testing.assert_array_equal(a, b)
    finally:
        native.set_threading(before)


@needs_native
def test_default_threading_is_openmp_where_the_compiler_has_it():
    lib = native.get_library()
    code = "from sparseforge.inference import native; print(native.threading_mode())"
    env = {k: v for k, v in os.environ.items() if k != native.THREADING_ENV}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.strip() == ("openmp" if lib.sf_openmp_available() else "pool")
    env[native.THREADING_ENV] = "pool"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "pool"


def test_bad_threading_names_are_refused():
    from sparseforge.errors import SparseforgeError

    with pytest.raises(SparseforgeError, match="'tbb'.*allowed: \\['openmp', 'pool'\\]"):
        native.set_threading("tbb")
    code = "from sparseforge.inference import native; native.get_library()"
    env = dict(os.environ, **{native.THREADING_ENV: "fibers"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode != 0 and "SPARSEFORGE_THREADING='fibers' is not allowed" in out.stderr


@needs_native
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_child_runs_on_the_pool_after_the_parent_used_openmp():
    """libgomp's threads do not survive fork(): a child must not enter an OpenMP region (it would
    wait forever for the parent's team), so the library switches the child to its pool."""
    code = """
import os, sys, torch
from sparseforge.inference import native, kernels
from sparseforge.inference.formats import CompactCSR
from sparseforge.inference.kernels import sparse_matmul_tensor
native.set_threading("openmp")
w = torch.randn(512, 512) * (torch.rand(512, 512) < 0.5)
x = torch.randn(3, 512)
f = CompactCSR.from_dense(w)
ref = sparse_matmul_tensor(f, x)  # parent: a parallel region (512 * 256 kept x 3 rows of work)
pid = os.fork()
if pid == 0:
    y = sparse_matmul_tensor(f, x)
    os._exit(0 if torch.equal(y, ref) and native.threading_mode() == "pool" else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), native.threading_mode())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-800:]
    expected = "openmp" if native.get_library().sf_openmp_available() else "pool"
    assert out.stdout.split() == ["0", expected]


@needs_cc
def test_build_without_openmp_when_the_compiler_lacks_it(tmp_path):
    """A compiler that rejects -fopenmp still gets a library (pool only)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    fake = tmp_path / "cc-no-openmp"
    fake.write_text(
        f'#!/bin/sh\ncase " $* " in *" -fopenmp "*) echo "error: unsupported option" >&2; exit 1;; esac\nexec {cc} "$@"\n'
    )
    fake.chmod(0o755)
    out_dir = tmp_path / "cache"
    path = native.build_library(compiler=[str(fake)], directory=out_dir)
    lib = native.load_library(path)
    assert lib.sf_openmp_available() == 0
    assert lib.sf_set_threading(native.THREADING_MODES["openmp"]) == native.THREADING_MODES["pool"]
    assert [p.name for p in out_dir.iterdir()] == [path.name]


@needs_native
@pytest.mark.parametrize("batch", [2, 24, 70, 130])
@pytest.mark.parametrize("block_bytes", [256, 1000, 4096])
def test_column_blocked_csr_spmm(monkeypatch, batch, block_bytes):
    """Small CSR_SPMM_BLOCK_BYTES forces the column-blocked SpMM (several blocks, row groups,
    empty rows, blocks without a kept weight): matches dense and does not depend on threads."""
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0)
    monkeypatch.setattr(kernels, "CSR_SPMM_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(kernels, "CSR_SPMM_BLOCK_ROWS", 37)
    w = _weight(301, 700, 0.05, seed=batch)
    w[10:60] = 0.0
    w[:, 128:400] = 0.0  # whole blocks with no kept weight
    x = np.random.default_rng(batch).standard_normal((batch, 700)).astype(np.float32)
    ldx = (batch + 7) // 8 * 8
    assert 0 < kernels.spmm_block_cols(700, ldx) < 700
    fmt = CompactCSR.from_dense(w)
    one = _check(fmt, x, w, runner=KernelRunner(threads=1))
    for t in (2, 3, 7):
        np.testing.assert_array_equal(one, sparse_matmul(fmt, x, KernelRunner(threads=t)))


def test_spmm_block_cols_rule():
    assert kernels.spmm_block_cols(4096, 32) == 0  # xt 512 KB: fits L2, unblocked
    assert kernels.spmm_block_cols(4096, 128) == kernels.CSR_SPMM_BLOCK_BYTES // 512
    assert kernels.spmm_block_cols(60, 4096) == 0  # one block (>= 64 columns) would cover every column


@needs_native
@pytest.mark.parametrize("fmt_cls", [CompactCSR, Bitmask])
def test_sparse_linear_on_native_kernels_any_input_layout(fmt_cls):
    torch.manual_seed(0)
    w = torch.from_numpy(_weight(24, 40, 0.3, seed=9))
    b = torch.randn(24)
    layer = SparseLinear(fmt_cls.from_dense(w), None, b, BatchPlan.from_choices({1: "sparse"}))
    with torch.inference_mode():
        for x in (torch.randn(40), torch.randn(2, 3, 40), torch.randn(40, 300).t(), torch.randn(300, 40)):
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@needs_native
def test_concurrent_python_threads_share_the_pool(monkeypatch):
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0)
    from concurrent.futures import ThreadPoolExecutor

    w = _weight(500, 256, 0.2, seed=2)
    fmt = CompactCSR.from_dense(w)
    xs = [np.random.default_rng(i).standard_normal((i % 3 * 8 + 1, 256)).astype(np.float32) for i in range(24)]
    refs = [sparse_matmul(fmt, x, KernelRunner(threads=1)) for x in xs]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: sparse_matmul(fmt, x, KernelRunner(threads=2)), xs))
    for ref, out in zip(refs, outs, strict=True):
        np.testing.assert_array_equal(ref, out)


# ---------------------------------------------------------------- build, cache, fallback
def test_missing_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSEFORGE_CC", "sparseforge-no-such-compiler")
    monkeypatch.setenv("SPARSEFORGE_CACHE", str(tmp_path))
    native._reset_for_tests()
    try:
        with pytest.warns(RuntimeWarning, match="C kernels unavailable.*no-such-compiler") as rec:
            assert native.get_library() is None
        assert len(rec) == 1 and "\n" not in str(rec[0].message)
        assert "not found" in native.native_reason()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no second warning
            assert native.get_library() is None
        w = _weight(20, 30, 0.3)
        x = np.random.default_rng(0).standard_normal((3, 30)).astype(np.float32)
        fmt = CompactCSR.from_dense(w)
        if kernels.numba_available():
            _check(fmt, x, w)  # Numba kernels take over
        # neither C nor Numba: convert keeps everything dense and says why
        monkeypatch.setattr(kernels, "_IMPORT_ERROR", "numba is not importable (simulated)")
        assert not kernels.kernels_available() and "simulated" in kernels.unavailable_reason()
        model = torch.nn.Sequential(torch.nn.Linear(30, 20))
        with torch.no_grad():
            model[0].weight.copy_(torch.from_numpy(w))
        with pytest.warns(UserWarning, match="kernels unavailable"):
            fast, report = convert(model, autotune=False)
        assert report.sparse_layers == []
        with torch.inference_mode():
            torch.testing.assert_close(fast(torch.from_numpy(x)), model(torch.from_numpy(x)))
    finally:
        monkeypatch.undo()
        native._reset_for_tests()
    assert not list(tmp_path.iterdir())


def test_failing_compile_is_reported_in_one_line(tmp_path):
    with pytest.raises(native.NativeBuildError, match="failed|does not run") as info:
        native.build_library(compiler=["false"], directory=tmp_path)
    assert "\n" not in str(info.value)
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


@needs_native
def test_concurrent_first_compile_is_safe(tmp_path):
    code = (
        "import sys; from pathlib import Path; from sparseforge.inference import native; "
        "p = native.build_library(directory=Path(sys.argv[1])); lib = native.load_library(p); "
        "print(p.name, lib.sf_has_avx2())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    names = {o[0].split()[0] for o in outs}
    assert len(names) == 1
    files = sorted(os.listdir(tmp_path))
    assert files == [names.pop()], files  # one library, no temporary files left behind
    # a second build is a cache hit (no compiler call needed)
    assert native.build_library(directory=tmp_path).name in files


@needs_native
def test_autotune_times_both_csr_spmv_variants_and_pins_the_winner():
    from sparseforge.inference.autotune import measure_layer

    w = torch.from_numpy(_weight(256, 512, 0.05, seed=4))
    choice = measure_layer(w, None, (1, 8), reps=2, margin=-1.0)  # margin -1: sparse always "wins"
    assert {"dense", "csr", "csr[gather]", "bitmask"} <= set(choice.timings_ms)
    assert choice.timings_ms["csr[gather]"][8] == choice.timings_ms["csr"][8]  # same kernel above batch 1
    assert choice.packed is not None and "dense" not in set(choice.choices.values())  # some packed format everywhere
    x = np.random.default_rng(0).standard_normal((1, 512)).astype(np.float32)
    _check(choice.packed, x, w.numpy())


def test_autotune_margin_keeps_dense_when_sparse_is_not_clearly_faster():
    from sparseforge.inference.autotune import measure_layer

    w = torch.from_numpy(_weight(64, 64, 0.9, seed=1))
    choice = measure_layer(w, None, (1,), reps=2, margin=1e9)  # no kernel can be 1e9x faster
    assert choice.packed is None and choice.choices == {1: "dense"} and "by >=" in choice.reason


@needs_native
def test_deepcopy_of_a_used_layer_does_not_share_array_addresses():
    import copy
    import gc

    w = torch.from_numpy(_weight(64, 96, 0.2, seed=7))
    layer = SparseLinear(CompactCSR.from_dense(w), None, None, BatchPlan.from_choices({1: "sparse"}))
    x = torch.randn(3, 96)
    with torch.inference_mode():
        layer(x)  # builds the native plan (raw addresses) for this weight
        clone = copy.deepcopy(layer)
        del layer
        gc.collect()
        _ = [np.ones(10_000, np.float32) for _ in range(50)]  # reuse the freed memory
        torch.testing.assert_close(clone(x), torch.nn.functional.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_native
@pytest.mark.parametrize(
    "m,n,mpad",
    # the kernel moves 32 x 32 tiles of 8 x 8 blocks: row and column counts on and off those edges
    [(1, 1, 8), (9, 17, 16), (128, 4096, 128), (300, 70, 304), (8, 8, 8), (37, 3, 40), (72, 40, 72), (101, 77, 112)],
)
@pytest.mark.parametrize("threads", [1, 3])
def test_native_transpose_is_exact_and_zero_pads(m, n, mpad, threads):
    lib = native.get_library()
    src = torch.randn(m, n)
    dst = torch.full((n, mpad), float("nan"))
    lib.sf_transpose(src.data_ptr(), m, n, n, dst.data_ptr(), mpad, mpad, threads)
    assert torch.equal(dst[:, :m], src.t())
    assert torch.equal(dst[:, m:], torch.zeros(n, mpad - m))


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_native_transpose_of_strided_rows_into_wider_rows(threads):
    # source rows longer than n (a column slice) and destination rows longer than mpad: nothing
    # outside the m x n source and the n x mpad destination is read or written
    lib = native.get_library()
    wide = torch.randn(67, 90)
    src = wide[:, 5:75]  # 67 x 70, row stride 90
    dst = torch.full((70, 100), float("nan"))
    lib.sf_transpose(src.data_ptr(), 67, 70, 90, dst.data_ptr(), 100, 72, threads)
    assert torch.equal(dst[:, :67], src.t())
    assert torch.equal(dst[:, 67:72], torch.zeros(70, 5))
    assert torch.isnan(dst[:, 72:]).all()


@needs_native
@pytest.mark.parametrize("batch", [1, 5])
def test_bias_added_in_the_kernel_is_bitwise_the_bias_added_afterwards(monkeypatch, batch, threading):
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0)
    w = _weight(301, 200, 0.3, seed=11)
    w[7] = 0.0  # an empty row gets exactly its bias
    bias = torch.from_numpy(np.random.default_rng(3).standard_normal(301).astype(np.float32))
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((batch, 200)).astype(np.float32))
    for fmt in (CompactCSR.from_dense(w), Bitmask.from_dense(w)):
        for variant in (0, 1, 2):
            kernels.set_spmv_variant(fmt, variant)
            for t in (1, 2):
                runner = KernelRunner(threads=t)
                plain = kernels.sparse_matmul_tensor(fmt, x, runner)
                fused = kernels.sparse_matmul_tensor(fmt, x, runner, bias=bias)
                assert torch.equal(fused, plain + bias), (fmt.name, variant, t)
                assert torch.equal(fused[:, 7], bias[7].expand(batch))


# ---------------------------------------------------------------- block sparse (BSR) C kernels
def _block_weight(rows: int, cols: int, bh: int, bw: int, block_density: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    keep = rng.random((rows // bh, cols // bw)) < block_density
    keep[(rows // bh) // 2] = False  # an empty block-row
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    return w * np.repeat(np.repeat(keep, bh, axis=0), bw, axis=1)


@needs_native
@pytest.mark.parametrize("block", [(8, 8), (4, 4), (1, 8), (2, 16), (3, 5), (16, 4), (5, 8), (1, 1), (2, 2), (7, 12)])
@pytest.mark.parametrize("block_density", [0.0, 0.3, 1.0])
def test_native_block_kernels_match_dense(block, block_density):
    """Every register-blocking path (row groups of 8/4/2/1, 8/4-wide and scalar columns, 1-8 batch
    tiles at once) against float64 dense, with bias, for batch sizes around the tile widths."""
    bh, bw = block
    rows, cols = bh * 11, bw * 9
    w = _block_weight(rows, cols, bh, bw, block_density, seed=bh * 100 + bw)
    fmt = BlockSparse.from_dense(w, bh, bw)
    assert kernels.has_native_kernel(fmt)
    bias = torch.from_numpy(np.random.default_rng(3).standard_normal(rows).astype(np.float32))
    for batch in (1, 3, 8, 16, 24, 40, 64, 72, 130):
        x = torch.from_numpy(np.random.default_rng(batch).standard_normal((batch, cols)).astype(np.float32))
        got = kernels.sparse_matmul_tensor(fmt, x, bias=bias)
        ref = (x.double() @ torch.from_numpy(w).double().T + bias.double()).float()
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * np.sqrt(cols), msg=f"block {block}, batch {batch}")


@needs_native
@pytest.mark.parametrize("batch", [1, 24])
def test_native_block_results_do_not_depend_on_thread_count(monkeypatch, batch):
    monkeypatch.setattr(kernels, "MIN_PARALLEL_WORK", 0)
    w = _block_weight(256, 96, 4, 8, 0.3, seed=2)
    w[64:160] = 0.0  # unbalanced block-rows
    fmt = BlockSparse.from_dense(w, 4, 8)
    x = np.random.default_rng(1).standard_normal((batch, 96)).astype(np.float32)
    one = sparse_matmul(fmt, x, KernelRunner(threads=1))
    _check(fmt, x, w)
    for t in (2, 3, 7):
        np.testing.assert_array_equal(one, sparse_matmul(fmt, x, KernelRunner(threads=t)))


@needs_native
@pytest.mark.parametrize("block", [(8, 8), (1, 8), (4, 4), (3, 5), (2, 16)])
def test_native_block_spmm_column_blocking_matches_dense(monkeypatch, block):
    """Wide layers at large batch walk the input columns in ranges (xt slice in L2); blocks of a
    block-row are continued range after range; the default range and the smallest (64 inputs)."""
    bh, bw = block
    w = _block_weight(bh * 12, 1920, bh, bw, 0.3, seed=7)
    fmt = BlockSparse.from_dense(w, bh, bw)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((130, 1920)).astype(np.float32))
    ref = (x.double() @ torch.from_numpy(w).double().T).float()
    assert kernels.spmm_block_cols(1920, 136) > 0  # the blocked path is taken at this size
    for block_bytes in (kernels.CSR_SPMM_BLOCK_BYTES, 4 * 136 * 64):
        monkeypatch.setattr(kernels, "CSR_SPMM_BLOCK_BYTES", block_bytes)
        got = kernels.sparse_matmul_tensor(fmt, x)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-3, msg=f"block {block}, range bytes {block_bytes}")


# ---------------------------------------------------------------- AVX-512 bitmask SpMV (variant 2)
# A hardware property, not an install: skipped on a CPU without AVX-512F, but on one with it the
# library must have the path (a build that lost it fails here instead of silently skipping).
_CPU_AVX512 = "avx512f" in native._cpu_flags().split()
needs_avx512 = pytest.mark.skipif(not _CPU_AVX512, reason="this CPU has no AVX-512F")


def _avx512_weight(rows: int, cols: int, density: float, seed: int) -> torch.Tensor:
    w = torch.from_numpy(_weight(rows, cols, density, seed))
    w[0] = 0.0  # nothing kept
    if rows > 2:
        w[2] = torch.linspace(-1.0, 1.0, cols)
        w[2][w[2] == 0] = 0.5  # every column kept
    w[-1] = torch.linspace(0.5, 1.5, cols)  # the last row of the values array, every column kept
    return w


@needs_native
@needs_avx512
@pytest.mark.parametrize("cols", [1, 15, 16, 17, 48, 63, 64, 65, 100, 127, 128, 130, 384, 1000])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.95])
def test_avx512_bitmask_spmv_matches_dense(cols, density):
    assert kernels.bitmask_spmv_avx512(), "CPU has AVX-512F but the C library was built without it"
    assert kernels.BITMASK_SPMV_VARIANT == 2  # the default on such a CPU
    rows = 11
    w = _avx512_weight(rows, cols, density, seed=cols * 7 + int(density * 100))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(cols))
    fmt = Bitmask.from_dense(w)
    kernels.set_spmv_variant(fmt, 2)
    wide = torch.randn(1, 3 * cols, generator=torch.Generator().manual_seed(cols + 1))
    for x in (wide[:, :cols], wide[:, ::3]):  # contiguous and strided input
        for b in (None, bias):
            got = kernels.sparse_matmul_tensor(fmt, x, bias=b)
            ref = torch.nn.functional.linear(x, w, b)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * max(1.0, cols**0.5))
    assert torch.equal(kernels.sparse_matmul_tensor(fmt, wide[:, :cols])[0, 0], torch.tensor(0.0))


@needs_native
@needs_avx512
@pytest.mark.parametrize("cols", [16, 70, 200])
def test_avx512_bitmask_spmv_propagates_nan_and_inf_like_dense(cols):
    # every lane of every 16-column step is multiplied, so as in dense F.linear a NaN in x makes
    # every output NaN (0 * NaN), rows that keep nothing included, and an infinity gives NaN
    # where the weight is 0 (0 * inf) and +-inf where it is kept
    w = _avx512_weight(9, cols, 0.4, seed=cols)
    w[4, 3] = 2.0
    w[5, 3] = 0.0
    fmt = Bitmask.from_dense(w)
    kernels.set_spmv_variant(fmt, 2)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1))
        x[0, 3] = bad
        got, ref = kernels.sparse_matmul_tensor(fmt, x), torch.nn.functional.linear(x, w)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)), (bad, got, ref)
        assert torch.equal(torch.isposinf(got), torch.isposinf(ref)) and torch.equal(
            torch.isneginf(got), torch.isneginf(ref)
        )
        assert torch.isnan(got[0, 0]) and torch.isnan(got[0, 5])  # a row that keeps nothing, or not column 3
        if bad == bad:
            assert torch.isinf(got[0, 4]) and torch.sign(got[0, 4]) == torch.sign(torch.tensor(bad))


_GUARD_PAGE_SCRIPT = r"""
import ctypes, mmap, sys
import numpy as np, torch
from sparseforge.inference import kernels
from sparseforge.inference.formats import Bitmask
cols = int(sys.argv[1])
w = np.zeros((3, cols), np.float32)
w[0, : cols // 3] = 1.0
w[-1] = np.linspace(0.5, 1.5, cols, dtype=np.float32)  # the last row keeps every column
fmt = Bitmask.from_dense(w)
n, page = fmt.values.shape[0], mmap.PAGESIZE
body = (4 * n + page - 1) // page * page
buf = mmap.mmap(-1, body + page)
base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
assert libc.mprotect(base + body, page, 0) == 0  # PROT_NONE: any read past the values faults
vals = np.frombuffer(buf, dtype=np.float32, count=n, offset=body - 4 * n)
vals[:] = fmt.values
fmt.values = vals
kernels.set_spmv_variant(fmt, int(sys.argv[2]))
x = torch.randn(1, cols)
got = kernels.sparse_matmul_tensor(fmt, x)
torch.testing.assert_close(got, x @ torch.from_numpy(w).T, rtol=1e-5, atol=1e-4)
print("ok")
"""


@needs_native
@needs_avx512
@pytest.mark.parametrize("cols", [100, 128, 1000])
def test_avx512_bitmask_spmv_never_reads_past_the_values(cols):
    # the values end right before a PROT_NONE page: an unmasked 16-lane load at the last row's
    # end would crash the child process
    res = subprocess.run(
        [sys.executable, "-c", _GUARD_PAGE_SCRIPT, str(cols), "2"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.strip() == "ok", (res.returncode, res.stderr[-2000:])
