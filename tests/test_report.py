"""sparsity_report: nnz, sparsity and FLOPs per layer against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparseforge import MaskState, sparsity_report


def tiny_model() -> nn.Module:
    """Conv1d(2 -> 4, k=3): 24 weights + 4 bias; input length 10 -> 8 outputs -> flatten 32 ->
    Linear(32 -> 5): 160 weights + 5 bias. 193 parameters in all, 184 of them prunable weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Flatten(), nn.Linear(32, 5))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) + 0.5)  # strictly nonzero
        model[0].weight.view(-1)[:10] = 0.0  # conv nnz 24 - 10 = 14
        model[2].weight.view(-1)[:100] = 0.0  # linear nnz 160 - 100 = 60
        model[0].bias[1] = 0.0  # conv bias nnz 3
    return model


def test_report_with_example_input_by_hand():
    model = tiny_model()
    x = torch.randn(3, 2, 10)  # batch 3: FLOPs are per sample
    r = sparsity_report(model, x, show=False)
    conv, lin = r.layers
    assert conv.name == "0.weight" and conv.shape == (4, 2, 3) and conv.numel == 24
    assert conv.nnz == 14 and conv.sparsity == pytest.approx(10 / 24)
    # conv FLOPs = 2 * nnz * output positions (8 per sample)
    assert conv.dense_flops == 2 * 24 * 8 == 384
    assert conv.sparse_flops == 2 * 14 * 8 == 224
    assert lin.name == "2.weight" and lin.numel == 160 and lin.nnz == 60
    assert lin.sparsity == pytest.approx(100 / 160)
    assert lin.dense_flops == 2 * 160 == 320 and lin.sparse_flops == 2 * 60 == 120
    # totals: prunable weights vs all parameters
    assert r.prunable_params == 184 and r.prunable_nnz == 74
    assert r.prunable_sparsity == pytest.approx(1 - 74 / 184)
    assert r.total_params == 24 + 4 + 160 + 5 == 193
    assert r.total_nnz == 14 + 3 + 60 + 5 == 82
    assert r.total_sparsity == pytest.approx(1 - 82 / 193)
    assert r.dense_flops == 384 + 320 and r.sparse_flops == 224 + 120
    d = r.to_dict()
    assert d["prunable_nnz"] == 74 and d["total_sparsity"] == pytest.approx(1 - 82 / 193)
    assert d["layers"][0]["sparse_flops"] == 224


def test_report_without_example_input_counts_one_position():
    r = sparsity_report(tiny_model(), show=False)
    conv, lin = r.layers
    assert conv.dense_flops == 48 and conv.sparse_flops == 28
    assert lin.dense_flops == 320 and lin.sparse_flops == 120


def test_report_nnz_from_masks():
    model = tiny_model()
    m = torch.zeros(5, 32, dtype=torch.bool)
    m[0, :7] = True
    masks = MaskState({"2.weight": m})
    r = sparsity_report(model, torch.randn(1, 2, 10), masks=masks, show=False)
    assert r.layers[1].nnz == 7 and r.layers[1].sparse_flops == 14
    assert r.layers[0].nnz == 14  # no mask: counted from the weights


def test_linear_on_sequences_counts_positions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    r = sparsity_report(model, torch.randn(2, 6, 4), show=False)  # 6 tokens per sample
    assert r.layers[0].dense_flops == 2 * 12 * 6


def test_report_table_and_printing(capsys):
    r = sparsity_report(tiny_model(), torch.randn(2, 2, 10), show=True)
    out = capsys.readouterr().out
    assert "0.weight" in out and "2.weight" in out
    assert r.to_table().row_count == 4  # two layers + two total rows


def test_report_tied_weights_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.b(self.a(x))

    r = sparsity_report(Tied(), show=False)
    assert [layer.name for layer in r.layers] == ["a.weight"]
    assert r.total_params == 16 and r.prunable_params == 16


def test_prunable_totals_follow_the_masks_when_given():
    """With masks, the prunable totals are the pruning budget: excluded layers stay out of them."""
    import sparseforge

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    masks = sparseforge.prune(model, 0.9, exclude=["2"])  # only layer 0 (200 weights) is pruned
    r = sparsity_report(model, torch.randn(1, 10), masks=masks, show=False)
    assert r.prunable_params == 200 and r.prunable_nnz == 20
    assert r.prunable_sparsity == pytest.approx(0.9)
    assert [layer.prunable for layer in r.layers] == [True, False]
    assert r.dense_flops == 2 * (200 + 80)  # FLOPs still count the excluded layer
    assert r.sparse_flops == 2 * (20 + 80)


def _table_text(report) -> str:
    from rich.console import Console

    console = Console(width=250, record=True)
    console.print(report.to_table())
    return console.export_text()


def test_a_report_without_masks_does_not_pass_for_the_pruned_sparsity():
    """Pruned 0.9 with the classifier excluded: with masks the budget total is 0.9; without masks
    the total covers every Linear/Conv layer and is labelled so, never as the prunable budget."""
    import sparseforge

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 4))
    masks = sparseforge.prune(model, 0.9, exclude=["2"])
    with_masks = sparsity_report(model, masks=masks, show=False)
    without = sparsity_report(model, show=False)
    assert with_masks.budget == "masked layers" and with_masks.prunable_sparsity == pytest.approx(0.9)
    assert without.budget == "all Linear/Conv layers"
    assert without.prunable_sparsity == pytest.approx(180 / 280)  # the excluded layer's 80 weights count
    text = _table_text(without)
    assert "all Linear/Conv weights" in text and "masked layers total" not in text and "prunable total" not in text
    assert "No masks given" in text and "kept (mask)" not in text
    masked_text = _table_text(with_masks)
    assert "masked layers total" in masked_text and "kept (mask)" in masked_text and "nonzero" in masked_text


def test_mask_counts_and_nonzeros_are_separate_and_unapplied_masks_are_flagged():
    model = nn.Sequential(nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0, 2.0, 3.0], [0.0, 0.0, 4.0, 5.0]]))  # 5 nonzero
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])  # keeps 3
    r = sparsity_report(model, masks=MaskState({"0.weight": mask}), show=False)
    layer = r.layers[0]
    assert (layer.mask_kept, layer.nonzero, layer.nnz) == (3, 5, 3)
    assert r.unapplied == ["0.weight"] and "WARNING" in _table_text(r)


def test_checkpoint_report_reads_kept_and_nonzero_from_the_file_alone():
    from sparseforge.report import checkpoint_report

    w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    r = checkpoint_report(
        {"fc.weight": w, "fc.bias": torch.ones(2)},
        MaskState({"fc.weight": torch.tensor([[True, True], [False, False]])}),
        show=False,
    )
    assert [(x.name, x.mask_kept, x.nonzero) for x in r.layers] == [("fc.weight", 2, 1)]
    assert r.prunable_sparsity == pytest.approx(0.5) and r.total_params == 6 and r.total_nnz == 3
