"""Wall-time overhead of sparse training over dense training, per optimizer step.

Model: MLP 1024-2048-2048-10, batch 128, synthetic data, SGD with momentum 0.9. Sparse variants
use a 90% sparse ERK random mask (GMP starts dense and prunes to 90%). Every variant has its own
model and optimizer (same initial weights); they run interleaved in chunks (dense, static, SET,
RigL, ... then again) in one process, so machine-load drift hits all of them alike.

Reported per variant (milliseconds per step):

* ``median``: median step time (forward + backward + ``optimizer.step()`` with its hooks).
* ``amortized``: median of the non-update steps plus the mask updates' extra time spread over
  all steps -- the honest per-step cost with mask updates included.
* ratios of both to dense.

Sparsifier mode: the sparse variants use the Sparsifier's default, ``zero_state="auto"``, which
picks ``"grads"`` for this SGD: one elementwise pass per step (gradients times
masks); weights and optimizer state are masked when masks change. It is exact for SGD/Adam/AdamW
(a zero gradient, zero state and zero weight give a zero update, weight decay included), which
the Sparsifier checks. ``RigL(step)`` runs ``zero_state="step"`` (the default for other
optimizers, and the default of earlier versions for all: gradients, then weights and momentum,
masked every step: three passes) for comparison.

Usage: ``python benchmarks/bench_overhead.py [--steps 300] [--chunk 25] [--quick]``; writes
``benchmarks/results/overhead.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sparseforge import Sparsifier
from sparseforge.algorithms import GMP, SET, RigL, StaticSparse, init_sparse
from sparseforge.experiments.models import MLP


def build(variant: str, sizes: tuple[int, ...], sparsity: float, every: int, steps: int):
    torch.manual_seed(0)
    model = MLP(sizes[0], sizes[-1], hidden=sizes[1:-1])
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    if variant == "dense":
        return model, opt, None
    far = 100 * steps  # DST drop fraction stays ~alpha during the benchmark
    algorithms = {
        "static": lambda: StaticSparse(),
        "SET": lambda: SET(end=far, every=every),
        "RigL": lambda: RigL(end=far, every=every),
        "RigL(step)": lambda: RigL(end=far, every=every),
        "GMP": lambda: GMP(sparsity, start=0, end=steps, every=every),
    }
    masks = init_sparse(model, 0.0 if variant == "GMP" else sparsity)
    if variant == "RigL(step)":
        sparsifier = Sparsifier(model, opt, masks, algorithms[variant](), zero_state="step")
    else:  # the default, as a new user gets it
        sparsifier = Sparsifier(model, opt, masks, algorithms[variant]())
        assert sparsifier.zero_state == "grads", repr(sparsifier)
    return model, opt, sparsifier


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    parser.add_argument("--chunk", type=int, default=25, help="steps per variant before switching")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--every", type=int, default=100, help="mask update interval (steps)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="small model, few steps (smoke test)")
    parser.add_argument("--variants", default="dense,static,SET,RigL,RigL(step),GMP")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "overhead.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (1024, 2048, 2048, 10) if not args.quick else (128, 256, 256, 10)
    steps, every = (args.steps, args.every) if not args.quick else (40, 10)
    variants = args.variants.split(",")
    batch = 128
    x, y = torch.randn(batch, sizes[0]), torch.randint(0, sizes[-1], (batch,))

    runs = {v: build(v, sizes, args.sparsity, every, steps + args.warmup) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    updates: dict[str, list[bool]] = {v: [] for v in variants}

    def one_step(variant: str) -> tuple[float, bool]:
        model, opt, sparsifier = runs[variant]
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        elapsed = time.perf_counter() - start
        algo = sparsifier.algorithm if sparsifier is not None else None
        return elapsed, bool(algo is not None and algo.is_update_step(sparsifier.masks.step))

    for v in variants:
        for _ in range(args.warmup):
            one_step(v)
    while any(len(times[v]) < steps for v in variants):
        for v in variants:
            for _ in range(min(args.chunk, steps - len(times[v]))):
                t, was_update = one_step(v)
                times[v].append(t)
                updates[v].append(was_update)

    results = {}
    for v in variants:
        plain = [t for t, u in zip(times[v], updates[v], strict=True) if not u]
        median = statistics.median(plain)
        extra = sum(t - median for t, u in zip(times[v], updates[v], strict=True) if u)
        results[v] = {
            "median_ms": 1e3 * statistics.median(times[v]),
            "amortized_ms": 1e3 * (median + extra / len(times[v])),
            "mean_ms": 1e3 * statistics.fmean(times[v]),
            "updates": sum(updates[v]),
            "update_extra_ms": 1e3 * extra / max(sum(updates[v]), 1),
            "final_sparsity": runs[v][2].masks.sparsity() if runs[v][2] is not None else 0.0,
        }
    base = results.get("dense", next(iter(results.values())))
    for r in results.values():
        r["median_ratio"] = r["median_ms"] / base["median_ms"]
        r["amortized_ratio"] = r["amortized_ms"] / base["amortized_ms"]

    print(
        f"MLP {'-'.join(map(str, sizes))}, batch {batch}, SGD momentum, sparsity {args.sparsity}, "
        f"{steps} steps/variant in chunks of {args.chunk}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'variant':<12}{'median ms':>11}{'x dense':>9}{'amort. ms':>11}{'x dense':>9}{'updates':>9}{'ms/update':>11}"
    )
    for v, r in results.items():
        print(
            f"{v:<12}{r['median_ms']:>11.2f}{r['median_ratio']:>9.3f}{r['amortized_ms']:>11.2f}"
            f"{r['amortized_ratio']:>9.3f}{r['updates']:>9d}{r['update_extra_ms']:>11.1f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "sizes": sizes,
        "batch": batch,
        "steps": steps,
        "chunk": args.chunk,
        "every": every,
        "sparsity": args.sparsity,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
    from sparseforge.fileio import write_text

    write_text(out, json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
