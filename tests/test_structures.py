"""Structures: exact nnz, N:M validity, deterministic ties, kept = highest-scoring, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseforge
from sparseforge import NM, Block, Channel, ConstantFanIn, SparseforgeError, Unstructured, parse_structure
from sparseforge.structures import topk_mask


def half_up(x: float) -> int:
    """Round half up, the documented rounding of every kept count."""
    return math.floor(x + 0.5)


def scores_for(shape, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if ties:  # few distinct values: many ties at the threshold
        return torch.randint(0, 3, shape, generator=g).float()
    return torch.randn(shape, generator=g)


def single_line_error(excinfo, *needles: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)


# 2-D (Linear) and 3-D/4-D (Conv1d/Conv2d) weight shapes.
shapes = st.one_of(
    st.tuples(st.integers(1, 12), st.integers(1, 24)),
    st.tuples(st.integers(1, 6), st.integers(1, 4), st.integers(1, 5)),
    st.tuples(st.integers(1, 5), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
)
densities = st.floats(0.0, 1.0, allow_nan=False)
seeds = st.integers(0, 2**16)


# ---------------------------------------------------------------------------------------------
# Exact nnz
# ---------------------------------------------------------------------------------------------


@given(shape=shapes, density=densities, seed=seeds, ties=st.booleans())
def test_unstructured_exact_nnz(shape, density, seed, ties):
    s = Unstructured()
    mask = s.mask_from_scores(scores_for(shape, seed, ties), density)
    assert mask.dtype == torch.bool and tuple(mask.shape) == shape
    expected = half_up(density * math.prod(shape))
    assert s.kept_count(shape, density) == expected
    assert int(mask.sum()) == expected


@given(shape=shapes, seed=seeds, ties=st.booleans(), data=st.data())
def test_unstructured_kept_count_from_integer_target(shape, seed, ties, data):
    numel = math.prod(shape)
    k = data.draw(st.integers(0, numel))
    mask = Unstructured().mask_from_scores(scores_for(shape, seed, ties), k / numel)
    assert int(mask.sum()) == k


@pytest.mark.parametrize(
    "numel,density,kept",
    [(10, 0.25, 3), (10, 0.35, 4), (10, 0.349, 3), (8, 0.5, 4), (7, 0.5, 4), (5, 0.0, 0), (5, 1.0, 5), (3, 0.1, 0)],
)
def test_unstructured_round_half_up_by_hand(numel, density, kept):
    assert Unstructured().kept_count((numel,), density) == kept
    assert int(Unstructured().mask_from_scores(torch.randn(numel), density).sum()) == kept


@given(shape=shapes, density=densities, seed=seeds, ties=st.booleans())
def test_constant_fan_in_exact_per_row(shape, density, seed, ties):
    s = ConstantFanIn()
    mask = s.mask_from_scores(scores_for(shape, seed, ties), density)
    rows, fan_in = shape[0], math.prod(shape[1:])
    per_row = half_up(density * fan_in)
    assert (mask.reshape(rows, fan_in).sum(dim=1) == per_row).all()
    assert s.kept_count(shape, density) == rows * per_row == int(mask.sum())


nm_pairs = st.integers(1, 8).flatmap(lambda m: st.tuples(st.integers(1, m), st.just(m)))  # n_keep = 0 is refused


@given(
    nm=nm_pairs,
    out=st.integers(1, 6),
    groups=st.integers(1, 4),
    kernel=st.sampled_from([(), (1,), (3,), (2, 2)]),
    seed=seeds,
    ties=st.booleans(),
)
def test_nm_every_group_keeps_exactly_n(nm, out, groups, kernel, seed, ties):
    n, m = nm
    # Linear: (out, in) with in = groups * m. Conv: (out, cin, *kernel) with cin = groups * m, so the
    # fan-in cin * prod(kernel) is a multiple of m.
    if kernel:
        cin = groups * m
        shape = (out, cin, *kernel)
    else:
        shape = (out, groups * m)
    s = NM(n, m)
    scores = scores_for(shape, seed, ties)
    mask = s.mask_from_scores(scores)
    fan_in = math.prod(shape[1:])
    per_group = mask.reshape(out, fan_in // m, m).sum(dim=-1)
    assert (per_group == n).all()
    assert int(mask.sum()) == s.kept_count(shape) == math.prod(shape) // m * n
    # kept are the highest-scoring within every group
    g_scores = scores.reshape(-1, m)
    g_mask = mask.reshape(-1, m)
    for row_s, row_m in zip(g_scores, g_mask, strict=True):
        if 0 < n < m:
            assert row_s[row_m].min() >= row_s[~row_m].max()


def test_nm_groups_run_along_input_dim_of_conv():
    # Conv weight (out=1, in=2, k=2): flattened inputs [c0k0, c0k1, c1k0, c1k1] form ONE group of 4.
    w = torch.tensor([[[1.0, 4.0], [3.0, 2.0]]])
    mask = NM(2, 4).mask_from_scores(w)
    assert mask.tolist() == [[[False, True], [True, False]]]
    # Linear (2, 4) with NM(1, 2): groups are (w00,w01), (w02,w03), (w10,w11), (w12,w13)
    w = torch.tensor([[1.0, 2.0, 5.0, 3.0], [9.0, 0.0, 0.0, 7.0]])
    assert NM(1, 2).mask_from_scores(w).tolist() == [[False, True, True, False], [True, False, False, True]]


@given(
    rows=st.integers(1, 4),
    cols=st.integers(1, 4),
    br=st.integers(1, 4),
    bc=st.integers(1, 4),
    kernel=st.sampled_from([(), (1,), (2,)]),
    density=densities,
    seed=seeds,
    ties=st.booleans(),
)
def test_block_exact_nnz_whole_blocks_highest(rows, cols, br, bc, kernel, density, seed, ties):
    k = math.prod(kernel)
    fan_in = bc * cols * (2 if kernel == (2,) else 1)  # keep divisible by cols
    if kernel:
        shape = (br * rows, fan_in // k, *kernel)
    else:
        shape = (br * rows, fan_in)
    s = Block(rows, cols)
    scores = scores_for(shape, seed, ties)
    mask = s.mask_from_scores(scores, density)
    n_blocks = (shape[0] // rows) * (fan_in // cols)
    expected = half_up(density * n_blocks) * rows * cols
    assert s.kept_count(shape, density) == expected == int(mask.sum())
    tiles_m = mask.reshape(shape[0] // rows, rows, fan_in // cols, cols)
    block_sum = tiles_m.sum(dim=(1, 3))
    assert ((block_sum == 0) | (block_sum == rows * cols)).all()  # whole blocks only
    tile_scores = scores.reshape(shape[0] // rows, rows, fan_in // cols, cols).sum(dim=(1, 3)).reshape(-1)
    kept = (block_sum > 0).reshape(-1)
    if kept.any() and (~kept).any():
        assert tile_scores[kept].min() >= tile_scores[~kept].max()


@given(shape=shapes, dim=st.integers(0, 1), density=densities, seed=seeds, ties=st.booleans())
def test_channel_exact_nnz_whole_slices_highest(shape, dim, density, seed, ties):
    s = Channel(dim)
    scores = scores_for(shape, seed, ties)
    mask = s.mask_from_scores(scores, density)
    size = shape[dim]
    expected = half_up(density * size) * (math.prod(shape) // size)
    assert s.kept_count(shape, density) == expected == int(mask.sum())
    per_slice = mask.movedim(dim, 0).reshape(size, -1)
    slice_kept = per_slice.all(dim=1)
    assert (per_slice.any(dim=1) == slice_kept).all()  # a slice is all kept or all dropped
    slice_scores = scores.movedim(dim, 0).reshape(size, -1).sum(dim=1)
    if slice_kept.any() and (~slice_kept).any():
        assert slice_scores[slice_kept].min() >= slice_scores[~slice_kept].max()


# ---------------------------------------------------------------------------------------------
# Highest scores kept, deterministic ties
# ---------------------------------------------------------------------------------------------


@given(shape=shapes, density=densities, seed=seeds, ties=st.booleans())
def test_unstructured_keeps_highest_scores(shape, density, seed, ties):
    scores = scores_for(shape, seed, ties)
    mask = Unstructured().mask_from_scores(scores, density)
    if mask.any() and (~mask).any():
        assert scores[mask].min() >= scores[~mask].max()


@given(shape=shapes, density=densities)
def test_all_equal_scores_keep_lowest_indices(shape, density):
    scores = torch.full(shape, 0.5)
    numel = math.prod(shape)
    rows, fan_in = shape[0], numel // shape[0]
    # Unstructured: the first k of the flattened weight
    k = half_up(density * numel)
    mask = Unstructured().mask_from_scores(scores, density)
    assert mask.reshape(-1).tolist() == [i < k for i in range(numel)]
    # Constant fan-in: the first k of every row
    k = half_up(density * fan_in)
    mask = ConstantFanIn().mask_from_scores(scores, density)
    assert mask.reshape(rows, fan_in).tolist() == [[j < k for j in range(fan_in)]] * rows
    # Channel(0): the first k output slices
    k = half_up(density * rows)
    mask = Channel(0).mask_from_scores(scores, density)
    assert mask.reshape(rows, fan_in).all(dim=1).tolist() == [i < k for i in range(rows)]


@given(nm=nm_pairs, groups=st.integers(1, 5))
def test_nm_all_equal_keep_first_n_of_each_group(nm, groups):
    n, m = nm
    mask = NM(n, m).mask_from_scores(torch.zeros(3, groups * m))
    assert mask.reshape(-1, m).tolist() == [[j < n for j in range(m)]] * (3 * groups)


def test_block_all_equal_keep_first_blocks_in_row_major_order():
    # 4x4 weight, 2x2 blocks: tile grid 2x2, density 0.5 -> blocks (0,0) and (0,1): top half kept.
    mask = Block(2, 2).mask_from_scores(torch.ones(4, 4), 0.5)
    assert mask.tolist() == [[True] * 4] * 2 + [[False] * 4] * 2
    # 2x6 with 1x2 blocks: grid 2x3, density 0.5 -> 3 blocks: (0,0),(0,1),(0,2): row 0 kept.
    mask = Block(1, 2).mask_from_scores(torch.ones(2, 6), 0.5)
    assert mask.tolist() == [[True] * 6, [False] * 6]


@given(shape=shapes, density=densities, seed=seeds)
def test_same_input_same_mask(shape, density, seed):
    scores = scores_for(shape, seed, ties=True)
    for s in (Unstructured(), ConstantFanIn(), Channel(0)):
        a = s.mask_from_scores(scores.clone(), density)
        b = s.mask_from_scores(scores.clone(), density)
        assert torch.equal(a, b)


def test_ties_at_threshold_go_to_lower_index():
    scores = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    # k=3: 3.0 strictly above; two of the three 2.0s (indices 2 and 3) fill up.
    assert topk_mask(scores, 3).tolist() == [[True, False, True, True, False, False]]
    assert topk_mask(scores, 0).sum() == 0 and topk_mask(scores, 6).all()


def test_unstructured_by_hand():
    w = torch.tensor([[0.1, -5.0, 3.0], [2.0, 0.0, -1.0]])
    mask = Unstructured().mask_from_scores(w.abs(), 0.5)  # keep 3 of 6: |-5|, 3, 2
    assert mask.tolist() == [[False, True, True], [True, False, False]]


def test_nan_scores_rejected():
    with pytest.raises(SparseforgeError):
        Unstructured().mask_from_scores(torch.tensor([1.0, float("nan"), 0.0]), 0.5)


# ---------------------------------------------------------------------------------------------
# Parsing and bad input
# ---------------------------------------------------------------------------------------------


def test_parse_structure_names():
    assert parse_structure("unstructured") == Unstructured()
    assert parse_structure("2:4") == NM(2, 4)
    assert parse_structure("block:4x2") == Block(4, 2)
    assert parse_structure("channel") == Channel(0)
    assert parse_structure("channel:1") == Channel(1)
    assert parse_structure("fanin") == ConstantFanIn()
    nm = NM(1, 4)
    assert parse_structure(nm) is nm
    assert NM(2, 4).fixed_density == 0.5


@pytest.mark.parametrize("bad", ["bogus_structure", "2-4", "block:4", "channel:x"])
def test_unknown_structure_string(bad):
    with pytest.raises(SparseforgeError) as e:
        parse_structure(bad)
    single_line_error(e, repr(bad))


def test_n_greater_than_m():
    with pytest.raises(SparseforgeError) as e:
        NM(5, 4)
    single_line_error(e, "n_keep=5", "m=4")
    with pytest.raises(SparseforgeError) as e:
        parse_structure("5:4")
    single_line_error(e, "5", "4")


def test_m_not_dividing_input_dim():
    with pytest.raises(SparseforgeError) as e:
        NM(2, 4).mask_from_scores(torch.randn(3, 6))
    single_line_error(e, "6", "m=4")
    with pytest.raises(SparseforgeError) as e:  # conv: 3 * 3 = 9 flattened inputs
        NM(2, 4).kept_count((2, 3, 3))
    single_line_error(e, "9")


def test_nm_density_conflict_and_bad_density():
    with pytest.raises(SparseforgeError) as e:
        NM(2, 4).mask_from_scores(torch.randn(2, 4), 0.75)
    single_line_error(e, "0.75")
    for bad in (1.5, -0.1):
        with pytest.raises(SparseforgeError) as e:
            Unstructured().kept_count((4,), bad)
        single_line_error(e, repr(bad))


def test_block_does_not_tile():
    with pytest.raises(SparseforgeError) as e:
        Block(2, 2).mask_from_scores(torch.randn(3, 4), 0.5)
    single_line_error(e, "3x4")


def test_error_is_value_error():
    assert issubclass(sparseforge.SparseforgeError, ValueError)


@pytest.mark.parametrize("bad", ["abc", None, [0.5]])
def test_non_numeric_density_is_a_sparseforge_error(bad):
    with pytest.raises(SparseforgeError) as e:
        Unstructured().kept_count((4,), bad)
    single_line_error(e, repr(bad))
