"""Multi-threaded CPU kernels (Numba) for the packed formats of :mod:`.formats`.

Two shapes of work per format:

Kernels are serial over a row range ``[r0, r1)`` and release the GIL; :class:`KernelRunner`
splits rows over threads (balanced by nonzeros where a row pointer exists).

* ``*_spmv``: batch 1, ``out[r] = sum_k values[k] * x[col[k]]``; four independent fp32
  accumulators per row hide the add latency (no ``fastmath``: results are deterministic and do
  not depend on the thread count; rows are split across threads, never a row's sum).
* ``*_spmm_t``: batch > 1 on the *transposed* input ``xt`` of shape ``(in_features, batch)``: for
  each kept weight ``out_t[r, :] += v * xt[c, :]``, a contiguous axpy that LLVM vectorises.

All kernels are compiled lazily with ``cache=True`` (on-disk cache next to this file), so a
process pays the JIT cost once per signature. If Numba is missing, :func:`kernels_available`
returns ``False`` and :func:`unavailable_reason` says why; callers then run the dense path.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .formats import Bitmask, BlockSparse, CompactCSR, PackedFormat, PackedNM

__all__ = ["kernels_available", "unavailable_reason", "sparse_matmul", "KernelRunner", "DEFAULT_RUNNER"]

try:  # pragma: no cover - exercised only where numba is absent
    import numba
    from numba import njit
    from numba.cpython.unsafe.numbers import trailing_zeros

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover
    numba = None
    _IMPORT_ERROR = f"numba is not importable ({type(exc).__name__}: {exc}); install sparseforge[kernels]"


def kernels_available() -> bool:
    """Whether the Numba kernels can be used in this process."""
    return _IMPORT_ERROR is None


def unavailable_reason() -> str | None:
    """One line saying why kernels are unavailable, or ``None`` when they are available."""
    return _IMPORT_ERROR


if _IMPORT_ERROR is None:
    _jit = dict(cache=True, fastmath=False, nogil=True)

    # ---------------------------------------------------------------- CSR
    @njit(**_jit)
    def _csr_spmv(indptr, indices, values, x, out, r0, r1):  # pragma: no cover - compiled
        for r in range(r0, r1):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            k = np.int64(indptr[r])
            e = np.int64(indptr[r + 1])
            while k + 4 <= e:
                a0 += values[k] * x[np.int64(indices[k])]
                a1 += values[k + 1] * x[np.int64(indices[k + 1])]
                a2 += values[k + 2] * x[np.int64(indices[k + 2])]
                a3 += values[k + 3] * x[np.int64(indices[k + 3])]
                k += 4
            while k < e:
                a0 += values[k] * x[np.int64(indices[k])]
                k += 1
            out[r] = (a0 + a1) + (a2 + a3)

    @njit(**_jit)
    def _csr_spmm_t(indptr, indices, values, xt, out_t, r0, r1):  # pragma: no cover - compiled
        nb = xt.shape[1]
        for r in range(r0, r1):
            acc = out_t[r]
            for b in range(nb):
                acc[b] = 0.0
            for k in range(np.int64(indptr[r]), np.int64(indptr[r + 1])):
                v = values[k]
                xr = xt[np.int64(indices[k])]
                for b in range(nb):
                    acc[b] += v * xr[b]

    # ---------------------------------------------------------------- bitmask
    @njit(**_jit)
    def _bitmask_spmv(mask, rowptr, values, x, out, r0, r1):  # pragma: no cover - compiled
        words = mask.shape[1]
        for r in range(r0, r1):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            p = rowptr[r]
            for w in range(words):
                bits = mask[r, w]
                base = w * 64
                while bits != 0:
                    a0 += values[p] * x[base + np.int64(trailing_zeros(bits))]
                    bits &= bits - np.uint64(1)
                    p += 1
                    if bits == 0:
                        break
                    a1 += values[p] * x[base + np.int64(trailing_zeros(bits))]
                    bits &= bits - np.uint64(1)
                    p += 1
            out[r] = a0 + a1

    @njit(**_jit)
    def _bitmask_spmm_t(mask, rowptr, values, xt, out_t, r0, r1):  # pragma: no cover - compiled
        words = mask.shape[1]
        nb = xt.shape[1]
        for r in range(r0, r1):
            acc = out_t[r]
            for b in range(nb):
                acc[b] = 0.0
            p = rowptr[r]
            for w in range(words):
                bits = mask[r, w]
                base = w * 64
                while bits != 0:
                    v = values[p]
                    xr = xt[base + np.int64(trailing_zeros(bits))]
                    for b in range(nb):
                        acc[b] += v * xr[b]
                    bits &= bits - np.uint64(1)
                    p += 1

    # ---------------------------------------------------------------- N:M
    @njit(**_jit)
    def _nm_spmv(values, positions, n_keep, m, x, out, r0, r1):  # pragma: no cover - compiled
        per_row = values.shape[1]
        for r in range(r0, r1):
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            vr = values[r]
            pr = positions[r]
            k = 0
            while k + 2 <= per_row:
                a0 += vr[k] * x[(k // n_keep) * m + np.int64(pr[k])]
                a1 += vr[k + 1] * x[((k + 1) // n_keep) * m + np.int64(pr[k + 1])]
                k += 2
            if k < per_row:
                a0 += vr[k] * x[(k // n_keep) * m + np.int64(pr[k])]
            out[r] = a0 + a1

    @njit(**_jit)
    def _nm_spmm_t(values, positions, n_keep, m, xt, out_t, r0, r1):  # pragma: no cover - compiled
        per_row = values.shape[1]
        nb = xt.shape[1]
        for r in range(r0, r1):
            acc = out_t[r]
            for b in range(nb):
                acc[b] = 0.0
            for k in range(per_row):
                v = values[r, k]
                xr = xt[(k // n_keep) * m + np.int64(positions[r, k])]
                for b in range(nb):
                    acc[b] += v * xr[b]

    # ---------------------------------------------------------------- block sparse
    @njit(**_jit)
    def _block_spmm_t(rowptr, bcols, blocks, xt, out_t, r0, r1):  # pragma: no cover - compiled
        bh = blocks.shape[1]
        bw = blocks.shape[2]
        nb = xt.shape[1]
        for br in range(r0, r1):
            for i in range(bh):
                acc = out_t[br * bh + i]
                for b in range(nb):
                    acc[b] = 0.0
            for k in range(np.int64(rowptr[br]), np.int64(rowptr[br + 1])):
                c0 = np.int64(bcols[k]) * bw
                for i in range(bh):
                    acc = out_t[br * bh + i]
                    for j in range(bw):
                        v = blocks[k, i, j]
                        xr = xt[c0 + j]
                        for b in range(nb):
                            acc[b] += v * xr[b]


class KernelRunner:
    """Splits a kernel's rows over ``threads`` Python threads (the kernels release the GIL).

    Numba's own ``parallel=True`` was measured to stall badly next to PyTorch on a 2-core machine
    (two OpenMP runtimes spinning against each other: 12-30 ms per call instead of < 1 ms), so the
    kernels are serial and this runner provides the parallelism. ``threads=None`` follows
    ``torch.get_num_threads()`` at call time.
    """

    def __init__(self, threads: int | None = None, min_rows_per_thread: int = 64) -> None:
        self._threads = threads
        self._min_rows = min_rows_per_thread
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def threads_for(self, rows: int) -> int:
        want = self._threads if self._threads is not None else torch.get_num_threads()
        return max(1, min(int(want), rows // self._min_rows))

    def run(self, kernel, args: tuple, rows: int, bounds: np.ndarray | None = None) -> None:
        """Call ``kernel(*args, r0, r1)`` over ``[0, rows)`` split in contiguous chunks.

        ``bounds`` (optional, cumulative work per row, ``rows + 1`` long) balances the chunks by work.
        """
        n = self.threads_for(rows)
        if n == 1:
            kernel(*args, 0, rows)
            return
        if bounds is not None and bounds[-1] > 0:
            targets = np.linspace(0, float(bounds[-1]), n + 1)[1:-1]
            cuts = [0, *np.searchsorted(bounds, targets).tolist(), rows]
        else:
            cuts = [rows * i // n for i in range(n + 1)]
        with self._lock:
            if self._pool is None or self._pool._max_workers < n - 1:  # noqa: SLF001
                self._pool = ThreadPoolExecutor(max_workers=max(1, n - 1), thread_name_prefix="sparseforge")
            pool = self._pool
        futures = [pool.submit(kernel, *args, cuts[i], cuts[i + 1]) for i in range(1, n) if cuts[i] < cuts[i + 1]]
        kernel(*args, cuts[0], cuts[1])
        for f in futures:
            f.result()


#: The runner :func:`sparse_matmul` uses unless given one (holds a lazily created thread pool).
DEFAULT_RUNNER = KernelRunner()


def sparse_matmul(fmt: PackedFormat, x: np.ndarray, runner: KernelRunner | None = None) -> np.ndarray:
    """``x @ W.T`` for a packed weight ``W``: ``x`` is C-contiguous float32 ``(batch, in_features)``.

    Returns a new float32 array ``(batch, out_features)``. Batch 1 uses the SpMV kernel, larger
    batches the transposed SpMM kernel. Raises ``RuntimeError`` if kernels are unavailable.
    """
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)
    run = (runner or DEFAULT_RUNNER).run
    rows = fmt.shape[0]
    batch = x.shape[0]
    if batch == 0:
        return np.zeros((0, rows), dtype=np.float32)
    if batch == 1 and not isinstance(fmt, BlockSparse):
        out = np.empty(rows, dtype=np.float32)
        xv = np.ascontiguousarray(x[0])
        if isinstance(fmt, CompactCSR):
            run(_csr_spmv, (fmt.indptr, fmt.indices, fmt.values, xv, out), rows, fmt.indptr)
        elif isinstance(fmt, Bitmask):
            run(_bitmask_spmv, (fmt.mask, fmt.rowptr, fmt.values, xv, out), rows)
        elif isinstance(fmt, PackedNM):
            run(_nm_spmv, (fmt.values, fmt.positions, fmt.n_keep, fmt.m, xv, out), rows)
        else:
            raise TypeError(f"no kernel for format {type(fmt).__name__}")
        return out.reshape(1, rows)
    xt = np.ascontiguousarray(x.T)
    out_t = np.empty((rows, batch), dtype=np.float32)
    if isinstance(fmt, CompactCSR):
        run(_csr_spmm_t, (fmt.indptr, fmt.indices, fmt.values, xt, out_t), rows, fmt.indptr)
    elif isinstance(fmt, Bitmask):
        run(_bitmask_spmm_t, (fmt.mask, fmt.rowptr, fmt.values, xt, out_t), rows)
    elif isinstance(fmt, PackedNM):
        run(_nm_spmm_t, (fmt.values, fmt.positions, fmt.n_keep, fmt.m, xt, out_t), rows)
    elif isinstance(fmt, BlockSparse):
        run(_block_spmm_t, (fmt.block_rowptr, fmt.block_cols, fmt.blocks, xt, out_t), rows // fmt.bh, fmt.block_rowptr)
    else:
        raise TypeError(f"no kernel for format {type(fmt).__name__}")
    return np.ascontiguousarray(out_t.T)
