"""sparseforge.prune: exact sparsity for every method, exclusions, biases, tied weights, bad input."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import sparseforge
from sparseforge import METHODS, SparseforgeError, prune


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


def conv_net(seed: int = 0) -> nn.Module:
    """conv 4x3x3x3 (108 weights) -> 4x6x6 = 144 -> linear 16x144 (2304) -> linear 5x16 (80)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, 5))


SIZES = {"0.weight": 108, "3.weight": 2304, "5.weight": 80}


def batch(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 5, (n,), generator=g)


def method_kwargs(method: str) -> dict:
    if method in ("snip", "grasp", "movement"):
        return {"data": batch()}
    if method == "synflow":
        return {"input_shape": (3, 8, 8), "synflow_rounds": 5}
    return {}


def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_hits_exact_sparsity(method):
    assert set(METHODS) == {"magnitude", "random", "snip", "grasp", "synflow", "movement"}
    model = conv_net()
    biases = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("bias")}
    masks = prune(model, sparsity=0.75, method=method, **method_kwargs(method))
    assert set(masks.names()) == set(SIZES)
    # 0.25 of 108, 2304, 80 = 27, 576, 20 kept (exact); 623 over the prunable weights.
    for name, size in SIZES.items():
        assert masks.nnz(name) == size // 4, name
        assert masks[name].dtype == torch.bool
    assert masks.nnz() == 623 == half_up(0.25 * sum(SIZES.values()))
    params = dict(model.named_parameters())
    for name in SIZES:
        assert (params[name][~masks[name]] == 0).all()  # applied in place
        assert masks.targets[name] == pytest.approx(0.75)
    for name, value in biases.items():
        assert torch.equal(params[name], value), name  # biases untouched


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("distribution", ["erk", "global"])
def test_methods_with_budgeted_distributions_hit_total(method, distribution):
    model = conv_net(1)
    masks = prune(model, sparsity=0.8, method=method, distribution=distribution, **method_kwargs(method))
    total = sum(SIZES.values())
    assert abs(masks.nnz() - 0.2 * total) <= 1.0
    for name, size in SIZES.items():
        assert 0 < masks.nnz(name) <= size


def test_magnitude_keeps_largest_and_leaves_kept_values():
    model = conv_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune(model, sparsity=0.9)
    for name in SIZES:
        w = before[name]
        m = masks[name]
        assert w.abs()[m].min() >= w.abs()[~m].max()
        after = dict(model.named_parameters())[name]
        assert torch.equal(after[m], w[m])


def test_random_is_seeded():
    a = prune(conv_net(), sparsity=0.5, method="random", seed=3)
    b = prune(conv_net(), sparsity=0.5, method="random", seed=3)
    c = prune(conv_net(), sparsity=0.5, method="random", seed=4)
    assert all(torch.equal(a[n], b[n]) for n in SIZES)
    assert not all(torch.equal(a[n], c[n]) for n in SIZES)


def test_exclude_and_first_last_dense():
    model = conv_net()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks = prune(model, sparsity=0.75, exclude=["5"])
    assert set(masks.names()) == {"0.weight", "3.weight"}
    assert torch.equal(model[5].weight, before["5.weight"])
    assert masks.nnz() == 27 + 576

    model = conv_net()
    masks = prune(model, sparsity=0.75, exclude=[nn.Conv2d, "3.weight"])
    assert masks.names() == ["5.weight"] and masks.nnz() == 20
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[3].weight, before["3.weight"])

    model = conv_net()
    masks = prune(model, sparsity=0.75, first_last_dense=True)
    assert masks.names() == ["3.weight"]
    assert masks.nnz("3.weight") == 576
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[5].weight, before["5.weight"])
    assert int((model[3].weight != 0).sum()) == 576


def test_nm_structure_through_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(4, 6, 2), nn.Flatten(), nn.Linear(6 * 3, 8))  # fan-in 4*2 = 8 and 18
    with pytest.raises(SparseforgeError) as e:  # 18 inputs do not split into groups of 4
        prune(model, structure="2:4")
    one_line(e, "18")
    model = nn.Sequential(nn.Conv1d(4, 6, 2), nn.Flatten(), nn.Linear(6 * 4, 8))
    masks = prune(model, structure="2:4", sparsity=None)
    assert (masks["0.weight"].reshape(6, 2, 4).sum(-1) == 2).all()
    assert (masks["2.weight"].reshape(8, 6, 4).sum(-1) == 2).all()
    assert masks.sparsity() == 0.5
    masks = prune(nn.Linear(8, 2), structure=sparseforge.NM(1, 4), sparsity=0.75)
    assert masks.nnz() == 4
    with pytest.raises(SparseforgeError) as e:
        prune(nn.Linear(8, 2), structure="2:4", sparsity=0.9)
    one_line(e, "0.9")


def test_other_structures_through_prune():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    masks = prune(model, sparsity=0.5, structure="channel")
    assert masks.nnz("0.weight") == 32 and masks["0.weight"].all(dim=1).sum() == 4
    masks = prune(model, sparsity=0.5, structure="fanin")
    assert (masks["0.weight"].sum(dim=1) == 4).all() and (masks["2.weight"].sum(dim=1) == 4).all()
    masks = prune(model, sparsity=0.75, structure="block:2x2")
    assert masks.nnz("0.weight") == 16 and masks.nnz("2.weight") == 8


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(8, 8, bias=False)
        self.mid = nn.Linear(8, 8)
        self.dec = nn.Linear(8, 8, bias=False)
        self.dec.weight = self.enc.weight  # tied

    def forward(self, x):
        return self.dec(self.mid(self.enc(x)))


def test_tied_weights_pruned_once():
    model = TiedNet()
    masks = prune(model, sparsity=0.75)
    assert masks.names() == ["enc.weight", "mid.weight"]
    assert masks.nnz("enc.weight") == 16  # 0.25 * 64 once, not pruned a second time
    assert int((model.dec.weight != 0).sum()) == 16
    assert masks.nnz() == 32
    # excluding the tied module by one name keeps it dense under both
    model = TiedNet()
    masks = prune(model, sparsity=0.75, exclude=["enc"])
    assert masks.names() == ["mid.weight"]
    assert int((model.enc.weight != 0).sum()) == 64


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "abc"])
def test_bad_sparsity(bad):
    model = conv_net()
    before = model[3].weight.detach().clone()
    with pytest.raises(SparseforgeError) as e:
        prune(model, sparsity=bad)
    one_line(e, repr(bad))
    assert torch.equal(model[3].weight, before)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"method": "wanda_typo"}, "'wanda_typo'"),
        ({"structure": "diagonal"}, "'diagonal'"),
        ({"structure": "5:4"}, "5"),
        ({"distribution": "gaussian"}, "'gaussian'"),
        ({"exclude": ["no_such_layer"]}, "'no_such_layer'"),
        ({"exclude": [nn.LSTM]}, "LSTM"),
        ({"method": "snip"}, "'snip'"),  # needs data
    ],
)
def test_bad_arguments(kwargs, needle):
    kwargs = {"sparsity": 0.5, **kwargs}
    if kwargs.get("structure") == "5:4":
        kwargs["sparsity"] = None
    with pytest.raises(SparseforgeError) as e:
        prune(conv_net(), **kwargs)
    one_line(e, needle)


def test_no_prunable_layer():
    with pytest.raises(SparseforgeError) as e:
        prune(nn.Sequential(nn.ReLU()), sparsity=0.5)
    one_line(e, "no prunable layer")
    with pytest.raises(SparseforgeError):
        prune(nn.Sequential(nn.Linear(4, 4)), sparsity=0.5, first_last_dense=True)


def test_select_prunable_defaults():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Embedding(3, 4), nn.Conv1d(4, 4, 1), nn.LayerNorm(4))
    assert list(sparseforge.select_prunable(model)) == ["0.weight", "3.weight"]


def test_skip_incompatible_leaves_untileable_layers_dense():
    """fan-in 6 cannot hold groups of 4: with skip_incompatible that layer stays dense and is listed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(SparseforgeError, match="groups of m=4"):
        sparseforge.prune(copy.deepcopy(model), structure="2:4")
    before = model[0].weight.detach().clone()
    masks = sparseforge.prune(model, structure="2:4", skip_incompatible=True)
    assert masks.skipped == ["0.weight"] and masks.names() == ["2.weight"]
    assert torch.equal(model[0].weight, before)
    assert masks.nnz("2.weight") == 16  # 32 weights, 2 of every 4 kept


def test_skip_incompatible_with_nothing_left_is_an_error():
    model = nn.Sequential(nn.Linear(6, 3))
    with pytest.raises(SparseforgeError, match="no prunable layer fits"):
        sparseforge.prune(model, structure="2:4", skip_incompatible=True)
