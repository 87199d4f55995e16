"""Tests for the one-shot layer methods: SparseGPT, RIA, DSnoT, OWL, the registry (and Wanda).

Expected values are derived by hand or in closed form (float64) in the tests themselves.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparseforge.errors import SparseforgeError
from sparseforge.oneshot import (
    METHODS,
    InputStats,
    block_outlier_ratio,
    get_method,
    outlier_ratio,
    owl_sparsities,
    prune_magnitude,
    prune_ria,
    prune_sparsegpt,
    prune_wanda,
    refine_dsnot,
    ria_scores,
)
from sparseforge.oneshot.registry import Method
from sparseforge.structures import NM, Block, Unstructured

T = torch.tensor


def stats_of(x: torch.Tensor, *, hessian: bool = True) -> InputStats:
    s = InputStats(x.shape[-1], hessian=hessian)
    s.add(x)
    return s


def recon_error(weight: torch.Tensor, new_weight: torch.Tensor, x: torch.Tensor) -> float:
    """||W X - W' X||_F^2 over all tokens (x holds one token per row)."""
    return float(((weight.double() - new_weight.double()) @ x.double().T).pow(2).sum())


def round_half_up(v: float) -> int:
    return math.floor(v + 0.5)


def correlated_inputs(seed: int, tokens: int = 256, width: int = 32, rank: int = 12) -> torch.Tensor:
    """Inputs spanning mostly a rank-``rank`` subspace: strongly correlated columns."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(rank, width, generator=g)
    return torch.randn(tokens, rank, generator=g) @ basis + 0.1 * torch.randn(tokens, width, generator=g)


# ---------------------------------------------------------------------------------------------
# SparseGPT


def sequential_obs(w: torch.Tensor, h: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, float]:
    """SparseGPT's result in closed form (float64), column by column, for a fixed mask.

    At column i the columns < i are frozen, so the OBS step uses Hinv_i = inverse of H restricted
    to columns i..: pruning w_ri moves the row by delta = -w_ri / [Hinv_i]_00 * Hinv_i[0, :] and
    costs w_ri^2 / (2 [Hinv_i]_00). A kept weight costs nothing and changes nothing.
    """
    w = w.double().clone()
    loss = 0.0
    for i in range(w.shape[1]):
        hinv = torch.linalg.inv(h[i:, i:])
        for r in range(w.shape[0]):
            if pruned[r, i]:
                wq = w[r, i].item()
                loss += wq * wq / (2 * hinv[0, 0].item())
                w[r, i:] -= wq / hinv[0, 0] * hinv[0, :]
    return w, loss


def test_sparsegpt_2x4_equals_closed_form_obs() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=g) @ T([[1.0, 0.3, 0, 0], [0, 1.0, 0.5, 0], [0, 0, 1.0, -0.4], [0.2, 0, 0, 1.0]])
    w = T([[0.9, -0.2, 1.5, 0.1], [-0.3, 1.2, 0.05, -0.8]])
    stats = stats_of(x)
    h = stats.hessian().double()
    # the mask: the 4 lowest w^2 / d_j^2 of the 8, d_j^2 = [inverse of H[j:, j:]]_00 (one block)
    d2 = torch.stack([torch.linalg.inv(h[j:, j:])[0, 0] for j in range(4)])
    saliency = w.double().pow(2) / d2
    pruned = torch.zeros(2, 4, dtype=torch.bool)
    pruned.view(-1)[saliency.flatten().argsort()[:4]] = True
    expected, loss = sequential_obs(w, h, pruned)

    res = prune_sparsegpt(w, stats, 0.5, Unstructured(), percdamp=0.0)
    assert torch.equal(res.mask, ~pruned)
    assert res.weight is not None
    assert torch.allclose(res.weight.double(), expected, atol=1e-5)
    assert torch.all(res.weight[~res.mask] == 0)
    assert res.info["percdamp"] == 0.0 and res.info["damp_retries"] == 0
    assert res.info["error"] == pytest.approx(loss, rel=1e-4)
    # with no dampening the OBS losses are the exact reconstruction error per token
    assert res.info["error"] == pytest.approx(recon_error(w, res.weight, x) / 64, rel=1e-4)


def test_sparsegpt_single_pruned_first_column_is_textbook_obs() -> None:
    """Pruning only column 0: delta = -w_0 / [H^-1]_00 * H^-1[0, :] with the full inverse."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(128, 4, generator=g)
    x[:, 1] += 0.8 * x[:, 0]  # column 0 correlated with column 1: the update moves w_1
    w = T([[0.01, 1.0, -2.0, 1.5], [-0.02, -1.0, 0.7, 2.0]])
    stats = stats_of(x)
    hinv = torch.linalg.inv(stats.hessian().double())
    expected = w.double() - (w.double()[:, :1] / hinv[0, 0]) * hinv[0, :].unsqueeze(0)

    res = prune_sparsegpt(w, stats, 0.25, Unstructured(), percdamp=0.0)
    assert res.mask.tolist() == [[False, True, True, True]] * 2
    assert res.weight is not None
    assert torch.allclose(res.weight.double(), expected, atol=1e-5)
    assert res.weight[0, 1] != w[0, 1]  # the correlated weight was updated
    expected_loss = float((w.double()[:, 0] ** 2).sum() / (2 * hinv[0, 0]))
    assert res.info["error"] == pytest.approx(expected_loss, rel=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("sparsity", "structure"), [(0.5, Unstructured()), (None, NM(2, 4))])
def test_sparsegpt_beats_magnitude_and_wanda_on_correlated_inputs(
    seed: int, sparsity: float | None, structure: NM | Unstructured
) -> None:
    x = correlated_inputs(seed)
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(100 + seed))
    stats = stats_of(x)
    res = prune_sparsegpt(w, stats, sparsity, structure)
    assert res.weight is not None
    ours = recon_error(w, res.weight, x)
    magnitude = recon_error(w, w * prune_magnitude(w, stats, sparsity, structure).mask, x)
    wanda = recon_error(w, w * prune_wanda(w, stats, sparsity, structure).mask, x)
    assert ours < 0.6 * min(magnitude, wanda)
    assert int(res.mask.sum()) == 128  # half of 8 x 32 either way
    # the reported estimate is exact for the dampened Hessian H + damp I: the error per token
    # plus damp / 2 x ||W - W'||^2
    delta = float((w.double() - res.weight.double()).pow(2).sum())
    assert res.info["error"] == pytest.approx(ours / x.shape[0] + res.info["damp"] / 2 * delta, rel=1e-3)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.9, 0.99])
@pytest.mark.parametrize("blocksize", [3, 8, 128])
def test_sparsegpt_exact_count_per_layer_and_per_row(sparsity: float, blocksize: int) -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 10, generator=g)
    w = torch.randn(6, 10, generator=g)
    stats = stats_of(x)
    res = prune_sparsegpt(w, stats, sparsity, Unstructured(), blocksize=blocksize)
    assert int(res.mask.sum()) == round_half_up((1 - sparsity) * 60)
    res = prune_sparsegpt(w, stats, sparsity, Unstructured(), blocksize=blocksize, per_row=True)
    assert res.mask.sum(dim=1).tolist() == [round_half_up((1 - sparsity) * 10)] * 6
    assert res.weight is not None and torch.all(res.weight[~res.mask] == 0)


def test_sparsegpt_dead_inputs_are_zeroed_and_finite() -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.randn(32, 6, generator=g)
    x[:, 2] = 0.0  # an input that never fires
    w = torch.randn(4, 6, generator=g)
    res = prune_sparsegpt(w, stats_of(x), 0.25, Unstructured())
    assert res.weight is not None
    assert torch.isfinite(res.weight).all()
    assert torch.all(res.weight[:, 2] == 0)
    assert res.info["dead_inputs"] == 1
    assert int(res.mask.sum()) == 18


def test_sparsegpt_cholesky_failure_raises_the_dampening_and_says_so() -> None:
    # columns 0 and 1 are identical: H is exactly singular (small integers, exact in fp32)
    col = [2.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    other = [1.0, -1.0, 0.0, 3.0, 1.0, 0.0, -2.0, 1.0]
    x = torch.tensor([col, col, other]).T
    w = T([[1.0, -0.5, 0.25], [0.3, 0.8, -1.0]])
    stats = stats_of(x)
    res = prune_sparsegpt(w, stats, 0.5, Unstructured(), percdamp=0.0)
    assert res.info["damp_retries"] == 1
    assert res.info["percdamp"] == pytest.approx(0.01)
    assert res.weight is not None and torch.isfinite(res.weight).all()
    with pytest.raises(SparseforgeError, match="Cholesky") as excinfo:
        prune_sparsegpt(w, stats, 0.5, Unstructured(), percdamp=0.0, max_damp_retries=0)
    assert "\n" not in str(excinfo.value)


def test_sparsegpt_keeps_dtype_and_does_not_modify_its_input() -> None:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(32, 8, generator=g)
    w = torch.randn(4, 8, generator=g).to(torch.bfloat16)
    before = w.clone()
    res = prune_sparsegpt(w, stats_of(x), None, NM(2, 4))
    assert res.weight is not None and res.weight.dtype == torch.bfloat16
    assert torch.equal(w, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": None}, "N:M"),
        ({"blocksize": 0}, "blocksize"),
        ({"percdamp": -0.1}, "percdamp"),
        ({"percdamp": float("nan")}, "percdamp"),
        ({"structure": Block(2, 2)}, "not supported"),
        ({"structure": NM(2, 4), "sparsity": 0.3}, "conflicts"),
        ({"structure": NM(1, 3), "sparsity": None, "blocksize": 4}, "blocksize"),
        ({"structure": NM(2, 5), "sparsity": None}, "groups of m=5"),
        ({"per_row": True, "structure": NM(2, 4), "sparsity": None}, "per_row"),
        ({"stats": None}, "statistics"),
        ({"stats": stats_of(torch.ones(2, 12), hessian=False)}, "hessian=True"),
        ({"weight": torch.ones(4, 12, dtype=torch.int64)}, "floating-point"),
        ({"weight": torch.full((4, 12), float("nan"))}, "NaN"),
        ({"stats": InputStats(7, hessian=True)}, "width"),
    ],
)
def test_sparsegpt_refuses_bad_values_in_one_line(kwargs: dict[str, object], match: str) -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(16, 12, generator=g)
    args: dict[str, object] = {
        "weight": torch.randn(4, 12, generator=g),
        "stats": stats_of(x),
        "sparsity": 0.5,
        "structure": Unstructured(),
    }
    args.update(kwargs)
    with pytest.raises(SparseforgeError, match=match) as excinfo:
        prune_sparsegpt(**args)  # type: ignore[arg-type]
    assert "\n" not in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# Wanda and RIA by hand

# W = [[1, -2, 3], [4, 0.5, -0.1]], one token x = [4, 1, 9] -> ||X_j|| = [4, 1, 9]
W_HAND = T([[1.0, -2.0, 3.0], [4.0, 0.5, -0.1]])
X_HAND = T([[4.0, 1.0, 9.0]])


def test_wanda_compares_within_each_row_by_hand() -> None:
    # scores |W| * ||X||: row 0 [4, 2, 27], row 1 [16, 0.5, 0.9]
    # per row, keep round_half_up(0.5 * 3) = 2: row 0 {0, 2}, row 1 {0, 2}
    res = prune_wanda(W_HAND, stats_of(X_HAND, hessian=False), 0.5, Unstructured())
    assert res.mask.tolist() == [[True, False, True], [True, False, True]]
    # a layer-wide comparison would keep {27, 16, 4} and drop row 1's 0.9: Wanda does not
    assert res.weight is None


def test_ria_scores_by_hand() -> None:
    # |W| column sums (over outputs) [5, 2.5, 3.1], row sums (over inputs) [6, 4.6]
    # sqrt(||X_j||) = [2, 1, 3]
    expected = T(
        [
            [(1 / 5 + 1 / 6) * 2, (2 / 2.5 + 2 / 6) * 1, (3 / 3.1 + 3 / 6) * 3],
            [(4 / 5 + 4 / 4.6) * 2, (0.5 / 2.5 + 0.5 / 4.6) * 1, (0.1 / 3.1 + 0.1 / 4.6) * 3],
        ]
    )
    assert torch.allclose(ria_scores(W_HAND, T([4.0, 1.0, 9.0])), expected, rtol=1e-6)
    # a = 0: relative importance alone
    ri = ria_scores(W_HAND, T([4.0, 1.0, 9.0]), a=0.0)
    assert ri[0, 0].item() == pytest.approx(1 / 5 + 1 / 6)


def test_ria_mask_per_layer_and_per_row_by_hand() -> None:
    # scores: row 0 [0.733, 1.133, 4.403], row 1 [3.339, 0.309, 0.162]
    stats = stats_of(X_HAND, hessian=False)
    layer = prune_ria(W_HAND, stats, 0.5, Unstructured())  # keep 3 of 6, layer-wide (reference default)
    assert layer.mask.tolist() == [[False, True, True], [True, False, False]]
    row = prune_ria(W_HAND, stats, 0.5, Unstructured(), per_row=True)  # keep 2 per row
    assert row.mask.tolist() == [[False, True, True], [True, True, False]]


def test_ria_zero_row_or_column_gives_zero_scores_not_nan() -> None:
    w = T([[0.0, 0.0], [1.0, 0.0]])
    scores = ria_scores(w, T([1.0, 1.0]))
    assert torch.isfinite(scores).all()
    assert scores.tolist() == [[0.0, 0.0], [2.0, 0.0]]


def test_ria_refuses_bad_values() -> None:
    with pytest.raises(SparseforgeError, match="a="):
        ria_scores(W_HAND, T([1.0, 1.0, 1.0]), a=-1.0)
    with pytest.raises(SparseforgeError, match="column norms"):
        ria_scores(W_HAND, T([1.0, 1.0]))
    with pytest.raises(SparseforgeError, match="statistics"):
        prune_ria(W_HAND, None, 0.5, Unstructured())


# ---------------------------------------------------------------------------------------------
# N:M validity, exact sparsity and determinism of every method


def _layer(seed: int, rows: int, cols: int) -> tuple[torch.Tensor, InputStats]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(48, cols, generator=g) * torch.rand(cols, generator=g) * 3 + torch.randn(cols, generator=g)
    return torch.randn(rows, cols, generator=g), stats_of(x)


def _all_methods(w: torch.Tensor, stats: InputStats, sparsity: float | None, structure: NM | Unstructured):
    """Every method's mask (DSnoT refining the magnitude mask)."""
    masks = {name: m.fn(w, stats, sparsity, structure).mask for name, m in METHODS.items()}
    masks["dsnot"] = refine_dsnot(w, masks["magnitude"], stats, structure=structure, update_threshold=0.0).mask
    return masks


NM_CHOICES = [NM(1, 2), NM(2, 4), NM(1, 4), NM(3, 4), NM(2, 8), NM(4, 4)]


@given(
    rows=st.integers(1, 5),
    groups=st.integers(1, 4),
    structure=st.sampled_from(NM_CHOICES),
    seed=st.integers(0, 2**16),
)
def test_every_method_gives_a_valid_nm_mask(rows: int, groups: int, structure: NM, seed: int) -> None:
    w, stats = _layer(seed, rows, groups * structure.m)
    for name, mask in _all_methods(w, stats, None, structure).items():
        per_group = mask.reshape(-1, structure.m).sum(dim=1)
        assert torch.all(per_group == structure.n_keep), name


@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 12),
    sparsity=st.sampled_from([0.0, 0.125, 0.25, 1 / 3, 0.5, 0.75, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_exact_unstructured_counts(rows: int, cols: int, sparsity: float, seed: int) -> None:
    w, stats = _layer(seed, rows, cols)
    masks = _all_methods(w, stats, sparsity, Unstructured())
    per_layer = round_half_up((1 - sparsity) * rows * cols)
    per_row = round_half_up((1 - sparsity) * cols)
    assert int(masks["magnitude"].sum()) == per_layer
    assert int(masks["sparsegpt"].sum()) == per_layer
    assert int(masks["ria"].sum()) == per_layer
    assert masks["wanda"].sum(dim=1).tolist() == [per_row] * rows
    assert torch.equal(masks["dsnot"].sum(dim=1), masks["magnitude"].sum(dim=1))


def test_every_method_is_deterministic() -> None:
    w, stats = _layer(9, 8, 16)
    for structure, sparsity in [(Unstructured(), 0.6), (NM(2, 4), None)]:
        first = {name: m.fn(w.clone(), stats, sparsity, structure) for name, m in METHODS.items()}
        second = {name: m.fn(w.clone(), stats, sparsity, structure) for name, m in METHODS.items()}
        for name in METHODS:
            assert torch.equal(first[name].mask, second[name].mask), name
            a, b = first[name].weight, second[name].weight
            assert (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)), name
            assert first[name].info == second[name].info, name
        mask = first["magnitude"].mask
        d1 = refine_dsnot(w, mask, stats, structure=structure, update_threshold=0.0)
        d2 = refine_dsnot(w, mask.clone(), stats, structure=structure, update_threshold=0.0)
        assert torch.equal(d1.mask, d2.mask) and d1.info == d2.info


# ---------------------------------------------------------------------------------------------
# DSnoT


def skewed_inputs(seed: int) -> torch.Tensor:
    """Half the inputs have a large mean and a small spread, half a zero mean and unit spread."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.zeros(64)
    mean[:32] = 3.0
    spread = torch.ones(64)
    spread[:32] = 0.1
    return mean + spread * torch.randn(256, 64, generator=g)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dsnot_reduces_the_reconstruction_error_of_a_poor_mask(seed: int) -> None:
    x = skewed_inputs(seed)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(50 + seed))
    stats = stats_of(x, hessian=False)
    start = prune_magnitude(w, stats, 0.5, Unstructured()).mask  # blind to the input means
    res = refine_dsnot(w, start, stats)
    assert res.weight is None
    assert res.info["swaps"] > 0
    assert torch.equal(res.mask.sum(dim=1), start.sum(dim=1))  # sparsity unchanged, row by row
    assert recon_error(w, w * res.mask, x) < 0.7 * recon_error(w, w * start, x)
    # what it optimises: the expected (mean) error of every row, never increased
    mu = stats.mean().double()
    e_before = ((w.double() * ~start) @ mu).abs()
    e_after = ((w.double() * ~res.mask) @ mu).abs()
    assert torch.all(e_after <= e_before + 1e-9)
    assert res.info["expected_error_after"] == pytest.approx(float(e_after.sum()), rel=1e-6)
    assert res.info["expected_error_before"] == pytest.approx(float(e_before.sum()), rel=1e-6)


def test_dsnot_swaps_inside_nm_groups() -> None:
    x = skewed_inputs(3)
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(60))
    stats = stats_of(x, hessian=False)
    start = prune_magnitude(w, stats, None, NM(2, 4)).mask
    res = refine_dsnot(w, start, stats, structure=NM(2, 4))
    assert res.info["swaps"] > 0
    assert torch.all(res.mask.reshape(-1, 4).sum(dim=1) == 2)
    assert recon_error(w, w * res.mask, x) < recon_error(w, w * start, x)


def test_dsnot_threshold_and_zero_cycles_leave_the_mask_alone() -> None:
    x = skewed_inputs(4)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(61))
    stats = stats_of(x, hessian=False)
    start = prune_magnitude(w, stats, 0.5, Unstructured()).mask
    assert torch.equal(refine_dsnot(w, start, stats, max_cycles=0).mask, start)
    assert torch.equal(refine_dsnot(w, start, stats, update_threshold=1e12).mask, start)
    assert refine_dsnot(w, start, stats, max_cycles=1).info["swaps"] <= 8


def test_dsnot_refuses_bad_values_in_one_line() -> None:
    x = skewed_inputs(5)
    w = torch.randn(4, 64)
    stats = stats_of(x, hessian=False)
    mask = prune_magnitude(w, stats, 0.5, Unstructured()).mask
    bad = [
        ({"mask": mask.float()}, "bool"),
        ({"mask": mask[:, :8]}, "shape"),
        ({"structure": NM(2, 4)}, "not NM"),
        ({"structure": Block(2, 2)}, "not supported"),
        ({"max_cycles": -1}, "max_cycles"),
        ({"update_threshold": -0.5}, "update_threshold"),
        ({"tokens_per_sample": 0}, "tokens_per_sample"),
        ({"pow_of_var_regrowing": float("inf")}, "pow_of_var_regrowing"),
        ({"stats": None}, "statistics"),
    ]
    for kwargs, match in bad:
        args: dict[str, object] = {"weight": w, "mask": mask, "stats": stats, **kwargs}
        with pytest.raises(SparseforgeError, match=match) as excinfo:
            refine_dsnot(**args)  # type: ignore[arg-type]
        assert "\n" not in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# OWL


def test_outlier_ratio_by_hand() -> None:
    # scores |W| * ||X||, norms all 1: nine 1s and one 100 -> mean 10.9, 5 x mean = 54.5 -> 1 of 10
    w = T([[1.0] * 9 + [-100.0]])
    assert outlier_ratio(w, torch.ones(10)) == pytest.approx(0.1)
    assert outlier_ratio(w, torch.ones(10), m=10.0) == 0.0  # 100 is not > 109
    assert outlier_ratio(torch.zeros(2, 3), torch.ones(3)) == 0.0
    # a block pools its layers: one mean over all 12 scores (11 + 100 + ...) -> 1 of 12
    pooled = block_outlier_ratio([(w, torch.ones(10)), (T([[1.0, 1.0]]), torch.ones(2))])
    assert pooled == pytest.approx(1 / 12)


def test_owl_sparsities_mean_range_and_monotonicity() -> None:
    ratios = {"layers.0": 0.02, "layers.1": 0.10, "layers.2": 0.03, "layers.3": 0.01, "layers.4": 0.05}
    out = owl_sparsities(ratios, 0.7, lam=0.08)
    assert list(out) == list(ratios)
    assert math.fsum(out.values()) / len(out) == pytest.approx(0.7, abs=1e-12)
    assert all(0.7 - 0.08 <= s <= 0.7 + 0.08 for s in out.values())
    # the layer farthest from the mean ratio (layers.1) sits on the edge of the band
    assert out["layers.1"] == pytest.approx(0.7 - 0.08, abs=1e-12)
    by_ratio = sorted(ratios, key=ratios.__getitem__)
    assert all(out[a] >= out[b] for a, b in zip(by_ratio, by_ratio[1:], strict=False))
    # more outliers, lower sparsity, strictly for distinct ratios
    assert out["layers.3"] > out["layers.0"] > out["layers.2"] > out["layers.4"] > out["layers.1"]


@given(
    ratios=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12),
    target=st.floats(0.1, 0.85),
    lam=st.floats(0.0, 0.1),
)
def test_owl_sparsities_properties(ratios: list[float], target: float, lam: float) -> None:
    named = {f"l{i}": r for i, r in enumerate(ratios)}
    out = owl_sparsities(named, target, lam=lam)
    assert math.fsum(out.values()) / len(out) == pytest.approx(target, abs=1e-12)
    assert all(target - lam - 1e-15 <= s <= target + lam + 1e-15 for s in out.values())
    for a in named:
        for b in named:
            if named[a] < named[b]:
                assert out[a] >= out[b]


def test_owl_equal_ratios_give_the_target() -> None:
    assert owl_sparsities({"a": 0.05, "b": 0.05}, 0.5) == {"a": 0.5, "b": 0.5}


@pytest.mark.parametrize(
    ("ratios", "target", "lam", "match"),
    [
        ({"a": 0.1}, 1.0, 0.08, "target"),
        ({"a": 0.1}, -0.1, 0.08, "target"),
        ({"a": 0.1}, 0.5, -0.01, "lam"),
        ({"a": 0.1}, 0.05, 0.08, "lam"),
        ({"a": 0.1}, 0.95, 0.08, "lam"),
        ({"a": 0.1}, 0.5, float("nan"), "lam"),
        ({}, 0.5, 0.08, "ratios"),
        ({"a": 1.5}, 0.5, 0.08, "ratios"),
        ({"a": float("nan")}, 0.5, 0.08, "ratios"),
    ],
)
def test_owl_refuses_bad_values(ratios: dict[str, float], target: float, lam: float, match: str) -> None:
    with pytest.raises(SparseforgeError, match=match) as excinfo:
        owl_sparsities(ratios, target, lam=lam)
    assert "\n" not in str(excinfo.value)


def test_outlier_ratio_refuses_bad_m() -> None:
    with pytest.raises(SparseforgeError, match="m="):
        outlier_ratio(W_HAND, T([1.0, 1.0, 1.0]), m=0.0)
    with pytest.raises(SparseforgeError, match="layers"):
        block_outlier_ratio([])


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry_names_functions_and_needs() -> None:
    assert {name: m.needs for name, m in METHODS.items()} == {
        "magnitude": "none",
        "wanda": "norms",
        "ria": "norms",
        "sparsegpt": "hessian",
    }
    assert METHODS["sparsegpt"].fn is prune_sparsegpt
    assert all(m.name == name for name, m in METHODS.items())
    assert get_method("ria").fn is prune_ria
    with pytest.raises(SparseforgeError, match="allowed: magnitude, ria, sparsegpt, wanda"):
        get_method("obc")
    with pytest.raises(AttributeError):
        METHODS["wanda"].needs = "none"  # type: ignore[misc]
    assert isinstance(METHODS["wanda"], Method)


# ---------------------------------------------------------------------------------------------
# InputStats: sums by hand, means optional, NaN/Inf checked once when read


def test_input_stats_sums_by_hand_and_without_means() -> None:
    x = T([[1.0, -2.0], [3.0, 0.5]])
    full = stats_of(x)
    assert full.tokens == 2
    torch.testing.assert_close(full.col_norms(), T([10.0, 4.25]).sqrt())
    torch.testing.assert_close(full.mean(), T([2.0, -0.75]))
    torch.testing.assert_close(full.variance(), T([1.0, 1.5625]))
    torch.testing.assert_close(full.hessian(), T([[10.0, -0.5], [-0.5, 4.25]]))  # 2 X^T X / 2
    lean = InputStats(2, means=False)
    lean.add(x)
    assert lean.sums is None
    torch.testing.assert_close(lean.col_norms(), full.col_norms(), rtol=0, atol=0)
    with pytest.raises(SparseforgeError, match=r"without means=True"):
        lean.mean()
    with pytest.raises(SparseforgeError, match=r"without means=True"):
        lean.variance()
    with pytest.raises(SparseforgeError, match=r"means='no' is not allowed; allowed: True or False"):
        InputStats(2, means="no")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("means", [True, False])
def test_input_stats_non_finite_inputs_are_refused_when_read(bad: float, means: bool) -> None:
    s = InputStats(3, hessian=True, means=means)
    s.add(T([[1.0, 2.0, 3.0]]))
    assert torch.isfinite(s.col_norms()).all()  # finite so far
    s.add(T([[1.0, bad, 3.0], [0.0, 1.0, 2.0]]))
    for read in (s.col_norms, s.hessian):
        with pytest.raises(SparseforgeError, match=r"calibration inputs contain NaN or Inf; allowed: finite"):
            read()
    with pytest.raises(SparseforgeError, match="NaN or Inf"):
        prune_wanda(torch.ones(2, 3), s, 0.5, Unstructured())
