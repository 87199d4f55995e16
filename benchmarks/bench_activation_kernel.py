"""The sparse-input kernel, layer by layer, at batch 1 (token-by-token decoding).

One linear layer of a Llama-style model (labels are ``out x in``: the MLP's up/gate projections
2816x1024 and 11008x4096, its down projections 1024x2816 and 4096x11008, an attention
projection 4096x4096), fed ONE input row with 0 / 25 / 50 / 75 / 90 % exact zeros at random
places (the activation sparsity that TEAL / CATS thresholds produce), with a dense weight and
with a 50 % unstructured (random) weight. Timed in the same run, interleaved call by call
(``sparseforge.inference.bench``'s helper; median ms per call):

* ``dense``: torch ``F.linear`` (reads the whole weight whatever the input);
* ``input-sparse``: :func:`~sparseforge.inference.input_sparse_matmul` on
  :class:`~sparseforge.inference.InputSparseDense` (reads the weights of the active inputs);
* for the 50 % weights, ``weight-sparse``: the faster of the existing batch-1 kernels of the
  packed weight alone (bitmask, CSR), and ``combined``: the sparse-input kernel on
  :class:`~sparseforge.inference.InputSparseBitmask` (the active inputs' kept weights only).

Speedups are over ``dense`` in the same run; GB/s = weight bytes the call reads (the active
inputs' share of the packed weight for the sparse-input kernels, the whole packed weight
otherwise) / time. Every layer is timed a second time while ``os.cpu_count()`` busy-loop
processes load the cores (``sparseforge.inference.bench.busy_processes``, the helper of the
inference benchmark's busy-machine column). The load average before and after each part is
recorded: numbers taken while other jobs share the machine are preliminary.

Writes ``benchmarks/results/activation_kernel.json`` and ``.md``. About 2-3 minutes on 2 cores;
``--quick`` takes seconds (one small layer).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_oneshot import machine_info  # noqa: E402
from sparseforge.errors import SparseforgeError  # noqa: E402
from sparseforge.fileio import check_output_dir, write_text  # noqa: E402
from sparseforge.inference import (  # noqa: E402
    Bitmask,
    CompactCSR,
    InputSparseBitmask,
    InputSparseDense,
    input_sparse_matmul,
)
from sparseforge.inference.autotune import sparse_input_sample  # noqa: E402
from sparseforge.inference.bench import _interleaved_ms, busy_processes, read_bandwidth_gbps  # noqa: E402
from sparseforge.inference.kernels import sparse_matmul_tensor  # noqa: E402
from sparseforge.inference.native import threading_mode  # noqa: E402

RESULTS = Path(__file__).parent / "results"
#: (out_features, in_features) of the timed layers.
SHAPES: tuple[tuple[int, int], ...] = ((2816, 1024), (1024, 2816), (4096, 4096), (11008, 4096), (4096, 11008))
QUICK_SHAPES: tuple[tuple[int, int], ...] = ((192, 320),)
#: Fractions of the input row that are exactly zero.
INPUT_SPARSITIES = (0.0, 0.25, 0.5, 0.75, 0.9)
QUICK_INPUT_SPARSITIES = (0.0, 0.5, 0.9)
#: Fractions of the weight that are zero (unstructured, random places).
WEIGHT_SPARSITIES = (0.0, 0.5)
#: Timed rounds (idle / under load); short calls get more, up to MIN_SECONDS of timing per row.
ROUNDS, LOADED_ROUNDS, MIN_SECONDS = 15, 9, 0.4


def _load() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def _layer(shape: tuple[int, int], weight_sparsity: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.02
    if weight_sparsity > 0:
        w[torch.rand(*shape, generator=g) < weight_sparsity] = 0.0
    return w, torch.randn(shape[0], generator=g) * 0.01


def _packs(w: torch.Tensor, weight_sparsity: float) -> dict[str, Any]:
    """The packed weights timed for one layer, with the bytes each reads per active input fraction."""
    packs: dict[str, Any] = {"input-sparse": InputSparseDense.from_dense(w)}
    if weight_sparsity > 0:
        packs["combined"] = InputSparseBitmask.from_dense(w)
        packs["bitmask"] = Bitmask.from_dense(w)
        packs["csr"] = CompactCSR.from_dense(w)
    return packs


def _calls(
    w: torch.Tensor, bias: torch.Tensor, packs: dict[str, Any], x: torch.Tensor
) -> dict[str, Callable[[], object]]:
    fns: dict[str, Callable[[], object]] = {"dense": partial(F.linear, x, w, bias)}
    for name, fmt in packs.items():
        if name in ("input-sparse", "combined"):
            fns[name] = partial(input_sparse_matmul, fmt, x, 0.0, bias)
        else:
            fns[name] = partial(sparse_matmul_tensor, fmt, x, bias=bias)
    return fns


def _check(fns: dict[str, Callable[[], object]]) -> float:
    """Largest difference of any variant from dense (each must compute the same layer)."""
    ref = fns["dense"]()
    assert isinstance(ref, torch.Tensor)
    worst = 0.0
    for name, fn in fns.items():
        got = fn()
        out = got[0] if isinstance(got, tuple) else got
        assert isinstance(out, torch.Tensor), name
        err = float((out - ref).abs().max())
        if not err <= 1e-3 * max(1.0, float(ref.abs().max())):
            raise SparseforgeError(f"{name} differs from dense F.linear by {err:.3g}; allowed: float32 rounding")
        worst = max(worst, err)
    return worst


def _row(
    shape: tuple[int, int],
    weight_sparsity: float,
    input_sparsity: float,
    w: torch.Tensor,
    packs: dict[str, Any],
    ms: dict[str, float],
    err: float,
) -> dict[str, Any]:
    active = 1.0 - input_sparsity
    read = {"dense": w.numel() * 4}
    for name, fmt in packs.items():
        read[name] = int(fmt.nbytes * active) if name in ("input-sparse", "combined") else fmt.nbytes
    row: dict[str, Any] = {
        "shape": list(shape),
        "weight_sparsity": weight_sparsity,
        "input_sparsity": input_sparsity,
        "ms": ms,
        "speedup": {k: ms["dense"] / v for k, v in ms.items() if k != "dense"},
        "weight_bytes_read": read,
        "gbps": {k: read[k] / v / 1e6 for k, v in ms.items()},
        "max_abs_error": err,
    }
    if weight_sparsity > 0:
        best = min(("bitmask", "csr"), key=ms.__getitem__)
        row["weight_sparse_best"] = best
    return row


def run(
    shapes: Sequence[tuple[int, int]],
    input_sparsities: Sequence[float],
    *,
    rounds: int = ROUNDS,
    loaded_rounds: int = LOADED_ROUNDS,
    min_seconds: float = MIN_SECONDS,
    busy: bool = True,
    log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True),
) -> dict[str, Any]:
    """Time every (layer, weight sparsity, input sparsity); idle rows, and rows under load when ``busy``."""
    rows: list[dict[str, Any]] = []
    loaded: list[dict[str, Any]] = []
    load = {"start": _load()}
    for i, shape in enumerate(shapes):
        for weight_sparsity in WEIGHT_SPARSITIES:
            w, bias = _layer(shape, weight_sparsity, seed=i)
            packs = _packs(w, weight_sparsity)
            gen = torch.Generator().manual_seed(100 + i)
            inputs = {s: sparse_input_sample(shape[1], 1.0 - s, 0.0, gen) for s in input_sparsities}
            with torch.inference_mode():
                for s, x in inputs.items():
                    fns = _calls(w, bias, packs, x)
                    err = _check(fns)
                    ms = _interleaved_ms(fns, rounds, min_seconds=min_seconds)
                    rows.append(_row(shape, weight_sparsity, s, w, packs, ms, err))
                    log(_describe(rows[-1]))
                if busy:
                    with busy_processes():
                        for s, x in inputs.items():
                            fns = _calls(w, bias, packs, x)
                            ms = _interleaved_ms(fns, loaded_rounds, min_seconds=min_seconds)
                            loaded.append(_row(shape, weight_sparsity, s, w, packs, ms, 0.0))
                            log("  under load: " + _describe(loaded[-1]))
    load["end"] = _load()
    return {"rows": rows, "loaded_rows": loaded, "load_average": load}


def _describe(r: dict[str, Any]) -> str:
    out, inp = r["shape"]
    parts = ", ".join(f"{k} {v:.3f} ms ({r['speedup'].get(k, 1.0):.2f}x)" for k, v in r["ms"].items())
    return f"{out}x{inp} weights {r['weight_sparsity']:.0%} inputs {r['input_sparsity']:.0%} zero: {parts}"


def _cell(r: dict[str, Any], key: str, what: str) -> str:
    if key == "weight-sparse":
        key = r.get("weight_sparse_best", "")
    if key not in r["ms"]:
        return "-"
    if what == "ms":
        return f"{r['ms'][key]:.3f}"
    if what == "x":
        return f"{r['speedup'][key]:.2f}x"
    return f"{r['gbps'][key]:.1f}"


def _label(r: dict[str, Any]) -> list[str]:
    out, inp = r["shape"]
    ws = f"{r['weight_sparsity']:.0%} ({r['weight_sparse_best']})" if "weight_sparse_best" in r else "dense"
    return [f"{out}x{inp}", ws, f"{r['input_sparsity']:.0%}"]


_KERNELS = ("input-sparse", "weight-sparse", "combined")
#: (variant, "ms" / "x" / "gbps") per column of the two tables.
IDLE_CELLS = [
    ("dense", "ms"),
    *((k, w) for k in _KERNELS for w in ("ms", "x")),
    *((k, "gbps") for k in ("dense", *_KERNELS)),
]
LOADED_CELLS = [("dense", "ms"), *((k, "x") for k in _KERNELS)]


def _table(rows: list[dict[str, Any]], cells: list[tuple[str, str]]) -> list[str]:
    return ["| " + " | ".join(_label(r) + [_cell(r, k, w) for k, w in cells]) + " |" for r in rows]


def markdown(result: dict[str, Any]) -> str:
    """The result as Markdown: settings, the idle table, the under-load table."""
    m, s, load = result["machine"], result["settings"], result["load_average"]
    fmt_load = lambda v: "n/a" if v is None else " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = [
        "# Sparse-input kernel: one layer at batch 1",
        "",
        f"Command: `{result['command']}`. Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} with "
        f"{s['torch_threads']} threads, C kernels' threading: {s['threading']}; read bandwidth "
        f"{s['read_gbps']:.1f} GB/s; {m['date']}. Load average (1 / 5 / 15 min) at the start "
        f"{fmt_load(load['start'])}, at the end {fmt_load(load['end'])}"
        + (" (other jobs shared the machine: preliminary numbers)." if s["preliminary"] else "."),
        "",
        "Median ms per call of one input row, all variants interleaved call by call; `x` = dense ms / ms "
        "in the same run; GB/s = weight bytes read / time (the sparse-input kernels read the active "
        "inputs' share of their layout). Layers are `out x in`; `inputs zero` = fraction of the row that "
        "is exactly 0 (random places); weight-sparse = the faster existing packed kernel of the "
        "weight alone (named); combined = sparse inputs and sparse weights together.",
        "",
        "| layer | weights | inputs zero | dense ms | input-sparse ms | x | weight-sparse ms | x | combined ms | x "
        "| GB/s dense | GB/s input-sparse | GB/s weight-sparse | GB/s combined |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += _table(result["rows"], IDLE_CELLS)
    if result["loaded_rows"]:
        lines += [
            "",
            f"## Under load: {s['busy_processes']} busy-loop processes on the cores",
            "",
            "| layer | weights | inputs zero | dense ms | input-sparse x | weight-sparse x | combined x |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        lines += _table(result["loaded_rows"], LOADED_CELLS)
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one small layer, few rounds (seconds)")
    p.add_argument("--no-busy", action="store_true", help="skip the run under load")
    p.add_argument("--threads", type=int, default=None, help="torch (and C kernel) threads; default: torch's")
    p.add_argument("--out-dir", default=str(RESULTS), help="folder of activation_kernel.json and .md")
    a = p.parse_args(argv)
    out_dir = check_output_dir(a.out_dir, "--out-dir")
    if a.threads is not None:
        if a.threads < 1:
            raise SparseforgeError(f"--threads={a.threads} is not allowed; allowed: an int >= 1")
        torch.set_num_threads(a.threads)
    quick = bool(a.quick)
    t0 = time.perf_counter()
    read_gbps = read_bandwidth_gbps(megabytes=32 if quick else 256)
    result = run(
        QUICK_SHAPES if quick else SHAPES,
        QUICK_INPUT_SPARSITIES if quick else INPUT_SPARSITIES,
        rounds=3 if quick else ROUNDS,
        loaded_rounds=3 if quick else LOADED_ROUNDS,
        min_seconds=0.0 if quick else MIN_SECONDS,
        busy=not a.no_busy,
    )
    start = result["load_average"]["start"]
    result.update(
        command=shlex.join(
            ["python", "benchmarks/bench_activation_kernel.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        machine=machine_info(),
        settings={
            "quick": quick,
            "torch_threads": torch.get_num_threads(),
            "threading": threading_mode() or "unavailable",
            "read_gbps": read_gbps,
            "busy_processes": os.cpu_count() if not a.no_busy else 0,
            "preliminary": start is None or start[0] > 0.5,
            "seconds": time.perf_counter() - t0,
        },
    )
    write_text(out_dir / "activation_kernel.json", json.dumps(result, indent=2) + "\n")
    write_text(out_dir / "activation_kernel.md", markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
