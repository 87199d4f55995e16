"""The Sparse-IFT benchmark's shipped config and verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_benchmark
from sparseforge.experiments.config import load_runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    return load_benchmark("sparse_ift")


def test_the_shipped_config_compares_every_transformation_with_dense():
    _, runs = load_runs(ROOT / "src/sparseforge/experiments/configs/sparse_ift.yaml")
    # dense once per seed + 4 kinds x 2 mask algorithms x 3 sparsities, 3 seeds
    assert len(runs) == (1 + 4 * 2 * 3 + 1 + 2) * 3  # + dense, parallel and doped at 5x
    kinds = {r.config.model.sparse_ift.kind for r in runs if r.config.model.sparse_ift is not None}
    assert kinds == {"wide", "parallel", "factorized", "doped"}
    for r in runs:  # the first and the last layer stay dense; Wide excludes nothing (it would widen nothing)
        if r.config.model.sparse_ift is not None:
            assert r.config.model.sparse_ift.exclude == ([] if r.config.model.sparse_ift.kind == "wide" else ["0", "4"])


def test_the_shipped_cnn_config_compares_every_transformation_with_dense_under_both_inits():
    _, runs = load_runs(ROOT / "src/sparseforge/experiments/configs/sparse_ift_cnn.yaml")
    # dense + 4 kinds x 2 mask algorithms x 3 sparsities x 2 initialisations, 3 seeds
    assert len(runs) == (1 + 4 * 2 * 3 * 2) * 3
    assert {r.config.model.name for r in runs} == {"cnn"}
    sparse = [r.config for r in runs if r.config.model.sparse_ift is not None]
    assert {(c.model.sparse_ift.kind, c.algorithm.name, c.sparsity.target, c.sparsity.init) for c in sparse} == {
        (k, a, s, i)
        for k in ("wide", "parallel", "factorized", "doped")
        for a in ("static", "rigl")
        for s in (0.5, 0.75, 0.9)
        for i in ("sparse", "dense")
    }
    for c in sparse:
        assert c.model.sparse_ift.exclude == ([] if c.model.sparse_ift.kind == "wide" else ["features.0", "classifier"])


@pytest.mark.parametrize(
    ("a", "b", "word"),
    [
        ([0.70, 0.71, 0.72], [0.68, 0.68, 0.68], "beats dense (+3.0)"),
        ([0.67, 0.69, 0.71], [0.68, 0.68, 0.68], "level with dense (+1.0)"),  # se = 0.02 / sqrt(3) = 1.15 points
        ([0.60, 0.61, 0.62], [0.68, 0.68, 0.68], "below dense (-7.0)"),
        ([], [0.68], "not run"),
    ],
)
def test_verdicts(bench, a, b, word):
    assert bench._verdict(a, b) == word


def test_the_cifar10_config_takes_a_local_copy_and_transforms_resnet20_at_equal_flops(tmp_path):
    import torch

    from sparseforge.experiments.models import build_model
    from sparseforge.layers import transform

    path = ROOT / "src/sparseforge/experiments/configs/sparse_ift_cifar10.yaml"
    _, runs = load_runs(path, data_root=tmp_path)
    assert len(runs) == (1 + 3 * 2 * 3) * 3  # dense + parallel/factorized/doped x static/rigl x 50/75/90 %
    assert {r.config.data.root for r in runs} == {str(tmp_path)}
    model = build_model("resnet20", 3 * 32 * 32, 10, input_shape=(3, 32, 32))
    convs = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d) and n != "conv1"}
    _, masks = transform(model, "parallel", 0.75, exclude=["conv1", "fc"])
    kept = {}
    for name, mask in masks.items():
        layer = name.split(".branches.")[0]
        kept[layer] = kept.get(layer, 0) + int(mask.sum())
    assert kept == convs  # every replaced convolution keeps exactly its dense weight count
