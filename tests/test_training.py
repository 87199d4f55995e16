"""The plain training loop: per-epoch metrics, seeded shuffling, any batch iterable, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sparseforge as sf
from sparseforge.training import batches


def _toy(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 8, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()  # linearly separable
    return x, y


def test_train_learns_and_records_every_epoch() -> None:
    torch.manual_seed(0)
    x, y = _toy()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    history = sf.train(model, (x, y), epochs=5, optimizer=opt, batch_size=32, eval_data=(x, y), progress=False)
    assert [m.epoch for m in history.epochs] == [1, 2, 3, 4, 5]
    assert [m.steps for m in history.epochs] == [8, 16, 24, 32, 40]  # 256 / 32 = 8 steps per epoch
    assert history.epochs[-1].train_loss < history.epochs[0].train_loss
    assert history.final_accuracy is not None and history.final_accuracy > 0.9


def test_train_is_seeded_and_accepts_any_iterable() -> None:
    x, y = _toy()

    def run(data) -> torch.Tensor:  # type: ignore[no-untyped-def]
        torch.manual_seed(1)
        model = nn.Linear(8, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        sf.train(model, data, epochs=2, optimizer=opt, batch_size=64, seed=3, progress=False)
        return model.weight.detach().clone()

    assert torch.equal(run((x, y)), run((x, y)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    assert not torch.equal(run(loader), nn.Linear(8, 2).weight)  # trained from a DataLoader


def test_evaluate_by_hand() -> None:
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0]])
    y = torch.tensor([0, 1, 1, 1])  # argmax rows: 0, 1, 0, 1 -> 3 of 4 correct
    _, acc = sf.evaluate(model, (x, y), batch_size=3)
    assert acc == 0.75


def test_sparsifier_in_train_keeps_zeros() -> None:
    x, y = _toy()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    masks = sf.prune(model, 0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    sparsifier = sf.Sparsifier(model, opt, masks)
    sf.train(model, (x, y), epochs=2, optimizer=opt, progress=False)
    for name, param in sparsifier.params.items():
        assert torch.count_nonzero(param[~masks[name]]) == 0
    assert masks.step == 2 * 2  # 256 / 128 = 2 steps per epoch


@pytest.mark.parametrize("kwargs", [{"epochs": 0}, {"epochs": 1, "batch_size": 0}])
def test_bad_arguments(kwargs) -> None:  # type: ignore[no-untyped-def]
    x, y = _toy()
    model = nn.Linear(8, 2)
    with pytest.raises(sf.SparseforgeError, match=str(list(kwargs.values())[-1])):
        sf.train(model, (x, y), optimizer=torch.optim.SGD(model.parameters(), lr=0.1), **kwargs)


def test_mismatched_lengths_and_empty_eval() -> None:
    with pytest.raises(sf.SparseforgeError, match="3 rows"):
        list(batches((torch.zeros(3, 2), torch.zeros(4)), 2))
    with pytest.raises(sf.SparseforgeError, match="empty"):
        sf.evaluate(nn.Linear(2, 2), [])
