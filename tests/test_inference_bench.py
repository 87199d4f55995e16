"""The inference benchmark runs end to end on a tiny model file and writes JSON (no timing asserts)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sparseforge.errors import SparseforgeError
from sparseforge.inference.bench import format_markdown, format_table, load_mlp, run_inference_bench


def test_bench_on_tiny_model_file(tmp_path):
    torch.manual_seed(0)
    save_file(
        {"a.weight": torch.randn(32, 16), "a.bias": torch.randn(32), "b.weight": torch.randn(8, 32)},
        tmp_path / "m.safetensors",
    )
    rows = run_inference_bench(
        (0.9, "2:4"), (1, 3), model_path=tmp_path / "m.safetensors", json_out=tmp_path / "r.json", quick=True, rounds=2
    )
    assert [(r["pattern"], r["batch"]) for r in rows] == [("0.9", 1), ("0.9", 3), ("2:4", 1), ("2:4", 3)]
    for r in rows:
        assert r["dense_ms"] > 0 and r["sparseforge_ms"] > 0 and r["copy_gbps"] > 0
        assert r["dense_cold_ms"] > 0 and r["speedup_cold"] == pytest.approx(
            r["dense_cold_ms"] / r["sparseforge_cold_ms"]
        )
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["rows"]) == 4
    table = format_table(rows)
    assert "vs dense" in table and "cold: dense" in table and "copy (read+write)" in table and rows[0]["read_gbps"] > 0
    md = format_markdown(rows).splitlines()
    assert len(md) == 2 + len(rows) and all(line.count("|") == md[0].count("|") for line in md)
    assert md[2].startswith("| 0.9 | 1 | ")
    # quick runs skip the busy-machine column: None in the rows, "-" in the tables
    assert all(r["speedup_busy_converted"] is None and r["busy_vs_idle"] is None for r in rows)
    assert saved["busy_column"] is False and " - |" in md[2]


def test_busy_processes_keep_the_cores_busy_and_are_always_killed():
    from sparseforge.inference.bench import busy_processes

    with busy_processes(2, settle_s=0.0) as procs:
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.returncode is not None for p in procs)
    with pytest.raises(RuntimeError, match="boom"):
        with busy_processes(1, settle_s=0.0) as procs:
            raise RuntimeError("boom")
    assert procs[0].returncode is not None


def test_bench_busy_column_converts_under_load_and_reports_the_ratio(tmp_path):
    """busy=True: a second conversion while every core runs a busy loop; both models timed
    afterwards, interleaved; speedup, ratio and flagged layers in the rows, JSON and both tables."""
    torch.manual_seed(0)
    save_file({"a.weight": torch.randn(32, 16), "b.weight": torch.randn(8, 32)}, tmp_path / "m.safetensors")
    rows = run_inference_bench(
        (0.9,),
        (1,),
        model_path=tmp_path / "m.safetensors",
        json_out=tmp_path / "r.json",
        quick=True,
        rounds=2,
        busy=True,
    )
    (r,) = rows
    assert r["busy_sparseforge_ms"] > 0 and r["speedup_busy_converted"] == pytest.approx(
        r["dense_ms"] / r["busy_sparseforge_ms"]
    )
    assert r["busy_vs_idle"] == pytest.approx(r["sparseforge_ms"] / r["busy_sparseforge_ms"])
    assert isinstance(r["busy_under_load_layers"], int) and r["busy_paths"]
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["busy_column"] is True and saved["rows"][0]["busy_vs_idle"] == pytest.approx(r["busy_vs_idle"])
    table = format_table(rows)
    assert "busy-conv" in table and "busy/idle" in table and f"{r['speedup_busy_converted']:.2f}x" in table
    md = format_markdown(rows).splitlines()
    assert "busy / idle" in md[0] and all(line.count("|") == md[0].count("|") for line in md)
    assert f"{r['busy_vs_idle']:.2f}" in md[2]


def test_bench_rejects_bad_inputs(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(SparseforgeError, match="not a readable"):
        load_mlp(tmp_path / "bad.safetensors")
    save_file({"a.weight": torch.randn(4, 4)}, tmp_path / "m.safetensors")
    with pytest.raises(SparseforgeError, match="sparsity"):
        run_inference_bench((1.5,), (1,), model_path=tmp_path / "m.safetensors", quick=True, rounds=1)


def test_block_pattern_prunes_whole_blocks_and_runs(tmp_path):
    from sparseforge.inference.bench import _prune, build_mlp, parse_pattern

    assert (
        parse_pattern(" Block:8x4:0.75 ") == "block:8x4:0.75"
        and parse_pattern("2:4") == "2:4"
        and parse_pattern("0.5") == 0.5
    )
    assert parse_pattern("channel:0.50") == "channel:0.5"
    for bad in ("channel:", "channel:1.0", "block:8x8", "channel"):
        with pytest.raises(SparseforgeError):
            parse_pattern(bad)
    rows_gone = _prune(build_mlp(width=32, layers=2), "channel:0.25")[0].weight.detach()
    assert int((rows_gone == 0).all(dim=1).sum()) == 8 and int((rows_gone != 0).all(dim=1).sum()) == 24
    model = build_mlp(width=32, layers=2)
    pruned = _prune(model, "block:8x4:0.75")
    w = pruned[0].weight.detach()
    blocks = (w.reshape(4, 8, 8, 4) != 0).any(dim=(1, 3))  # (32/8) x (32/4) blocks
    assert int(blocks.sum()) == 8  # 25 % of the 32 blocks kept, every other block all zero
    kept = w.reshape(4, 8, 8, 4).permute(0, 2, 1, 3)[blocks]
    assert bool((kept != 0).all())  # kept blocks are whole
    save_file({"a.weight": torch.randn(32, 16), "b.weight": torch.randn(8, 32)}, tmp_path / "m.safetensors")
    rows = run_inference_bench(("block:4x4:0.5",), (1, 9), model_path=tmp_path / "m.safetensors", quick=True, rounds=2)
    assert [r["pattern"] for r in rows] == ["block:4x4:0.5"] * 2 and "block:4x4:0.5" in format_table(rows)
