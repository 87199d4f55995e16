"""Choosing a format and a per-batch-size path for one layer: predict, measure, or apply a rule.

:func:`candidate_formats` packs a weight in every format that fits its zero pattern;
:func:`predict_ms` is a byte / multiply-add cost model of every format and of dense ``F.linear``
(the prior: it orders the candidates, drops the hopeless ones, and decides under load where it is
confident); :func:`measure_layer` times the remaining candidates and ``F.linear`` on random inputs
of the requested batch sizes (all variants interleaved call by call) and returns a
:class:`LayerChoice`; sparse must beat dense by :data:`SPARSE_MARGIN` to be chosen.

Timings taken while other processes compete for the cores are not trusted: every timing round
records how long this process's threads waited for a CPU (``/proc/self/task/*/schedstat``) and
how far the median call lies above the fastest one. A noisy round is repeated, spread over time,
up to :data:`LOAD_ROUNDS` rounds; the first quiet round decides. If none is quiet, the per-variant
fastest calls of all rounds are the estimate (they approximate the quiet machine), the cost model
overrides them where it predicts a speedup far above the margin, and the choice is flagged
``under_load`` so the user knows to re-tune (:func:`~.convert.retune`).
:func:`rule_layer` is the no-measurement fallback (``autotune=False``): CSR when density <= 0.25,
else dense.

Sparse inputs (a :class:`~sparseforge.activations.ThresholdedLinear`): :func:`measure_input_sparse`
times the sparse-input kernel (:func:`~.kernels.input_sparse_matmul`) on random rows with the
layer's calibrated fraction of active inputs, and at the higher fractions of
:data:`INPUT_DENSITY_LADDER`, interleaved with the path the plain layer runs for one row (dense
``F.linear`` or a packed weight format, after the same thresholding), through the same noise
handling (:func:`_measure_batch`); it returns the packing and the crossover (the most active
inputs for which the kernel still wins by the margin). :func:`rule_input_sparse` is its
no-measurement fallback.
"""

from __future__ import annotations

import glob
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise

import numpy as np
import torch

from ..activations.thresholded import drop_small
from ..errors import SparseforgeError
from .epilogue import apply_activation
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
from .kernels import (
    bitmask_spmv_avx512,
    has_native_kernel,
    input_sparse_matmul,
    kernel_available_for,
    pairs_leading_dim,
    pairs_padded_batch,
    set_spmv_variant,
    sparse_matmul_tensor,
)
from .native import get_library

__all__ = [
    "LayerChoice",
    "TimingRound",
    "candidate_formats",
    "measure_layer",
    "rule_layer",
    "predict_ms",
    "predicted_speedups",
    "RULE_MAX_DENSITY",
    "SPARSE_MARGIN",
    "InputSparseChoice",
    "measure_input_sparse",
    "rule_input_sparse",
    "predict_input_sparse_ms",
    "sparse_input_sample",
    "INPUT_DENSITY_LADDER",
]

#: Two sparse formats whose times are within this fraction of each other count as tied: the
#: smaller one runs, so that timing noise does not swap them between runs of ``convert`` (at 15 %,
#: CSR and bitmask at one row of a 90 % layer still swapped in 1 of 5 runs).
STABLE_TIE = 0.2
#: A sparse kernel must beat dense by this fraction (in interleaved medians) to be chosen.
SPARSE_MARGIN = 0.10

#: Sparse-input packings within this fraction of the fastest count as tied; the smaller one wins
#: (weight formats use :data:`STABLE_TIE`).
TIE_FRACTION = 0.05

#: A candidate whose speedup over dense is within this factor of ``1 + margin`` is a close call:
#: dense and it are timed again over CLOSE_CALL_REPS x reps rounds before deciding.
CLOSE_CALL = 1.5
CLOSE_CALL_REPS = 3
#: ... and, where the layer before it in the model runs dense (``after_dense``), also each right
#: after an untimed dense call of the same layer: the C kernels ran 4-8 % slower right after a
#: PyTorch GEMM than back to back (BERT-base FFN layers at 64 rows, 4096^2 at 128; reading 8 MiB of
#: another buffer before each call instead changed nothing, so it is not the caches), and more on
#: small layers: MiniLM's 384 x 1536 output layer at 19 rows (50 %, `pairs`) measured 1.15x over
#: dense back to back but 0.96x after a dense call, and the converted model ran 5 % slower than
#: dense. Applied to every layer it kept the 4096^2 model at 50 % dense at 1 and 16 rows (0.98x /
#: 1.04x instead of 1.45x / 1.62x), whose layers follow sparse layers, not GEMMs.

#: Calls shorter than this (seconds) are timed over at least SHORT_CALL_REPS rounds.
SHORT_CALL_S = 0.005
SHORT_CALL_REPS = 15
#: ... and calls shorter than this over at least TINY_CALL_REPS rounds: at one row of a BERT-base
#: layer (0.05-0.15 ms a call) the ratio of two formats' medians over 15 rounds ranged 1.17-1.64
#: between runs of ``convert``, across the tie rule's line; the extra rounds cost a few ms.
TINY_CALL_S = 0.0005
TINY_CALL_REPS = 80

#: With ``autotune=False`` a layer runs sparse (CSR) only at or below this density (kept fraction).
RULE_MAX_DENSITY = 0.25

# ---------------------------------------------------------------------------------- load detection
#: A timing round is noisy when this process's threads together waited for a CPU (run queue) for
#: more than this fraction of the round's wall time (summed over threads, so it can exceed 1).
#: Measured on the 2-vCPU development VM, one 4096² layer at 90 %, dense and CSR interleaved:
#: 0.8-1.2 while other users' jobs ran (load ~2), 1.3-1.6 with two busy-loop processes added;
#: a lone spinning thread on that VM waited 0.01 % of its time. The limit is a judgement call.
WAIT_LIMIT = 0.10
#: ... or when some variant's median call is more than this factor above its fastest call (calls
#: of at least SPREAD_MIN_MS only: below that, timer, interpreter and cache jitter dominate). Under
#: the loads above the spread reached 1.1-60 (single OpenMP calls between 1 and 60 ms), so this is
#: the second line of defence where the run-queue wait is unavailable (no /proc). On the idle VM
#: one-row calls of 40-80 us spread 1.45-1.57x: with a 0.05 ms floor every batch-1 round of a
#: BERT-base layer at 90 % looked noisy, and the cost model (which overrates the bitmask kernel
#: there) chose a format 2x slower than the CSR gather kernel.
SPREAD_LIMIT = 1.3
SPREAD_MIN_MS = 0.25
#: Timing rounds per batch size at most while the rounds stay noisy (the first quiet one decides).
LOAD_ROUNDS = 3
#: Pause before a repeated round: the previous round's duration times the round number, within these bounds (s).
PAUSE_MIN_S = 0.05
PAUSE_MAX_S = 1.0

# ------------------------------------------------------------------------------------ cost model
# Predicted time of one call = per-call overhead + bytes streamed / MODEL_GBPS + work / threads,
# where "work" is format-specific nanoseconds of one thread (per kept weight at batch 1, per kept
# weight x batch column above). Calibrated on the development machine (2 vCPUs of an Intel Xeon
# with AVX-512 under KVM, torch 2.13 CPU wheel, gcc -O3 -march=native) with one thread
# (torch.set_num_threads(1)): the fastest of 5-15 calls of dense F.linear and of every format on
# one 4096x4096 layer, magnitude-pruned to 50 / 70 / 90 % (CSR, bitmask), 70 % of 8x8 blocks,
# half the output neurons removed (compact), 2:4 (N:M, Numba), at batch 1, 16 and 128, and a
# 64x64 layer for the per-call overheads. Other jobs shared the machine (load ~2), so the fastest
# calls stand for the quiet machine; the work constants are what is left of each time after the
# bytes at MODEL_GBPS, divided by the work. Fitted times (ms, one thread): dense 2.33 / 8.14 /
# 27.2 at batch 1 / 16 / 128; CSR at 90 % 1.72 / 1.13 / 9.50, at 50 % 7.76 / 6.45 / 47.8; bitmask
# at 90 % 1.66 / 2.25 / 12.4, at 50 % 5.31 / 7.47 / 64.8; 8x8 blocks at 70 % 1.10 / 2.29 / 21.8;
# compact at 50 % 1.17 / 4.28 / 14.5. The model reproduces these within ~15 %; on another CPU it is
# only a prior (the measurement decides whenever the machine is quiet).

#: Read bandwidth (GB/s): ``Tensor.sum`` over 64 MB on one thread, 29.1 GB/s; dense batch 1 streams 67 MB in 2.33 ms (28.8 GB/s).
MODEL_GBPS = 29.0
#: Per-call overhead (ms): a 64x64 layer, F.linear 1.9 us; C kernels 3.3 us at batch 1 and 7.7 us above
#: (input / output transposes); compact and Numba estimated from their extra torch / thread-pool calls.
MODEL_OVERHEAD_MS = {"dense": 0.002, "native1": 0.0033, "native": 0.0077, "compact": 0.008, "numba": 0.03}
#: ns per multiply-add of dense F.linear beyond reading its weight, one thread, by batch (log-interpolated).
_NS_DENSE = ((1, 0.0), (16, 0.0217), (128, 0.0116))
#: CSR: ns per kept weight at batch 1 (0.82 / 0.85 / 0.72 at 90 / 70 / 50 %; the AVX2-gather SpMV
#: measured 5 % faster, modelled alike); per kept weight x batch column (padded to 8) above.
_NS_CSR_SPMV = 0.80
#: The AVX2-gather SpMV: 0.6 ns per kept weight on 4096² at 90 %, 0.34 on BERT-base 3072x768 (short
#: rows, where the scalar kernel's per-row work weighs more: 0.68). Modelled apart since the
#: cost model decides under load: with the scalar figure it preferred bitmask at one row of a 90 %
#: layer, which ran 0.70x as fast as the gather kernel the quiet measurement picks.
_NS_CSR_SPMV_GATHER = 0.45
_NS_CSR_SPMM = ((16, 0.032), (128, 0.043))
#: Bitmask: batch 1 costs 0.32 ns per mask byte (8 columns) + 0.41 ns per kept weight; above,
#: 0.40 ns per mask byte (decoding) + the SpMM cost per kept weight x padded column.
_NS_BITMASK_SPMV = (0.32, 0.41)
#: Bitmask with the AVX-512 SpMV (variant 2, :func:`~.kernels.bitmask_spmv_avx512`): 1.1 ns of one
#: thread per 16 columns (one masked expand-load and FMA; the same at any density), and that
#: work overlaps the prefetched value stream, so a call costs the larger of the two, not their
#: sum. One thread, 4096x4096, fastest of 10 calls: 1.30-1.45 / 1.04-1.16 / 1.14-1.19 ms at 50 /
#: 70 / 90 % (streams 1.23 / 0.77 / 0.31 ms at MODEL_GBPS; 1.05 M steps); the sum model would
#: predict 1.0x of dense at 50 % where 1.6-2.4x was measured, and cap it there under load.
_NS_BITMASK512_STEP = 1.1
_NS_BITMASK_DECODE = 0.40
_NS_BITMASK_SPMM = ((16, 0.040), (128, 0.056))
#: Block: ns per stored weight (zeros inside kept blocks included) at batch 1, per stored weight x padded column above.
_NS_BLOCK_SPMV = 0.080
_NS_BLOCK_SPMM = ((16, 0.020), (128, 0.033))
#: Numba kernels (N:M, or any format without the C library): per kept weight at batch 1, per kept weight x column above.
_NS_NUMBA = (2.35, 0.222)
#: Pairs kernel, ns per kept weight and batch lane (padded to its tiles) on one thread: ~100 GFLOP/s
#: per core on the 2-vCPU AVX-512 Xeon (BERT-base shapes, 50 % density, 64-512 rows).
_NS_PAIRS = 0.020
#: Calls below this many multiply-adds run on one thread (kernels.MIN_PARALLEL_WORK).
_PARALLEL_WORK = 65536

#: Candidates the model predicts at least this many times slower than dense at every batch size
#: are not timed (only for layers whose dense call is predicted to take >= PRUNE_MIN_MS: below,
#: fixed overheads dominate the model and timing is cheap anyway).
PRUNE_BELOW = 0.4
PRUNE_MIN_MS = 0.05
#: Under load, a predicted speedup of at least CONFIDENT x (1 + margin) is trusted over the noisy
#: measurement: such a prediction stays above the threshold even if the model overestimates by
#: 37 % (its error on the calibration set is ~15 %; on the 2-core AMD EPYC of earlier measurements
#: it underestimated batch-1 speedups up to ~2.8x, which errs towards dense). With 2.0 instead,
#: channel-pruned layers at batch 1 (predicted 1.98x, measured 1.85x idle) were decided from
#: the noisy timings and kept dense under sustained load (0.84 of the idle-converted speedup).
CONFIDENT = 1.6
#: Under load, a measured speedup is capped at MODEL_SLACK x the cost model's prediction: a busy
#: machine slows dense more than the kernels in the fastest calls too, so a measurement above the
#: model is not trusted to choose between two sparse formats (measured: 8x8 blocks at 70 % and
#: batch 16 converted under load switched to CSR, predicted 2.2x against the blocks' 3.35x, and
#: ran 0.83x as fast as the idle choice).
MODEL_SLACK = 1.25

_NM_PATTERNS = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))
_BLOCKS = ((8, 8), (4, 4), (1, 8))
_MIN_BLOCK_FILL = 0.6
#: The compacted dense sub-matrix is a candidate when it keeps at most this fraction of the matrix.
_MAX_COMPACT_AREA = 0.8
#: The row-pair format (batched kernel) is a candidate when some batch size has this many rows.
PAIRS_MIN_BATCH = 8
#: Above this density pairs of rows share their common columns (about density^2 of the columns);
#: below it two rows rarely share one and the empty shared runs only cost loop overhead, so each
#: row keeps its own run, in wider blocks (256 columns: at 90 % sparsity a row keeps ~26 per block).
PAIRS_SHARE_MIN_DENSITY = 0.25


@dataclass
class LayerChoice:
    """Outcome for one layer: the kept packed format(s) and the path per batch rows.

    ``choices[b]`` is ``"sparse"`` (``packed``), ``"dense"``, or ``extra.name`` (a second format
    kept for the batch sizes where it beats ``packed`` by the margin). ``predicted`` holds the cost
    model's speedup over dense per candidate and batch size; ``under_load`` says that some batch
    size was decided from noisy timings (``load_note`` says which and how).
    """

    packed: PackedFormat | None
    choices: dict[int, str]
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    extra: PackedFormat | None = None
    predicted: dict[str, dict[int, float]] = field(default_factory=dict)
    under_load: bool = False
    load_note: str = ""


def candidate_formats(weight: torch.Tensor, batch_sizes: tuple[int, ...] = ()) -> list[PackedFormat]:
    """Every packed format that suits ``weight``'s zeros: CSR and bitmask always; the row-pair
    format when some batch size has at least :data:`PAIRS_MIN_BATCH` rows (and its C kernel is
    built); N:M, block and compact dense (whole zero rows or columns) when they fit."""
    w = weight.detach().contiguous()
    out: list[PackedFormat] = [CompactCSR.from_dense(w), Bitmask.from_dense(w)]
    if batch_sizes and max(batch_sizes) >= PAIRS_MIN_BATCH and get_library() is not None:
        density = float((w != 0).float().mean()) if w.numel() else 0.0
        share = density > PAIRS_SHARE_MIN_DENSITY
        out.append(PairedCSR.from_dense(w, cb=128 if share else 256, share=share))
    for n_keep, m in _NM_PATTERNS:
        if PackedNM.fits(w, n_keep, m):
            out.append(PackedNM.from_dense(w, n_keep, m))
            break
    for bh, bw in _BLOCKS:
        if BlockSparse.fill_ratio(w, bh, bw) >= _MIN_BLOCK_FILL:
            out.append(BlockSparse.from_dense(w, bh, bw))
            break
    if CompactDense.area(w) <= _MAX_COMPACT_AREA:
        out.append(CompactDense.from_dense(w))
    return out


# ------------------------------------------------------------------------------------ cost model
def _interp(table: tuple[tuple[int, float], ...], batch: int) -> float:
    """``table`` value at ``batch``, linear in log2(batch) between its points, constant beyond them."""
    if batch <= table[0][0]:
        return table[0][1]
    for (b0, v0), (b1, v1) in pairwise(table):
        if batch <= b1:
            t = (math.log2(batch) - math.log2(b0)) / (math.log2(b1) - math.log2(b0))
            return v0 + t * (v1 - v0)
    return table[-1][1]


def _dense_ms(rows: int, cols: int, batch: int, threads: int) -> float:
    work = rows * cols * batch
    t = threads if work >= _PARALLEL_WORK else 1
    return (
        MODEL_OVERHEAD_MS["dense"]
        + (4 * rows * cols + 4 * batch * (rows + cols)) / (MODEL_GBPS * 1e6)
        + work * _interp(_NS_DENSE, batch) / t * 1e-6
    )


def _bitmask_avx512(fmt: Bitmask) -> bool:
    """Whether ``fmt`` runs the AVX-512 bitmask SpMV at batch 1 (the library has it, and the weight
    is not pinned to another variant)."""
    return getattr(fmt, "_sf_spmv_variant", None) in (None, 2) and bitmask_spmv_avx512()


def predict_ms(
    fmt: PackedFormat | None, shape: tuple[int, int], batch: int, threads: int | None = None, variant: int | None = None
) -> float:
    """Predicted milliseconds of one call at ``batch`` input rows: dense ``F.linear`` when ``fmt``
    is ``None``, else ``fmt``'s kernel (bias ignored; ``variant=1``: CSR's AVX2-gather SpMV at batch
    1). See the constants above for the calibration."""
    rows, cols = int(shape[0]), int(shape[1])
    batch = max(1, int(batch))
    threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
    if fmt is None:
        return _dense_ms(rows, cols, batch, threads)
    if isinstance(fmt, CompactDense):
        kr, kc = fmt.weight.shape
        return (
            MODEL_OVERHEAD_MS["compact"]
            + _dense_ms(kr, kc, batch, threads)
            + 8 * batch * (rows + cols) / (MODEL_GBPS * 1e6)
        )
    kept = int(fmt.nnz)
    padded = (batch + 7) // 8 * 8
    io = 4 * batch * (rows + cols) * (1 if batch == 1 else 3)  # x and y; above batch 1 also the transposed copies
    if not has_native_kernel(fmt):  # Numba (N:M, or no C library)
        ns = kept * (_NS_NUMBA[0] if batch == 1 else _NS_NUMBA[1] * batch)
        overhead = MODEL_OVERHEAD_MS["numba"]
    else:
        overhead = MODEL_OVERHEAD_MS["native1" if batch == 1 else "native"]
        if isinstance(fmt, PairedCSR):
            lanes = pairs_padded_batch(batch)
            ns = kept * lanes * _NS_PAIRS
        elif isinstance(fmt, BlockSparse):
            ns = kept * (_NS_BLOCK_SPMV if batch == 1 else padded * _interp(_NS_BLOCK_SPMM, batch))
        elif isinstance(fmt, Bitmask):
            steps = rows * ((cols + 63) // 64) * 8
            if batch == 1 and _bitmask_avx512(fmt):
                t = threads if kept >= _PARALLEL_WORK else 1
                stream = (fmt.nbytes + io) / (MODEL_GBPS * 1e6)
                return overhead + max(stream, steps / 2 * _NS_BITMASK512_STEP / t * 1e-6)  # 8-column steps / 2
            if batch == 1:
                ns = steps * _NS_BITMASK_SPMV[0] + kept * _NS_BITMASK_SPMV[1]
            else:
                ns = steps * _NS_BITMASK_DECODE + kept * padded * _interp(_NS_BITMASK_SPMM, batch)
        else:  # CSR
            spmv = _NS_CSR_SPMV_GATHER if variant == 1 else _NS_CSR_SPMV
            ns = kept * (spmv if batch == 1 else padded * _interp(_NS_CSR_SPMM, batch))
    t = threads if kept * batch >= _PARALLEL_WORK else 1
    return overhead + (fmt.nbytes + io) / (MODEL_GBPS * 1e6) + ns / t * 1e-6


def predicted_speedups(
    shape: tuple[int, int], formats: dict[str, PackedFormat], batch_sizes: tuple[int, ...], threads: int | None = None
) -> dict[str, dict[int, float]]:
    """``{name: {batch: predicted dense time / format time}}`` for the named formats."""
    out: dict[str, dict[int, float]] = {}
    for name, fmt in formats.items():
        out[name] = {b: predict_ms(None, shape, b, threads) / predict_ms(fmt, shape, b, threads) for b in batch_sizes}
    return out


# ------------------------------------------------------------------------------------ timing
def _interleaved_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Wall-clock ms of every call of each function, timed round-robin (one call each per round).

    Interleaving makes every variant see the same machine load; two untimed warm-up calls each.
    When every call is shorter than :data:`SHORT_CALL_S`, at least :data:`SHORT_CALL_REPS` rounds
    (:data:`TINY_CALL_REPS` below :data:`TINY_CALL_S`).
    """
    warm = []
    for fn in fns.values():
        fn()
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    if max(warm) < SHORT_CALL_S:
        reps = max(reps, SHORT_CALL_REPS)  # short calls: more rounds cost little and cut noise
    if max(warm) < TINY_CALL_S:
        reps = max(reps, TINY_CALL_REPS)
    return _round_robin(fns, reps)


def _times_after(
    fns: dict[str, Callable[[], object]], reps: int, before: Callable[[], object]
) -> dict[str, list[float]]:
    """Like :func:`_interleaved_times` (no warm-up), but every call follows an untimed call of
    ``before``: ms of every call as it runs after another operation."""
    return _round_robin(fns, reps, before)


def _round_robin(
    fns: dict[str, Callable[[], object]], reps: int, before: Callable[[], object] | None = None
) -> dict[str, list[float]]:
    """``reps`` rounds of one timed call of each function (ms), each after ``before`` (untimed) if given."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(reps):  # rotate the starting variant: no variant always follows the slowest one
        for k, fn in items[i % len(items) :] + items[: i % len(items)]:
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms per call of each function, from :func:`_interleaved_times`."""
    return {k: float(np.median(v)) for k, v in _interleaved_times(fns, reps).items()}


def run_queue_wait_ns() -> dict[str, int] | None:
    """Nanoseconds each thread of this process has spent runnable but not running (waiting for a
    CPU), from ``/proc/self/task/*/schedstat``; ``None`` where the kernel does not provide it."""
    out: dict[str, int] = {}
    for path in glob.glob("/proc/self/task/*/schedstat"):
        try:
            with open(path) as f:
                out[path.split("/")[-2]] = int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return out or None


@dataclass
class TimingRound:
    """One interleaved timing round: ``times[variant]`` = ms of every call; ``wait`` = run-queue
    wait of this process's threads over the round's wall time (``None``: unknown); ``wall_s`` = its duration."""

    times: dict[str, list[float]]
    wait: float | None = None
    wall_s: float = 0.0

    def medians(self) -> dict[str, float]:
        return {k: float(np.median(v)) for k, v in self.times.items()}

    def noise(self) -> str | None:
        """Why these timings cannot be trusted (one phrase), or ``None`` when the round looks quiet."""
        if self.wait is not None and self.wait > WAIT_LIMIT:
            return f"threads waited for a CPU {self.wait:.0%} of the time"
        spreads = {
            k: float(np.median(v)) / min(v)
            for k, v in self.times.items()
            if v and min(v) > 0 and float(np.median(v)) >= SPREAD_MIN_MS
        }
        if spreads:
            k = max(spreads, key=spreads.__getitem__)
            if spreads[k] > SPREAD_LIMIT:
                return f"{k}'s median call {spreads[k]:.2f}x its fastest"
        return None


def _timing_round(fns: dict[str, Callable[[], object]], reps: int) -> TimingRound:
    """Time ``fns`` interleaved (:func:`_interleaved_times`) and record the run-queue wait meanwhile."""
    before = run_queue_wait_ns()
    t0 = time.perf_counter()
    times = _interleaved_times(fns, reps)
    wall = time.perf_counter() - t0
    after = run_queue_wait_ns()
    wait = None
    if before is not None and after is not None and wall > 0:
        wait = sum(max(0, ns - before.get(tid, 0)) for tid, ns in after.items()) / 1e9 / wall
    return TimingRound(times, wait, wall)


def _pause(seconds: float) -> None:
    time.sleep(seconds)


def _rounds_until_quiet(fns: dict[str, Callable[[], object]], reps: int) -> tuple[list[TimingRound], bool]:
    """Timing rounds until one is quiet, at most :data:`LOAD_ROUNDS`, paused in between (longer
    each time: load from other jobs comes and goes); ``(rounds, whether the last one is quiet)``."""
    rounds: list[TimingRound] = []
    for i in range(LOAD_ROUNDS):
        if i:
            _pause(min(PAUSE_MAX_S, max(PAUSE_MIN_S, rounds[-1].wall_s * i)))
        rounds.append(_timing_round(fns, reps))
        if rounds[-1].noise() is None:
            return rounds, True
    return rounds, False


def _pooled(rounds: list[TimingRound]) -> tuple[dict[str, float], dict[str, float]]:
    """Per variant: the fastest call over all rounds and the median of all calls."""
    keys = rounds[0].times
    fastest = {k: min(min(r.times[k]) for r in rounds) for k in keys}
    median = {k: float(np.median([t for r in rounds for t in r.times[k]])) for k in keys}
    return fastest, median


def _is_close(speedup: float, threshold: float) -> bool:
    return threshold / CLOSE_CALL <= speedup <= threshold * CLOSE_CALL


def _confirm_close_calls(
    fns: dict[str, Callable[[], object]],
    medians: dict[str, float],
    reps: int,
    margin: float,
    after_dense: bool = False,
) -> tuple[dict[str, float], str | None]:
    """Time dense and every candidate near the decision threshold again, :data:`CLOSE_CALL_REPS`
    times longer, and keep for each the *less favourable* of two estimates of its speedup over
    dense: the ratio of medians and the ratio of fastest calls; with ``after_dense`` (the layer
    before this one runs dense at this batch size) also timed with every call right after a dense
    call (:func:`_times_after`), and the least favourable of the three estimates is kept. A kernel
    that won by noise must not replace dense; in particular a busy machine (another process taking
    one core now and then) slows a multi-threaded dense GEMM more than our dynamically scheduled
    kernels, so the medians alone can favour sparse at a batch size where it loses on a quiet
    machine; the fastest calls are the quiet-machine estimate. Returned as ms relative to the first pass's dense median
    (``dense / speedup``), so every candidate is compared with the same dense number, with a note
    when the second timing stayed noisy (its rounds are then pooled)."""
    threshold = 1.0 + margin
    close = [k for k, v in medians.items() if k != "dense" and v > 0 and _is_close(medians["dense"] / v, threshold)]
    if not close:
        return medians, None
    chosen = {k: fns[k] for k in ("dense", *close)}
    rounds, quiet = _rounds_until_quiet(chosen, reps * CLOSE_CALL_REPS)
    fastest, median = _pooled(rounds[-1:] if quiet else rounds)
    after_median: dict[str, float] = {}
    if after_dense:  # each after a dense call, as many rounds as the first timing had (short calls get more)
        after = _times_after(chosen, len(rounds[-1].times["dense"]), fns["dense"])
        after_median = {k: float(np.median(v)) for k, v in after.items()}
    out = dict(medians)
    for k in close:
        speedup = min(median["dense"] / median[k], fastest["dense"] / fastest[k])
        if after_median.get(k, 0.0) > 0 and after_median.get("dense", 0.0) > 0:
            speedup = min(speedup, after_median["dense"] / after_median[k])
        out[k] = medians["dense"] / speedup
    note = (
        None
        if quiet
        else f"close call {', '.join(close)} timed again under load ({rounds[-1].noise()}, {len(rounds)} rounds)"
    )
    return out, note


def _measure_batch(
    fns: dict[str, Callable[[], object]],
    reps: int,
    margin: float,
    predicted: dict[str, float],
    after_dense: bool = False,
) -> tuple[dict[str, float], str | None]:
    """ms per call of every variant at one batch size (dense under ``"dense"``), and a note when
    the timings were taken under load.

    Quiet round (the first, or a repeat): its medians, close calls confirmed
    (:func:`_confirm_close_calls`). No quiet round in :data:`LOAD_ROUNDS`: every candidate's
    speedup is the ratio of fastest calls over all rounds (for a close call, the less favourable of
    that and the ratio of pooled medians), except where the cost model predicts at least
    :data:`CONFIDENT` x the threshold: that prediction is used; elsewhere a measured speedup above
    :data:`MODEL_SLACK` x the prediction is capped there. Times are then dense's fastest call over
    the speedup.
    """
    rounds, quiet = _rounds_until_quiet(fns, reps)
    if quiet:
        return _confirm_close_calls(fns, rounds[-1].medians(), reps, margin, after_dense)
    threshold = 1.0 + margin
    fastest, median = _pooled(rounds)
    out = {"dense": fastest["dense"]}
    from_model: list[str] = []
    capped: list[str] = []
    for k in fns:
        if k == "dense":
            continue
        speedup = fastest["dense"] / fastest[k] if fastest[k] > 0 else 0.0
        med = median["dense"] / median[k] if median[k] > 0 else 0.0
        if _is_close(speedup, threshold) or _is_close(med, threshold):
            speedup = min(speedup, med)
        p = predicted.get(k, 0.0)
        if p >= CONFIDENT * threshold:
            speedup = p
            from_model.append(f"{k} {p:.1f}x")
        elif p > 0 and speedup > MODEL_SLACK * p:
            speedup = MODEL_SLACK * p
            capped.append(k)
        out[k] = fastest["dense"] / speedup if speedup > 0 else float("inf")
    how = f"cost model for {', '.join(from_model)}" if from_model else "fastest calls of all rounds"
    if capped:
        how += f" (capped at {MODEL_SLACK}x the cost model for {', '.join(capped)})"
    return out, f"{len(rounds)} noisy rounds ({rounds[-1].noise()}), decided from the {how}"


def _describe(fmt: PackedFormat) -> str:
    extra = "".join(f",{k}={v}" for k, v in fmt.params().items())
    return f"{fmt.name}{'(' + extra[1:] + ')' if extra else ''}"


def measure_layer(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    batch_sizes: tuple[int, ...],
    reps: int = 5,
    seed: int = 0,
    margin: float = SPARSE_MARGIN,
    max_formats: int = 2,
    activation: str | None = None,
    transposed_in: frozenset[int] = frozenset(),
    transposed_output: bool = False,
    after_dense: frozenset[int] = frozenset(),
) -> LayerChoice:
    """Time dense ``F.linear`` against every candidate format at each batch size (rows).

    The calls are timed as they will run in the model: ``activation`` (the activation module
    ``convert`` will fuse into this layer) runs after dense and inside or after each candidate;
    at the batch sizes in ``transposed_in`` the input comes as the previous pairs layer hands it
    over (a transposed view); ``transposed_output``: the pairs candidate returns its output that
    way (its consumer reads it in place); at the batch sizes in ``after_dense`` the layer before
    this one runs dense, so close calls are also timed right after a dense call.

    The cost model (:func:`predict_ms`) first orders the candidates and drops those it predicts
    :data:`PRUNE_BELOW` x slower than dense at every batch size. Dense and the others are timed
    interleaved, ``reps`` rounds (median ms per call, bias included on both sides). A format
    *wins* a batch size only when ``dense_ms >= (1 + margin) * sparse_ms``, so measurement noise
    does not pick a kernel that is really slower than dense; candidates within a factor
    :data:`CLOSE_CALL` of that threshold are timed again, longer, together with dense, and must win
    on both the medians and the fastest calls (:func:`_confirm_close_calls`). Noisy timings
    (other processes competing for the cores) are repeated and, if they stay noisy, replaced by
    fastest-call estimates and confident cost-model predictions (:func:`_measure_batch`); the
    choice is then flagged ``under_load``.
    At each batch size the format that runs is, among those beating dense by the margin, the
    smallest one within :data:`STABLE_TIE` of the fastest (dense where none wins), so that timing
    noise cannot swap two close formats between runs. If that asks for more than ``max_formats``
    formats (default 2), the set of ``max_formats`` formats with the lowest mean time relative to
    dense over the batch sizes is kept (within :data:`STABLE_TIE`, the fewest bytes). The first
    format is the one running at the most batch sizes.
    """
    if max_formats not in (1, 2) or isinstance(max_formats, bool):
        raise SparseforgeError(f"max_formats={max_formats!r} is not allowed; allowed: 1 or 2")
    gen = torch.Generator().manual_seed(seed)
    w = weight.detach().contiguous()
    shape = (int(w.shape[0]), int(w.shape[1]))
    threads = torch.get_num_threads()
    found: list[tuple[str, PackedFormat, int | None]] = []
    for f in candidate_formats(w, tuple(batch_sizes)):
        if not kernel_available_for(f):
            continue
        found.append((_describe(f), f, None))
        if isinstance(f, CompactCSR) and has_native_kernel(f) and 1 in batch_sizes:
            found.append(
                (_describe(f) + "[gather]", f, 1)
            )  # the same weight with the AVX2-gather SpMV (batch 1 only differs)
    predicted = predicted_speedups(shape, {n: f for n, f, _ in found}, tuple(batch_sizes), threads)
    for n, f, kernel in found:
        if kernel is not None:  # the same weight on another batch-1 kernel
            predicted[n] = {
                b: predict_ms(None, shape, b, threads) / predict_ms(f, shape, b, threads, variant=kernel)
                for b in batch_sizes
            }
    pruned: list[str] = []
    if _dense_ms(*shape, max(batch_sizes), threads) >= PRUNE_MIN_MS:
        pruned = [n for n, _, _ in found if all(predicted[n][b] < PRUNE_BELOW for b in batch_sizes)]
    # fastest predicted first (mean predicted time relative to dense over the batch sizes)
    found = sorted(
        (c for c in found if c[0] not in pruned), key=lambda c: sum(1.0 / predicted[c[0]][b] for b in batch_sizes)
    )
    names = [n for n, _, _ in found]
    cands = [f for _, f, _ in found]
    variants = [v for _, _, v in found]
    pruned_note = (
        (
            f"; not timed (cost model predicts < {PRUNE_BELOW}x of dense): "
            + ", ".join(f"{n} {max(predicted[n].values()):.2f}x" for n in pruned)
        )
        if pruned
        else ""
    )
    if not found:
        return LayerChoice(
            None, {b: "dense" for b in batch_sizes}, "dense: " + pruned_note[2:], {}, predicted=predicted
        )
    timings: dict[str, dict[int, float]] = {"dense": {}, **{n: {} for n in names}}
    notes: dict[int, str] = {}
    act_ms: dict[int, float] = {}  # the PyTorch activation after an unfused kernel, for the tie rule
    for b in batch_sizes:
        x = _layer_input(b, w.shape[1], b in transposed_in and b > 1, gen)
        if activation is not None:
            act_ms[b] = _activation_ms(b, int(w.shape[0]), activation, gen)
        fns: dict[str, Callable[[], object]] = {"dense": partial(_dense_call, x, w, bias, activation)}
        for name, fmt, var in zip(names, cands, variants, strict=True):
            if var is not None and b != 1:
                continue  # identical to the default kernel above batch 1
            if isinstance(fmt, PairedCSR) and b < PAIRS_MIN_BATCH:
                continue  # a tile of at least 16 lanes for a few rows: not a candidate there
            chained = transposed_output and isinstance(fmt, PairedCSR)
            fns[name] = partial(_sparse_call, fmt, x, bias, var, activation, chained)
        ms, note = _measure_batch(
            fns, reps, margin, {k: predicted[k][b] for k in fns if k != "dense"}, b in after_dense
        )
        if note:
            notes[b] = note
        for k, v in ms.items():
            timings[k][b] = v
        for name, fmt in zip(names, cands, strict=True):
            if b not in timings[name]:
                same = timings.get(_describe(fmt), {})  # csr[gather] above batch 1: csr's time
                timings[name][b] = same.get(b, float("inf"))
    load_note = "; ".join(f"batch {b}: {n}" for b, n in notes.items())
    suffix = pruned_note + (f"; UNDER LOAD, re-tune on a quiet machine: {load_note}" if notes else "")

    def wins(name: str, b: int) -> bool:
        return timings["dense"][b] >= (1.0 + margin) * timings[name][b]

    # Per batch size, the format that runs: among those beating dense by the margin, the smallest
    # within STABLE_TIE of the fastest (fewer bytes streamed per call: in a model, layers run back
    # to back and compete for memory bandwidth; and noise cannot swap two close formats between
    # runs). When that asks for more formats than max_formats, the set of max_formats formats with
    # the lowest mean (time of the path taken / dense time) over the batch sizes is kept (each batch
    # size counts equally; within STABLE_TIE of the lowest, the fewest bytes).
    obj = {n: id(f) for n, f in zip(names, cands, strict=True)}
    size = {n: f.nbytes for n, f in zip(names, cands, strict=True)}
    var_of = {n: v for n, v in zip(names, variants, strict=True)}
    order = {n: i for i, n in enumerate(names)}

    fused = {n for n, f in zip(names, cands, strict=True) if isinstance(f, PairedCSR)}

    def kernel_ms(n: str, b: int) -> float:
        # ties compare the kernels: an unfused format's time less the PyTorch activation after it
        # (at one row the activation can cost as much as the kernel and hide a 2x difference)
        return max(timings[n][b] - (0.0 if n in fused else act_ms.get(b, 0.0)), 1e-6)

    def runs_at(b: int, allowed: set[str]) -> str:
        ok = [n for n in allowed if wins(n, b)]
        if not ok:
            return "dense"
        fastest = min(kernel_ms(n, b) for n in ok)
        near = [n for n in ok if kernel_ms(n, b) <= (1.0 + STABLE_TIE) * fastest]
        # a batch-1 kernel variant times like its plain kernel above batch 1: name the plain one
        return min(near, key=lambda n: (size[n], timings[n][b], b != 1 and var_of[n] is not None, order[n]))

    def path_ms(assign: dict[int, str], b: int) -> float:
        return timings["dense"][b] if assign[b] == "dense" else timings[assign[b]][b]

    assign = {b: runs_at(b, set(names)) for b in batch_sizes}
    used = {obj[n] for n in assign.values() if n != "dense"}
    if len(used) > max_formats:
        winners = sorted({obj[n] for n in names if any(wins(n, b) for b in batch_sizes)})
        options = []
        for combo in itertools.combinations(winners, max_formats):
            trial = {b: runs_at(b, {n for n in names if obj[n] in combo}) for b in batch_sizes}
            score = sum(path_ms(trial, b) / timings["dense"][b] for b in batch_sizes) / len(batch_sizes)
            options.append((score, sum(size[n] for n in {v for v in trial.values() if v != "dense"}), trial))
        lowest = min(o[0] for o in options)
        assign = min((o for o in options if o[0] <= lowest * (1.0 + STABLE_TIE)), key=lambda o: (o[1], o[0]))[2]
    if all(n == "dense" for n in assign.values()):
        speeds = ", ".join(
            f"batch {b}: best sparse {min((timings[n][b] for n in names), default=float('nan')):.3g} ms vs dense {timings['dense'][b]:.3g} ms"
            for b in batch_sizes
        )
        return LayerChoice(
            None,
            {b: "dense" for b in batch_sizes},
            f"dense: no sparse kernel beat dense by >= {margin:.0%} ({speeds}){suffix}",
            timings,
            predicted=predicted,
            under_load=bool(notes),
            load_note=load_note,
        )
    # the main format: the one running at the most batch sizes (ties: the smaller)
    by_obj: dict[int, list[str]] = {}
    for b in batch_sizes:
        if assign[b] != "dense":
            by_obj.setdefault(obj[assign[b]], []).append(assign[b])
    ranked = sorted(by_obj.values(), key=lambda ns: (-len(ns), size[ns[0]], order[ns[0]]))
    fmt_of = {n: f for n, f in zip(names, cands, strict=True)}
    kept: list[tuple[str, PackedFormat]] = []
    for ns in ranked:
        at_one = [n for b, n in assign.items() if b == 1 and n in ns]  # the batch-1 variant, if it runs there
        name = at_one[0] if at_one else ns[0]
        set_spmv_variant(fmt_of[name], var_of[name])
        kept.append((name, fmt_of[name]))
    name, fmt = kept[0]
    extra = kept[1] if len(kept) > 1 else None
    choices = {
        b: "dense" if assign[b] == "dense" else "sparse" if obj[assign[b]] == id(fmt) else fmt_of[assign[b]].name
        for b in batch_sizes
    }
    chosen = {b: assign[b] if assign[b] != "dense" else name for b in batch_sizes}
    why = ", ".join(
        f"batch {b}: {choices[b] if choices[b] != 'sparse' else fmt.name} ({timings[chosen[b]][b]:.3g} ms {chosen[b]} vs "
        f"{timings['dense'][b]:.3g} ms dense, {timings['dense'][b] / timings[chosen[b]][b]:.2f}x)"
        for b in batch_sizes
    )
    kept_text = name + (f" + {extra[0]}" if extra is not None else "")
    return LayerChoice(
        fmt,
        choices,
        f"{kept_text} measured (sparse needs >= {margin:.0%} over dense): {why}{suffix}",
        timings,
        extra=extra[1] if extra is not None else None,
        predicted=predicted,
        under_load=bool(notes),
        load_note=load_note,
    )


def _sparse_call(
    fmt: PackedFormat,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    variant: int | None = None,
    activation: str | None = None,
    transposed_output: bool = False,
) -> None:
    """One call as :class:`~.modules.SparseLinear` makes it (bias and a fused activation included)."""
    set_spmv_variant(fmt, variant)
    sparse_matmul_tensor(fmt, x, bias=bias, activation=activation, transposed_output=transposed_output)


def _dense_call(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """The dense layer (and the activation module after it, when one is to be fused)."""
    return apply_activation(torch.nn.functional.linear(x, w, bias), activation)


def _activation_ms(rows: int, width: int, activation: str, gen: torch.Generator, calls: int = 15) -> float:
    """Median ms of the PyTorch activation on a ``(rows, width)`` output (what an unfused kernel adds)."""
    y = torch.randn(rows, width, generator=gen)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        apply_activation(y, activation)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _layer_input(rows: int, cols: int, transposed: bool, gen: torch.Generator) -> torch.Tensor:
    """Random ``(rows, cols)`` input; ``transposed``: laid out as a pairs layer's transposed output."""
    if not transposed:
        return torch.randn(rows, cols, generator=gen)
    ld = pairs_leading_dim(rows)
    store = torch.randn(cols, ld, generator=gen)
    return store[:, :rows].T


def rule_layer(weight: torch.Tensor, batch_sizes: tuple[int, ...]) -> LayerChoice:
    """No measurement: CSR for every batch size if density <= :data:`RULE_MAX_DENSITY`, else dense."""
    density = float((weight != 0).float().mean()) if weight.numel() else 1.0
    if density <= RULE_MAX_DENSITY:
        return LayerChoice(
            CompactCSR.from_dense(weight.detach().contiguous()),
            {b: "sparse" for b in batch_sizes},
            f"csr by rule: density {density:.3f} <= {RULE_MAX_DENSITY} (autotune=False)",
        )
    return LayerChoice(
        None,
        {b: "dense" for b in batch_sizes},
        f"dense by rule: density {density:.3f} > {RULE_MAX_DENSITY} (autotune=False; sparse kernels lose here on the reference CPU)",
    )


# ------------------------------------------------------------------------------------ sparse inputs
#: Fractions of active inputs, besides the layer's calibrated one, at which the sparse-input kernel
#: is timed (those above the calibrated one): the crossover is the largest of them up to which it
#: wins by the margin at every timed fraction.
INPUT_DENSITY_LADDER = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
#: The weight-sparse sparse-input layout (:class:`~.formats.InputSparseBitmask`) is a candidate
#: from this weight sparsity on (below it, its masks and offsets cost more than the zeros save).
INPUT_BITMASK_MIN_SPARSITY = 0.25
#: ``autotune=False``: the kernel runs for layers calibrated to drop at least this fraction of
#: their inputs, while at most RULE_CROSSOVER of a row's inputs are active (the benchmark's dense-
#: weight kernel won at 50 % active inputs on every shape, one and two threads).
RULE_MIN_INPUT_SPARSITY = 0.5
RULE_CROSSOVER = 0.5
#: Cost model of the sparse-input kernel: a call reads its packed bytes times
#: ``min(1, active fraction x _INPUT_WASTE)``: the input-major layout reads the active inputs'
#: rows only, but a pass keeps its sums in L1/L2 and a short row costs its start-up (big layers on
#: the development Xeon, one thread: 50 % active inputs 0.48-0.5 of dense ``F.linear``, 75 %
#: 0.6-0.75; the tile-major layout before it needed 1.6 here); plus the gather, ns per input.
_INPUT_WASTE = 1.1
_NS_INPUT_GATHER = 0.5
#: The thresholding (``drop_small``: three PyTorch ops) the plain path runs before its matmul, ms.
_DROP_SMALL_MS = 0.006

_InputFormat = InputSparseDense | InputSparseBitmask


@dataclass
class InputSparseChoice:
    """Outcome of :func:`measure_input_sparse` / :func:`rule_input_sparse` for one thresholded layer.

    ``packed``: the sparse-input packing to run for one row (``None``: the plain path wins);
    ``max_active``: the crossover as a count of active inputs (the kernel runs while a row has at
    most this many); ``crossover``: the same as a fraction of ``in_features``; ``timings_ms``:
    ``{"plain:<path>": {1: ms}, "<format>@<fraction>": {1: ms}}``.
    """

    packed: _InputFormat | None
    max_active: int
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    predicted: dict[str, dict[int, float]] = field(default_factory=dict)
    under_load: bool = False
    crossover: float | None = None


def sparse_input_sample(cols: int, density: float, threshold: float, generator: torch.Generator) -> torch.Tensor:
    """A random ``(1, cols)`` float32 row with ``round(density * cols)`` entries of magnitude above
    ``threshold`` at random positions; the others have magnitude at most ``threshold`` (0 when it is 0)."""
    n = min(cols, max(0, round(density * cols)))
    x = (torch.rand(1, cols, generator=generator) * 2 - 1) * float(threshold)
    pos = torch.randperm(cols, generator=generator)[:n]
    big = float(threshold) + 0.5 + torch.randn(n, generator=generator).abs()
    sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    x[0, pos] = sign * big
    return x


def predict_input_sparse_ms(fmt: _InputFormat, density: float, threads: int | None = None) -> float:
    """Predicted ms of one sparse-input call at ``density`` (fraction of active inputs); see
    :data:`_INPUT_WASTE`. Memory-bound: ``threads`` does not enter."""
    rows, cols = fmt.shape
    read = fmt.nbytes * min(1.0, max(0.0, density) * _INPUT_WASTE) + 4 * (rows + cols)
    return MODEL_OVERHEAD_MS["native1"] + cols * _NS_INPUT_GATHER * 1e-6 + read / (MODEL_GBPS * 1e6)


def _density_key(fmt: _InputFormat, density: float) -> str:
    return f"{fmt.name}@{density:.3f}"


def _plain_row_path(plain: LayerChoice) -> tuple[str, PackedFormat | None]:
    """``(name, format)`` of what the plain layer runs for one row (format ``None``: dense)."""
    path = plain.choices.get(1, plain.choices[min(plain.choices)])
    if path == "dense":
        return "dense", None
    fmt = plain.packed if path == "sparse" else plain.extra
    return (_describe(fmt), fmt) if fmt is not None else ("dense", None)


def _plain_row_call(
    fmt: PackedFormat | None, weight: torch.Tensor, bias: torch.Tensor | None, threshold: torch.Tensor, x: torch.Tensor
) -> None:
    """One row as :class:`~.modules.InputSparseLinear`'s plain path runs it: thresholding, then the matmul."""
    xd = drop_small(x, threshold)
    if fmt is None:
        torch.nn.functional.linear(xd, weight, bias)
    else:
        sparse_matmul_tensor(fmt, xd, bias=bias)


def measure_input_sparse(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    threshold: float,
    input_sparsity: float,
    plain: LayerChoice,
    reps: int = 5,
    seed: int = 0,
    margin: float = SPARSE_MARGIN,
) -> InputSparseChoice:
    """Time the sparse-input kernel against the plain layer's one-row path; pick a packing and a crossover.

    Candidates: :class:`~.formats.InputSparseDense`, and :class:`~.formats.InputSparseBitmask`
    when the weight's sparsity is at least :data:`INPUT_BITMASK_MIN_SPARSITY`. Each is timed on
    random rows (:func:`sparse_input_sample`) with ``1 - input_sparsity`` of the inputs active (the
    calibrated fraction; at least one input) and with every higher fraction of
    :data:`INPUT_DENSITY_LADDER`, all interleaved with the plain path (``plain``'s choice for one
    row: dense ``F.linear`` or a packed format, after the same ``drop_small``), ``reps`` rounds, with
    the noise handling, close-call re-timing and cost-model prior of :func:`measure_layer`.

    A candidate qualifies when it beats the plain path by ``margin`` at the calibrated fraction;
    its crossover is the largest timed fraction up to which it wins by the margin at every timed
    fraction (the kernel's time grows with the active inputs, the plain path's does not). The
    fastest qualifying candidate at the calibrated fraction is kept (within :data:`TIE_FRACTION`:
    the larger crossover, then the fewer bytes); ``max_active = floor(crossover * in_features)``.
    """
    w = weight.detach().contiguous()
    rows, cols = int(w.shape[0]), int(w.shape[1])
    d0 = max(1.0 / max(cols, 1), 1.0 - float(input_sparsity))
    densities = sorted({d0, *(d for d in INPUT_DENSITY_LADDER if d > d0 + 1e-9)})
    cands: list[_InputFormat] = [InputSparseDense.from_dense(w)]
    if w.numel() and float((w == 0).float().mean()) >= INPUT_BITMASK_MIN_SPARSITY:
        cands.append(InputSparseBitmask.from_dense(w))
    gen = torch.Generator().manual_seed(seed)
    samples = {d: sparse_input_sample(cols, d, threshold, gen) for d in densities}
    plain_name, plain_fmt = _plain_row_path(plain)
    thr = torch.tensor(float(threshold), dtype=torch.float32)
    fns: dict[str, Callable[[], object]] = {"dense": partial(_plain_row_call, plain_fmt, w, bias, thr, samples[d0])}
    base_ms = predict_ms(plain_fmt, (rows, cols), 1) + _DROP_SMALL_MS
    predicted: dict[str, float] = {}
    for fmt in cands:
        for d in densities:
            key = _density_key(fmt, d)
            fns[key] = partial(input_sparse_matmul, fmt, samples[d], float(threshold), bias)
            predicted[key] = base_ms / predict_input_sparse_ms(fmt, d)
    ms, note = _measure_batch(fns, reps, margin, predicted)
    timings = {f"plain:{plain_name}": {1: ms["dense"]}, **{k: {1: v} for k, v in ms.items() if k != "dense"}}
    suffix = f"; UNDER LOAD, re-tune on a quiet machine: {note}" if note else ""

    def wins(fmt: _InputFormat, d: float) -> bool:
        return ms["dense"] >= (1.0 + margin) * ms[_density_key(fmt, d)]

    scored: list[tuple[float, float, int, _InputFormat]] = []
    for fmt in cands:
        if not wins(fmt, d0):
            continue
        cross = d0
        for d in densities:
            if not wins(fmt, d):
                break
            cross = d
        scored.append((ms[_density_key(fmt, d0)], cross, fmt.nbytes, fmt))
    pred = {k: {1: v} for k, v in predicted.items()}
    if not scored:
        best_k = min((k for k in ms if k.endswith(f"@{d0:.3f}")), key=ms.__getitem__)
        return InputSparseChoice(
            None,
            0,
            f"no sparse-input kernel beat the plain path by >= {margin:.0%} at {d0:.0%} active inputs "
            f"({best_k} {ms[best_k]:.3g} ms vs {ms['dense']:.3g} ms {plain_name}){suffix}",
            timings,
            pred,
            bool(note),
        )
    fastest = min(t for t, *_ in scored)
    near = [c for c in scored if c[0] <= fastest * (1.0 + TIE_FRACTION)]
    t0, cross, _, fmt = min(near, key=lambda c: (-c[1], c[2], c[0]))
    above = [d for d in densities if d > cross]
    upto = (
        f"wins by the margin up to there, not at {above[0]:.0%}"
        if above
        else "wins by the margin at every timed fraction"
    )
    return InputSparseChoice(
        fmt,
        min(cols, math.floor(cross * cols + 1e-9)),
        f"{fmt.name} measured at {d0:.0%} active inputs (calibrated input sparsity {float(input_sparsity):.2f}): "
        f"{t0:.3g} ms vs {ms['dense']:.3g} ms {plain_name} ({ms['dense'] / t0:.2f}x, needs >= {margin:.0%}); "
        f"crossover {cross:.0%} active inputs ({upto}){suffix}",
        timings,
        pred,
        bool(note),
        cross,
    )


def rule_input_sparse(weight: torch.Tensor, input_sparsity: float) -> InputSparseChoice:
    """No measurement (``autotune=False``): the sparse-input kernel when the layer was calibrated to
    drop at least :data:`RULE_MIN_INPUT_SPARSITY` of its inputs, with crossover :data:`RULE_CROSSOVER`
    (:class:`~.formats.InputSparseBitmask` for weights at least half zeros, else the dense layout)."""
    w = weight.detach().contiguous()
    cols = int(w.shape[1])
    if float(input_sparsity) < RULE_MIN_INPUT_SPARSITY:
        return InputSparseChoice(
            None,
            0,
            f"plain path by rule: input sparsity {float(input_sparsity):.2f} < {RULE_MIN_INPUT_SPARSITY} (autotune=False)",
        )
    sparse_w = w.numel() > 0 and float((w == 0).float().mean()) >= 0.5
    fmt: _InputFormat = InputSparseBitmask.from_dense(w) if sparse_w else InputSparseDense.from_dense(w)
    return InputSparseChoice(
        fmt,
        math.floor(RULE_CROSSOVER * cols),
        f"{fmt.name} by rule: input sparsity {float(input_sparsity):.2f} >= {RULE_MIN_INPUT_SPARSITY}, "
        f"crossover {RULE_CROSSOVER:.0%} active inputs (autotune=False)",
        crossover=RULE_CROSSOVER,
    )
