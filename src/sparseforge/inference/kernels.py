"""CPU kernels for the packed formats of :mod:`.formats`: compiled C (CSR, bitmask, block) and Numba (all).

CSR, bitmask and block run on the C kernels of :mod:`.native` (``csrc/spmm.c``, built on first
use) when a C compiler is available; otherwise, and for N:M, on the Numba kernels below. If
neither is available, :func:`kernels_available` is ``False`` and callers run dense.

C kernels (see ``csrc/spmm.c``): batch 1 = SpMV (CSR: 8 scalar accumulators per row; bitmask:
with AVX-512 each 16 mask bits expand-load the row's next values into place, else each mask
byte expands 8 values with a permutation table, AVX2; block: a group of up
to 8 rows keeps one vector accumulator per row while the block-row's blocks stream past);
batch > 1 = SpMM on the transposed, zero-padded input ``xt`` ``(in_features, ceil8(batch))``:
each kept weight does an AVX2 axpy on a 8-64 column tile held in registers. Rows are split into
``CHUNKS_PER_THREAD * threads`` chunks balanced by work; a row's sum is never split and its
order of additions is fixed, so results do not depend on the thread count (tested bitwise).

Numba kernels: serial over a row range ``[r0, r1)``, releasing the GIL; :class:`KernelRunner`
splits rows over Python threads (balanced by nonzeros where a row pointer exists).

* ``*_spmv``: batch 1, ``out[r] = sum_k values[k] * x[col[k]]``; four independent fp32
  accumulators per row hide the add latency (no ``fastmath``: results are deterministic and do
  not depend on the thread count; rows are split across threads, never a row's sum).
* ``*_spmm_t``: batch > 1 on the *transposed* input ``xt`` of shape ``(in_features, batch)``: for
  each kept weight ``out_t[r, :] += v * xt[c, :]``, a contiguous axpy that LLVM vectorises.

All Numba kernels are compiled lazily with ``cache=True`` (on-disk cache next to this file).

Sparse inputs (:func:`input_sparse_matmul`, batch 1): ``y = W x' + b`` where ``x'`` is the row
with its entries of magnitude ``<= threshold`` dropped, reading only the weights of the active
inputs, from an :class:`~.formats.InputSparseDense` or :class:`~.formats.InputSparseBitmask`
layout (C kernel, see ``csrc/spmm.c``; a PyTorch fallback without the C library).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import SparseforgeError
from .epilogue import activation_code, apply_activation
from .formats import (
    Bitmask,
    BlockSparse,
    CompactCSR,
    CompactDense,
    InputSparseBitmask,
    InputSparseDense,
    PackedFormat,
    PackedNM,
    PairedCSR,
)
from .native import get_library, native_reason

__all__ = [
    "kernels_available",
    "kernel_available_for",
    "numba_available",
    "unavailable_reason",
    "sparse_matmul",
    "sparse_matmul_tensor",
    "has_native_kernel",
    "KernelRunner",
    "DEFAULT_RUNNER",
    "input_sparse_matmul",
    "input_sparse_native",
    "INPUT_SPARSE_VARIANT",
    "pairs_padded_batch",
    "pairs_leading_dim",
    "transposed_view_ok",
]

try:  # pragma: no cover - exercised only where numba is absent
    from numba import njit
    from numba.cpython.unsafe.numbers import trailing_zeros

    _IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover
    _IMPORT_ERROR = f"numba is not importable ({type(exc).__name__}: {exc}); install sparseforge[kernels]"


def numba_available() -> bool:
    """Whether the Numba kernels can be used in this process."""
    return _IMPORT_ERROR is None


def kernels_available() -> bool:
    """Whether any sparse kernel (C or Numba) can run in this process (builds the C kernels on first call)."""
    return _IMPORT_ERROR is None or get_library() is not None


def kernel_available_for(fmt: PackedFormat) -> bool:
    """Whether :func:`sparse_matmul` can run ``fmt`` here (C kernels: CSR, bitmask, block, pairs; Numba:
    CSR, bitmask, block and N:M; compact dense: PyTorch, always)."""
    if isinstance(fmt, PairedCSR):
        return has_native_kernel(fmt)
    return isinstance(fmt, CompactDense) or _IMPORT_ERROR is None or has_native_kernel(fmt)


def unavailable_reason() -> str | None:
    """One line saying why no kernel is available, or ``None`` when some kernel is."""
    if kernels_available():
        return None
    return f"{_IMPORT_ERROR}; C kernels: {native_reason()}"


if _IMPORT_ERROR is None:
    # ---------------------------------------------------------------- CSR
    @njit(cache=True, fastmath=False, nogil=True)
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

    @njit(cache=True, fastmath=False, nogil=True)
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
    # trailing_zeros is a numba @intrinsic: its Python signature is (typingctx, src), but jitted
    # code calls it with src alone, which mypy cannot know.
    @njit(cache=True, fastmath=False, nogil=True)
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
                    a0 += values[p] * x[base + np.int64(trailing_zeros(bits))]  # type: ignore[call-arg]  # an intrinsic: see above
                    bits &= bits - np.uint64(1)
                    p += 1
                    if bits == 0:
                        break
                    a1 += values[p] * x[base + np.int64(trailing_zeros(bits))]
                    bits &= bits - np.uint64(1)
                    p += 1
            out[r] = a0 + a1

    @njit(cache=True, fastmath=False, nogil=True)
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
                    xr = xt[base + np.int64(trailing_zeros(bits))]  # type: ignore[call-arg]  # an intrinsic: see above
                    for b in range(nb):
                        acc[b] += v * xr[b]
                    bits &= bits - np.uint64(1)
                    p += 1

    # ---------------------------------------------------------------- N:M
    @njit(cache=True, fastmath=False, nogil=True)
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

    @njit(cache=True, fastmath=False, nogil=True)
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
    @njit(cache=True, fastmath=False, nogil=True)
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

    def run(self, kernel: Callable[..., object], args: tuple, rows: int, bounds: np.ndarray | None = None) -> None:
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


# ------------------------------------------------------------------------------------------
# C kernels (native.py / csrc/spmm.c): CSR and bitmask. Other formats use the Numba kernels.

#: Row chunks per thread: the calling thread claims chunks too, so a worker that starts late
#: (busy machine) only delays the chunks it claimed.
CHUNKS_PER_THREAD = 4
#: Below this many multiply-adds (kept weights x batch) a call runs on one thread: waking a
#: worker costs ~10-60 us, more than such a call computes.
MIN_PARALLEL_WORK = 1 << 16
#: CSR SpMM (batch > 1) walks the input features in blocks whose slice of the transposed input
#: ``xt`` (block columns x padded batch x 4 B) is about this many bytes, so that it stays in L2
#: (512 KB per core on Zen 3) while a group of ``CSR_SPMM_BLOCK_ROWS`` rows uses it; only when
#: the whole ``xt`` is larger than ``4 * CSR_SPMM_BLOCK_BYTES`` (L2). One 4096² layer timed
#: alone: 0.8-1.0x at batch 32 (so unblocked there), 1.1x at 64, 1.4-1.7x at 128-256; inside
#: the 4-layer model ~1.06x (docs/design-notes.md). The block width depends only on the layer's
#: shape and the batch, never on the thread count (results stay thread-independent).
CSR_SPMM_BLOCK_BYTES = 128 * 1024
CSR_SPMM_BLOCK_ROWS = 256
#: SpMV variant for CSR: 0 = scalar, 8 accumulators; 1 = AVX2 gather (see docs/design-notes.md).
#: Neither wins reliably on the reference CPU, so ``convert`` times both per layer.
CSR_SPMV_VARIANT = 0
#: SpMV variant for bitmask: 0 = bit iteration (tzcnt); 1 = byte -> 8-lane expand (AVX2);
#: 2 = 16 mask bits -> masked expand-load (AVX-512; the C library runs 1 where it was compiled
#: without AVX-512, see :func:`bitmask_spmv_avx512`).
BITMASK_SPMV_VARIANT = 2


def bitmask_spmv_avx512() -> bool:
    """Whether the loaded C library has the AVX-512 bitmask SpMV (variant 2); ``False`` without C kernels."""
    lib = get_library()
    return bool(lib is not None and lib.sf_has_avx512())


class _NativePlan:
    """Per-format cache: contiguous arrays in the C kernels' dtypes, their addresses, row splits."""

    __slots__ = (
        "kind",
        "keep",
        "ptrs",
        "work",
        "cuts",
        "cut_align",
        "cuts_ptr",
        "words",
        "nnz",
        "suffix",
        "spmv",
        "spmm",
        "spmm_blk",
        "spmv_variant",
    )
    keep: tuple[np.ndarray, ...]  # the arrays whose addresses ptrs holds, per kind

    def __init__(self, fmt: PackedFormat) -> None:
        rows, cols = fmt.shape
        self.cuts: dict[int, np.ndarray] = {}
        self.cut_align = 1  # chunk boundaries fall on multiples of this many rows (pairs, for pairs)
        if isinstance(fmt, CompactCSR):
            self.kind = "csr"
            indptr = np.ascontiguousarray(fmt.indptr, dtype=np.int64)
            indices = np.ascontiguousarray(fmt.indices)
            if indices.dtype == np.uint16:
                self.suffix = "u16"
            else:
                indices = np.ascontiguousarray(indices, dtype=np.int32)
                self.suffix = "i32"
            values = np.ascontiguousarray(fmt.values, dtype=np.float32)
            self.keep = (indptr, indices, values)
            self.work = indptr + 8 * np.arange(rows + 1, dtype=np.int64)  # per-row overhead ~ 8 weights
            self.words, self.nnz = 0, int(values.shape[0])
        elif isinstance(fmt, BlockSparse):
            self.kind = "block"
            brow = np.ascontiguousarray(fmt.block_rowptr, dtype=np.int64)
            bcol = np.ascontiguousarray(fmt.block_cols, dtype=np.int32)
            blocks = np.ascontiguousarray(fmt.blocks, dtype=np.float32)
            self.keep = (brow, bcol, blocks)
            self.suffix = ""
            bsz = fmt.bh * fmt.bw
            self.words, self.nnz = 0, int(blocks.shape[0]) * bsz
            # work per block-row: its weights plus ~8 weights of overhead per output row
            self.work = brow * bsz + 8 * fmt.bh * np.arange(brow.shape[0], dtype=np.int64)
        elif isinstance(fmt, PairedCSR):
            self.kind = "pairs"
            counts = np.ascontiguousarray(fmt.counts, dtype=np.int32)
            starts = np.ascontiguousarray(fmt.starts, dtype=np.int64)
            self.keep = (counts, starts, np.ascontiguousarray(fmt.cols), np.ascontiguousarray(fmt.values))
            self.suffix = ""
            self.words, self.nnz = 0, int(fmt.values.shape[0])
            # chunks are ranges of row pairs; work per pair: its values plus ~8 weights of overhead
            # per row and block
            npairs = (rows + rows % 2) // 2
            per_pair = counts.transpose(0, 2, 1, 3).reshape(-1, counts.shape[1] * 3).astype(np.int64).sum(axis=1)
            per_pair = per_pair[:npairs] + 16 * counts.shape[1]
            self.work = np.concatenate([[0], np.cumsum(per_pair)]).astype(np.int64)
            # chunks start on a multiple of 8 pairs: the 16 outputs of a row-major output row
            # that one 64-byte line holds come from one chunk (one thread), never two
            self.cut_align = 8
        elif isinstance(fmt, Bitmask):
            self.kind = "bitmask"
            mask = np.ascontiguousarray(fmt.mask, dtype=np.uint64)
            rowptr = np.ascontiguousarray(fmt.rowptr, dtype=np.int64)
            values = np.ascontiguousarray(fmt.values, dtype=np.float32)
            self.keep = (mask, rowptr, values)
            self.words = int(mask.shape[1])
            self.nnz = int(values.shape[0])
            self.suffix = ""
            self.work = rowptr + (self.words * 8) * np.arange(rows + 1, dtype=np.int64)  # one step per mask byte
        else:  # _native_plan is only asked for _NATIVE_FORMATS
            raise TypeError(f"no C kernel for format {type(fmt).__name__}")
        self.ptrs = tuple(a.ctypes.data for a in self.keep)
        self.cuts_ptr: dict[int, tuple[int, int]] = {}
        #: SpMV variant this weight runs (CSR: 0 scalar / 1 gather; bitmask: 0 tzcnt / 1 expand /
        #: 2 AVX-512 expand-load);
        #: ``None`` = the module default. ``convert`` sets it from its measurement.
        self.spmv_variant: int | None = getattr(fmt, "_sf_spmv_variant", None)
        lib = get_library()
        self.spmv = getattr(lib, "sf_csr_spmv_" + self.suffix) if self.kind == "csr" else None
        self.spmm = getattr(lib, "sf_csr_spmm_" + self.suffix) if self.kind == "csr" else None
        self.spmm_blk = getattr(lib, "sf_csr_spmm_blk_" + self.suffix) if self.kind == "csr" else None

    def cuts_for(self, threads: int) -> tuple[int, int]:
        """``(address of cuts, nchunks)``: ``CHUNKS_PER_THREAD * threads`` contiguous row ranges of about equal work."""
        got = self.cuts_ptr.get(threads)
        if got is None:
            rows = self.work.shape[0] - 1
            n = max(1, min(threads * CHUNKS_PER_THREAD if threads > 1 else 1, rows))
            targets = np.linspace(0, float(self.work[-1]), n + 1)[1:-1]
            inner = np.searchsorted(self.work, targets)
            if self.cut_align > 1:
                inner = np.rint(inner / self.cut_align).astype(np.int64) * self.cut_align
            cuts = np.unique(np.clip(np.array([0, *inner.tolist(), rows], dtype=np.int64), 0, rows))
            if cuts.size < 2:  # no rows at all: one empty chunk
                cuts = np.array([0, rows], dtype=np.int64)
            n = len(cuts) - 1
            self.cuts[threads] = cuts  # keeps the array (and so the address) alive
            got = (cuts.ctypes.data, n)
            self.cuts_ptr[threads] = got
        return got


#: Plans per format object. Kept outside the object (weakly keyed) so that copy.deepcopy / pickle
#: of a converted model never carries raw addresses of the original's arrays.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLANS_LOCK = threading.Lock()


#: Formats with C kernels (N:M runs on Numba: the bitmask format stores 2:4 in fewer bytes).
_NATIVE_FORMATS = (CompactCSR, Bitmask, BlockSparse, PairedCSR)


def _cached_plan(cache: weakref.WeakKeyDictionary, fmt: PackedFormat, make: Callable[[PackedFormat], object]):
    """``cache[fmt]``, made with ``make(fmt)`` on first use (once, under the plans' lock)."""
    plan = cache.get(fmt)
    if plan is None:
        with _PLANS_LOCK:
            plan = cache.get(fmt)
            if plan is None:
                plan = make(fmt)
                cache[fmt] = plan
    return plan


def _native_plan(fmt: PackedFormat) -> _NativePlan:
    return _cached_plan(_PLANS, fmt, _NativePlan)


def set_spmv_variant(fmt: PackedFormat, variant: int | None) -> None:
    """Pin the batch-1 kernel variant of a weight on the C kernels (CSR: 0 scalar, 1 AVX2 gather; bitmask:
    0 tzcnt, 1 AVX2 byte expand, 2 AVX-512 expand-load; None = the module default)."""
    fmt._sf_spmv_variant = variant  # type: ignore[attr-defined]  # plain int: survives deepcopy
    if has_native_kernel(fmt):
        _native_plan(fmt).spmv_variant = variant


def has_native_kernel(fmt: PackedFormat) -> bool:
    """Whether ``fmt`` runs on the C kernels in this process (CSR, bitmask and block; library loaded)."""
    return isinstance(fmt, _NATIVE_FORMATS) and get_library() is not None


def spmm_block_cols(cols: int, ldx: int) -> int:
    """Input-feature block width of the CSR SpMM for ``xt (cols, ldx)``; 0 = unblocked."""
    if cols * ldx * 4 <= 4 * CSR_SPMM_BLOCK_BYTES:
        return 0
    cb = max(64, CSR_SPMM_BLOCK_BYTES // (4 * ldx))
    return cb if cb < cols else 0


def pairs_padded_batch(batch: int) -> int:
    """Lanes the pairs kernel computes for ``batch`` input rows: full tiles of 64, then the smallest
    tile of 16, 32 or 64 that holds the rest (``csrc/spmm.c``, ``sf_pairs_tile``)."""
    full = batch // 64 * 64
    rest = batch - full
    if rest == 0:
        return full
    return full + next(t for t in (16, 32, 64) if t >= rest)


def pairs_leading_dim(batch: int) -> int:
    """Row length (floats) of the transposed activations for ``batch`` rows: the padded batch plus
    16, so that consecutive rows never sit a multiple of 4 KiB apart (they would all share a few
    L1 sets)."""
    return pairs_padded_batch(batch) + 16


#: Per-thread scratch buffers of the pairs kernel (the transposed input and output), grown to the
#: largest call seen and reused: a fresh 0.8 MB tensor per call costs its page faults every time
#: (about 0.05 ms of a 0.8 ms BERT-base layer at 64 rows).
_SCRATCH = threading.local()


def _scratch(slot: int, n: int) -> torch.Tensor:
    """A float32 buffer of ``n`` elements for this thread (slot 0: input, 1: output)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None:
        bufs = _SCRATCH.bufs = [None, None]
    buf = bufs[slot]
    if buf is None or buf.numel() < n:
        buf = bufs[slot] = torch.empty(n, dtype=torch.float32)
    return buf


def transposed_view_ok(x: torch.Tensor) -> bool:
    """Whether ``x`` ``(batch, features)`` is a transposed view the pairs kernel reads in place:
    unit batch stride, a feature stride of at least the padded batch, and storage behind every lane
    the kernel reads (what a layer converted with ``transposed_output`` returns)."""
    if x.dim() != 2 or x.stride(0) != 1 or x.shape[0] < 2 or x.shape[1] < 1:
        return False
    batch, cols = x.shape
    ld = x.stride(1)
    need = x.storage_offset() + (cols - 1) * ld + pairs_padded_batch(batch)
    return ld >= pairs_padded_batch(batch) and x.untyped_storage().nbytes() >= 4 * need


def _pairs_matmul(
    lib,
    plan: _NativePlan,
    fmt: PairedCSR,
    x: torch.Tensor,
    threads: int,
    bias: torch.Tensor | None,
    act: str | None,
    transposed_output: bool,
) -> torch.Tensor:
    """The row-pair kernel on ``x`` float32 ``(batch, in_features)``: C-contiguous rows, or a
    transposed view (:func:`transposed_view_ok`), read in place.

    ``transposed_output=True`` returns the result as a transposed view ``(batch, out_features)``
    with strides ``(1, ld)``, which the next pairs layer reads without a copy. Rows of ``x`` holding a
    NaN or an infinity are computed again with the dense weight (a sparse kernel skips ``0 * inf``,
    which dense ``F.linear`` turns into NaN), so the output matches dense in which entries are NaN or
    infinite."""
    rows, cols = fmt.shape
    batch = x.shape[0]
    bpad = pairs_padded_batch(batch)
    rows_pad = rows + rows % 2
    cp, nchunks = plan.cuts_for(threads)
    if transposed_view_ok(x):
        xt_ptr, ldx = x.data_ptr(), x.stride(1)
        # a pairs layer's output says whether it is all finite; anything else is checked
        bad = 0 if getattr(x, "_sf_finite", False) else lib.sf_nonfinite(xt_ptr, cols, batch, ldx, threads)
    else:
        x = x.contiguous()
        ldx = pairs_leading_dim(batch)
        xt = _scratch(0, cols * ldx)
        xt_ptr = xt.data_ptr()
        bad = lib.sf_transpose_check(x.data_ptr(), batch, cols, cols, xt_ptr, ldx, bpad, threads)
    ldo = pairs_leading_dim(batch)
    if transposed_output:
        store = torch.empty(rows_pad * ldo, dtype=torch.float32)
        out = store.view(rows_pad, ldo)[:rows, :batch].T
        out_ptr, ldy = None, 0
    else:
        store = _scratch(1, rows_pad * ldo)
        out = torch.empty(batch, rows, dtype=torch.float32)
        out_ptr, ldy = out.data_ptr(), rows
    counts_p, starts_p, cols_p, val_p = plan.ptrs
    rc = lib.sf_pairs_spmm(
        counts_p,
        starts_p,
        cols_p,
        val_p,
        rows,
        cols,
        fmt.cb,
        fmt.group,
        xt_ptr,
        ldx,
        bpad,
        store.data_ptr(),
        ldo,
        bias.data_ptr() if bias is not None else None,
        activation_code(act),
        cp,
        nchunks,
        threads,
        out_ptr,
        batch,
        ldy,
    )
    if rc < 0:  # the format's invariants are checked on construction and load
        raise SparseforgeError(f"pairs kernel refused its arguments (cb={fmt.cb}, group={fmt.group}, batch={batch})")
    if bad:
        hit = (~torch.isfinite(x)).any(dim=1).nonzero().flatten()
        out[hit] = apply_activation(torch.nn.functional.linear(x[hit], fmt.to_dense(), bias), act)
    elif rc == 0 and transposed_output:
        out._sf_finite = True  # type: ignore[attr-defined]  # read by the next pairs layer
    return out


def _native_matmul(
    lib, plan: _NativePlan, fmt: PackedFormat, x: torch.Tensor, threads: int, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x`` is a C-contiguous float32 CPU tensor ``(batch >= 1, in_features)``; ``bias`` float32 or None."""
    rows, cols = fmt.shape
    batch = x.shape[0]
    cp, nchunks = plan.cuts_for(threads)
    if batch == 1:
        out = torch.empty(1, rows, dtype=torch.float32)
        bias_p = bias.data_ptr() if bias is not None else None  # added in the kernel, row by row
        if plan.kind == "csr":
            assert plan.spmv is not None  # set for every CSR plan
            variant = CSR_SPMV_VARIANT if plan.spmv_variant is None else plan.spmv_variant
            plan.spmv(*plan.ptrs, x.data_ptr(), out.data_ptr(), cp, nchunks, threads, variant, bias_p)
        elif isinstance(fmt, BlockSparse):  # plan.kind == "block"
            lib.sf_block_spmv(*plan.ptrs, fmt.bh, fmt.bw, x.data_ptr(), out.data_ptr(), cp, nchunks, threads, bias_p)
        else:
            width = plan.words * 64
            xv = x if width == cols else torch.nn.functional.pad(x, (0, width - cols))
            mask_p, rowptr_p, val_p = plan.ptrs
            variant = BITMASK_SPMV_VARIANT if plan.spmv_variant is None else plan.spmv_variant
            lib.sf_bitmask_spmv(
                mask_p,
                plan.words,
                rowptr_p,
                val_p,
                plan.nnz,
                xv.data_ptr(),
                out.data_ptr(),
                cp,
                nchunks,
                threads,
                variant,
                bias_p,
            )
        return out
    ldx = (batch + 7) // 8 * 8
    xt = torch.empty(cols, ldx, dtype=torch.float32)
    lib.sf_transpose(x.data_ptr(), batch, cols, cols, xt.data_ptr(), ldx, ldx, threads)  # zero-padded
    out_t = torch.empty(rows, ldx, dtype=torch.float32)
    if plan.kind == "csr":
        assert plan.spmm is not None and plan.spmm_blk is not None  # set for every CSR plan
        block_cols = spmm_block_cols(cols, ldx)
        if block_cols:
            plan.spmm_blk(
                *plan.ptrs,
                xt.data_ptr(),
                ldx,
                out_t.data_ptr(),
                cp,
                nchunks,
                threads,
                cols,
                block_cols,
                CSR_SPMM_BLOCK_ROWS,
            )
        else:
            plan.spmm(*plan.ptrs, xt.data_ptr(), ldx, out_t.data_ptr(), cp, nchunks, threads)
    elif isinstance(fmt, BlockSparse):  # plan.kind == "block"
        block_cols = spmm_block_cols(cols, ldx)  # input features per range, as for CSR (0 = one range)
        nbc = cols // fmt.bw
        lib.sf_block_spmm(
            *plan.ptrs,
            fmt.bh,
            fmt.bw,
            xt.data_ptr(),
            ldx,
            out_t.data_ptr(),
            cp,
            nchunks,
            threads,
            nbc,
            max(1, block_cols // fmt.bw) if block_cols else 0,
            max(1, CSR_SPMM_BLOCK_ROWS // fmt.bh),
        )
    else:
        mask_p, rowptr_p, val_p = plan.ptrs
        if (
            lib.sf_bitmask_spmm(
                mask_p, plan.words, rowptr_p, val_p, xt.data_ptr(), ldx, out_t.data_ptr(), cp, nchunks, threads
            )
            != 0
        ):
            raise MemoryError("sparseforge bitmask kernel could not allocate its row buffer")
    out = torch.empty(batch, rows, dtype=torch.float32)
    lib.sf_transpose(out_t.data_ptr(), rows, batch, ldx, out.data_ptr(), rows, rows, threads)
    if bias is not None:
        out += bias
    return out


#: Per-format torch index tensors of a CompactDense (weakly keyed, like the native plans).
_COMPACT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _compact_matmul(fmt: CompactDense, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T (+ bias)`` as a dense matmul on the kept rows and columns (PyTorch's BLAS)."""
    got = _COMPACT.get(fmt)
    if got is None:
        kept_rows = torch.from_numpy(fmt.rows.astype(np.int64))
        kept_cols = torch.from_numpy(fmt.cols.astype(np.int64))
        got = (
            kept_rows if kept_rows.numel() < fmt.shape[0] else None,
            kept_cols if kept_cols.numel() < fmt.shape[1] else None,
            torch.from_numpy(fmt.weight),
        )
        _COMPACT[fmt] = got
    rows, cols, weight = got
    xs = x if cols is None else x.index_select(1, cols)
    if rows is None:
        return torch.nn.functional.linear(xs, weight, bias)
    out = (
        torch.zeros(x.shape[0], fmt.shape[0], dtype=torch.float32)
        if bias is None
        else bias.expand(x.shape[0], -1).clone()
    )
    ys = torch.nn.functional.linear(xs, weight)
    if bias is not None:
        ys += bias.index_select(0, rows)
    return out.index_copy_(1, rows, ys)


def _check_kernel_tensor(what: str, t: torch.Tensor) -> None:
    if t.dtype != torch.float32 or not t.is_cpu:
        raise SparseforgeError(f"{what} {t.dtype} on {t.device} is not supported; allowed: torch.float32 on cpu")


def sparse_matmul_tensor(
    fmt: PackedFormat,
    x: torch.Tensor,
    runner: KernelRunner | None = None,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    transposed_output: bool = False,
) -> torch.Tensor:
    """Like :func:`sparse_matmul` for a float32 CPU tensor ``x`` ``(batch, in_features)``; returns a tensor.

    ``bias`` (float32 ``(out_features,)``, optional) is added to every output row; the batch-1 C
    kernels add it in place, right after each row's sum (bitwise the same as adding it afterwards).
    ``activation`` (a name of :data:`.epilogue.ACTIVATIONS`, optional) is applied after the bias:
    inside the kernel for the pairs format, with PyTorch otherwise. ``transposed_output`` (pairs
    format, batch >= 2): return a transposed view that the next pairs layer reads in place (any
    other consumer sees an ordinary, non-contiguous tensor).
    """
    code = activation_code(activation)  # refuses an unknown name before any work
    if x.dim() != 2 or x.shape[1] != fmt.shape[1]:
        raise SparseforgeError(
            f"input shape {tuple(x.shape)} does not fit: expected (rows, {fmt.shape[1]}) for a {fmt.shape[0]}x{fmt.shape[1]} weight"
        )
    # the C kernels read raw float32 memory: anything else would be read as garbage
    _check_kernel_tensor("input", x)
    if bias is not None:
        _check_kernel_tensor("bias", bias)
        if bias.shape != (fmt.shape[0],):
            raise SparseforgeError(f"bias shape {tuple(bias.shape)} does not fit: expected ({fmt.shape[0]},)")
    if not isinstance(transposed_output, bool):
        raise SparseforgeError(f"transposed_output={transposed_output!r} is not allowed; allowed: True or False")
    if x.shape[0] == 0:
        return torch.zeros(0, fmt.shape[0], dtype=torch.float32)
    if isinstance(fmt, CompactDense):
        y = _compact_matmul(fmt, x.contiguous(), None if bias is None else bias.contiguous())
        return apply_activation(y, activation)
    if isinstance(fmt, _NATIVE_FORMATS):
        lib = get_library()
        if lib is not None:
            plan = _native_plan(fmt)
            threads = runner._threads if runner is not None and runner._threads is not None else torch.get_num_threads()  # noqa: SLF001
            if plan.nnz * x.shape[0] < MIN_PARALLEL_WORK:
                threads = 1
            b = None if bias is None else bias.contiguous()
            if isinstance(fmt, PairedCSR):
                return _pairs_matmul(
                    lib, plan, fmt, x, max(1, int(threads)), b, activation if code else None, transposed_output
                )
            y = _native_matmul(lib, plan, fmt, x.contiguous(), max(1, int(threads)), b)
            return apply_activation(y, activation)
    if isinstance(fmt, PairedCSR):
        raise RuntimeError(f"the pairs format runs on the C kernels only, which are unavailable: {native_reason()}")
    out = torch.from_numpy(sparse_matmul(fmt, x.contiguous().numpy(), runner))
    if bias is not None:
        out += bias
    return apply_activation(out, activation)


def sparse_matmul(fmt: PackedFormat, x: np.ndarray, runner: KernelRunner | None = None) -> np.ndarray:
    """``x @ W.T`` for a packed weight ``W``: ``x`` is C-contiguous float32 ``(batch, in_features)``.

    Returns a new float32 array ``(batch, out_features)``. CSR and bitmask run on the C kernels
    when they are built (:mod:`.native`), on ``runner``'s thread count or ``torch.get_num_threads()``
    threads (the C library's own pool); other formats, or all when the C kernels are unavailable, on the Numba
    kernels. Batch 1 uses the SpMV kernels, larger batches the transposed SpMM kernels. Raises
    ``RuntimeError`` if no kernel is available for ``fmt``.
    """
    if x.shape[0] == 0:
        return np.zeros((0, fmt.shape[0]), dtype=np.float32)
    if isinstance(fmt, CompactDense) or (isinstance(fmt, _NATIVE_FORMATS) and get_library() is not None):
        x_tensor = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        return sparse_matmul_tensor(fmt, x_tensor, runner).numpy()
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


# ------------------------------------------------------------------------------------------
# Sparse inputs (batch 1): csrc/spmm.c "sparse input"

#: Instruction set of the sparse-input kernel: 2 = AVX-512, 1 = AVX2, 0 = portable C. The C
#: library runs the best one it was compiled with at or below the request.
INPUT_SPARSE_VARIANT = 2

_InputFormat = InputSparseDense | InputSparseBitmask


#: Byte alignment of the sparse-input layouts' arrays. numpy's allocator leaves them 16 bytes off
#: a cache line; with the earlier tile-major layout each 256-byte column chunk of a 64-row tile
#: then touched 5 lines instead of 4 (aligned, one thread, 4096x4096 at 25 % active inputs 2.09
#: vs 2.37 ms). With the input-major layout the rows of a tile-multiple width stay line-aligned.
INPUT_SPARSE_ALIGN = 128


def _aligned(arr: np.ndarray, dtype: type) -> np.ndarray:
    """``arr`` as a C-contiguous ``dtype`` array whose data starts on an :data:`INPUT_SPARSE_ALIGN` boundary
    (``arr`` itself when it already does)."""
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if arr.ctypes.data % INPUT_SPARSE_ALIGN == 0:
        return arr
    raw = np.empty(arr.nbytes + INPUT_SPARSE_ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % INPUT_SPARSE_ALIGN
    out: np.ndarray = raw[start : start + arr.nbytes].view(dtype).reshape(arr.shape)
    out[...] = arr
    return out


class _InputPlan:
    """Per-format cache: the arrays' addresses for the C kernel, and the non-finite columns.

    The format's arrays are replaced by aligned copies (:data:`INPUT_SPARSE_ALIGN`) when they are
    not aligned, once, so the format and the kernel share one copy."""

    __slots__ = ("keep", "ptrs", "force", "force_ptr", "force_t", "dense_t")

    def __init__(self, fmt: _InputFormat) -> None:
        if isinstance(fmt, InputSparseDense):
            fmt.weight_t = _aligned(fmt.weight_t, np.float32)
            self.keep: tuple[np.ndarray, ...] = (fmt.weight_t,)
            finite = bool(np.isfinite(fmt.weight_t).all())
        else:
            fmt.mask = _aligned(fmt.mask, np.uint64)
            fmt.colptr = _aligned(fmt.colptr, np.int64)
            fmt.coloff = _aligned(fmt.coloff, np.uint32)
            fmt.values = _aligned(fmt.values, np.float32)
            self.keep = (fmt.mask, fmt.colptr, fmt.coloff, fmt.values)
            finite = bool(np.isfinite(fmt.values).all())
        self.ptrs = tuple(a.ctypes.data for a in self.keep)
        self.dense_t: torch.Tensor | None = None  # the dense weight, for the PyTorch fallback (bitmask)
        cols = fmt.shape[1]
        self.force: np.ndarray | None = None
        self.force_t: torch.Tensor | None = None
        if not finite:
            # columns holding a NaN or inf weight: dense multiplies them by a dropped 0 too (0 * inf
            # = NaN), so they are always active
            bad = ~torch.isfinite(fmt.to_dense()).all(dim=0)
            self.force_t = bad
            bits = np.zeros(((cols + 63) // 64) * 64, dtype=bool)
            bits[:cols] = bad.numpy()
            self.force = np.packbits(bits, bitorder="little").view("<u8").astype(np.uint64)
        self.force_ptr = self.force.ctypes.data if self.force is not None else None


_INPUT_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _input_plan(fmt: _InputFormat) -> _InputPlan:
    return _cached_plan(_INPUT_PLANS, fmt, _InputPlan)  # type: ignore[arg-type]  # only called with input formats


def input_sparse_native() -> bool:
    """Whether :func:`input_sparse_matmul` runs the C kernel in this process (else PyTorch)."""
    return get_library() is not None


def _describe_tensor(t: object) -> str:
    return f"{t.dtype} {t.device} tensor of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_input_call(fmt: object, x: object, bias: object) -> _InputFormat:
    """``fmt`` if the call's arguments fit each other, else a one-line :class:`SparseforgeError`."""
    if not isinstance(fmt, (InputSparseDense, InputSparseBitmask)):
        raise SparseforgeError(
            f"fmt={type(fmt).__name__} is not allowed; allowed: InputSparseDense, InputSparseBitmask"
        )
    rows, cols = fmt.shape
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or not x.is_cpu or x.numel() != cols:
        raise SparseforgeError(
            f"x={_describe_tensor(x)} is not allowed; allowed: a float32 CPU tensor of {cols} elements (one row)"
        )
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.dtype != torch.float32 or not bias.is_cpu or bias.shape != (rows,)
    ):
        raise SparseforgeError(
            f"bias={_describe_tensor(bias)} is not allowed; allowed: None or a float32 CPU tensor of shape ({rows},)"
        )
    return fmt


def input_sparse_matmul(
    fmt: InputSparseDense | InputSparseBitmask,
    x: torch.Tensor,
    threshold: float = 0.0,
    bias: torch.Tensor | None = None,
    max_active: int | None = None,
    *,
    variant: int | None = None,
    threads: int | None = None,
) -> tuple[torch.Tensor | None, int]:
    """``W x' + b`` for ONE input row, reading only the weights of its active inputs.

    ``x'`` is ``x`` with every entry of magnitude ``<= threshold`` (in the input's units) set to 0,
    as :func:`sparseforge.activations.drop_small` does: NaN entries are kept (they propagate as in
    dense ``F.linear``), and an input whose weight column holds a NaN or inf is always multiplied
    (by 0 when dropped), so the result equals ``F.linear(drop_small(x, threshold), W, bias)`` up to
    float32 summation order. ``x`` is a float32 CPU tensor of ``in_features`` elements (shape
    ``(1, in)`` or ``(in,)``); ``bias`` float32 ``(out,)`` or ``None``.

    Returns ``(y, active)``: ``y`` of shape ``(1, out_features)``, and the number of active
    inputs. When ``active > max_active`` nothing is computed and ``y`` is ``None`` (the caller
    runs its dense path: the crossover rule of :class:`~.modules.InputSparseLinear`);
    ``max_active=None`` never stops, a negative one only counts. Bad arguments (another format,
    a row of another size, dtype or device) raise a one-line :class:`~sparseforge.errors.SparseforgeError`.
    Runs the C kernel
    (``variant``: 2 AVX-512, 1 AVX2, 0 portable C, default :data:`INPUT_SPARSE_VARIANT`) on
    ``threads`` threads (default ``torch.get_num_threads()``; one below
    :data:`MIN_PARALLEL_WORK` multiply-adds), or PyTorch without the C library.
    """
    fmt = _check_input_call(fmt, x, bias)
    rows, cols = fmt.shape
    xr = x.reshape(-1)
    limit = cols if max_active is None else int(max_active)
    lib = get_library()
    if lib is None:
        return _input_sparse_torch(fmt, xr, float(threshold), bias, limit)
    plan = _input_plan(fmt)
    xr = xr.contiguous()
    b = None if bias is None else bias.contiguous()
    out = torch.empty(1, rows, dtype=torch.float32)
    nthreads = max(1, int(threads if threads is not None else torch.get_num_threads()))
    var = INPUT_SPARSE_VARIANT if variant is None else int(variant)
    bias_p = b.data_ptr() if b is not None else None
    # the arguments both entry points share, after the layout's own
    common = (rows, cols, xr.data_ptr(), float(threshold), plan.force_ptr, bias_p, out.data_ptr(), limit)
    run = (nthreads, MIN_PARALLEL_WORK, var)
    if isinstance(fmt, InputSparseDense):
        n = lib.sf_insparse_dense(plan.ptrs[0], fmt.tile, *common, *run)
    else:
        n = lib.sf_insparse_bitmask(*plan.ptrs, int(plan.keep[3].shape[0]), *common, *run)
    if n < 0:
        raise MemoryError("sparseforge sparse-input kernel could not allocate its index buffer")
    return (None if n > limit else out), int(n)


def _input_sparse_torch(
    fmt: _InputFormat, xr: torch.Tensor, threshold: float, bias: torch.Tensor | None, limit: int
) -> tuple[torch.Tensor | None, int]:
    """The PyTorch fallback of :func:`input_sparse_matmul`: the active columns, selected and multiplied."""
    plan = _input_plan(fmt)
    keep = ~(xr.abs() <= threshold)  # NaN is kept, as in drop_small
    active = keep if plan.force_t is None else keep | plan.force_t
    n = int(active.sum())
    if n > limit:
        return None, n
    idx = active.nonzero().squeeze(1)
    xs = torch.where(keep, xr, torch.zeros((), dtype=xr.dtype)).index_select(0, idx)
    rows = fmt.shape[0]
    if isinstance(fmt, InputSparseDense):
        part = torch.from_numpy(plan.keep[0]).index_select(0, idx)  # (active, padded out)
        y = (xs @ part)[:rows]
    else:
        if plan.dense_t is None:
            plan.dense_t = fmt.to_dense()
        y = plan.dense_t.index_select(1, idx) @ xs
    if bias is not None:
        y = y + bias
    return y.reshape(1, rows).contiguous(), n
