"""The built-in demo: the shipped config is the comparison it says, and the demo runs end to end
(on a tiny config here): store, tables, plots, the best sparse model converted and timed."""

from __future__ import annotations

import textwrap

from sparseforge.cli import main
from sparseforge.experiments import demo
from sparseforge.experiments.config import load_runs

TINY = textwrap.dedent(
    """
    name: tiny-demo
    model: {name: mlp, width: 32}
    data: {name: mnist1d, samples: 400}
    training: {epochs: 2, batch_size: 64}
    sparsity: {target: 0.9}
    seeds: [0]
    grid:
      algorithm: [dense, static, {name: rigl, every: 2}]
    """
)


def test_the_shipped_config_compares_five_methods_at_90_percent_with_two_seeds():
    config, runs = load_runs(demo.demo_config_path())
    assert sorted({r.config.algorithm.name for r in runs}) == ["dense", "gmp", "rigl", "set", "static"]
    assert config.seeds == [0, 1] and len(runs) == 10
    assert {r.config.sparsity.target for r in runs if r.config.algorithm.name != "dense"} == {0.9}
    assert all(r.config.data.name == "mnist1d" and r.config.sparsity.distribution == "erk" for r in runs)


def test_the_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY, encoding="utf-8")
    monkeypatch.setattr(demo, "demo_config_path", lambda: config)
    main(["demo", "--out", str(tmp_path / "out"), "--workers", "2", "--no-progress"])
    out = capsys.readouterr().out
    for name in ("results.sqlite", "results.md", "results.csv", "accuracy_vs_sparsity.png", "layer_sparsity.png"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "| dense |" in out and "| rigl |" in out and "most accurate sparse run: algorithm=" in out
    assert "batch 1: dense" in out and "batch 64: dense" in out and "layers packed" in out
    # a second demo finds every run done and only reports and times again
    main(["demo", "--out", str(tmp_path / "out"), "--no-progress"])
    assert "most accurate sparse run" in capsys.readouterr().out
