"""The Random Search baseline: node configurations mask whole units; a tiny run reports searched vs
random vs dense with the weight sparsity a node sparsity implies."""

from __future__ import annotations

import pytest
import torch

from sparseforge.errors import SparseforgeError
from sparseforge.experiments.random_search import RandomSearchConfig, _parent, format_table, node_masks, random_search


def test_node_masks_remove_whole_units():
    model = _parent(3, 2, hidden=4, layers=2, seed=0)  # 3 -> 4 -> 4 -> 2
    keep = [torch.tensor([True, False, True, False]), torch.tensor([False, False, False, True])]
    masks = node_masks(model, keep)
    assert masks["0.weight"].tolist() == [[True] * 3, [False] * 3, [True] * 3, [False] * 3]
    # layer 2: rows = second hidden layer's units (only unit 3 kept), columns = first layer's units (0 and 2)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[3, 0] = expected[3, 2] = True
    assert torch.equal(masks["2.weight"], expected)
    assert masks["4.weight"].tolist() == [[False, False, False, True]] * 2
    with pytest.raises(SparseforgeError, match="1 hidden-unit selections for 2 hidden layers"):
        node_masks(model, keep[:1])


def test_a_tiny_run_reports_searched_random_and_dense():
    cfg = RandomSearchConfig(node_sparsities=(0.5,), hidden=16, candidates=4, seeds=(0, 1), epochs=2, samples=400)
    result = random_search(cfg)
    (row,) = result["rows"]
    # 8 of 16 units kept per layer: (40*8 + 8*8 + 8*10) / (40*16 + 16*16 + 16*10) kept
    assert row["weight_sparsity"] == pytest.approx(1 - (40 * 8 + 8 * 8 + 8 * 10) / (40 * 16 + 16 * 16 + 16 * 10))
    for key in ("searched", "random", "random_weight_mask"):
        assert 0.0 <= row[key]["mean"] <= 1.0 and row[key]["std"] >= 0.0
    assert len(row["searched_curve"]) == 2 and isinstance(row["searched_beats_random"], bool)
    assert 0.0 <= result["dense"]["mean"] <= 1.0
    table = format_table(result)
    assert "| 50% | 56.1% |" in table and table.count("\n") == 3  # 1 - 464 / 1056


def test_the_random_weight_masks_keep_each_layers_budget_anywhere():
    from sparseforge.experiments.random_search import _random_weight_masks

    model = _parent(40, 10, 16, 2, seed=0)
    keep = [torch.arange(16) < 8, torch.arange(16) % 2 == 0]
    like = node_masks(model, keep)
    got = _random_weight_masks(like, torch.Generator().manual_seed(0))
    assert {n: int(m.sum()) for n, m in got.items()} == {n: int(m.sum()) for n, m in like.items()}
    # unstructured: the kept weights of the first layer are not confined to the 8 kept units' rows
    assert got["0.weight"][~keep[0]].any()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_sparsities": (1.0,)}, "node sparsity 1.0 is not allowed"),
        ({"node_sparsities": (0.99,), "hidden": 16}, "leaves no unit of 16"),
        ({"candidates": 0}, "candidates"),
        ({"seeds": ()}, "seeds is empty"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(SparseforgeError, match=message):
        RandomSearchConfig(**kwargs)


def test_the_guide_example_runs_as_written(capsys):
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "experiments.md").read_text(encoding="utf-8")
    section = guide.split("## The Random Search baseline", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    exec(compile(code, "experiments.md", "exec"), {})
    out = capsys.readouterr().out
    assert "| 50% |" in out and "searched" in out
