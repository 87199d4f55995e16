"""Degenerate and inconsistent arguments are refused where they enter, before any work.

Every case must raise :class:`SparseforgeError` (a ``ValueError``) with a one-line message that
names the bad value; the behaviour tests also check that nothing was touched (weights, hooks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import sparseforge as sf
from sparseforge import NM, Block, Channel, MaskState, SparseforgeError, Sparsifier
from sparseforge.algorithms import GMP, SET, GraNet, NMTraining, RigL, SRigL, imp, init_sparse, sparse_model_soups
from sparseforge.algorithms.base import Algorithm
from sparseforge.algorithms.imp import prune_surviving
from sparseforge.algorithms.soups import average_states
from sparseforge.distributed import all_reduce_scores, broadcast_masks, shared_seed
from sparseforge.distributions import erk, kept_counts_from_densities, uniform
from sparseforge.errors import check_float, check_int
from sparseforge.schedules import cosine_drop_fraction, cubic_sparsity
from sparseforge.scores import random_scores
from sparseforge.structures import topk_mask
from sparseforge.training import batches, evaluate, train


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def sgd(m: nn.Module, **kw: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=0.1, **kw)


def refused(call: Callable[[], object], *needles: str) -> str:
    """Run ``call``; it must raise a one-line SparseforgeError containing every needle."""
    with pytest.raises(SparseforgeError) as err:
        call()
    msg = str(err.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def hooks(opt: torch.optim.Optimizer) -> int:
    return len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def unchanged(m: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


# ---------------------------------------------------------------------------------------------
# The cases named in the brief
# ---------------------------------------------------------------------------------------------


def test_nm_zero_kept_is_refused_and_prune_leaves_the_weights() -> None:
    refused(lambda: NM(0, 4), "n_keep=0", "1 <= n_keep <= m")
    m = model()
    before = snapshot(m)
    refused(lambda: sf.prune(m, structure="0:4"), "n_keep=0")
    assert unchanged(m, before)  # before: every weight became 0


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: NM(True, 4), "n_keep=True"),
        (lambda: NM(2.0, 4), "n_keep=2.0"),
        (lambda: NM(2, True), "m=True"),
        (lambda: NM(5, 4), "n_keep=5"),
        (lambda: Block(True, 2), "rows=True"),
        (lambda: Block(2, 0), "cols=0"),
        (lambda: Block(2, 1.5), "cols=1.5"),
        (lambda: Channel(True), "dim=True"),
        (lambda: Channel(-1), "dim=-1"),
        (lambda: topk_mask(torch.rand(2, 3), True), "k=True"),
        (lambda: topk_mask(torch.rand(2, 3), 1.5), "k=1.5"),
    ],
)
def test_structure_arguments(call: Callable[[], object], needle: str) -> None:
    refused(call, needle)


def test_optimizer_must_own_every_masked_parameter() -> None:
    m = model()
    masks = sf.prune(m, 0.5)
    before = snapshot(m)
    other = sgd(model(1))
    refused(lambda: Sparsifier(m, other, masks), "parameter '0.weight'", "param_groups")
    partial = torch.optim.SGD(m[0].parameters(), lr=0.1)  # misses the second masked layer
    refused(lambda: Sparsifier(m, partial, masks), "parameter '2.weight'")
    assert hooks(other) == 0 and hooks(partial) == 0
    assert unchanged(m, before)


def test_one_sparsifier_per_optimizer_until_finalize() -> None:
    m = model()
    opt = sgd(m, momentum=0.9)
    first = Sparsifier(m, opt, sf.prune(m, 0.5))
    refused(lambda: Sparsifier(m, opt, sf.prune(m, 0.5)), "already has an attached Sparsifier", "finalize()")
    assert hooks(opt) == 2  # the refused one registered nothing
    first.finalize()
    second = Sparsifier(m, opt, sf.prune(m, 0.5))
    assert second.attached and hooks(opt) == 2
    # No global state: another optimizer takes its own Sparsifier while this one is attached.
    m2 = model(1)
    opt2 = sgd(m2)
    Sparsifier(m2, opt2, sf.prune(m2, 0.5)).finalize()
    second.finalize()


def test_nm_training_and_sparsifier_do_not_share_an_optimizer() -> None:
    m = model()
    opt = sgd(m)
    trainer = NMTraining(m, opt, "2:4")
    refused(lambda: Sparsifier(m, opt, sf.prune(model(), 0.5)), "NMTraining")
    refused(lambda: NMTraining(m, opt, "2:4"), "already has an attached NMTraining")
    trainer.finalize()
    Sparsifier(m, opt, sf.prune(m, 0.5)).finalize()


@pytest.mark.parametrize("bad", [None, {"0.weight": torch.ones(8, 8, dtype=torch.bool)}, "masks"])
def test_masks_must_be_a_mask_state(bad: object) -> None:
    m = model()
    msg = refused(lambda: Sparsifier(m, sgd(m), bad), "allowed: a MaskState, e.g. from sparseforge.prune(...)")
    if bad is None:
        assert msg == "masks=None; allowed: a MaskState, e.g. from sparseforge.prune(...)"
    refused(lambda: Sparsifier(m, sgd(m), MaskState()), "no layer")


def test_meta_device_models_are_refused() -> None:
    meta = model().to("meta")
    expected = "parameter '0.weight' is on the meta device; load real weights first"
    refused(lambda: sf.prune(meta, 0.5), expected)
    refused(lambda: init_sparse(meta, 0.5), expected)
    masks = MaskState({"0.weight": torch.ones(8, 8, dtype=torch.bool)})
    refused(lambda: Sparsifier(meta, sgd(meta), masks), expected)
    refused(lambda: masks.apply(meta), expected)
    refused(lambda: NMTraining(meta, sgd(meta), "2:4"), expected)


def test_failed_algorithm_check_leaves_no_hook_and_no_change() -> None:
    m = model()
    masks = init_sparse(m, 0.5)  # unstructured: rows keep different counts
    opt = sgd(m, momentum=0.9)
    before = snapshot(m)
    refused(lambda: Sparsifier(m, opt, masks, SRigL(end=10, every=2)), "constant fan-in")
    assert hooks(opt) == 0 and unchanged(m, before)
    Sparsifier(m, opt, masks).finalize()  # the optimizer is still free


def test_algorithm_must_be_an_algorithm() -> None:
    m = model()
    refused(lambda: Sparsifier(m, sgd(m), sf.prune(m, 0.5), "rigl"), "algorithm is a str")


# ---------------------------------------------------------------------------------------------
# The rest of the family, one line each
# ---------------------------------------------------------------------------------------------

X, Y = torch.randn(20, 8), torch.randint(0, 4, (20,))


def _train(make_opt: Callable[[nn.Module], Any] = sgd, **kw: Any) -> object:
    m = kw.pop("model", None) or model()
    args: dict[str, Any] = {"epochs": 1, "optimizer": make_opt(m), "progress": False}
    args.update(kw)
    data = args.pop("data", (X, Y))
    return train(m, data, **args)


def _gmp_from_sparser() -> object:
    m = model()
    return Sparsifier(m, sgd(m), init_sparse(m, 0.9), GMP(0.5, start=0, end=10, every=2))


CASES: list[tuple[str, Callable[[], object], str]] = [
    # prune / init_sparse
    ("prune sparsity str", lambda: sf.prune(model(), "0.5"), "sparsity='0.5'"),
    ("prune sparsity bool", lambda: sf.prune(model(), True), "sparsity=True"),
    ("prune seed float (ignored by magnitude)", lambda: sf.prune(model(), 0.5, seed=1.5), "seed=1.5"),
    ("init_sparse seed None", lambda: init_sparse(model(), 0.5, seed=None), "seed=None"),
    ("prune min_density < 0", lambda: sf.prune(model(), 0.5, min_density=-1), "min_density=-1"),
    ("prune min_density NaN", lambda: sf.prune(model(), 0.5, distribution="global", min_density=math.nan), "nan"),
    ("prune synflow_rounds 0", lambda: sf.prune(model(), 0.5, synflow_rounds=0), "synflow_rounds=0"),
    ("prune model not a module", lambda: sf.prune("net", 0.5), "model is a str"),
    ("prune include_types names", lambda: sf.prune(model(), 0.5, include_types=("Linear",)), "include_types"),
    ("prune exclude single str", lambda: sf.prune(model(), 0.5, exclude="0"), "exclude='0'"),
    (
        "prune empties a layer",
        lambda: sf.prune(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 200)), 0.9),
        "keeps no weight of '0.weight'",
    ),
    # MaskState
    ("MaskState step < 0", lambda: MaskState(step=-1), "step=-1"),
    ("MaskState step float", lambda: MaskState(step=1.5), "step=1.5"),
    ("MaskState step NaN", lambda: MaskState(step=math.nan), "step=nan"),
    ("MaskState target NaN", lambda: MaskState(targets={"a": math.nan}), "targets['a']=nan"),
    ("MaskState 0.5 mask", lambda: MaskState({"a": torch.tensor([0.5, 0.0])}), "values other than 0 and 1"),
    ("MaskState int name", lambda: MaskState({1: torch.ones(2, dtype=torch.bool)}), "mask name 1"),
    ("MaskState list", lambda: MaskState([("a", torch.ones(2))]), "masks is a list"),
    ("MaskState load step str", lambda: MaskState.from_state_dict({"masks": {}, "step": "x"}), "step='x'"),
    ("MaskState unknown layer", lambda: MaskState({"a": torch.ones(2, dtype=torch.bool)}).sparsity("b"), "'b'"),
    # Sparsifier
    ("Sparsifier empty MaskState", lambda: _sparsifier(masks=MaskState()), "masks has no layer"),
    ("zero_state unknown", lambda: _sparsifier(zero_state="fast"), "zero_state='fast'"),
    ("change_masks non-tensor", lambda: _sparsifier().change_masks({"0.weight": [True]}), "'0.weight'"),
    (
        "change_masks stray grown_values",
        lambda: _sparsifier().change_masks(
            {"0.weight": torch.ones(8, 8, dtype=torch.bool)}, {"2.weight": torch.ones(4, 8)}
        ),
        "grown_values names '2.weight'",
    ),
    ("load_state_dict not a dict", lambda: _sparsifier().load_state_dict([1]), "Sparsifier.state_dict()"),
    # schedules
    ("cubic step NaN", lambda: cubic_sparsity(math.nan, initial=0, final=0.5, start=0, end=10), "step=nan"),
    ("cosine step str", lambda: cosine_drop_fraction("a", alpha=0.3, end=10), "step='a'"),
    # DST / GMP / GraNet / SRigL
    ("RigL seed float", lambda: RigL(end=10, every=2, seed=1.5), "seed=1.5"),
    ("SET seed None", lambda: SET(end=10, every=2, seed=None), "seed=None"),
    ("RigL never updates", lambda: RigL(total_steps=100), "every=100 and total_steps=100 sets end=75"),
    ("SET every >= end", lambda: SET(end=10, every=10), "allowed: every < 10"),
    ("SRigL gamma str", lambda: SRigL(end=10, every=2, gamma_sal="a"), "gamma_sal='a'"),
    ("GMP end float", lambda: GMP(0.5, start=0, end=1.5), "end=1.5"),
    (
        "GMP min_density > 1 - final",
        lambda: GMP(0.5, start=0, end=10, distribution="global", min_density=0.6),
        "min_density=0.6",
    ),
    ("GMP min_density NaN", lambda: GMP(0.5, start=0, end=10, min_density=math.nan), "min_density=nan"),
    ("GMP final below start", _gmp_from_sparser, "final_sparsity=0.5 is below"),
    ("GraNet prune_end 0", lambda: GraNet(0.5, prune_end=0, end=10, every=2), "prune_end=0"),
    (
        "GraNet names its window",
        lambda: GraNet(0.5, prune_start=10, prune_end=5, end=20, every=2),
        "prune_end=5 is before prune_start=10",
    ),
    # distributions
    ("uniform negative dim", lambda: uniform({"a": (-2, -2)}, 0.5), "(-2, -2)"),
    ("erk empty shape", lambda: erk({"a": ()}, 0.5), "shape ()"),
    ("uniform list of shapes", lambda: uniform([(4, 4)], 0.5), "shapes is a list"),
    ("kept_counts over capacity", lambda: kept_counts_from_densities({"a": (2,)}, {"a": 1.0}, 5), "total_kept=5"),
    ("kept_counts NaN density", lambda: kept_counts_from_densities({"a": (4,)}, {"a": math.nan}, 2), "nan"),
    # scores
    ("random_scores seed float", lambda: random_scores({"w": torch.zeros(2)}, seed=0.5), "seed=0.5"),
    # training
    ("train epochs float", lambda: _train(epochs=1.5), "epochs=1.5"),
    ("train epochs bool", lambda: _train(epochs=True), "epochs=True"),
    ("train batch float", lambda: _train(batch_size=2.5), "batch_size=2.5"),
    ("train empty pair", lambda: _train(data=(X[:0], Y[:0])), "0 samples"),
    ("train empty iterable", lambda: _train(data=[]), "no batch in epoch 1"),
    ("train bare tensor", lambda: _train(data=X), "train_data is a Tensor"),
    ("train lr 0", lambda: _train(lambda m: torch.optim.SGD(m.parameters(), lr=0.0)), "lr=0.0"),
    ("train lr < 0", lambda: _train(_with_lr(-0.1)), "'lr']=-0.1"),
    ("train lr NaN", lambda: _train(_with_lr(math.nan)), "'lr']=nan"),
    ("train foreign optimizer", lambda: _train(optimizer=sgd(model(1))), "none of the model's parameters"),
    ("train optimizer None", lambda: _train(optimizer=None), "optimizer is a NoneType"),
    ("train seed None", lambda: _train(seed=None), "seed=None"),
    ("train loss_fn None", lambda: _train(loss_fn=None), "loss_fn=None"),
    ("train scheduler str", lambda: _train(scheduler="cosine"), "scheduler is a str"),
    ("evaluate batch 0", lambda: evaluate(model(), (X, Y), batch_size=0), "batch_size=0"),
    ("batches batch 0", lambda: list(batches((X, Y), 0)), "batch_size=0"),
    # distributed (checked even single-process)
    ("shared_seed float", lambda: shared_seed(1.5), "seed=1.5"),
    ("shared_seed bool", lambda: shared_seed(True), "seed=True"),
    ("broadcast_masks bad src", lambda: broadcast_masks({"a": torch.ones(2, dtype=torch.bool)}, src=-1), "src=-1"),
    ("all_reduce int scores", lambda: all_reduce_scores({"a": torch.ones(2, dtype=torch.long)}), "torch.int64"),
    ("all_reduce a list", lambda: all_reduce_scores([torch.ones(2)]), "scores is a list"),
    # IMP / soups / N:M training
    (
        "imp min_density str",
        lambda: imp(model(), sgd, lambda *a: None, final_sparsity=0.5, rounds=1, min_density="a"),
        "min_density='a'",
    ),
    (
        "imp foreign optimizer",
        lambda: imp(model(), lambda m: sgd(model(1)), lambda *a: None, final_sparsity=0.5, rounds=1),
        "param_groups",
    ),
    ("prune_surviving missing mask", lambda: prune_surviving({"a": torch.rand(4, 4)}, {}, 0.5), "'a'"),
    ("soups float seeds", lambda: _soups(seeds=[1.5, 2.5]), "seeds item=1.5"),
    ("soups identical ingredients", lambda: _soups(seeds=[1, 1]), "repeat seed 1"),
    ("soups eval_fn not callable", lambda: _soups(eval_fn=3), "eval_fn=3"),
    ("average_states shapes differ", lambda: average_states([{"a": torch.ones(2)}, {"a": torch.ones(3)}]), "(3,)"),
    ("NMTraining foreign optimizer", lambda: NMTraining(model(), sgd(model(1)), "2:4"), "param_groups"),
    ("NMTraining scale str", lambda: NMTraining(model(), sgd(model()), "2:4", pruned_grad_scale="a"), "'a'"),
]


def _sparsifier(masks: MaskState | None = None, **kw: Any) -> Sparsifier:
    m = model()
    return Sparsifier(m, sgd(m), sf.prune(m, 0.5) if masks is None else masks, **kw)


def _with_lr(lr: float) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(m: nn.Module) -> torch.optim.Optimizer:
        opt = sgd(m)
        opt.param_groups[0]["lr"] = lr  # torch refuses it at construction, not when set later
        return opt

    return make


def _soups(**kw: Any) -> object:
    return sparse_model_soups(
        model(), lambda m, i: sgd(m), lambda m, o, i: None, final_sparsity=0.5, cycles=1, ingredients=2, **kw
    )


@pytest.mark.parametrize(("label", "call", "needle"), CASES, ids=[c[0] for c in CASES])
def test_refused(label: str, call: Callable[[], object], needle: str) -> None:
    refused(call, needle)


def test_train_with_foreign_optimizer_changes_nothing_before_refusing() -> None:
    m = model()
    before = snapshot(m)
    refused(lambda: _train(model=m, optimizer=sgd(model(1))), "none of the model's parameters")
    assert unchanged(m, before)


# ---------------------------------------------------------------------------------------------
# Invariants of the shared checks
# ---------------------------------------------------------------------------------------------


@given(n=st.integers(-3, 10), m=st.integers(-3, 10))
def test_nm_constructs_exactly_when_1_le_n_le_m(n: int, m: int) -> None:
    if 1 <= n <= m:
        assert NM(n, m).fixed_density == n / m
    else:
        refused(lambda: NM(n, m), f"n_keep={n}", f"m={m}")


@given(value=st.one_of(st.integers(-5, 5), st.floats(allow_nan=True), st.booleans(), st.none(), st.text(max_size=2)))
def test_check_int_accepts_integers_in_range_only(value: object) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 3
    if ok:
        assert check_int(value, "x", 0, 3) == value
    else:
        refused(lambda: check_int(value, "x", 0, 3), f"x={value!r}", "[0, 3]")


@given(value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.booleans()))
def test_check_float_accepts_finite_numbers_in_range_only(value: object) -> None:
    ok = not isinstance(value, bool) and math.isfinite(value) and 0.0 <= value <= 1.0
    if ok:
        assert check_float(value, "x", low=0.0, high=1.0) == float(value)
    else:
        refused(lambda: check_float(value, "x", low=0.0, high=1.0), "x=", "[0, 1]")


class Noisy(Algorithm):
    """An algorithm writing weights outside change_masks: it must force per-step masking."""

    requires_step_masking = True

    def is_update_step(self, step: int) -> bool:
        return True

    @torch.no_grad()
    def update(self, sparsifier: Sparsifier, step: int) -> None:
        for p in sparsifier.params.values():
            p.add_(0.01)


def test_algorithm_that_writes_weights_forces_step_mode() -> None:
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    sp = Sparsifier(m, opt, sf.prune(m, 0.5), Noisy())
    assert sp.zero_state == "step" and sp.zero_state_reason == "auto: Noisy needs weights masked every step"
    for _ in range(3):
        opt.zero_grad()
        m(X).sum().backward()
        opt.step()
        # the update wrote every weight after the step; the next step's masking removes it again
    sp.finalize()
    for name, mask in sp.masks.items():
        assert torch.all(sp.params[name][~mask] == 0)
    m2 = model()
    refused(
        lambda: Sparsifier(m2, torch.optim.AdamW(m2.parameters()), sf.prune(m2, 0.5), Noisy(), zero_state="grads"),
        "needs weights masked every step",
    )


# ---------------------------------------------------------------------------------------------
# CI: a missing optional capability fails instead of skipping (tests/conftest.py: requires)
# ---------------------------------------------------------------------------------------------


def test_requires_marker_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import MISSING_IN_CI, requires

    monkeypatch.delenv("CI", raising=False)
    missing = requires(False, "numba kernels unavailable")
    assert (
        missing.name == "skipif" and missing.args == (True,) and missing.kwargs["reason"] == "numba kernels unavailable"
    )
    present = requires(True, "numba kernels unavailable")
    assert present.name == "skipif" and present.args == (False,)
    monkeypatch.setenv("CI", "true")
    missing = requires(False, "numba kernels unavailable")
    assert missing.name == MISSING_IN_CI and missing.args == ("numba kernels unavailable",)
    assert requires(True, "x").name == "skipif" and requires(True, "x").args == (False,)  # present: runs
    monkeypatch.setenv("CI", "1")  # only the exact value "true" switches, as in .ci/run
    assert requires(False, "x").name == "skipif"


def test_requires_fails_under_ci_and_skips_otherwise(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    pytester.makepyfile(
        test_kernels="""
from conftest import requires

@requires(False, "C kernels unavailable: no compiler")
def test_needs_missing():
    raise AssertionError("the body must not run")

@requires(True, "always there")
def test_needs_present():
    pass
"""
    )
    monkeypatch.delenv("CI", raising=False)
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:xdist", "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*C kernels unavailable: no compiler*"])
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest("-p", "no:cacheprovider", "-p", "no:xdist")
    result.assert_outcomes(passed=1, failed=1)  # fails before its body runs; never skips
    result.stdout.fnmatch_lines(["*CI=true and a required capability is missing: C kernels unavailable: no compiler*"])


def test_ci_script_sets_ci_before_make_test() -> None:
    from pathlib import Path

    script = (Path(__file__).parents[1] / ".ci" / "run").read_text().splitlines()
    assert "export CI=true" in script and "make test" in script
    assert script.index("export CI=true") < script.index("make test")
