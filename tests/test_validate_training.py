"""The validation v2 script: its shipped configs, run selection, and held / not-held verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import load_benchmark
from sparseforge.experiments.config import load_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vt():  # type: ignore[no-untyped-def]
    return load_benchmark("validate_training")


def test_the_shipped_validation_configs_expand_to_the_studies_they_describe():
    _, runs = load_runs(ROOT / "src/sparseforge/experiments/configs/validation.yaml")
    # every method at 3 sparsities (dense once) + uniform static x 3 + RigL every 50/200 x 2
    # + 2x/5x for dense (once per length) and 5 sparse-from-scratch methods x 2 sparsities
    # + sparse init for 5 methods x 2 sparsities; 3 seeds each
    assert len(runs) == (1 + 7 * 3 + 3 + 2 * 2 + (2 + 5 * 2 * 2) + 5 * 2) * 3 == 183
    assert {r.config.algorithm.every for r in runs if r.config.algorithm.name == "rigl"} == {50, 100, 200}
    assert {r.config.training.multiplier for r in runs} == {1.0, 2.0, 5.0}
    assert {r.config.sparsity.init for r in runs} == {"dense", "sparse"}
    _, cnn = load_runs(ROOT / "src/sparseforge/experiments/configs/validation_cnn.yaml")
    assert len(cnn) == (1 + 7 * 2) * 3 and {r.config.model.name for r in cnn} == {"cnn"}


def test_the_cifar_study_reads_the_folder_it_is_given(vt, tmp_path):
    runs = vt.study_runs("cifar10", tmp_path)
    assert len(runs) == 45 and {r.config.data.root for r in runs} == {str(tmp_path)}
    assert {r.config.model.name for r in runs} == {"resnet20"}


@pytest.mark.parametrize(
    ("a", "b", "margin", "expected"),
    [
        ([0.60, 0.62, 0.64], [0.50, 0.50, 0.50], 0.0, "held"),  # +0.12
        ([0.50, 0.52, 0.54], [0.52, 0.52, 0.52], 0.0, "held"),  # exactly equal means
        ([0.49, 0.52, 0.55], [0.53, 0.53, 0.53], 0.0, "within noise"),  # -0.01, se = 0.03 / sqrt(3) = 0.017
        ([0.40, 0.41, 0.42], [0.50, 0.50, 0.50], 0.0, "**not held**"),  # -0.09, se 0.0058
        ([0.40, 0.41, 0.42], [0.50, 0.50, 0.50], 0.10, "held"),  # within a 10-point margin
        ([], [0.5], 0.0, "not run"),
    ],
)
def test_verdicts(vt, a, b, margin, expected):
    got, diff, se = vt.verdict(a, b, margin)
    assert got == expected
    if a:
        assert diff == pytest.approx(sum(a) / len(a) - sum(b) / len(b) + margin)


def test_runs_are_picked_by_method_sparsity_and_settings(vt):
    def run(name, target, acc, **extra):
        flat = {
            "algorithm.name": name,
            "algorithm.every": extra.get("every", 100),
            "sparsity.target": target,
            "sparsity.distribution": extra.get("distribution", "erk"),
            "sparsity.init": extra.get("init", "dense"),
            "training.multiplier": extra.get("multiplier", 1.0),
        }
        return flat, {"accuracy": acc}

    runs = vt.Runs(
        [
            run("dense", 0.0, 0.70),
            run("dense", 0.0, 0.75, multiplier=5.0),
            run("rigl", 0.8, 0.50),
            run("rigl", 0.8, 0.52, every=50),
            run("rigl", 0.9, 0.40),
            run("rigl", 0.8, 0.60, multiplier=5.0),
            run("static", 0.8, 0.45, distribution="uniform"),
            run("static", 0.8, 0.47),
            run("static", 0.8, 0.49, init="sparse"),
        ]
    )
    assert runs.pick("rigl", 0.8) == [0.50]
    assert runs.pick("rigl", 0.8, algorithm__every=50) == [0.52]
    assert runs.pick("rigl", 0.8, training__multiplier=5.0) == [0.60]
    assert runs.pick("static", 0.8) == [0.47]
    assert runs.pick("static", 0.8, sparsity__distribution="uniform") == [0.45]
    assert runs.pick("static", 0.8, sparsity__init="sparse") == [0.49]
    assert runs.pick("dense") == [0.70] and runs.pick("dense", training__multiplier=5.0) == [0.75]
    assert runs.pick("set", 0.8) == []
    # the gap claim compares dense-minus-sparse at 1x and 5x: 0.70 - 0.50 = 0.20 against 0.75 - 0.60 = 0.15
    assert vt._gaps(runs.pick("dense"), runs.pick("rigl", 0.8)) == [pytest.approx(0.20)]
    rows = {(c.text, c.setting): c.row() for c in vt.claims(runs, None, None)}
    narrows = rows[("longer training narrows rigl's gap to dense (same length)", "MLP, 80%")]
    assert narrows["verdict"] == "held" and math.isclose(narrows["difference"], 0.05)
    erk = rows[("ERK ≥ uniform layer-wise sparsity (static masks)", "MLP, 80%")]
    assert erk["verdict"] == "held" and math.isclose(erk["difference"], 0.02)
    assert rows[("RigL ≥ SET", "MLP, 80%, 1x")]["verdict"] == "not run"


def test_the_summary_counts_verdicts_per_claim_and_model(vt):
    def row(setting, verdict, diff):
        return {"claim": "A ≥ B", "source": "paper", "setting": setting, "verdict": verdict, "difference": diff}

    rows = [
        row("MLP, 80%, 1x", "held", 0.016),
        row("MLP, 90%, 1x", "within noise", -0.002),
        row("MLP, 95%, 1x", "**not held**", -0.05),
        row("CNN, 80%, 1x", "held", 0.08),
        row("CNN, 90%, 1x", "held", 0.1),
    ]
    lines = vt.summary_table(rows)
    assert lines[0] == "| claim | source | MLP | CNN |"
    assert lines[2] == "| A ≥ B | paper | held 1 of 3 (+1.6, -0.2, -5.0) | held (+8.0, +10.0) |"
