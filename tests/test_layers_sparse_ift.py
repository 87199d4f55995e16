"""Sparse-IFT layers: each transformation keeps the dense layer's multiply-adds exactly, trains
with the library's algorithms, and refuses bad input in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sparseforge import Sparsifier
from sparseforge.algorithms import RigL
from sparseforge.errors import SparseforgeError
from sparseforge.layers import SparseDoped, SparseFactorized, SparseParallel, iso_macs, split_exactly, transform


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


@given(total_frac=st.floats(0, 1), sizes=st.lists(st.integers(0, 50), min_size=1, max_size=6))
def test_split_exactly_adds_up_and_fits(total_frac, sizes):
    total = int(total_frac * sum(sizes))
    counts = split_exactly(total, sizes)
    assert sum(counts) == total and all(0 <= c <= n for c, n in zip(counts, sizes, strict=True))


def test_split_exactly_by_hand():
    # 10 over sizes 3 and 7 of 20 -> 1.5 and 3.5 -> remainders tie, the first index wins
    assert split_exactly(5, [3, 7]) == [2, 3]
    assert split_exactly(0, [4, 4]) == [0, 0]
    with pytest.raises(SparseforgeError, match="do not fit"):
        split_exactly(9, [4, 4])


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(["parallel", "factorized", "doped"]),
    sparsity=st.sampled_from([0.0, 0.5, 0.75, 0.9]),
    n_in=st.integers(1, 48),
    n_out=st.integers(1, 48),
)
def test_every_transformation_keeps_the_dense_multiply_adds_exactly(kind, sparsity, n_in, n_out):
    model = nn.Sequential(nn.Linear(n_in, n_out))
    model, masks = transform(model, kind, sparsity, seed=1)
    assert iso_macs(model, dict(masks.items())) == n_in * n_out
    for name, mask in masks.items():  # pruned weights are zero
        assert not dict(model.named_parameters())[name].detach()[~mask].any()
    assert model(torch.randn(3, n_in)).shape == (3, n_out)


@pytest.mark.parametrize(
    ("kind", "sparsity", "shape"),
    [
        ("parallel", 0.75, {"branches": 4}),  # 1 / (1 - 0.75)
        ("parallel", 0.9, {"branches": 10}),
        # 64 x 64 at 75 %: rank = 4096 / (0.25 * 128) = 128, each factor 64 x 128 at 75 % sparsity
        ("factorized", 0.75, {"rank": 128}),
        # doped at 75 %: rank = floor(0.75 * 4096 / 128) = 24, low-rank 24 * 128 = 3072, sparse keeps 1024
        ("doped", 0.75, {"rank": 24}),
    ],
)
def test_sizes_by_hand(kind, sparsity, shape):
    model = nn.Sequential(nn.Linear(64, 64))
    model, masks = transform(model, kind, sparsity)
    layer = model[0]
    if kind == "parallel":
        assert isinstance(layer, SparseParallel) and len(layer.branches) == shape["branches"]
        assert all(
            masks.nnz(f"0.branches.{b}.weight") in (4096 // shape["branches"], 4096 // shape["branches"] + 1)
            for b in range(shape["branches"])
        )
    elif kind == "factorized":
        assert isinstance(layer, SparseFactorized) and layer.v.out_features == shape["rank"]
        assert masks.nnz("0.v.weight") == masks.nnz("0.u.weight") == 2048
        assert masks.sparsity("0.v.weight") == pytest.approx(0.75)
    else:
        assert isinstance(layer, SparseDoped) and layer.v is not None and layer.v.out_features == shape["rank"]
        assert masks.nnz("0.sparse.weight") == 4096 - 24 * 128 == 1024
        assert list(masks) == ["0.sparse.weight"]  # the low-rank factors stay dense


def test_transform_keeps_the_interface_bias_and_excluded_layers():
    model = _mlp()
    head = model[4]
    bias = model[0].bias.detach().clone()
    model, masks = transform(model, "parallel", 0.5, exclude=["4"])
    assert model[4] is head  # excluded: untouched
    assert isinstance(model[0], SparseParallel) and torch.equal(model[0].bias.detach(), bias)
    assert sorted({n.split(".")[0] for n in masks}) == ["0", "2"]
    assert model(torch.randn(5, 40)).shape == (5, 10)
    assert iso_macs(model, dict(masks.items())) == 40 * 64 + 64 * 64 + 64 * 10


def test_doped_starts_as_its_sparse_part():
    layer = nn.Linear(16, 8)
    doped = SparseDoped.from_linear(layer, rank=3)
    x = torch.randn(4, 16)
    torch.testing.assert_close(doped(x), layer(x))  # U = 0 at the start


@pytest.mark.parametrize("kind", ["parallel", "factorized", "doped"])
def test_rigl_trains_a_transformed_model_and_keeps_it_iso_flop(kind):
    model = _mlp()
    model, masks = transform(model, kind, 0.75, exclude=["4"], seed=0)
    dense_macs = 40 * 64 + 64 * 64 + 64 * 10
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sparsifier = Sparsifier(model, opt, masks, RigL(total_steps=40, every=5))
    x, y = torch.randn(128, 40), torch.randint(0, 10, (128,))
    first = None
    for _ in range(40):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < first  # it trains
    assert sparsifier.algorithm.history, "RigL must have updated the masks"
    assert iso_macs(model, dict(sparsifier.masks.items())) == dense_macs


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: transform(m, "wider", 0.5), r"transformation 'wider' is not known; allowed: parallel"),
        (lambda m: transform(m, "parallel", 1.0), r"sparsity"),
        (lambda m: transform(m, "parallel", 0.5, exclude=["nope"]), r"exclude pattern 'nope' matches no linear"),
        (lambda m: transform(m, "parallel", 0.5, exclude="0"), r"exclude='0' is not allowed"),
        (lambda m: transform(nn.Linear(3, 3), "parallel", 0.5), r"the model itself is an nn.Linear"),
        (lambda m: transform(nn.ReLU(), "parallel", 0.5), r"has no nn.Linear layer"),
        (lambda m: transform("model", "parallel", 0.5), r"model is a str"),
    ],
)
def test_bad_input_is_one_line(call, message):
    with pytest.raises(SparseforgeError, match=message) as info:
        call(_mlp())
    assert "\n" not in str(info.value)


def test_the_guide_example_runs_as_written():
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "layers.md").read_text(encoding="utf-8")
    code = re.findall(r"```python\n(.*?)```", guide, re.S)[0]
    namespace: dict[str, object] = {}
    exec(compile(code, "layers.md", "exec"), namespace)
    assert isinstance(namespace["sparsifier"], Sparsifier)


def test_the_guide_config_snippet_validates():
    import re
    from pathlib import Path

    import yaml

    from sparseforge.experiments.config import parse_config

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "layers.md").read_text(encoding="utf-8")
    snippet = re.findall(r"```yaml\n(.*?)```", guide, re.S)[0]
    config = parse_config(yaml.safe_load(snippet))
    assert config.model.sparse_ift is not None and config.model.sparse_ift.kind == "parallel"
