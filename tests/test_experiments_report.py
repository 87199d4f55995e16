"""Reports of a results store, checked against a store filled by hand with known numbers; and the
experiment commands of the CLI (run --dry-run, results, report) on it."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest

from sparseforge.experiments.config import expand, parse_config
from sparseforge.experiments.store import ResultsStore
from sparseforge.experiments.summary import csv_table, group_runs, markdown_table, write_report

CONFIG = {
    "name": "hand",
    "seeds": [0, 1, 2],
    "grid": {"algorithm": ["dense", "static", {"name": "rigl", "every": 10}], "sparsity.target": [0.5, 0.9]},
}
# accuracy per (algorithm, sparsity) and seed, chosen by hand
ACCURACY = {
    ("dense", 0.0): [0.90, 0.92, 0.94],
    ("static", 0.5): [0.80, 0.82, 0.84],
    ("static", 0.9): [0.60, 0.70, 0.80],
    ("rigl", 0.5): [0.85, 0.85, 0.85],
    ("rigl", 0.9): [0.75, 0.77, 0.79],
}


def _fill(path):
    runs = expand(parse_config(CONFIG))
    store = ResultsStore(path)
    store.add_runs(runs)
    for run in runs:
        name, target = run.config.algorithm.name, run.config.sparsity.target
        accuracy = ACCURACY[(name, target)][run.seed]
        store.start(run.key)
        for epoch in (1, 2):
            store.log_epoch(run.key, epoch, 10 * epoch, {"mask_change": 0.01 * epoch if name == "rigl" else 0.0})
        flops = 100.0 * (1 - target)
        store.finish(run.key, {"accuracy": accuracy, "sparsity": target, "train_flops": flops, "epochs": 2})
    pending = expand(parse_config({**CONFIG, "name": "other", "grid": {}, "seeds": [7]}))
    store.add_runs(pending)  # a pending run of another experiment: never reported
    store.close()
    return runs


def test_groups_and_tables_match_the_hand_numbers(tmp_path):
    path = tmp_path / "r.sqlite"
    runs = _fill(path)
    with ResultsStore(path) as store:
        groups = group_runs(store.runs())
    assert [(g.method, g.sparsity) for g in groups] == [
        ("dense", 0.0),
        ("static", 0.5),
        ("static", 0.9),
        ("rigl", 0.5),
        ("rigl", 0.9),
    ]
    static90 = groups[2]
    assert len(static90.runs) == 3
    assert static90.mean("accuracy") == pytest.approx(0.70)
    assert static90.std("accuracy") == pytest.approx(0.10)  # sample std of 0.6, 0.7, 0.8
    assert groups[3].std("accuracy") == 0.0
    table = markdown_table(groups)
    assert "| static | 90% | 1x | 70.00 ± 10.00 | 90.0 ± 0.0 | 10 (0.10x) | 3 |" in table
    assert "| dense | - | 1x | 92.00 ± 2.00 | 0.0 ± 0.0 | 100 (1.00x) | 3 |" in table
    rows = list(csv.DictReader(io.StringIO(csv_table(groups))))
    assert len(rows) == 5 and float(rows[4]["accuracy_mean"]) == pytest.approx(0.77)
    assert len(runs) == 15


def test_an_algorithm_parameter_that_varies_names_the_method(tmp_path):
    config = {
        "seeds": [0],
        "grid": {"algorithm": [{"name": "rigl", "every": 10}, {"name": "rigl", "every": 20}, "static"]},
    }
    runs = expand(parse_config(config))
    with ResultsStore(tmp_path / "r.sqlite") as store:
        store.add_runs(runs)
        for run in runs:
            store.start(run.key)
            store.finish(run.key, {"accuracy": 0.5, "sparsity": 0.9, "train_flops": 1.0})
        methods = [g.method for g in group_runs(store.runs())]
    assert methods == ["rigl (every=10)", "rigl (every=20)", "static"]


def test_write_report_files(tmp_path):
    path = tmp_path / "r.sqlite"
    _fill(path)
    written = write_report(path, tmp_path / "out")
    assert set(written) == {"markdown", "csv", "accuracy_vs_sparsity", "accuracy_vs_flops", "mask_change"}
    for key in ("accuracy_vs_sparsity", "accuracy_vs_flops", "mask_change"):
        assert written[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["markdown"].read_text().startswith("# hand\n")
    with pytest.raises(Exception, match="has no finished runs of experiment 'other'"):
        write_report(path, tmp_path / "out2", experiment="other")


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-c", "from sparseforge.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
    )


def test_cli_results_report_and_dry_run(tmp_path):
    path = tmp_path / "r.sqlite"
    _fill(path)
    listed = _cli("results", str(path), "--status", "done", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "0 pending" not in listed.stdout and "1 pending, 0 running, 15 done, 0 failed; 15 shown" in listed.stdout
    reported = _cli("report", str(path), "--out", str(tmp_path / "rep"), cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    assert "70.00 ± 10.00" in reported.stdout and (tmp_path / "rep" / "results.csv").exists()
    bad = _cli("results", str(path), "--status", "finished", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: status='finished' is not allowed")

    config = tmp_path / "c.yaml"
    config.write_text("seeds: [0, 1]\ngrid:\n  algorithm: [static, set]\n", encoding="utf-8")
    dry = _cli("run", str(config), "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0 and "4 runs; nothing was run (--dry-run)" in dry.stdout
    assert not (tmp_path / "runs").exists()
    wrong = _cli("run", str(config), "--backend", "spark", "--store", str(tmp_path / "x.sqlite"), cwd=tmp_path)
    assert wrong.returncode == 2 and "backend='spark' is not allowed" in wrong.stderr
