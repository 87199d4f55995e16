"""Training-time algorithms: GMP and dynamic sparse training (SET, RigL, SNFS, GraNet, SRigL).

Invariants checked at every optimizer step and at every mask update: exact counts, pruned
weights and optimizer state at zero, grown weights at exactly 0, disjoint drop/grow sets of the
planned size, updates at exactly the scheduled steps; plus hand-crafted RigL/SET cases and a
short convergence run per method on scikit-learn digits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sparseforge import MaskState, Sparsifier
from sparseforge.algorithms import GMP, SET, SNFS, GraNet, RigL, SRigL, StaticSparse, init_sparse
from sparseforge.algorithms.dst import keep_top_per_row, top_indices
from sparseforge.errors import SparseforgeError
from sparseforge.experiments.models import MLP
from sparseforge.schedules import cosine_drop_fraction, cubic_sparsity
from sparseforge.structures import NM, Block, Channel, ConstantFanIn, Unstructured, topk_mask

STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def _states(sp: Sparsifier, name: str) -> list[torch.Tensor]:
    state = sp.optimizer.state.get(sp.params[name], {})
    return [state[k] for k in STATE_KEYS if k in state]


class Recorder:
    """Wraps ``algorithm.update`` and ``sparsifier.change_masks`` to check every mask change."""

    def __init__(self, sp: Sparsifier) -> None:
        self.sp = sp
        self.update_steps: list[int] = []
        self.changes: list[tuple[int, dict[str, dict[str, torch.Tensor]]]] = []
        algo_update, change = sp.algorithm.update, sp.change_masks

        def update(sparsifier: Sparsifier, step: int) -> None:
            assert step == sparsifier.masks.step
            self.update_steps.append(step)
            algo_update(sparsifier, step)

        def change_masks(new_masks, grown_values=None):
            old = {n: m.clone() for n, m in sp.masks.items()}
            result = change(new_masks, grown_values)
            record = {}
            for name in new_masks:
                new, param = sp.masks[name], sp.params[name].detach()
                dropped, grown = old[name] & ~new, new & ~old[name]
                assert result[name] == (int(dropped.sum()), int(grown.sum()))
                assert torch.all(param[grown] == 0.0), "grown weights must start at exactly 0"
                assert torch.all(param[~new] == 0.0)
                for state in _states(sp, name):
                    assert torch.all(state[dropped | grown] == 0.0), "optimizer state not zeroed"
                record[name] = {"old": old[name], "new": new.clone(), "dropped": dropped, "grown": grown}
                if sp.dense_grads is not None:  # the growth signal of gradient-based methods
                    record[name]["grad"] = sp.dense_grads[name].clone()
            self.changes.append((sp.masks.step, record))
            return result

        sp.algorithm.update = update  # type: ignore[method-assign]
        sp.change_masks = change_masks  # type: ignore[method-assign]


def _check_zero(sp: Sparsifier) -> None:
    for name, mask in sp.masks.items():
        assert torch.all(sp.params[name].detach()[~mask] == 0.0)
        for state in _states(sp, name):
            assert torch.all(state[~mask] == 0.0)


def _run(
    algorithm: Callable[[int], object],
    *,
    steps: int = 60,
    sparsity: float = 0.8,
    structure: str = "unstructured",
    optimizer: str = "sgd",
    after_step: Callable[[Sparsifier, int], None] | None = None,
) -> tuple[Sparsifier, Recorder, dict[str, int]]:
    torch.manual_seed(0)
    model = MLP(16, 4, hidden=(32, 32))
    masks = init_sparse(model, sparsity, structure=structure)
    initial = {n: masks.nnz(n) for n in masks}
    opt = _optimizer(optimizer, model)
    sp = Sparsifier(model, opt, masks, algorithm(steps))
    assert sp.zero_state == "grads", "these invariants must exercise the default (fast) mode"
    rec = Recorder(sp)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for step in range(1, steps + 1):
        idx = torch.randint(0, 64, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        assert sp.masks.step == step
        _check_zero(sp)
        if after_step is not None:
            after_step(sp, step)
    return sp, rec, initial


DST_FACTORIES = {
    "SET": lambda s: SET(total_steps=s, every=4),
    "RigL": lambda s: RigL(total_steps=s, every=4),
    "SNFS": lambda s: SNFS(total_steps=s, every=4),
    "SRigL": lambda s: SRigL(total_steps=s, every=4, gamma_sal=0.0),
}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("method", sorted(DST_FACTORIES))
def test_dst_invariants(method: str, optimizer: str) -> None:
    structure = "fanin" if method == "SRigL" else "unstructured"

    def exact(sp: Sparsifier, step: int) -> None:
        if method == "SNFS":  # moves counts between layers, keeps the total exact
            assert sp.masks.nnz() == sum(initial_counts.values())
        else:
            assert {n: sp.masks.nnz(n) for n in sp.masks} == initial_counts

    torch.manual_seed(0)
    initial_counts = {
        n: m.nnz(n) for m in [init_sparse(MLP(16, 4, hidden=(32, 32)), 0.8, structure=structure)] for n in m
    }
    sp, rec, initial = _run(DST_FACTORIES[method], optimizer=optimizer, structure=structure, after_step=exact)
    assert initial == initial_counts
    # total_steps=60 -> end=45; updates every 4 steps strictly before end (drop fraction 0 at end)
    expected = list(range(4, 45, 4))
    assert rec.update_steps == expected
    assert [s for s, _ in sp.algorithm.history] == expected
    changed = [s for s, _ in rec.changes]  # late updates may round to no change at all
    assert changed == expected[: len(changed)] and len(changed) >= len(expected) - 2
    for step, record in rec.changes:
        fraction = cosine_drop_fraction(step, alpha=0.3, end=45)
        total_drop = sum(int(r["dropped"].sum()) for r in record.values())
        total_grow = sum(int(r["grown"].sum()) for r in record.values())
        assert total_drop == total_grow > 0
        for r in record.values():
            assert not (r["dropped"] & r["grown"]).any()
            assert not (r["grown"] & r["old"]).any(), "grew a position that was active (or just dropped)"
            nnz = int(r["old"].sum())
            planned = min(_round(fraction * nnz), r["old"].numel() - nnz)
            if method == "SRigL":  # constant fan-in: the drop is per row
                rows = r["old"].shape[0]
                k = int(r["old"].sum()) // rows
                d = min(_round(fraction * k), r["old"].shape[1] - k)
                # a row short of inactive positions with a gradient drops only as many as it can regrow
                useful = ((r["grad"] != 0) & ~r["old"]).sum(1)
                planned = int(useful.clamp(max=d).sum())
                assert torch.all(r["new"].sum(1) == k)
            if method in ("RigL", "SNFS", "SRigL"):
                # growth only where the dense gradient is nonzero; never into a zero-gradient position
                assert torch.all(r["grad"][r["grown"]] != 0), "grew where the gradient is exactly 0"
            if method == "RigL":  # a shortfall of useful positions is kept, not dropped
                useful = int(((r["grad"] != 0) & ~r["old"]).sum())
                planned = min(planned, useful)
            if method == "SNFS":  # every layer drops its fraction, less what could not grow anywhere
                assert int(r["dropped"].sum()) <= _round(fraction * nnz)
            else:
                assert int(r["dropped"].sum()) == planned
                assert int(r["grown"].sum()) == planned


def test_static_never_changes() -> None:
    sp, rec, initial = _run(lambda s: StaticSparse())
    assert rec.update_steps == [] and {n: sp.masks.nnz(n) for n in sp.masks} == initial


@pytest.mark.parametrize("every", [3, 4])
def test_update_count_matches_schedule(every: int) -> None:
    """Peer bug: a step counter incremented twice made even intervals never update."""
    _, rec, _ = _run(lambda s: SET(end=40, every=every), steps=50)
    assert rec.update_steps == list(range(every, 40, every))


def _hand_layer(weights: torch.Tensor, mask: torch.Tensor, algorithm: object, grad: torch.Tensor):
    layer = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weights)
    model = nn.Sequential(layer)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    sp = Sparsifier(model, opt, MaskState({"0.weight": mask}), algorithm)
    old = mask.clone()
    layer.weight.grad = grad.clone()
    opt.step()
    return sp, layer, old


def test_rigl_grows_exactly_top_gradient_inactive_positions() -> None:
    weights = (torch.arange(1, 25, dtype=torch.float32) / 10).reshape(4, 6)
    mask = torch.zeros(24, dtype=torch.bool)
    mask[::2] = True  # 12 active: even flat indices
    mask = mask.reshape(4, 6)
    grad = torch.zeros(24)
    grad[::2] = 1000.0  # huge gradients at active positions (incl. those dropped): must not regrow
    odd_scores = torch.tensor([0.3, -5.0, 0.1, 2.0, -0.7, 9.0, 0.05, -3.0, 1.5, 0.2, -0.01, 4.0])
    grad[1::2] = odd_scores
    algo = RigL(end=1000, every=1, alpha=0.5)
    sp, layer, old = _hand_layer(weights, mask, algo, grad.reshape(4, 6))
    fraction = cosine_drop_fraction(1, alpha=0.5, end=1000)
    n = _round(fraction * 12)
    assert n == 6
    expected = torch.zeros(24, dtype=torch.bool)
    expected[list(range(12, 24, 2))] = True  # the 6 largest-magnitude active weights survive
    top_odd = torch.topk(odd_scores.abs(), n).indices * 2 + 1
    expected[top_odd] = True
    assert torch.equal(sp.masks["0.weight"].reshape(-1), expected)
    flat = layer.weight.detach().reshape(-1)
    assert torch.all(flat[top_odd] == 0.0)  # grown at 0
    assert torch.equal(flat[12::2], weights.reshape(-1)[12::2])  # survivors untouched
    assert sp.dense_grads is None  # released after the update


def test_set_grows_among_inactive_only_and_is_seeded() -> None:
    weights = torch.randn(8, 8)
    torch.manual_seed(1)
    mask = torch.rand(8, 8) < 0.3
    grown_sets = []
    for seed in (0, 0, 1):
        sp, layer, old = _hand_layer(weights, mask, SET(end=1000, every=1, alpha=0.5, seed=seed), torch.randn(8, 8))
        new = sp.masks["0.weight"]
        grown, dropped = new & ~old, old & ~new
        assert (
            int(grown.sum())
            == int(dropped.sum())
            == _round(cosine_drop_fraction(1, alpha=0.5, end=1000) * int(old.sum()))
        )
        assert not (grown & old).any()
        kept_magnitudes = weights[old & new].abs()
        assert kept_magnitudes.min() >= weights[dropped].abs().max()  # dropped the smallest
        assert torch.all(layer.weight.detach()[grown] == 0.0)
        grown_sets.append(grown)
    assert torch.equal(grown_sets[0], grown_sets[1]) and not torch.equal(grown_sets[0], grown_sets[2])


def test_grown_weights_then_train() -> None:
    """Grown positions must receive gradient after the update (the mask really opened)."""

    def check(sp: Sparsifier, step: int) -> None:
        if step == 9:  # one step after the update at step 8
            for _, record in rec_holder[0].changes[-1:]:
                for name, r in record.items():
                    assert (sp.params[name].detach()[r["grown"]] != 0).float().mean() > 0.5

    rec_holder: list[Recorder] = []

    def factory(steps: int) -> RigL:
        return RigL(end=40, every=8)

    torch.manual_seed(0)
    model = MLP(16, 4, hidden=(32, 32))
    masks = init_sparse(model, 0.8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sp = Sparsifier(model, opt, masks, factory(0))
    rec_holder.append(Recorder(sp))
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for step in range(1, 10):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        check(sp, step)


@pytest.mark.parametrize("distribution", ["uniform", "erk", "global"])
def test_gmp_cubic_targets_and_monotone(distribution: str) -> None:
    start, end, every, final = 10, 40, 5, 0.8
    totals: dict[int, int] = {}
    sp, rec, initial = _run(
        lambda s: GMP(final, start=start, end=end, every=every, distribution=distribution),
        sparsity=0.0,
        steps=50,
        after_step=lambda sp, t: totals.__setitem__(t, sp.masks.nnz()),
    )
    assert all(initial[n] == sp.masks[n].numel() for n in initial)  # started dense
    assert rec.update_steps == list(range(start, end + 1, every))
    for _, record in rec.changes:
        for r in record.values():
            assert not r["grown"].any() and not (r["new"] & ~r["old"]).any()  # monotone
    total = sum(sp.masks[n].numel() for n in sp.masks)
    if distribution == "global":  # the total follows the cubic exactly at every update
        for step in rec.update_steps:
            expect = _round((1 - cubic_sparsity(step, initial=0.0, final=final, start=start, end=end)) * total)
            assert totals[step] == expect
        assert sp.masks.nnz() == _round((1 - final) * total)
    else:  # every layer follows its own cubic to its distribution target
        for step, record in rec.changes:
            for name, r in record.items():
                final_l = sp.masks.targets[name]
                expect = _round(
                    (1 - cubic_sparsity(step, initial=0.0, final=final_l, start=start, end=end)) * r["new"].numel()
                )
                assert int(r["new"].sum()) == expect
        assert sp.masks.sparsity() == pytest.approx(final, abs=1e-3)


def test_gmp_prunes_smallest_surviving_weights() -> None:
    weights = torch.tensor([[0.5, -0.1, 0.0, 2.0], [0.3, -0.2, 1.0, 0.05]])
    mask = torch.tensor([[True, True, False, True], [True, True, True, True]])
    algo = GMP(0.5, start=0, end=1, every=1)
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(weights)
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    sp = Sparsifier(nn.Sequential(layer), opt, MaskState({"0.weight": mask}), algo)
    layer.weight.grad = torch.zeros(2, 4)
    opt.step()
    expected = torch.tensor([[True, False, False, True], [True, False, True, False]])
    assert torch.equal(sp.masks["0.weight"], expected)


def test_granet_prunes_gradually_and_regenerates() -> None:
    final, prune_end = 0.9, 30
    totals: dict[int, int] = {}
    sp, rec, initial = _run(
        lambda s: GraNet(final, prune_start=0, prune_end=prune_end, total_steps=s, every=5),
        sparsity=0.5,
        steps=60,
        after_step=lambda sp, step: totals.__setitem__(step, sp.masks.nnz()),
    )
    total = sum(sp.masks[n].numel() for n in sp.masks)
    s0 = 1 - sum(initial.values()) / total
    assert rec.update_steps == list(range(5, 45, 5))  # every 5 steps up to end = 75% of 60
    for step in range(1, 61):
        expect = _round((1 - cubic_sparsity(step - step % 5, initial=s0, final=final, start=0, end=prune_end)) * total)
        assert totals[step] == expect, step
    regrown = 0
    for step, record in rec.changes:
        for r in record.values():
            assert not (r["grown"] & r["old"]).any()
            regrown += int(r["grown"].sum())
        if step > prune_end:  # pure regeneration: drop and regrow the same number
            assert (
                sum(int(r["grown"].sum()) for r in record.values())
                == sum(int(r["dropped"].sum()) for r in record.values())
                > 0
            )
    assert regrown > 0


def test_srigl_ablates_neurons_and_keeps_constant_fan_in() -> None:
    def constant(sp: Sparsifier, step: int) -> None:
        for name, mask in sp.masks.items():
            rows = mask.reshape(mask.shape[0], -1).sum(1)
            live = rows[rows > 0]
            assert live.unique().numel() == 1
            # the budget is redistributed over the live rows, less what no row could grow with a
            # gradient (columns fed by ablated or dead neurons have none)
            assert int(mask.sum()) <= budget[name]

    torch.manual_seed(0)
    budget = {n: m.nnz(n) for m in [init_sparse(MLP(16, 4, hidden=(32, 32)), 0.8, structure="fanin")] for n in m}
    sp, rec, _ = _run(lambda s: SRigL(total_steps=s, every=4, gamma_sal=0.9), structure="fanin", after_step=constant)
    ablated = sum(int((m.reshape(m.shape[0], -1).sum(1) == 0).sum()) for _, m in sp.masks.items())
    assert ablated > 0
    grown_fan_in = False
    for _, record in rec.changes:
        for r in record.values():
            assert torch.all(r["grad"][r["grown"]] != 0), "grew where the gradient is exactly 0"
            old_k, new_k = (
                int(x.sum(1).max()) for x in (r["old"].reshape(len(r["old"]), -1), r["new"].reshape(len(r["new"]), -1))
            )
            grown_fan_in |= new_k > old_k
    assert grown_fan_in, "an ablation must hand its budget to the live rows at least once"


def test_srigl_rejects_non_constant_fan_in_masks() -> None:
    model = MLP(16, 4, hidden=(32, 32))
    masks = init_sparse(model, 0.8)  # unstructured ERK: rows differ
    with pytest.raises(SparseforgeError, match="constant fan-in"):
        Sparsifier(model, torch.optim.SGD(model.parameters(), lr=0.1), masks, SRigL(end=10, every=2))


@pytest.mark.parametrize("cls", [SET, RigL, SNFS])
@pytest.mark.parametrize("structure", [NM(2, 4), Block(2, 2), Channel(0), ConstantFanIn()])
def test_dst_rejects_unsupported_structures(cls, structure) -> None:
    with pytest.raises(SparseforgeError, match="does not support structure"):
        cls(end=100, structure=structure)


def test_srigl_and_granet_structure_checks() -> None:
    with pytest.raises(SparseforgeError, match="does not support structure"):
        SRigL(end=100, structure=Unstructured())
    with pytest.raises(SparseforgeError, match="does not support structure"):
        GraNet(0.9, prune_end=50, end=100, structure=NM(2, 4))


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: RigL(end=100, alpha=0.0), "alpha=0.0"),
        (lambda: RigL(end=100, alpha=1.2), "alpha=1.2"),
        (lambda: SET(end=100, every=0), "every=0"),
        (lambda: RigL(), "give exactly one"),
        (lambda: RigL(end=0), "end=0"),
        (lambda: GMP(0.5, start=0, end=0), "end=0"),
        (lambda: RigL(end=10, total_steps=20), "give exactly one"),
        (lambda: GMP(0.9, start=50, end=10), "end=10 is before start=50"),
        (lambda: GMP(1.0, start=0, end=10), "final_sparsity=1.0"),
        (lambda: GMP(0.9, start=0, end=10, distribution="weird"), "distribution='weird'"),
        (lambda: SRigL(end=10, gamma_sal=2.0), "gamma_sal=2.0"),
    ],
)
def test_construction_errors(call, needle: str) -> None:
    with pytest.raises(SparseforgeError) as err:
        call()
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_state_dict_round_trip_keeps_gmp_start() -> None:
    sp, _, _ = _run(lambda s: GMP(0.8, start=5, end=30, every=5), sparsity=0.0, steps=20)
    state = sp.state_dict()
    fresh = GMP(0.8, start=5, end=30, every=5)
    fresh.load_state_dict(state["algorithm"])
    assert fresh.targets.initial == sp.algorithm.targets.initial
    assert all(v == 0.0 for k, v in fresh.targets.initial.items())


def test_global_gmp_pairs_masks_and_weights_by_name_after_a_reordered_load() -> None:
    """A mask state loaded with its layers in another order (e.g. sorted keys) scores each layer's own weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    params = dict(model.named_parameters())
    masks = MaskState({n: torch.ones_like(params[n], dtype=torch.bool) for n in ("0.weight", "2.weight")})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sp = Sparsifier(model, opt, masks, GMP(0.8, start=1, end=4, every=1, distribution="global"))
    state = sp.state_dict()
    state["masks"]["masks"] = dict(reversed(list(state["masks"]["masks"].items())))
    sp.load_state_dict(state)
    assert list(sp.masks) != list(sp.params)
    for _ in range(5):
        opt.zero_grad()
        model(torch.randn(16, 8)).sum().backward()
        opt.step()
    assert sp.masks.sparsity() == pytest.approx(0.8, abs=1e-2)


# -- convergence on scikit-learn digits ------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    from sparseforge.experiments.datasets import load_dataset

    return load_dataset("digits")


CONVERGENCE = {
    "static": (0.8, "unstructured", lambda s: StaticSparse()),
    "SET": (0.8, "unstructured", lambda s: SET(total_steps=s, every=10)),
    "RigL": (0.8, "unstructured", lambda s: RigL(total_steps=s, every=10)),
    "SNFS": (0.8, "unstructured", lambda s: SNFS(total_steps=s, every=10)),
    "GraNet": (0.5, "unstructured", lambda s: GraNet(0.8, prune_end=s // 2, total_steps=s, every=10)),
    "SRigL": (0.8, "fanin", lambda s: SRigL(total_steps=s, every=10)),
    "GMP": (0.0, "unstructured", lambda s: GMP(0.8, start=s // 4, end=3 * s // 4, every=10)),
}


@pytest.mark.parametrize("method", sorted(CONVERGENCE))
def test_convergence_on_digits(method: str, digits) -> None:
    from sparseforge.training import train

    init_sparsity, structure, factory = CONVERGENCE[method]
    torch.manual_seed(0)
    model = MLP(64, 10, hidden=(128, 128))
    masks = init_sparse(model, init_sparsity, structure=structure)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    epochs, batch = 8, 64
    steps = epochs * math.ceil(len(digits.y_train) / batch)
    sp = Sparsifier(model, opt, masks, factory(steps))
    history = train(
        model,
        (digits.x_train, digits.y_train),
        epochs=epochs,
        optimizer=opt,
        batch_size=batch,
        eval_data=(digits.x_test, digits.y_test),
        progress=False,
    )
    assert sp.masks.sparsity() == pytest.approx(0.8, abs=0.01)
    assert history.final_accuracy >= 0.85, f"{method}: accuracy {history.final_accuracy:.3f}"
    _check_zero(sp)


# -- exact selection ---------------------------------------------------------------------------
@given(st.lists(st.integers(-3, 3), min_size=1, max_size=60), st.data())
def test_top_indices_matches_reference_with_ties(values: list[int], data) -> None:
    scores = torch.tensor(values, dtype=torch.float32)
    k = data.draw(st.integers(0, len(values)))
    expected = topk_mask(scores.reshape(1, -1), k).reshape(-1).nonzero().squeeze(1)
    assert torch.equal(top_indices(scores, k), expected)


@pytest.mark.parametrize("seed", range(4))
def test_top_indices_large_exact(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 200_000
    scores = torch.randint(0, 1000, (n,), generator=g).float()  # many ties
    if seed % 2:
        scores[torch.randperm(n, generator=g)[: n // 2]] = float("-inf")
    for k in (1, 777, 30_000, 99_000):
        expected = topk_mask(scores.reshape(1, -1), k).reshape(-1).nonzero().squeeze(1)
        assert torch.equal(top_indices(scores, k), expected)


# -- the Sparsifier's one-pass mode used by the overhead benchmark ------------------------------
OPTIMIZERS = {
    "sgd-nesterov-wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam-amsgrad-wd": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2, amsgrad=True),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
}


def _train_rigl(zero_state: str, make_opt) -> tuple[nn.Module, Sparsifier]:
    torch.manual_seed(0)
    model = MLP(16, 4, hidden=(32, 32))
    opt = make_opt(model.parameters())
    sp = Sparsifier(model, opt, init_sparse(model, 0.8), RigL(end=40, every=5), zero_state=zero_state)
    Recorder(sp)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        _check_zero(sp)
    return model, sp


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_grads_mode_is_exact(name: str) -> None:
    """zero_state='grads' skips the per-step weight/state masking; results must be bit-identical."""
    lean, sp_lean = _train_rigl("grads", OPTIMIZERS[name])
    full, sp_full = _train_rigl("step", OPTIMIZERS[name])
    for (n, a), (_, b) in zip(lean.named_parameters(), full.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert all(torch.equal(sp_lean.masks[n], sp_full.masks[n]) for n in sp_lean.masks)


def test_grads_mode_refuses_other_optimizers() -> None:
    model = MLP(16, 4, hidden=(32, 32))
    with pytest.raises(SparseforgeError, match="zero_state='grads' is not exact for RMSprop"):
        Sparsifier(model, torch.optim.RMSprop(model.parameters()), init_sparse(model, 0.8), zero_state="grads")


# -- the default zero_state="auto" ------------------------------------------------------------
ALGORITHMS = {  # every built-in Sparsifier algorithm, with updates inside 30 steps
    "static": (0.8, "unstructured", lambda: StaticSparse()),
    "SET": (0.8, "unstructured", lambda: SET(end=40, every=5)),
    "RigL": (0.8, "unstructured", lambda: RigL(end=40, every=5)),
    "SNFS": (0.8, "unstructured", lambda: SNFS(end=40, every=5)),
    "SRigL": (0.8, "fanin", lambda: SRigL(end=40, every=5, gamma_sal=0.5)),
    "GMP": (0.0, "unstructured", lambda: GMP(0.8, start=0, end=20, every=5)),
    "GraNet": (0.5, "unstructured", lambda: GraNet(0.8, prune_end=20, end=40, every=5)),
}


def _train_default(algorithm: str, make_opt, zero_state: str | None) -> tuple[nn.Module, Sparsifier, int]:
    sparsity, structure, make = ALGORITHMS[algorithm]
    torch.manual_seed(0)
    model = MLP(16, 4, hidden=(32, 32))
    opt = make_opt(model.parameters())
    masks = init_sparse(model, sparsity, structure=structure)
    extra = {} if zero_state is None else {"zero_state": zero_state}
    sp = Sparsifier(model, opt, masks, make(), **extra)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    changes = 0
    for _ in range(30):
        before = {n: m.clone() for n, m in sp.masks.items()}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        _check_zero(sp)  # pruned weights and every per-weight state tensor exactly 0, every step
        changes += sum(int((before[n] != m).sum()) for n, m in sp.masks.items())
    return model, sp, changes


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_default_zero_state_is_grads_and_bit_identical_to_step(algorithm: str, opt_name: str) -> None:
    """The default picks the one-pass mode for SGD(momentum, nesterov, wd) / Adam(amsgrad, wd) /
    AdamW, and every built-in algorithm ends bit-identical to masking everything every step."""
    fast, sp_fast, changes = _train_default(algorithm, OPTIMIZERS[opt_name], None)
    full, sp_full, _ = _train_default(algorithm, OPTIMIZERS[opt_name], "step")
    assert sp_fast.zero_state == "grads" and sp_fast.zero_state_reason.startswith("auto: exact for ")
    assert sp_full.zero_state == "step" and sp_full.zero_state_reason == "explicit"
    if algorithm != "static":
        assert changes > 0, "the masks must really change during the run"
    for (n, a), (_, b) in zip(fast.named_parameters(), full.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    assert all(torch.equal(sp_fast.masks[n], sp_full.masks[n]) for n in sp_fast.masks)


DEAD_UNIT_FACTORIES: dict[str, Callable[[], object]] = {
    "RigL": lambda: RigL(total_steps=60, every=4),
    "SNFS": lambda: SNFS(total_steps=60, every=4),
    "SRigL": lambda: SRigL(total_steps=60, every=4, gamma_sal=0.0),
    "GraNet": lambda: GraNet(1 - 20 / 64, prune_end=20, total_steps=60, every=4),
    "SET": lambda: SET(total_steps=60, every=4),
}


@pytest.mark.parametrize("method", sorted(DEAD_UNIT_FACTORIES))
def test_no_kept_weight_stays_exactly_zero_behind_dead_units(method: str) -> None:
    """Hidden units that never fire give their outgoing columns a zero gradient; a weight grown there
    starts at 0 and stays 0. Gradient-driven growth (RigL, SNFS, SRigL, GraNet) never grows there,
    so no kept weight ends exactly 0; SET grows at random by design, so its only kept zeros are
    weights it grew behind dead units (none elsewhere)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    dead = torch.arange(16) >= 4  # 12 of 16 hidden units dead
    with torch.no_grad():
        model[0].bias[dead] = -1e6
    masks = MaskState({"2.weight": torch.zeros(4, 16, dtype=torch.bool)})
    masks["2.weight"][:, :4] = True  # the live columns, full ...
    if method == "SRigL":  # ... and one weight behind a dead unit per row (constant fan-in 5)
        masks["2.weight"][torch.arange(4), 4 + torch.arange(4)] = True
    else:  # ... and four weights behind dead units in row 0
        masks["2.weight"][0, 4:8] = True
    masks.apply(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, opt, masks, DEAD_UNIT_FACTORIES[method]())  # type: ignore[arg-type]
    rec = Recorder(sp)
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    weight, mask = model[2].weight.detach(), sp.masks["2.weight"]
    assert sp.masks.nnz() == 20  # exact count kept
    kept_zero = (weight == 0) & mask
    if method == "SET":
        assert not kept_zero[:, ~dead].any(), "a kept weight behind a live unit is exactly 0"
        return
    grown_dead = sum(int(r["grown"][:, dead].sum()) for _, record in rec.changes for r in record.values())
    assert grown_dead == 0
    if method == "SRigL":
        assert (mask.sum(1) == 5).all()  # constant fan-in kept
    # the weights behind dead units were dropped (smallest: they never trained) or kept as they were
    assert int(kept_zero.sum()) == 0, f"{int(kept_zero.sum())} kept weights are exactly 0"


@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_keep_top_per_row_matches_a_row_by_row_choice(rows: int, cols: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (rows, cols), generator=gen).float()  # many ties
    allowed = torch.rand(rows, cols, generator=gen) < 0.7
    counts = torch.tensor([int(torch.randint(0, int(a.sum()) + 1, (1,), generator=gen)) for a in allowed])
    got = keep_top_per_row(scores, allowed, counts)
    for r in range(rows):
        candidates = [c for c in range(cols) if allowed[r, c]]
        best = sorted(candidates, key=lambda c: (-float(scores[r, c]), c))[: int(counts[r])]
        assert sorted(torch.nonzero(got[r]).flatten().tolist()) == sorted(best)
