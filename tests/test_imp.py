"""IMP / lottery tickets: exact sparsity per round, rewinding, snapshot copies, convergence."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from sparseforge.algorithms.imp import IMPRound, imp, prune_surviving, round_sparsities
from sparseforge.errors import SparseforgeError
from sparseforge.experiments.datasets import load_dataset
from sparseforge.experiments.models import MLP
from sparseforge.training import batches, evaluate, train


def _model(seed: int = 0, hidden=(32, 32)) -> nn.Module:
    torch.manual_seed(seed)
    return MLP(64, 10, hidden=hidden)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)


def _train_steps(data, steps: int, batch_size: int = 64):
    """A train_fn doing exactly ``steps`` optimizer steps on ``data``."""

    def fn(model, optimizer, info):
        gen = torch.Generator().manual_seed(info.round)
        done = 0
        while done < steps:
            for x, y in batches(data, batch_size, shuffle=True, generator=gen):
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
                done += 1
                if done == steps:
                    break
        return done

    return fn


def _weights(model):
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def test_round_sparsities_geometric():
    s = round_sparsities(0.875, 3)
    assert s == pytest.approx([0.5, 0.75, 0.875])
    with pytest.raises(SparseforgeError):
        round_sparsities(0.5, 0)


def test_exact_sparsity_each_round_and_pruned_weights_zero(digits):
    model = _model()
    data = (digits.x_train, digits.y_train)
    total = sum(p.numel() for p in _weights(model).values())
    seen: list[tuple[int, int, int]] = []
    prev_masks: list[dict[str, torch.Tensor]] = []
    inner = _train_steps(data, 5)

    def train_fn(m, opt, info: IMPRound):
        w = _weights(m)
        nnz_before = sum(int((p != 0).sum()) for p in w.values())
        out = inner(m, opt, info)
        nnz_after = sum(int((p != 0).sum()) for p in w.values())
        seen.append((info.round, nnz_before, nnz_after))
        if info.round >= 1:
            prev_masks.append({n: (p != 0).clone() for n, p in w.items()})
        return out

    masks, history = imp(model, _sgd, train_fn, final_sparsity=0.9, rounds=3, rewind_step=2)
    targets = round_sparsities(0.9, 3)
    assert [r.round for r in history.rounds] == [0, 1, 2, 3]
    assert history.prune_fraction == pytest.approx(1 - 0.1 ** (1 / 3))
    for (rnd, before, after), rec in zip(seen[1:], history.rounds[1:], strict=True):
        expected = math.floor((1 - targets[rnd - 1]) * total + 0.5)
        assert before <= expected and after <= expected  # survivors exactly, unless a weight is exactly 0
        assert rec.target_sparsity == pytest.approx(targets[rnd - 1])
        assert rec.steps == 5
    # masks: exact count, nested across rounds, pruned weights zero
    assert masks.nnz() == math.floor(0.1 * total + 0.5)
    assert masks.sparsity() == pytest.approx(0.9, abs=1.0 / total)
    for name, p in _weights(model).items():
        assert torch.all(p[~masks[name]] == 0)
    for a, b in pairwise(prev_masks):
        for n in a:
            assert not torch.any(b[n] & ~a[n]), "a pruned weight came back"
    assert history.rounds[-1].sparsity >= 0.9 - 1.0 / total


def test_rewind_equals_snapshot_and_snapshot_not_aliased(digits):
    model = _model(1)
    data = (digits.x_train, digits.y_train)
    k = 3
    independent: dict[str, torch.Tensor] = {}
    starts: dict[int, dict[str, torch.Tensor]] = {}
    inner = _train_steps(data, 6)

    def train_fn(m, opt, info: IMPRound):
        if info.round == 0:
            count = [0]

            def record(o, a, kw):
                count[0] += 1
                if count[0] == k:
                    independent.update({n: t.detach().clone() for n, t in m.state_dict().items()})

            opt.register_step_post_hook(record)
        else:
            assert info.start_step == k
            starts[info.round] = {n: t.detach().clone() for n, t in m.state_dict().items()}
        return inner(m, opt, info)

    masks, history = imp(model, _sgd, train_fn, final_sparsity=0.75, rounds=2, rewind_step=k)
    snap = history.snapshot
    assert snap is not None and set(snap) == set(independent)
    live = model.state_dict()
    for name, value in snap.items():
        # training after step k did not alter the snapshot, and it shares no storage with the model
        assert torch.equal(value, independent[name])
        assert value.data_ptr() != live[name].data_ptr()
    changed = any(not torch.equal(snap[n], live[n]) for n in snap)
    assert changed, "training should have moved the weights away from the snapshot"
    # at the start of each retraining round: survivors equal the snapshot exactly, pruned are zero
    for state in starts.values():
        assert set(state) == set(snap)
        for name, value in state.items():
            if name in masks:
                assert (value != 0).sum() <= masks.numel(name)
                kept = value != 0
                assert torch.equal(value[kept], snap[name][kept])
            else:
                assert torch.equal(value, snap[name])  # biases rewound too
    # the last round's start: exactly snapshot * mask
    for name in masks:
        assert torch.equal(starts[2][name], snap[name] * masks[name])
    assert masks.step == k + 6


def test_rewind_zero_copies_initialisation(digits):
    model = _model(2)
    init = {n: t.detach().clone() for n, t in model.state_dict().items()}
    data = (digits.x_train, digits.y_train)
    starts = {}
    inner = _train_steps(data, 4)

    def train_fn(m, opt, info):
        if info.round == 1:
            starts.update({n: t.detach().clone() for n, t in m.state_dict().items()})
        return inner(m, opt, info)

    masks, history = imp(model, _sgd, train_fn, final_sparsity=0.5, rounds=1, rewind_step=0)
    for name, value in init.items():
        assert torch.equal(history.snapshot[name], value)
        expected = value * masks[name] if name in masks else value
        assert torch.equal(starts[name], expected)


def test_no_rewind_fine_tunes(digits):
    model = _model(3)
    data = (digits.x_train, digits.y_train)
    before_round1 = {}
    inner = _train_steps(data, 4)

    def train_fn(m, opt, info):
        if info.round == 1:
            before_round1.update({n: t.detach().clone() for n, t in m.state_dict().items()})
        out = inner(m, opt, info)
        if info.round == 0:
            before_round1["trained"] = m[0].weight.detach().clone()
        return out

    masks, history = imp(model, _sgd, train_fn, final_sparsity=0.5, rounds=1, rewind_step=None)
    assert history.snapshot is None
    trained = before_round1.pop("trained")
    assert torch.equal(before_round1["0.weight"], trained * masks["0.weight"])


def test_optimizer_reset_each_round(digits):
    model = _model(4)
    made = []

    def make(m):
        opt = _sgd(m)
        made.append(opt)
        return opt

    seen_opts = []

    def train_fn(m, opt, info):
        seen_opts.append(opt)
        assert len(opt.state) == 0  # fresh optimizer: no momentum carried over
        return _train_steps((digits.x_train, digits.y_train), 2)(m, opt, info)

    imp(model, make, train_fn, final_sparsity=0.75, rounds=2, rewind_step=1)
    assert len(made) == 3 and seen_opts == made


@pytest.mark.parametrize(
    "kwargs",
    [
        {"final_sparsity": 1.0, "rounds": 2},
        {"final_sparsity": 0.0, "rounds": 2},
        {"final_sparsity": 0.5, "rounds": 0},
        {"final_sparsity": 0.5, "rounds": 2, "rewind_step": -1},
        {"final_sparsity": 0.5, "rounds": 2, "min_density": 0.9},
    ],
)
def test_bad_arguments_raise_before_training(kwargs):
    called = []
    with pytest.raises(SparseforgeError):
        imp(_model(), _sgd, lambda m, o, i: called.append(1), **kwargs)
    assert not called


def test_rewind_step_never_reached(digits):
    with pytest.raises(SparseforgeError, match="rewind_step=50"):
        imp(
            _model(),
            _sgd,
            _train_steps((digits.x_train, digits.y_train), 3),
            final_sparsity=0.5,
            rounds=1,
            rewind_step=50,
        )


def test_prune_surviving_never_regrows():
    torch.manual_seed(0)
    w = {"a": torch.randn(8, 8), "b": torch.randn(4, 8)}
    m1, _ = prune_surviving(w, None, 0.5)
    w2 = {n: torch.randn_like(t) for n, t in w.items()}  # magnitudes reshuffled
    m2, _ = prune_surviving(w2, m1, 0.75)
    assert sum(int(m.sum()) for m in m2.values()) == 24
    for n in w:
        assert not torch.any(m2[n] & ~m1[n])
    with pytest.raises(SparseforgeError):
        prune_surviving(w2, m2, 0.5)


def test_imp_converges_on_digits(digits):
    """Lottery ticket with late rewinding at 80% sparsity keeps digits accuracy high."""
    model = _model(5, hidden=(64, 64))
    data = (digits.x_train, digits.y_train)
    test = (digits.x_test, digits.y_test)

    def train_fn(m, opt, info):
        train(m, data, epochs=6, optimizer=opt, batch_size=64, seed=info.round, progress=False)

    masks, history = imp(
        model, _sgd, train_fn, final_sparsity=0.8, rounds=2, rewind_step=10, eval_fn=lambda m: evaluate(m, test)[1]
    )
    accs = [r.eval_result for r in history.rounds]
    assert accs[0] > 0.9
    assert accs[-1] > 0.9, accs
    assert masks.sparsity() == pytest.approx(0.8, abs=1e-3)
