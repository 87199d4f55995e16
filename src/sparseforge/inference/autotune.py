"""Choosing a format and a per-batch-size path for one layer: measure, or apply a rule.

:func:`candidate_formats` packs a weight in every format that fits its zero pattern;
:func:`measure_layer` times each candidate and ``F.linear`` on random inputs of the requested
batch sizes (median wall-clock milliseconds over a few calls) and returns a :class:`LayerChoice`.
:func:`rule_layer` is the no-measurement fallback (``autotune=False``): a cost rule calibrated
on a 2-core AMD EPYC (see docs/inference.md), CSR when density <= 0.25, else dense.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .formats import Bitmask, BlockSparse, CompactCSR, PackedFormat, PackedNM
from .kernels import sparse_matmul

__all__ = ["LayerChoice", "candidate_formats", "measure_layer", "rule_layer", "RULE_MAX_DENSITY"]

#: With ``autotune=False`` a layer runs sparse (CSR) only at or below this density (kept fraction).
RULE_MAX_DENSITY = 0.25

_NM_PATTERNS = ((1, 4), (2, 4), (1, 8), (2, 8), (4, 8))
_BLOCKS = ((8, 8), (4, 4), (1, 8))
_MIN_BLOCK_FILL = 0.6


@dataclass
class LayerChoice:
    """Outcome for one layer: the kept packed format (or None) and the path per batch rows."""

    packed: PackedFormat | None
    choices: dict[int, str]
    reason: str
    timings_ms: dict[str, dict[int, float]] = field(default_factory=dict)


def candidate_formats(weight: torch.Tensor) -> list[PackedFormat]:
    """Every packed format that suits ``weight``'s zeros: CSR and bitmask always; N:M and block when they fit."""
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
    return out


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up (JIT, caches)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _describe(fmt: PackedFormat) -> str:
    extra = "".join(f",{k}={v}" for k, v in fmt.params().items())
    return f"{fmt.name}{'(' + extra[1:] + ')' if extra else ''}"


def measure_layer(weight: torch.Tensor, bias: torch.Tensor | None, batch_sizes: tuple[int, ...], reps: int = 5, seed: int = 0) -> LayerChoice:
    """Time dense ``F.linear`` against every candidate format at each batch size (rows).

    Keeps the single sparse format with the lowest summed time over the batch sizes it wins; a
    batch size runs dense where dense was faster. Timings are median milliseconds per call.
    """
    gen = torch.Generator().manual_seed(seed)
    w = weight.detach().contiguous()
    cands = candidate_formats(w)
    timings: dict[str, dict[int, float]] = {"dense": {}}
    for fmt in cands:
        timings[_describe(fmt)] = {}
    for b in batch_sizes:
        x = torch.randn(b, w.shape[1], generator=gen)
        xn = x.numpy()
        timings["dense"][b] = _median_ms(lambda: torch.nn.functional.linear(x, w, bias), reps)
        for fmt in cands:
            timings[_describe(fmt)][b] = _median_ms(lambda: sparse_matmul(fmt, xn), reps)
    best_fmt, best_total = None, float("inf")
    for fmt in cands:
        t = timings[_describe(fmt)]
        total = sum(min(t[b], timings["dense"][b]) for b in batch_sizes)
        if any(t[b] < timings["dense"][b] for b in batch_sizes) and total < best_total:
            best_fmt, best_total = fmt, total
    if best_fmt is None:
        speeds = ", ".join(f"batch {b}: best sparse {min(timings[_describe(f)][b] for f in cands):.3g} ms vs dense {timings['dense'][b]:.3g} ms" for b in batch_sizes)
        return LayerChoice(None, {b: "dense" for b in batch_sizes}, f"dense: no sparse kernel beat dense ({speeds})", timings)
    t = timings[_describe(best_fmt)]
    choices = {b: ("sparse" if t[b] < timings["dense"][b] else "dense") for b in batch_sizes}
    why = ", ".join(f"batch {b}: {choices[b]} ({t[b]:.3g} ms sparse vs {timings['dense'][b]:.3g} ms dense, {timings['dense'][b] / t[b]:.2f}x)" for b in batch_sizes)
    return LayerChoice(best_fmt, choices, f"{_describe(best_fmt)} measured: {why}", timings)


def rule_layer(weight: torch.Tensor, batch_sizes: tuple[int, ...]) -> LayerChoice:
    """No measurement: CSR for every batch size if density <= :data:`RULE_MAX_DENSITY`, else dense."""
    density = float((weight != 0).float().mean()) if weight.numel() else 1.0
    if density <= RULE_MAX_DENSITY:
        return LayerChoice(CompactCSR.from_dense(weight.detach().contiguous()), {b: "sparse" for b in batch_sizes},
                           f"csr by rule: density {density:.3f} <= {RULE_MAX_DENSITY} (autotune=False)")
    return LayerChoice(None, {b: "dense" for b in batch_sizes},
                       f"dense by rule: density {density:.3f} > {RULE_MAX_DENSITY} (autotune=False; sparse kernels lose here on the reference CPU)")
