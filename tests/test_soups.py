"""Sparse Model Soups: averaging, mask preservation, parallel == sequential, convergence."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparseforge.algorithms.soups import Ingredient, average_states, sparse_model_soups
from sparseforge.errors import SparseforgeError
from sparseforge.experiments.datasets import load_dataset
from sparseforge.experiments.models import MLP
from sparseforge.training import evaluate, train


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _model(seed: int = 0, hidden=(32, 32)) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(64, 10, hidden=hidden)


def _make_opt(model: nn.Module, ing: Ingredient) -> torch.optim.Optimizer:
    wd = 1e-4 if ing.weight_decay is None else ing.weight_decay
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)


def _train_fn(data, epochs: int = 1):
    def fn(model, optimizer, ing: Ingredient):
        train(model, data, epochs=epochs, optimizer=optimizer, batch_size=64, seed=ing.seed, progress=False)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return fn


def _weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def test_average_states_is_the_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    out = average_states([a, b])
    assert torch.equal(out["w"], torch.tensor([2.0, 4.0]))
    assert torch.equal(out["n"], torch.tensor(3))
    with pytest.raises(SparseforgeError):
        average_states([])


def test_soup_is_mean_of_ingredients_and_keeps_mask(digits):
    model = _model()
    data = (digits.x_train, digits.y_train)
    total = sum(p.numel() for p in _weights(model).values())
    masks, history = sparse_model_soups(
        model,
        _make_opt,
        _train_fn(data),
        final_sparsity=0.75,
        cycles=2,
        ingredients=3,
        weight_decays=[0.0, 1e-4, 5e-4],
        eval_fn=lambda m: evaluate(m, (digits.x_test, digits.y_test))[1],
    )
    assert len(history.cycles) == 2
    last = history.cycles[-1]
    states = last.ingredient_results
    assert len(states) == 3
    # ingredients differ (different seeds / weight decay), the soup is their exact mean
    assert not torch.equal(states[0]["0.weight"], states[1]["0.weight"])
    soup = model.state_dict()
    for key, value in soup.items():
        mean = sum(s[key] for s in states) / 3
        assert torch.allclose(value, mean, atol=1e-7, rtol=0), key
    # the mask is kept exactly: same positions are zero in every ingredient and the soup
    assert masks.nnz() == math.floor(0.25 * total + 0.5)
    for name, p in _weights(model).items():
        assert torch.all(p[~masks[name]] == 0)
        for s in states:
            assert torch.all(s[name][~masks[name]] == 0)
    for c, target in zip(history.cycles, [0.5, 0.75], strict=True):
        assert c.target_sparsity == pytest.approx(target)
        assert c.sparsity >= target - 1.0 / total
        assert c.soup_metric is not None and len(c.ingredient_metrics) == 3
        assert c.in_soup == [0, 1, 2]


def test_cycles_start_from_the_soup(digits):
    """Cycle 2's ingredients start from cycle 1's soup (pruned further)."""
    model = _model(1)
    data = (digits.x_train, digits.y_train)
    starts = {}
    inner = _train_fn(data)

    def fn(m, opt, ing):
        starts[(ing.cycle, ing.index)] = {k: v.detach().clone() for k, v in m.state_dict().items()}
        return inner(m, opt, ing)

    seen_soups = []

    def eval_fn(m):
        seen_soups.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return 0.0

    masks, history = sparse_model_soups(
        model, _make_opt, fn, final_sparsity=0.75, cycles=2, ingredients=2, eval_fn=eval_fn
    )
    soup1 = seen_soups[2]  # evaluations: ingredient 0, ingredient 1, soup of cycle 1, ...
    for k, v in starts[(2, 0)].items():
        if k in masks:
            kept = v != 0
            assert torch.equal(v[kept], soup1[k][kept])
        else:
            assert torch.equal(v, soup1[k])
    assert all(torch.equal(starts[(2, 0)][k], starts[(2, 1)][k]) for k in starts[(2, 0)])
    # seeds differ by ingredient and by cycle
    assert history.cycles[0].cycle == 1


def test_parallel_matches_sequential(digits):
    data = (digits.x_train[:512], digits.y_train[:512])
    results = []
    for workers in (1, 2):
        model = _model(2)
        _, history = sparse_model_soups(
            model, _make_opt, _train_fn(data), final_sparsity=0.5, cycles=1, ingredients=2, workers=workers
        )
        results.append((model.state_dict(), history))
    (s1, h1), (s2, h2) = results
    for k in s1:
        assert torch.allclose(s1[k], s2[k], atol=1e-5), k
    for a, b in zip(h1.cycles[0].ingredient_results, h2.cycles[0].ingredient_results, strict=True):
        assert torch.allclose(a["0.weight"], b["0.weight"], atol=1e-5)


def test_greedy_soup_not_worse_than_best_ingredient(digits):
    data = (digits.x_train, digits.y_train)
    val = (digits.x_test, digits.y_test)
    model = _model(3)
    _, history = sparse_model_soups(
        model,
        _make_opt,
        _train_fn(data),
        final_sparsity=0.5,
        cycles=1,
        ingredients=3,
        soup="greedy",
        eval_fn=lambda m: evaluate(m, val)[1],
    )
    c = history.cycles[0]
    assert c.soup_metric >= c.best_ingredient_metric
    assert set(c.in_soup) <= {0, 1, 2} and len(c.in_soup) >= 1
    assert evaluate(model, val)[1] == pytest.approx(c.soup_metric)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"final_sparsity": 1.0, "cycles": 1},
        {"final_sparsity": 0.5, "cycles": 0},
        {"final_sparsity": 0.5, "cycles": 1, "ingredients": 0},
        {"final_sparsity": 0.5, "cycles": 1, "soup": "greedy"},
        {"final_sparsity": 0.5, "cycles": 1, "soup": "best"},
        {"final_sparsity": 0.5, "cycles": 1, "ingredients": 2, "seeds": [1]},
        {"final_sparsity": 0.5, "cycles": 1, "ingredients": 2, "weight_decays": [0.1, -1.0]},
        {"final_sparsity": 0.5, "cycles": 1, "workers": 0},
    ],
)
def test_bad_arguments_raise_before_training(kwargs):
    called = []
    with pytest.raises(SparseforgeError):
        sparse_model_soups(_model(), _make_opt, lambda m, o, i: called.append(1), **kwargs)
    assert not called


def test_soups_converge_and_beat_ingredients_on_digits(digits):
    """Pretrain dense, then 2 cycles to 80%: the soup is accurate and at least as good as its average ingredient."""
    data = (digits.x_train, digits.y_train)
    test = (digits.x_test, digits.y_test)
    model = _model(4, hidden=(64, 64))
    train(
        model,
        data,
        epochs=5,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        batch_size=64,
        progress=False,
    )
    _, history = sparse_model_soups(
        model,
        _make_opt,
        _train_fn(data, epochs=3),
        final_sparsity=0.8,
        cycles=2,
        ingredients=3,
        eval_fn=lambda m: evaluate(m, test)[1],
    )
    for c in history.cycles:
        mean_ing = sum(c.ingredient_metrics) / len(c.ingredient_metrics)
        assert c.soup_metric >= mean_ing - 0.01, (c.soup_metric, c.ingredient_metrics)
    assert history.cycles[-1].soup_metric > 0.9
