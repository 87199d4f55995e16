"""Choosing a format and a per-batch-size path for one layer: measure, or apply a rule.

:func:`candidate_formats` packs a weight in every format that fits its zero pattern;
:func:`measure_layer` times each candidate and ``F.linear`` on random inputs of the requested
batch sizes (median wall-clock milliseconds, all variants interleaved call by call) and returns a
:class:`LayerChoice`; sparse must beat dense by :data:`SPARSE_MARGIN` to be chosen.
:func:`rule_layer` is the no-measurement fallback (``autotune=False``): a cost rule calibrated
on a 2-core AMD EPYC (see docs/inference.md), CSR when density <= 0.25, else dense.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SparseforgeError
from .formats import Bitmask, BlockSparse, CompactCSR, CompactDense, PackedFormat, PackedNM
from .kernels import has_native_kernel, kernel_available_for, set_spmv_variant, sparse_matmul_tensor

__all__ = ["LayerChoice", "candidate_formats", "measure_layer", "rule_layer", "RULE_MAX_DENSITY", "SPARSE_MARGIN"]

#: A sparse kernel must beat dense by this fraction (in interleaved medians) to be chosen.
SPARSE_MARGIN = 0.10

#: Candidates within this fraction of the fastest total count as tied; the smaller format wins.
TIE_FRACTION = 0.05

#: A candidate whose speedup over dense is within this factor of ``1 + margin`` is a close call:
#: dense and it are timed again over CLOSE_CALL_REPS x reps rounds before deciding.
CLOSE_CALL = 1.5
CLOSE_CALL_REPS = 3

#: Calls shorter than this (seconds) are timed over at least SHORT_CALL_REPS rounds.
SHORT_CALL_S = 0.005
SHORT_CALL_REPS = 15

#: With ``autotune=False`` a layer runs sparse (CSR) only at or below this density (kept fraction).
RULE_MAX_DENSITY = 0.25

_NM_PATTERNS = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))
_BLOCKS = ((8, 8), (4, 4), (1, 8))
_MIN_BLOCK_FILL = 0.6
#: The compacted dense sub-matrix is a candidate when it keeps at most this fraction of the matrix.
_MAX_COMPACT_AREA = 0.8


@dataclass
class LayerChoice:
    """Outcome for one layer: the kept packed format(s) and the path per batch rows.

    ``choices[b]`` is ``"sparse"`` (``packed``), ``"dense"``, or ``extra.name`` (a second format
    kept for the batch sizes where it beats ``packed`` by the margin).
    """

    packed: PackedFormat | None
    choices: dict[int, str]
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)
    extra: PackedFormat | None = None


def candidate_formats(weight: torch.Tensor) -> list[PackedFormat]:
    """Every packed format that suits ``weight``'s zeros: CSR and bitmask always; N:M, block and
    compact dense (whole zero rows or columns) when they fit."""
    w = weight.detach().contiguous()
    out: list[PackedFormat] = [CompactCSR.from_dense(w), Bitmask.from_dense(w)]
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


def _interleaved_times(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list[float]]:
    """Wall-clock ms of every call of each function, timed round-robin (one call each per round).

    Interleaving makes every variant see the same machine load; two untimed warm-up calls each.
    When every call is shorter than :data:`SHORT_CALL_S`, at least :data:`SHORT_CALL_REPS` rounds.
    """
    warm = []
    for fn in fns.values():
        fn()
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    if max(warm) < SHORT_CALL_S:
        reps = max(reps, SHORT_CALL_REPS)  # short calls: more rounds cost little and cut noise
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    for i in range(reps):  # rotate the starting variant: no variant always follows the slowest one
        for k, fn in items[i % len(items):] + items[: i % len(items)]:
            t0 = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def _interleaved_medians(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median ms per call of each function, from :func:`_interleaved_times`."""
    return {k: float(np.median(v)) for k, v in _interleaved_times(fns, reps).items()}


def _confirm_close_calls(fns: dict[str, Callable[[], object]], medians: dict[str, float], reps: int,
                         margin: float) -> dict[str, float]:
    """Time dense and every candidate near the decision threshold again, :data:`CLOSE_CALL_REPS`
    times longer, and keep for each the *less favourable* of two estimates of its speedup over
    dense: the ratio of medians and the ratio of fastest calls. A kernel that won by noise must
    not replace dense; in particular a busy machine (another process taking one core now and then)
    slows a multi-threaded dense GEMM more than our dynamically scheduled kernels, so the medians
    alone can favour sparse at a batch size where it loses on a quiet machine; the fastest calls
    are the quiet-machine estimate. Returned as ms relative to the first pass's dense median
    (``dense / speedup``), so every candidate is compared with the same dense number."""
    threshold = 1.0 + margin
    close = [k for k, v in medians.items()
             if k != "dense" and v > 0 and threshold / CLOSE_CALL <= medians["dense"] / v <= threshold * CLOSE_CALL]
    if not close:
        return medians
    times = _interleaved_times({k: fns[k] for k in ("dense", *close)}, reps * CLOSE_CALL_REPS)
    d_med, d_min = float(np.median(times["dense"])), min(times["dense"])
    out = dict(medians)
    for k in close:
        speedup = min(d_med / float(np.median(times[k])), d_min / min(times[k]))
        out[k] = medians["dense"] / speedup
    return out


def _describe(fmt: PackedFormat) -> str:
    extra = "".join(f",{k}={v}" for k, v in fmt.params().items())
    return f"{fmt.name}{'(' + extra[1:] + ')' if extra else ''}"


def measure_layer(weight: torch.Tensor, bias: torch.Tensor | None, batch_sizes: tuple[int, ...], reps: int = 5, seed: int = 0,
                  margin: float = SPARSE_MARGIN, max_formats: int = 2) -> LayerChoice:
    """Time dense ``F.linear`` against every candidate format at each batch size (rows).

    Dense and all candidates are timed interleaved, ``reps`` rounds (median ms per call, bias
    included on both sides). A format *wins* a batch size only when ``dense_ms >= (1 + margin) *
    sparse_ms``, so measurement noise does not pick a kernel that is really slower than dense;
    candidates within a factor :data:`CLOSE_CALL` of that threshold are timed again, longer,
    together with dense, and must win on both the medians and the fastest calls
    (:func:`_confirm_close_calls`).
    Keeps the sparse format with the lowest mean time relative to dense over the batch sizes
    (dense where it does not win); within :data:`TIE_FRACTION`, the one with fewer bytes. With
    ``max_formats=2`` (default) a second format is kept as well when it beats the first one's
    path by the margin at some batch sizes (those then run it): the format that saves the most
    time relative to the first's path. The other batch sizes run dense.
    """
    if max_formats not in (1, 2):
        raise SparseforgeError(f"max_formats={max_formats!r} is not allowed; allowed: 1 or 2")
    gen = torch.Generator().manual_seed(seed)
    w = weight.detach().contiguous()
    cands: list[PackedFormat] = []
    variants: list[int | None] = []
    for f in candidate_formats(w):
        if not kernel_available_for(f):
            continue
        cands.append(f)
        variants.append(None)
        if isinstance(f, CompactCSR) and has_native_kernel(f) and 1 in batch_sizes:
            cands.append(f)  # the same weight with the AVX2-gather SpMV (batch 1 only differs)
            variants.append(1)
    names = [_describe(f) + ("[gather]" if v == 1 else "") for f, v in zip(cands, variants)]
    timings: dict[str, dict[int, float]] = {"dense": {}, **{n: {} for n in names}}
    for b in batch_sizes:
        x = torch.randn(b, w.shape[1], generator=gen)
        fns: dict[str, Callable[[], object]] = {"dense": lambda: torch.nn.functional.linear(x, w, bias)}
        for name, fmt, var in zip(names, cands, variants):
            if var is not None and b != 1:
                continue  # identical to the default kernel above batch 1
            fns[name] = (lambda f=fmt, v=var: _sparse_call(f, x, bias, v))
        for k, v in _confirm_close_calls(fns, _interleaved_medians(fns, reps), reps, margin).items():
            timings[k][b] = v
        for name, fmt, var in zip(names, cands, variants):
            if b not in timings[name]:
                timings[name][b] = timings[_describe(fmt)][b]

    def wins(name: str, b: int) -> bool:
        return timings["dense"][b] >= (1.0 + margin) * timings[name][b]

    # Score = mean over batch sizes of (time of the path taken / dense time), so every batch size
    # counts equally (a raw sum would let batch 128 drown batch 1). Lowest score wins; within
    # TIE_FRACTION of it, the smaller format (fewer bytes streamed per call: in a model, layers
    # run back to back and compete for memory bandwidth).
    scored = []
    for name, fmt, var in zip(names, cands, variants):
        if any(wins(name, b) for b in batch_sizes):
            total = sum((timings[name][b] if wins(name, b) else timings["dense"][b]) / timings["dense"][b] for b in batch_sizes) / len(batch_sizes)
            scored.append((total, fmt.nbytes, name, fmt, var))
    best = None
    if scored:
        fastest = min(t for t, *_ in scored)
        near = [c for c in scored if c[0] <= fastest * (1.0 + TIE_FRACTION)]
        _, _, *rest = min(near, key=lambda c: (c[1], c[0]))
        best = tuple(rest)
    if best is None:
        speeds = ", ".join(f"batch {b}: best sparse {min((timings[n][b] for n in names), default=float('nan')):.3g} ms vs dense {timings['dense'][b]:.3g} ms"
                           for b in batch_sizes)
        return LayerChoice(None, {b: "dense" for b in batch_sizes},
                           f"dense: no sparse kernel beat dense by >= {margin:.0%} ({speeds})", timings)
    name, fmt, var = best
    set_spmv_variant(fmt, var)
    choices = {b: ("sparse" if wins(name, b) else "dense") for b in batch_sizes}
    path_ms = {b: timings[name][b] if choices[b] == "sparse" else timings["dense"][b] for b in batch_sizes}
    extra = None
    if max_formats == 2:
        # second format: the one saving the most (relative) time where it beats the first's path
        # by the margin; never a second packing of the same object (csr vs csr[gather])
        gain_best = 0.0
        for n2, f2, v2 in zip(names, cands, variants):
            if f2.name == fmt.name:
                continue
            better = [b for b in batch_sizes if path_ms[b] >= (1.0 + margin) * timings[n2][b]]
            gain = sum(1.0 - timings[n2][b] / path_ms[b] for b in better)
            if better and gain > gain_best:
                gain_best, extra = gain, (n2, f2, v2, better)
    chosen = {b: name for b in batch_sizes}
    if extra is not None:
        n2, f2, v2, better = extra
        set_spmv_variant(f2, v2)
        for b in better:
            choices[b], chosen[b] = f2.name, n2
    why = ", ".join(f"batch {b}: {choices[b] if choices[b] != 'sparse' else fmt.name} ({timings[chosen[b]][b]:.3g} ms {chosen[b]} vs "
                    f"{timings['dense'][b]:.3g} ms dense, {timings['dense'][b] / timings[chosen[b]][b]:.2f}x)" for b in batch_sizes)
    kept = name + (f" + {extra[0]}" if extra is not None else "")
    return LayerChoice(fmt, choices, f"{kept} measured (sparse needs >= {margin:.0%} over dense): {why}", timings,
                       extra=extra[1] if extra is not None else None)


def _sparse_call(fmt: PackedFormat, x: torch.Tensor, bias: torch.Tensor | None, variant: int | None = None) -> None:
    """One call as :class:`~.modules.SparseLinear` makes it (bias included)."""
    set_spmv_variant(fmt, variant)
    sparse_matmul_tensor(fmt, x, bias=bias)


def rule_layer(weight: torch.Tensor, batch_sizes: tuple[int, ...]) -> LayerChoice:
    """No measurement: CSR for every batch size if density <= :data:`RULE_MAX_DENSITY`, else dense."""
    density = float((weight != 0).float().mean()) if weight.numel() else 1.0
    if density <= RULE_MAX_DENSITY:
        return LayerChoice(CompactCSR.from_dense(weight.detach().contiguous()), {b: "sparse" for b in batch_sizes},
                           f"csr by rule: density {density:.3f} <= {RULE_MAX_DENSITY} (autotune=False)")
    return LayerChoice(None, {b: "dense" for b in batch_sizes},
                       f"dense by rule: density {density:.3f} > {RULE_MAX_DENSITY} (autotune=False; sparse kernels lose here on the reference CPU)")
