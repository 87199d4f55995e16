"""The sparse-input kernel benchmark runs end to end on one small layer and writes its JSON and
Markdown (no timing asserts)."""

from __future__ import annotations

import json

from conftest import load_benchmark, requires
from sparseforge.inference import native

needs_native = requires(native.native_available(), f"C kernels unavailable: {native.native_reason()}")


@needs_native
def test_quick_run_writes_every_row_and_variant(tmp_path):
    bench = load_benchmark("bench_activation_kernel")
    result = bench.main(["--quick", "--no-busy", "--out-dir", str(tmp_path)])
    rows = result["rows"]
    assert [(r["weight_sparsity"], r["input_sparsity"]) for r in rows] == [
        (w, s) for w in bench.WEIGHT_SPARSITIES for s in bench.QUICK_INPUT_SPARSITIES
    ]
    for r in rows:
        want = {"dense", "input-sparse"} | ({"combined", "bitmask", "csr"} if r["weight_sparsity"] else set())
        assert set(r["ms"]) == want and all(v > 0 for v in r["ms"].values())
        assert set(r["speedup"]) == want - {"dense"} and set(r["gbps"]) == want
        assert r["max_abs_error"] < 1e-3
        # the sparse-input kernels read only the active inputs' share of their layout
        assert (
            r["weight_bytes_read"]["input-sparse"] <= (1 - r["input_sparsity"]) * r["weight_bytes_read"]["dense"] * 1.5
        )
    assert result["loaded_rows"] == [] and result["settings"]["busy_processes"] == 0
    saved = json.loads((tmp_path / "activation_kernel.json").read_text())
    assert saved["rows"][0]["ms"] == rows[0]["ms"]
    md = (tmp_path / "activation_kernel.md").read_text()
    assert md.count("| 192x320 |") == len(rows) and "Under load" not in md and "Load average" in md


@needs_native
def test_the_run_under_load_times_every_row_again(tmp_path):
    bench = load_benchmark("bench_activation_kernel")
    result = bench.run([(64, 96)], [0.5], rounds=1, loaded_rounds=1, min_seconds=0.0, log=lambda _m: None)
    assert len(result["rows"]) == len(result["loaded_rows"]) == len(bench.WEIGHT_SPARSITIES)
    assert set(result["loaded_rows"][1]["ms"]) == {"dense", "input-sparse", "combined", "bitmask", "csr"}
