"""Layer-wise budgets: uniform / ER / ERK / global hit the target; hand-checked small cases."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseforge import SparseforgeError, Unstructured, er, erk, global_sparsities, layer_sparsities, uniform
from sparseforge.pruning import masks_for_scores


def half_up(x: float) -> int:
    return math.floor(x + 0.5)


def kept_counts(shapes, sparsities):
    """Integer kept count of every layer (asserting the sparsity is a whole number of weights)."""
    out = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        real = (1.0 - sparsities[name]) * n
        k = round(real)
        assert abs(real - k) < 1e-6, (name, real)
        assert 0 <= k <= n
        # Unstructured masks reproduce the count exactly from the returned sparsity
        assert Unstructured().kept_count(shape, 1.0 - sparsities[name]) == k
        out[name] = k
    return out


layer_shape = st.one_of(
    st.tuples(st.integers(1, 40), st.integers(1, 40)),
    st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 3), st.integers(1, 3)),
)
shape_maps = st.lists(layer_shape, min_size=1, max_size=6).map(lambda ls: {f"l{i}.weight": s for i, s in enumerate(ls)})
sparsities = st.floats(0.0, 0.99, allow_nan=False)


@pytest.mark.parametrize("fn", [uniform, er, erk])
@given(shapes=shape_maps, sparsity=sparsities)
def test_shape_distributions_hit_target_within_one_weight(fn, shapes, sparsity):
    result = fn(shapes, sparsity)
    assert set(result) == set(shapes)
    counts = kept_counts(shapes, result)
    total = sum(math.prod(s) for s in shapes.values())
    target = (1 - sparsity) * total
    assert abs(sum(counts.values()) - target) <= 1.0
    assert sum(counts.values()) == half_up(target)  # documented: round((1 - s) * total)
    for name, s in result.items():
        assert 0.0 <= s <= 1.0, (name, s)  # density never exceeds 1


@given(shapes=shape_maps, sparsity=sparsities)
def test_uniform_each_layer_within_one_weight_of_its_share(shapes, sparsity):
    counts = kept_counts(shapes, uniform(shapes, sparsity))
    for name, shape in shapes.items():
        assert abs(counts[name] - (1 - sparsity) * math.prod(shape)) < 1.0


@given(shapes=shape_maps, sparsity=sparsities)
def test_erk_densities_proportional_to_raw_except_dense(shapes, sparsity):
    result = erk(shapes, sparsity)
    counts = kept_counts(shapes, result)
    # Non-dense layers: density ~ eps * raw with one common eps (up to one weight of rounding).
    free = [n for n in shapes if counts[n] < math.prod(shapes[n])]
    raw = {n: sum(shapes[n]) / math.prod(shapes[n]) for n in shapes}
    if len(free) >= 1:
        budget = sum(counts[n] for n in free)
        eps = budget / sum(raw[n] * math.prod(shapes[n]) for n in free)
        for n in free:
            assert abs(counts[n] - eps * raw[n] * math.prod(shapes[n])) <= 1.0 + 1e-9
            # a layer left sparse would not have exceeded density 1
            assert eps * raw[n] <= 1.0 + 1.0 / math.prod(shapes[n]) + 1e-9


def test_erk_by_hand_with_dense_redistribution():
    shapes = {"a.weight": (8, 4), "b.weight": (64, 64), "c.weight": (10, 64)}
    # numel: a 32, b 4096, c 640 -> total 4768; sparsity 0.8 -> kept = round(0.2 * 4768 = 953.6) = 954
    # raw_l = sum(dims) / prod(dims): a 12/32 = 0.375, b 128/4096 = 0.03125, c 74/640 = 0.115625
    # raw_l * N_l: a 12, b 128, c 74 -> eps = 954 / 214 = 4.4579; eps * raw_a = 1.67 > 1 -> a dense.
    # Re-solve without a: budget 954 - 32 = 922, denominator 128 + 74 = 202, eps = 922/202 = 4.5644
    # eps * raw_b = 0.1426, eps * raw_c = 0.5278: both <= 1, done.
    # Real kept: b 922*128/202 = 584.24, c 922*74/202 = 337.76 -> floors 584 + 337 = 921, the last
    # weight goes to the larger remainder (c): b 584, c 338.
    eps = Fraction(922, 202)
    assert Fraction(954, 214) * Fraction(3, 8) > 1
    assert eps * Fraction(74, 640) <= 1
    result = erk(shapes, 0.8)
    assert result["a.weight"] == 0.0
    assert result["b.weight"] == pytest.approx(1 - 584 / 4096, abs=1e-12)
    assert result["c.weight"] == pytest.approx(1 - 338 / 640, abs=1e-12)


def test_er_uses_channels_only_by_hand():
    # Conv (16, 4, 3, 3) and Linear (10, 16); sparsity 0.5.
    # numel: conv 576, lin 160, total 736, kept = 368.
    # ER raw = (n_in + n_out) / (n_in * n_out): conv (4 + 16)/64 = 0.3125, lin 26/160 = 0.1625
    # raw*N: conv 180, lin 26 -> eps = 368/206 = 1.786; eps*raw: conv 0.558, lin 0.290 (no dense).
    # Real kept: conv 368*180/206 = 321.55, lin 368*26/206 = 46.45 -> 321 + 46 = 367, +1 to the larger
    # remainder (conv .55 vs lin .45): conv 322, lin 46.
    shapes = {"conv.weight": (16, 4, 3, 3), "lin.weight": (10, 16)}
    result = er(shapes, 0.5)
    assert result["conv.weight"] == pytest.approx(1 - 322 / 576, abs=1e-12)
    assert result["lin.weight"] == pytest.approx(1 - 46 / 160, abs=1e-12)
    # ERK on the same shapes differs: raw conv (16+4+3+3)/576 -> raw*N = 26, lin 26 -> eps = 368/52,
    # so each would keep 184; lin has only 160 (eps*raw_lin = 1.15 > 1) -> lin dense (160), and conv
    # takes the rest, 368 - 160 = 208.
    result = erk(shapes, 0.5)
    assert result["lin.weight"] == 0.0
    assert result["conv.weight"] == pytest.approx(1 - 208 / 576, abs=1e-12)


def test_uniform_by_hand():
    # Three 3-weight layers at sparsity 0.5: each share is 1.5 weights, the total is
    # round(0.5 * 9 = 4.5) = 5 -> floors 1+1+1, the two extra weights go to the first two layers.
    shapes = {"a": (1, 3), "b": (3,), "c": (3, 1)}
    result = uniform(shapes, 0.5)
    assert [round((1 - result[n]) * 3) for n in "abc"] == [2, 2, 1]
    # Exact shares stay exact: 0.75 of 8, 16 and 100 weights -> kept 2, 4, 25.
    result = uniform({"x": (2, 4), "y": (4, 4), "z": (10, 10)}, 0.75)
    assert result == {"x": 0.75, "y": 0.75, "z": 0.75}
    assert layer_sparsities({"x": (2, 4)}, 0.75, "uniform") == {"x": 0.75}


def test_global_by_hand_and_min_density_floor():
    a = torch.tensor([[0.9, 0.1], [0.5, 0.3]])
    b = torch.tensor([[0.8, 0.2, 0.7], [0.05, 0.6, 0.4]])
    scores = {"a": a, "b": b}
    # 10 weights, sparsity 0.6 -> keep 4: the global top-4 are 0.9 (a), 0.8, 0.7, 0.6 (b).
    result = global_sparsities(scores, 0.6)
    assert result == {"a": pytest.approx(0.75), "b": pytest.approx(0.5)}
    # Floor 0.3: a must keep ceil(0.3*4) = 2, b ceil(0.3*6) = 2. a got 1 -> pinned at 2 (0.9, 0.5);
    # the re-solve over b keeps 4 - 2 = 2 (0.8, 0.7).
    result = global_sparsities(scores, 0.6, min_density=0.3)
    assert result == {"a": pytest.approx(0.5), "b": pytest.approx(1 - 2 / 6)}
    # Floors summing above the budget are refused: 0.5 -> 2 + 3 = 5 > 4.
    with pytest.raises(SparseforgeError) as e:
        global_sparsities(scores, 0.6, min_density=0.5)
    assert "min_density=0.5" in str(e.value)
    masks, targets = masks_for_scores(scores, 0.6, distribution="global", min_density=0.3)
    assert masks["a"].tolist() == [[True, False], [True, False]]
    assert masks["b"].tolist() == [[True, False, True], [False, False, False]]
    # Collapse guard: a layer whose scores are all tiny still keeps its floor.
    tiny = {"big": torch.arange(1.0, 101.0).reshape(10, 10), "small": torch.full((2, 5), 1e-6)}
    result = global_sparsities(tiny, 0.9)  # keep 11: all from 'big' without a floor
    assert result["small"] == 1.0
    # Floor 0.05: big ceil(5) = 5, small ceil(0.5) = 1 -> small pinned at 1, big keeps the other 10.
    result = global_sparsities(tiny, 0.9, min_density=0.05)
    assert result == {"big": pytest.approx(0.9), "small": pytest.approx(0.9)}


@given(
    sizes=st.lists(st.tuples(st.integers(1, 10), st.integers(1, 10)), min_size=1, max_size=5),
    sparsity=sparsities,
    min_density=st.sampled_from([0.0, 0.01, 0.05, 0.1]),
    seed=st.integers(0, 1000),
)
def test_global_budget_floors_and_common_threshold(sizes, sparsity, min_density, seed):
    g = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.rand(s, generator=g) * (i + 1) for i, s in enumerate(sizes)}
    shapes = {n: tuple(t.shape) for n, t in scores.items()}
    total = sum(t.numel() for t in scores.values())
    floors = {n: math.ceil(min_density * t.numel()) for n, t in scores.items()}
    if sum(floors.values()) > half_up((1 - sparsity) * total):
        with pytest.raises(SparseforgeError):
            global_sparsities(scores, sparsity, min_density=min_density)
        return
    result = global_sparsities(scores, sparsity, min_density=min_density)
    counts = kept_counts(shapes, result)
    assert sum(counts.values()) == half_up((1 - sparsity) * total)
    for n in scores:
        assert counts[n] >= floors[n]
    # Layers above their floor share one threshold: each keeps its own top-k, and every kept
    # score there beats every dropped score in any layer above its floor.
    above = [n for n in scores if counts[n] > floors[n]]
    kept_min = [scores[n].reshape(-1).sort(descending=True).values[counts[n] - 1] for n in above if counts[n] > 0]
    dropped_max = [
        scores[n].reshape(-1).sort(descending=True).values[counts[n]] for n in above if counts[n] < scores[n].numel()
    ]
    if kept_min and dropped_max:
        assert min(kept_min) >= max(dropped_max)


def test_global_masks_follow_threshold():
    torch.manual_seed(0)
    scores = {"a": torch.rand(6, 6), "b": torch.rand(4, 8) * 2}
    masks, targets = masks_for_scores(scores, 0.7, distribution="global", min_density=0.0)
    kept = torch.cat([scores[n][masks[n]] for n in scores])
    dropped = torch.cat([scores[n][~masks[n]] for n in scores])
    assert kept.numel() == half_up(0.3 * 68)
    assert kept.min() > dropped.max()


@pytest.mark.parametrize("fn", [uniform, er, erk])
@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "abc"])
def test_bad_sparsity(fn, bad):
    with pytest.raises(SparseforgeError) as e:
        fn({"a": (4, 4)}, bad)
    msg = str(e.value)
    assert "\n" not in msg and repr(bad) in msg


def test_unknown_distribution_and_empty():
    with pytest.raises(SparseforgeError) as e:
        layer_sparsities({"a": (4, 4)}, 0.5, "gaussian")
    assert "'gaussian'" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(SparseforgeError) as e:
        masks_for_scores({"a": torch.rand(4, 4)}, 0.5, distribution="gaussian")
    assert "'gaussian'" in str(e.value)
    with pytest.raises(SparseforgeError):
        uniform({}, 0.5)
    with pytest.raises(SparseforgeError) as e:
        global_sparsities({"a": torch.rand(4)}, 0.5, min_density=1.5)
    assert "1.5" in str(e.value)


def test_non_numeric_min_density():
    with pytest.raises(SparseforgeError) as e:
        global_sparsities({"a": torch.rand(4)}, 0.5, min_density="abc")
    assert "'abc'" in str(e.value) and "\n" not in str(e.value)
