"""Turn a pruned model into packed sparse layers for fast CPU inference, and measure it.

A stack of ``--layers`` Linear layers of width ``--width`` is magnitude-pruned (default 90 %), then
``sparseforge.inference.convert`` times every packed format against dense, per layer and batch
size, and keeps the fastest (dense where no kernel wins). The script then times dense and
converted forward passes itself (interleaved, median of ``--reps`` calls per batch size) and
prints the ratio it measured: on a busy or small machine that can be 1.0x or less, and it says
so. Finally ``save_converted`` / ``load_converted`` round-trip the converted model and the
outputs are compared.

Run::

    python examples/convert_and_benchmark.py             # 4 x 1024, a few seconds (more when busy)
    python examples/convert_and_benchmark.py --tiny      # 2 x 512, a few seconds, for the tests
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import sparseforge as sf
from sparseforge.fileio import check_output_dir
from sparseforge.inference import convert, load_converted, save_converted


def make_model(width: int, layers: int) -> nn.Sequential:
    return nn.Sequential(*(m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())))


def time_ms(fns: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Milliseconds of ``reps`` calls of each model, the models called in turn (interleaved)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():  # warm-up
            fn(x)
        for _ in range(reps):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="2 layers of width 512, few timed calls")
    parser.add_argument("--width", type=int, default=None, help="layer width (default 1024; 512 with --tiny)")
    parser.add_argument("--layers", type=int, default=None, help="Linear layers (default 4; 2 with --tiny)")
    parser.add_argument("--sparsity", type=float, default=0.9, help="fraction of zeros (default 0.9)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per model (default 50; 5 with --tiny)")
    parser.add_argument("--out", default="examples_out", help="folder for the converted model")
    args = parser.parse_args()
    out = check_output_dir(args.out)
    width = args.width or (512 if args.tiny else 1024)
    layers = args.layers or (2 if args.tiny else 4)
    reps = args.reps or (5 if args.tiny else 50)
    batch_sizes = (1, 16)

    torch.manual_seed(0)
    model = make_model(width, layers).eval()
    sf.prune(model, sparsity=args.sparsity, method="magnitude")  # uniform budget: every layer gets the same sparsity

    fast, report = convert(model, batch_sizes=batch_sizes, reps=3 if args.tiny else 5)
    print(report)  # per layer: the format, which path runs at which batch size, and why

    print(
        f"timing {layers} x Linear({width}, {width}), {torch.get_num_threads()} threads, median of {reps} interleaved calls:"
    )
    for batch in batch_sizes:
        times = time_ms({"dense": model, "converted": fast}, torch.randn(batch, width), reps)
        ms = {name: statistics.median(t) for name, t in times.items()}
        ratio = round(ms["dense"] / ms["converted"], 2)  # what was measured here, nothing else
        verdict = "faster" if ratio >= 1.1 else "slower" if ratio <= 0.9 else "about the same (within timing noise)"
        spread = max(ms[name] / min(t) for name, t in times.items())  # median call vs fastest call
        noisy = f" (noisy: median calls {spread:.1f}x the fastest, the machine is busy)" if spread > 1.5 else ""
        print(
            f"  batch {batch:3d}: dense {ms['dense']:.4g} ms, converted {ms['converted']:.4g} ms "
            f"-> measured speedup {ratio:.2f}x: {verdict} in this run{noisy}"
        )
    if report.under_load_layers:
        print("  (convert saw a busy machine; sparseforge.inference.retune(fast) re-measures on a quiet one)")
    if not report.sparse_layers:
        print("no layer runs sparse on this machine, so there is nothing for save_converted to store")
        return

    path = save_converted(out / "linear_stack.sf.safetensors", fast)
    loaded = load_converted(path, make_model(width, layers).eval())  # the dense architecture as skeleton
    print(f"saved {path} ({path.stat().st_size / 1e6:.2f} MB) and loaded it back")
    diff_dense = diff_loaded = 0.0
    with torch.inference_mode():
        for batch in batch_sizes:  # each batch size may run another format
            x = torch.randn(batch, width)
            y_dense, y_fast, y_loaded = model(x), fast(x), loaded(x)
            diff_dense = max(diff_dense, (y_fast - y_dense).abs().max().item())
            diff_loaded = max(diff_loaded, (y_loaded - y_fast).abs().max().item())
    print(f"max abs diff converted vs dense: {diff_dense:.2e}")
    print(f"max abs diff loaded vs converted: {diff_loaded:.2e}")


if __name__ == "__main__":
    main()
