"""Inference benchmark: torch dense vs torch CSR vs sparseforge on a magnitude-pruned MLP.

:func:`run_inference_bench` returns one row per (sparsity pattern, batch) with median
milliseconds per forward of each variant (variants interleaved call by call in the same run),
speedups, and achieved weight-read bandwidth (GB/s = weight bytes read per forward / time)
next to the machine's measured copy bandwidth. :func:`format_table` renders the rows.

The *busy-machine column*: each pattern is converted twice, once as usual and once while
:func:`busy_processes` keeps every core busy with busy-loop processes; both converted models are
then timed on the quiet machine, interleaved, so the row shows how much a conversion on a loaded
machine loses (target: the busy-converted speedup within 15 % of the idle-converted one).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from typing import cast

import numpy as np
import torch
from torch import nn

from ..errors import SparseforgeError
from ..fileio import write_text
from ..structures import NM, Block, Channel, Unstructured, parse_structure
from .convert import convert
from .modules import SparseLinear
from .native import threading_mode

__all__ = [
    "run_inference_bench",
    "parse_pattern",
    "DEFAULT_PATTERNS",
    "format_table",
    "format_markdown",
    "copy_bandwidth_gbps",
    "read_bandwidth_gbps",
    "build_mlp",
    "load_mlp",
    "busy_processes",
    "BUSY_TARGET",
]


def _median_s(fn: Callable[[], object], reps: int) -> float:
    """Median wall-clock seconds of ``fn()`` over ``reps`` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def copy_bandwidth_gbps(megabytes: int = 256, reps: int = 10) -> float:
    """Measured memory bandwidth of a large ``Tensor.copy_``: (read + write) GB/s, median of ``reps``."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_s(lambda: dst.copy_(src), reps) / 1e9


def read_bandwidth_gbps(megabytes: int = 256, reps: int = 10) -> float:
    """Measured read bandwidth: GB/s of ``Tensor.sum`` over a large tensor (all threads), median of ``reps``."""
    src = torch.ones(megabytes * 2**20 // 4)
    return src.numel() * 4 / _median_s(src.sum, reps) / 1e9


def build_mlp(width: int = 4096, layers: int = 4, seed: int = 0) -> nn.Sequential:
    """The built-in benchmark model: ``layers`` Linear(width, width) layers with ReLU between."""
    torch.manual_seed(seed)
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def load_mlp(path: str | os.PathLike) -> nn.Sequential:
    """A Sequential of Linear layers (ReLU between) from a safetensors state dict of ``*.weight`` / ``*.bias``."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(path))
    except Exception as exc:
        raise SparseforgeError(
            f"model file {str(path)!r} is not a readable safetensors file ({type(exc).__name__})"
        ) from None
    names = [k[: -len(".weight")] for k in state if k.endswith(".weight") and state[k].dim() == 2]
    if not names:
        raise SparseforgeError(
            f"model file {str(path)!r} has no 2-D '*.weight' tensors; allowed: a state dict of Linear layers"
        )
    mods: list[nn.Module] = []
    for i, n in enumerate(names):
        w = state[n + ".weight"].float()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=n + ".bias" in state)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(state[n + ".bias"].float())
        mods += [lin, nn.ReLU()] if i < len(names) - 1 else [lin]
    return nn.Sequential(*mods).eval()


#: The standard set (``make bench``): unstructured magnitude pruning, 2:4, and two block-pruned models.
DEFAULT_PATTERNS: tuple[float | str, ...] = (
    0.5,
    0.7,
    0.9,
    0.95,
    "2:4",
    "block:8x8:0.7",
    "block:4x4:0.9",
    "channel:0.5",
)

_PATTERNS_ALLOWED = (
    "a fraction of zeros in [0, 1) (unstructured), n:m (e.g. 2:4), block:RxC:S (e.g. block:8x8:0.9) "
    "or channel:S (a fraction S of output neurons removed)"
)


def parse_pattern(pattern: str | float) -> str | float:
    """Check one benchmark pattern and return it normalised (a float or a string).

    Allowed: a fraction of zeros in ``[0, 1)`` (unstructured magnitude pruning), ``"n:m"`` (n kept
    per m inputs), ``"block:RxC:S"`` (R x C blocks pruned by their L1 norm to a fraction S of
    zero blocks) or ``"channel:S"`` (a fraction S of each layer's output neurons removed, by L1
    norm). Raises :class:`SparseforgeError` naming the value and what is allowed.
    """
    if isinstance(pattern, str):
        text = pattern.strip().lower()
        if text.startswith("channel:"):
            sparsity = parse_pattern(text[len("channel:") :]) if text[len("channel:") :] else None
            if not isinstance(sparsity, float):
                raise SparseforgeError(f"pattern={pattern!r} is not allowed; allowed: {_PATTERNS_ALLOWED}")
            return f"channel:{sparsity:g}"
        if text.startswith("block:"):
            parts = text.split(":")
            if len(parts) != 3:
                raise SparseforgeError(f"pattern={pattern!r} is not allowed; allowed: {_PATTERNS_ALLOWED}")
            structure = parse_structure(f"block:{parts[1]}")
            sparsity = parse_pattern(parts[2]) if parts[2] else None
            if not isinstance(sparsity, float) or not isinstance(structure, Block):
                raise SparseforgeError(f"pattern={pattern!r} is not allowed; allowed: {_PATTERNS_ALLOWED}")
            return f"block:{structure.rows}x{structure.cols}:{sparsity:g}"
        if ":" in text:
            if not isinstance(parse_structure(text), NM):
                raise SparseforgeError(f"pattern={pattern!r} is not allowed; allowed: {_PATTERNS_ALLOWED}")
            return text
        try:
            pattern = float(text)
        except ValueError:
            raise SparseforgeError(f"pattern={pattern!r} is not allowed; allowed: {_PATTERNS_ALLOWED}") from None
    value = float(pattern)
    if not (0.0 <= value < 1.0):
        raise SparseforgeError(f"sparsity={value!r} is outside the allowed range [0, 1)")
    return value


def _prune(model: nn.Sequential, pattern: str | float) -> nn.Sequential:
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, nn.Linear):
                scores = m.weight.abs()
                if isinstance(pattern, str) and pattern.startswith("channel:"):
                    mask = Channel(0).mask_from_scores(scores, 1.0 - float(pattern.split(":")[1]))
                elif isinstance(pattern, str) and pattern.startswith("block:"):
                    _, shape, sparsity = pattern.split(":")
                    rows, cols = (int(v) for v in shape.split("x"))
                    mask = Block(rows, cols).mask_from_scores(scores, 1.0 - float(sparsity))
                elif isinstance(pattern, str):
                    n_keep, m_ = (int(v) for v in pattern.split(":"))
                    mask = NM(n_keep, m_).mask_from_scores(scores)
                else:
                    mask = Unstructured().mask_from_scores(scores, 1.0 - float(pattern))
                m.weight.mul_(mask)
    return out


class _TorchCSR(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.w = lin.weight.detach().to_sparse_csr()
        self.b = None if lin.bias is None else lin.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.sparse.mm(self.w, x.t()).t()
        return y if self.b is None else y + self.b


def _torch_csr_model(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*[_TorchCSR(m) if isinstance(m, nn.Linear) else m for m in model])


def _weight_bytes(model: nn.Module, rows: int) -> int:
    """Bytes of weights the chosen path reads per forward at ``rows`` input rows."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * 4
        elif isinstance(m, SparseLinear):
            fmt = m.format_for(rows)
            if fmt is not None:
                total += fmt.nbytes
            else:
                assert m.dense_weight is not None  # SparseLinear keeps the dense weight for its dense path
                total += m.dense_weight.numel() * 4
    return total


def _runs(m: nn.Module, rows: int) -> str:
    """What a layer runs at ``rows``: the format name, or ``dense``."""
    fmt = m.format_for(rows) if isinstance(m, SparseLinear) else None
    return fmt.name if fmt is not None else "dense"


#: Short rows get more rounds, until the timed calls take about this many seconds (at most MAX_ROUNDS).
MIN_TIMED_S = 3.0
MAX_ROUNDS = 200


def _interleaved_ms(
    fns: dict[str, Callable[[], object]],
    rounds: int,
    min_seconds: float = 0.0,
    before: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median ms per call; one call of each variant per round, the starting variant rotating each
    round (on a busy machine the call right after a long one gets preempted more often). Rounds
    are raised (up to :data:`MAX_ROUNDS`) until they take about ``min_seconds``. ``before`` (not
    timed) runs before every timed call, e.g. to flush the caches."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    t0 = time.perf_counter()
    for f in fns.values():
        f()
    per_round = time.perf_counter() - t0
    if min_seconds > 0 and per_round > 0:
        rounds = max(rounds, min(MAX_ROUNDS, int(min_seconds / per_round)))
    items = list(fns.items())
    for i in range(rounds):
        for k, f in items[i % len(items) :] + items[: i % len(items)]:
            if before is not None:
                before()
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


#: The busy-machine column's target: busy-converted speedup / idle-converted speedup >= this, in every row.
BUSY_TARGET = 0.85

#: A busy loop that ends by itself when its parent is gone (checked every few million iterations).
_BUSY_LOOP = "import os\np = os.getppid()\nwhile os.getppid() == p:\n    for _ in range(2000000):\n        pass\n"


@contextlib.contextmanager
def busy_processes(n: int | None = None, settle_s: float = 0.3) -> Iterator[list[subprocess.Popen]]:
    """Keep ``n`` (default: ``os.cpu_count()``) busy-loop Python processes running inside the
    ``with`` block: the machine as another user's jobs leave it. They are killed (and reaped) when
    the block ends, also on an exception; each also ends by itself if this process dies."""
    n = (os.cpu_count() or 1) if n is None else int(n)
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(n):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _BUSY_LOOP],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        time.sleep(settle_s)  # let them start spinning before the measured work begins
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


#: Megabytes read before every call of the cold pass: well above the L3 of ordinary CPUs (32 MB here).
FLUSH_MB = 128


def run_inference_bench(
    sparsities: tuple[float | str, ...] = DEFAULT_PATTERNS,
    batches: tuple[int, ...] = (1, 16, 128),
    model_path: str | os.PathLike | None = None,
    json_out: str | os.PathLike | None = None,
    quick: bool = False,
    rounds: int | None = None,
    progress: Callable[[str], None] | None = None,
    busy: bool | None = None,
) -> list[dict]:
    """Benchmark dense vs torch CSR vs sparseforge; returns one dict per (pattern, batch).

    Two passes per row. *Interleaved*: the three variants called in turn, so each call finds the
    caches as the previous variant left them; a packed model smaller than the L3 cache (95 %:
    20 MB of 4x4096² weights) keeps part of its weights there from one call to the next.
    *Cold* (dense and sparseforge only): :data:`FLUSH_MB` MB of other data are read before every
    call, so every weight comes from memory, as for a model that shares the machine with other work.
    ``sparsities`` holds fractions of zeros (unstructured magnitude pruning) or ``"n:m"`` strings
    (``NM(n, m)``, n kept per m inputs). ``quick`` uses a 2-layer 2048-wide MLP, sparsity 0.9 and
    batch 1 unless given otherwise, and fewer rounds (< 1 minute). Times are median ms per forward.
    ``progress`` (optional) receives one line per finished step. The load average is recorded
    before and after every (pattern, batch) measurement.

    ``busy`` (default: on unless ``quick``): also convert each pattern while
    ``os.cpu_count()`` busy-loop processes keep every core busy (:func:`busy_processes`), and time
    that model in the interleaved pass next to the idle-converted one, after the busy loops are
    gone: ``busy_sparseforge_ms``, ``speedup_busy_converted`` and ``busy_vs_idle`` (=
    busy-converted speedup / idle-converted speedup, target >= :data:`BUSY_TARGET`), and
    ``busy_under_load_layers`` (how many layers the busy conversion flagged as decided under load).
    Off: these keys hold ``None``.
    """
    say = progress or (lambda _msg: None)
    if quick and model_path is None:
        base = build_mlp(width=2048, layers=2)
    else:
        base = load_mlp(model_path) if model_path is not None else build_mlp()
    rounds = rounds or (7 if quick else 25)
    busy = (not quick) if busy is None else bool(busy)
    copy_gbps = copy_bandwidth_gbps(megabytes=64 if quick else 256)
    read_gbps = read_bandwidth_gbps(megabytes=64 if quick else 256)
    rows_out: list[dict] = []
    patterns = [parse_pattern(p) for p in sparsities]  # all checked before any timing
    for pattern in patterns:
        pruned = _prune(base, pattern)
        t_conv = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast, report = convert(pruned, batch_sizes=tuple(batches), reps=3 if quick else 5)
        say(
            f"pattern {pattern}: converted in {time.perf_counter() - t_conv:.0f} s: {len(report.sparse_layers)}/{len(report.layers)} layers sparse"
        )
        fast_busy = report_busy = None
        if busy:
            t_conv = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught_busy, busy_processes():
                warnings.simplefilter("always")
                fast_busy, report_busy = convert(pruned, batch_sizes=tuple(batches), reps=3 if quick else 5)
            caught.extend(caught_busy)
            time.sleep(1.0)  # the busy loops are gone; let the machine settle before timing
            say(
                f"pattern {pattern}: converted on the busy machine in {time.perf_counter() - t_conv:.0f} s: "
                f"{len(report_busy.sparse_layers)}/{len(report_busy.layers)} layers sparse, {len(report_busy.under_load_layers)} flagged under load"
            )
        tcsr = _torch_csr_model(pruned)
        formats = sorted({d.format or "dense" for d in report.layers})
        for b in batches:
            x = torch.randn(b, cast(nn.Linear, pruned[0]).in_features)  # build_mlp/load_mlp: Linear first
            load_before = os.getloadavg()[0]
            variants: dict[str, Callable[[], object]] = {
                "dense": partial(pruned, x),
                "torch_csr": partial(tcsr, x),
                "sparseforge": partial(fast, x),
            }
            if fast_busy is not None:
                variants["sparseforge_busy"] = partial(fast_busy, x)
            with torch.inference_mode():
                ms = _interleaved_ms(variants, rounds, min_seconds=0.0 if quick else MIN_TIMED_S)
                junk = torch.ones((FLUSH_MB // 8 if quick else FLUSH_MB) * 2**20 // 4)
                cold = _interleaved_ms(
                    {"dense": partial(pruned, x), "sparseforge": partial(fast, x)},
                    max(5, rounds // 2) if quick else rounds,
                    before=junk.sum,
                )
            dense_bytes = _weight_bytes(pruned, b)
            sf_bytes = _weight_bytes(fast, b)
            rows_out.append(
                {
                    "pattern": pattern if isinstance(pattern, str) else f"{pattern:g}",
                    "batch": b,
                    "dense_ms": ms["dense"],
                    "torch_csr_ms": ms["torch_csr"],
                    "sparseforge_ms": ms["sparseforge"],
                    "speedup_vs_dense": ms["dense"] / ms["sparseforge"],
                    "speedup_vs_torch_csr": ms["torch_csr"] / ms["sparseforge"],
                    "dense_cold_ms": cold["dense"],
                    "sparseforge_cold_ms": cold["sparseforge"],
                    "speedup_cold": cold["dense"] / cold["sparseforge"],
                    "busy_sparseforge_ms": ms.get("sparseforge_busy"),
                    "speedup_busy_converted": ms["dense"] / ms["sparseforge_busy"] if fast_busy is not None else None,
                    "busy_vs_idle": ms["sparseforge"] / ms["sparseforge_busy"] if fast_busy is not None else None,
                    "busy_under_load_layers": len(report_busy.under_load_layers) if report_busy is not None else None,
                    "busy_paths": ", ".join(
                        sorted({_runs(fast_busy.get_submodule(d.name), b) for d in report_busy.layers})
                    )
                    if fast_busy is not None and report_busy is not None  # converted together
                    else None,
                    "dense_gbps": dense_bytes / ms["dense"] / 1e6,
                    "sparseforge_gbps": sf_bytes / ms["sparseforge"] / 1e6,
                    "sparseforge_weight_mb": sf_bytes / 1e6,
                    "copy_gbps": copy_gbps,
                    "read_gbps": read_gbps,
                    "paths": ", ".join(sorted({_runs(fast.get_submodule(d.name), b) for d in report.layers})),
                    "formats": formats,
                    "layers": [
                        {
                            "name": d.name,
                            "action": d.action,
                            "format": d.format,
                            "plan": d.plan,
                            "timings_ms": {k: {str(bb): v for bb, v in t.items()} for k, t in d.timings_ms.items()},
                        }
                        for d in report.layers
                    ],
                    "warnings": [str(w.message) for w in caught],
                    "load_avg_1min": (load_before, os.getloadavg()[0]),
                }
            )
            r = rows_out[-1]
            busy_text = (
                f"; busy-converted {r['busy_sparseforge_ms']:.2f} ms ({r['speedup_busy_converted']:.2f}x, {r['busy_vs_idle']:.2f} of idle)"
                if fast_busy is not None
                else ""
            )
            say(
                f"  {r['pattern']} batch {b}: dense {r['dense_ms']:.2f} ms, sparseforge {r['sparseforge_ms']:.2f} ms "
                f"({r['speedup_vs_dense']:.2f}x; cold {r['dense_cold_ms']:.2f} / {r['sparseforge_cold_ms']:.2f} ms, {r['speedup_cold']:.2f}x{busy_text}), "
                f"load {load_before:.2f}->{os.getloadavg()[0]:.2f}"
            )
    if json_out is not None:
        write_text(
            json_out,
            json.dumps(
                {
                    "copy_gbps": copy_gbps,
                    "read_gbps": read_gbps,
                    "torch_threads": torch.get_num_threads(),
                    "threading": threading_mode(),
                    "load_avg": os.getloadavg(),
                    "busy_column": busy,
                    "busy_target": BUSY_TARGET,
                    "rows": rows_out,
                },
                indent=2,
            ),
            what="--json output",
        )
    return rows_out


def _busy_cells(r: dict) -> tuple[str, str]:
    """(busy-converted speedup, busy / idle ratio with a mark when under :data:`BUSY_TARGET`), ``-`` when not measured."""
    if r.get("speedup_busy_converted") is None:
        return "-", "-"
    ratio = r["busy_vs_idle"]
    return f"{r['speedup_busy_converted']:.2f}x", f"{ratio:.2f}{'' if ratio >= BUSY_TARGET else ' (!)'}"


def format_table(rows: list[dict]) -> str:
    """A plain-text table of :func:`run_inference_bench` rows (ms = median ms per forward).

    ``busy-conv``: speedup over dense of the model converted while every core was busy (timed on
    the quiet machine); ``busy/idle``: that over the idle-converted speedup, ``(!)`` below :data:`BUSY_TARGET`."""
    pw = max([8] + [len(str(r["pattern"])) for r in rows])
    head = (
        f"{'pattern':>{pw}} {'batch':>5} {'dense ms':>9} {'torchCSR ms':>11} {'sf ms':>8} {'vs dense':>8} {'vs CSR':>7} "
        f"{'cold: dense':>11} {'sf ms':>7} {'vs dense':>8} {'busy-conv':>9} {'busy/idle':>9} {'dense GB/s':>10} {'sf GB/s':>8} {'load':>9}  paths"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        busy_speedup, busy_ratio = _busy_cells(r)
        load_before, load_after = r.get("load_avg_1min", (float("nan"),) * 2)
        load = f"{load_before:.1f}-{load_after:.1f}"
        lines.append(
            f"{r['pattern']:>{pw}} {r['batch']:>5} {r['dense_ms']:>9.2f} {r['torch_csr_ms']:>11.2f} {r['sparseforge_ms']:>8.2f} "
            f"{r['speedup_vs_dense']:>7.2f}x {r['speedup_vs_torch_csr']:>6.2f}x "
            f"{r['dense_cold_ms']:>11.2f} {r['sparseforge_cold_ms']:>7.2f} {r['speedup_cold']:>7.2f}x "
            f"{busy_speedup:>9} {busy_ratio:>9} "
            f"{r['dense_gbps']:>10.1f} {r['sparseforge_gbps']:>8.1f} "
            f"{load:>9}  {r['paths']}"
        )
    if rows:
        lines.append(
            f"machine bandwidth: copy (read+write) {rows[0]['copy_gbps']:.1f} GB/s, read {rows[0].get('read_gbps', float('nan')):.1f} GB/s; torch threads: {torch.get_num_threads()}; "
            f"sparseforge C kernels' threads: {threading_mode() or 'unavailable'}"
        )
    return "\n".join(lines)


def format_markdown(rows: list[dict]) -> str:
    """The rows of :func:`run_inference_bench` as a Markdown table (for the README and docs)."""
    lines = [
        "| pattern | batch | dense ms | torch CSR ms | sparseforge ms | vs dense | vs torch CSR | cold: dense ms | cold: sf ms "
        "| cold: vs dense | busy-converted: vs dense | busy / idle | dense GB/s | sf GB/s | sf MB | runs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        busy_speedup, busy_ratio = _busy_cells(r)
        lines.append(
            f"| {r['pattern']} | {r['batch']} | {r['dense_ms']:.2f} | {r['torch_csr_ms']:.2f} | {r['sparseforge_ms']:.2f} "
            f"| {r['speedup_vs_dense']:.2f}x | {r['speedup_vs_torch_csr']:.2f}x | {r['dense_cold_ms']:.2f} | {r['sparseforge_cold_ms']:.2f} "
            f"| {r['speedup_cold']:.2f}x | {busy_speedup} | {busy_ratio} | {r['dense_gbps']:.1f} | {r['sparseforge_gbps']:.1f} "
            f"| {r['sparseforge_weight_mb']:.0f} | {r['paths']} |"
        )
    return "\n".join(lines)
