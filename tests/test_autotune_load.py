"""Decisions under load: the cost model, noise detection, repeated rounds, the cost-model
fallback, the under-load flag, retune() and argument checks. Every timing is stubbed
(``autotune._timing_round``), so nothing here depends on the clock or on the machine's load."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from conftest import stub_timing_rounds
from sparseforge.errors import SparseforgeError
from sparseforge.inference import (
    Bitmask,
    CompactCSR,
    PackedNM,
    SparseLinear,
    autotune,
    convert,
    kernels,
    kernels_available,
    load_converted,
    retune,
    save_converted,
)

needs_kernels = pytest.mark.skipif(not kernels_available(), reason="kernels unavailable")


def pruned(layer: nn.Module, sparsity: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        w = layer.weight
        k = int(sparsity * w.numel())
        thr = w.abs().flatten().kthvalue(k).values
        w[w.abs() <= thr] = 0.0
    return layer


def weight(sparsity: float = 0.5, rows: int = 64, cols: int = 64) -> torch.Tensor:
    return pruned(nn.Linear(cols, rows), sparsity).weight.detach()


class Rounds:
    """A ``_timing_round`` stub: hands out the given (times, wait) per call, the last one forever.

    ``times`` maps a variant to its ms; a float is one call, a list is several calls; a variant
    missing from ``times`` gets ``default``."""

    def __init__(self, *rounds: tuple[dict, float], default: float = 10.0) -> None:
        self.rounds = list(rounds)
        self.default = default
        self.calls: list[list[str]] = []

    def __call__(self, fns, reps):
        times, wait = self.rounds[min(len(self.calls), len(self.rounds) - 1)]
        self.calls.append(sorted(fns))
        out = {}
        for k in fns:
            v = times.get(k, times.get("*", self.default))
            out[k] = list(v) if isinstance(v, (list, tuple)) else [float(v)] * 3
        return autotune.TimingRound(out, wait=wait, wall_s=0.01)


@pytest.fixture
def stub(monkeypatch):
    """Install a Rounds stub, no pauses, and a cost model that predicts ``predicted`` for every format."""
    pauses: list[float] = []
    monkeypatch.setattr(autotune, "_pause", pauses.append)

    def install(*rounds, predicted: float | None = None, default: float = 10.0) -> Rounds:
        r = Rounds(*rounds, default=default)
        stub_timing_rounds(monkeypatch, r)
        if predicted is not None:
            monkeypatch.setattr(
                autotune,
                "predicted_speedups",
                lambda shape, formats, sizes, threads=None: {n: {b: predicted for b in sizes} for n in formats},
            )
        r.pauses = pauses
        return r

    return install


QUIET, BUSY = 0.0, 0.9  # run-queue wait fractions


# ------------------------------------------------------------------------------------ cost model
def test_cost_model_follows_bytes_and_multiply_adds():
    shape = (1024, 1024)
    dense1, dense64 = (autotune.predict_ms(None, shape, b, threads=1) for b in (1, 64))
    assert dense1 == pytest.approx(
        (4 * 1024 * 1024 + 4 * 2048) / 29e6 + 0.002, rel=0.05
    )  # dense batch 1: streaming 4 MB
    assert dense64 > 4 * dense1  # multiply-adds grow with the batch
    times = {
        s: autotune.predict_ms(CompactCSR.from_dense(weight(s, *shape)), shape, 1, threads=2) for s in (0.5, 0.9, 0.97)
    }
    assert times[0.97] < times[0.9] < times[0.5]
    assert (
        dense1 / times[0.9] > 1.8 and dense1 / times[0.5] < 1.0
    )  # 2 threads: 90 % wins at batch 1, 50 % loses (as calibrated)
    w = weight(0.9, *shape)
    two = autotune.predict_ms(CompactCSR.from_dense(w), shape, 64, threads=2)
    assert two < autotune.predict_ms(CompactCSR.from_dense(w), shape, 64, threads=1)  # work is shared by the threads
    # bitmask streams fewer bytes than CSR at 50 %: the model predicts it faster at batch 1
    w50 = weight(0.5, *shape)
    assert autotune.predict_ms(Bitmask.from_dense(w50), shape, 1, 1) < autotune.predict_ms(
        CompactCSR.from_dense(w50), shape, 1, 1
    )
    sp = autotune.predicted_speedups(shape, {"csr": CompactCSR.from_dense(w)}, (1, 16))
    assert set(sp["csr"]) == {1, 16} and all(v > 0 for v in sp["csr"].values())


@needs_kernels
def test_cost_model_drops_hopeless_candidates_and_orders_the_rest(stub):
    """A 2:4 layer: N:M runs on the Numba kernels, predicted several times slower than dense, so it
    is not timed (without the cost model it would be: every candidate format was timed)."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    w[:, 1::2] = 0.0  # 2:4 (half of each group of 4 kept)
    assert any(isinstance(f, PackedNM) for f in autotune.candidate_formats(w))
    rounds = stub(({"dense": 10.0, "*": 5.0}, QUIET))
    choice = autotune.measure_layer(w, None, (1, 16), max_formats=1)
    timed = set().union(*rounds.calls)
    nm = [n for n in choice.predicted if n.startswith("nm")]
    assert nm and all(max(choice.predicted[n].values()) < autotune.PRUNE_BELOW for n in nm)
    assert not timed & set(nm) and {"dense", "csr", "bitmask"} <= timed
    assert "not timed" in choice.reason and nm[0] in choice.reason
    # tiny layers: fixed overheads dominate the model, every candidate is timed
    rounds.calls.clear()
    autotune.measure_layer(w[:8, :8].contiguous(), None, (1,), max_formats=1)
    assert any(n.startswith("nm") for n in set().union(*rounds.calls))


# ------------------------------------------------------------------------------------ noise detection
def test_noise_detection_from_run_queue_wait_and_spread():
    calm = autotune.TimingRound({"dense": [10.0, 10.2, 10.1], "csr": [5.0, 5.1, 5.0]}, wait=0.01)
    assert calm.noise() is None
    waited = autotune.TimingRound(calm.times, wait=0.6)
    assert "waited for a CPU 60%" in waited.noise()
    spread = autotune.TimingRound({"dense": [10.0, 10.2, 10.1], "csr": [1.0, 5.0, 5.0]}, wait=None)
    assert "csr's median call 5.00x its fastest" in spread.noise()
    tiny = autotune.TimingRound({"dense": [0.001, 0.004, 0.004]}, wait=0.0)  # below SPREAD_MIN_MS: jitter, not load
    assert tiny.noise() is None
    # the probe itself: this process's threads, in ns (Linux), and a real round records it
    probe = autotune.run_queue_wait_ns()
    assert probe is None or (probe and all(isinstance(v, int) and v >= 0 for v in probe.values()))
    r = autotune._timing_round({"a": lambda: None}, 2)
    assert len(r.times["a"]) >= 2 and r.wall_s > 0 and (r.wait is None or r.wait >= 0)


# ------------------------------------------------------------------------------------ quiet decisions
@pytest.mark.parametrize("dense_ms, expect", [(11.3, "sparse"), (10.7, "dense")])
def test_near_threshold_on_a_quiet_machine_both_sides_of_the_margin(stub, dense_ms, expect):
    """1.13x clears the 10 % margin (also on the fastest calls of the second, longer timing), 1.07x does not."""
    rounds = stub(({"dense": dense_ms, "*": 10.0}, QUIET))
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert choice.choices == {16: expect} and not choice.under_load
    assert len(rounds.calls) == 2 and "dense" in rounds.calls[1]  # first pass + the close call's confirmation


def test_noisy_round_is_repeated_and_the_quiet_one_decides(stub):
    """The first round (busy machine) makes csr look 3x faster; the repeat is quiet and says 0.5x:
    dense, not flagged, and a pause between the two rounds."""
    rounds = stub(({"dense": 30.0, "*": 10.0}, BUSY), ({"dense": 10.0, "*": 20.0}, QUIET), predicted=1.0)
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert choice.choices == {16: "dense"} and choice.packed is None and not choice.under_load
    assert len(rounds.calls) == 2 and len(rounds.pauses) == 1
    # ... and the other way round: a noisy round where sparse loses does not keep dense
    rounds = stub(({"dense": 10.0, "*": 30.0}, BUSY), ({"dense": 30.0, "*": 10.0}, QUIET), predicted=1.0)
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert choice.choices == {16: "sparse"} and not choice.under_load


def test_a_decision_is_never_taken_from_one_noisy_round(stub):
    """Always noisy: LOAD_ROUNDS rounds, pauses growing in between, then the choice is flagged."""
    rounds = stub(({"dense": 10.0, "*": 20.0}, BUSY), predicted=1.0)
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert len(rounds.calls) == autotune.LOAD_ROUNDS and len(rounds.pauses) == autotune.LOAD_ROUNDS - 1
    assert choice.under_load and "3 noisy rounds" in choice.load_note and "UNDER LOAD" in choice.reason
    assert choice.choices == {16: "dense"}


# ------------------------------------------------------------------------------------ decisions under load
def test_always_noisy_timings_fall_back_to_a_confident_cost_model(stub):
    """OpenMP kernels under oversubscription: every round says csr is 2x *slower* than dense, the
    cost model predicts 5x (far above the margin): sparse, flagged, the note names the model."""
    stub(({"dense": 10.0, "*": 20.0}, BUSY), predicted=5.0)
    choice = autotune.measure_layer(weight(0.9), None, (1, 16), max_formats=1)
    assert choice.packed is not None and set(choice.choices.values()) == {"sparse"}
    assert choice.under_load and "cost model" in choice.load_note
    timed_as = autotune._describe(choice.packed)  # the name with the format's parameters
    assert choice.timings_ms["dense"][16] / choice.timings_ms[timed_as][16] == pytest.approx(5.0)


def test_always_noisy_and_unconfident_model_keeps_the_fastest_call_estimate(stub):
    """Predicted 1.5x is not far enough above the margin to overrule the timings: the fastest calls
    over all rounds decide (here csr 0.8x: dense; csr 2x: sparse)."""
    stub(({"dense": [10.0, 14.0, 14.0], "*": [12.5, 13.0, 13.0]}, BUSY), predicted=1.5)
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert choice.choices == {16: "dense"} and choice.under_load and "fastest calls" in choice.load_note
    stub(({"dense": [10.0, 14.0, 14.0], "*": [5.0, 6.0, 6.0]}, BUSY), predicted=1.5)
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert choice.choices == {16: "sparse"} and choice.under_load


@pytest.mark.parametrize("fastest, median, expect", [(1.25, 1.0, "dense"), (1.25, 1.2, "sparse"), (1.05, 1.3, "dense")])
def test_close_calls_under_load_must_win_on_both_estimates(stub, fastest, median, expect):
    """Near the threshold under load the less favourable of the fastest-call and the median ratio counts."""
    stub(
        ({"dense": [10.0 * fastest, 10.0 * median * 1.5, 10.0 * median * 1.5], "*": [10.0, 15.0, 15.0]}, BUSY),
        predicted=1.2,
    )
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert choice.choices == {16: expect} and choice.under_load


# ------------------------------------------------------------------------------------ convert and retune
def mlp() -> nn.Sequential:
    return nn.Sequential(pruned(nn.Linear(48, 64), 0.9), nn.ReLU(), pruned(nn.Linear(64, 24), 0.9, seed=1))


@needs_kernels
def test_convert_reports_and_warns_about_decisions_under_load(stub):
    stub(({"dense": 10.0, "*": 20.0}, BUSY), predicted=5.0)
    with pytest.warns(UserWarning, match=r"2 of 2 layers were decided while other processes kept the CPU busy.*retune"):
        fast, report = convert(mlp(), batch_sizes=(1, 8))
    assert report.under_load_layers == ["0", "2"] and all(d.under_load and d.predicted for d in report.layers)
    text = str(report)
    assert "2 decided under load" in text and "(UNDER LOAD)" in text
    stub(({"dense": 10.0, "*": 5.0}, QUIET))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no under-load warning on a quiet machine
        _, quiet = convert(mlp(), batch_sizes=(1, 8))
    assert quiet.under_load_layers == [] and "under load" not in str(quiet)


@needs_kernels
def test_retune_rebuilds_sparse_and_dense_kept_layers(monkeypatch):
    """Converted with the rule (CSR for the 90 % layer, the 50 % one kept dense); re-tuned where
    dense wins for the first layer and sparse for the second: they swap, outputs unchanged, and
    the batch sizes convert tuned for are measured again."""
    torch.manual_seed(0)
    model = nn.Sequential(pruned(nn.Linear(48, 64), 0.9), nn.ReLU(), pruned(nn.Linear(64, 24), 0.5, seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast, first = convert(model, autotune=False, batch_sizes=(1, 8), fuse=False)
    assert first.sparse_layers == ["0"] and isinstance(fast[2], nn.Linear)
    seen_rows = set()

    def timing(fns, reps):
        y = fns["dense"]()  # tells the layer (output width) and the batch rows
        seen_rows.add(y.shape[0])
        sparse_ms = 2.0 if y.shape[-1] == 24 else 30.0  # the second layer now wins, the first loses
        return autotune.TimingRound({k: [10.0 if k == "dense" else sparse_ms] * 3 for k in fns}, wait=0.0)

    stub_timing_rounds(monkeypatch, timing)
    with pytest.warns(UserWarning, match="1 of 2 layers run dense: 0"):
        again, report = retune(fast)
    assert again is fast and seen_rows == {1, 8}  # in place by default
    assert isinstance(again[0], nn.Linear) and isinstance(again[2], SparseLinear)
    assert [d.action for d in report.layers] == ["dense", "sparse"] and report.batch_sizes == (1, 8)
    with torch.inference_mode():
        x = torch.randn(5, 48)
        torch.testing.assert_close(again(x), model(x), rtol=1e-5, atol=1e-5)


@needs_kernels
def test_retune_works_on_a_loaded_model_and_on_conv_layers(stub, tmp_path, monkeypatch):
    torch.manual_seed(3)
    model = nn.Sequential(pruned(nn.Conv2d(16, 8, 1), 0.9), nn.ReLU(), pruned(nn.Linear(8, 8), 0.9, seed=2))
    stub(({"dense": 10.0, "*": 2.0}, QUIET))
    fast, _ = convert(model, batch_sizes=(4, 32))
    save_converted(tmp_path / "m.safetensors", fast)
    loaded = load_converted(tmp_path / "m.safetensors", nn.Sequential(nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Linear(8, 8)))
    assert isinstance(loaded[0], SparseLinear)
    seen: list[tuple[int, ...]] = []
    real = autotune.measure_layer

    def spy(w, bias, sizes, **kw):
        seen.append(tuple(sizes))
        return real(w, bias, sizes, **kw)

    import importlib

    stub(({"dense": 2.0, "*": 10.0}, QUIET))  # now dense wins everywhere
    monkeypatch.setattr(importlib.import_module("sparseforge.inference.convert"), "measure_layer", spy)
    with pytest.warns(UserWarning, match="nothing converted"):
        copy_, report = retune(loaded, inplace=False)
    assert seen and all(s == (32,) for s in seen)  # after loading: the plan's bounds (all rows <= 32 in one bucket)
    assert isinstance(loaded[0], SparseLinear)  # inplace=False left it alone
    assert isinstance(copy_[0], nn.Conv2d) and copy_[0].kernel_size == (1, 1) and isinstance(copy_[2], nn.Linear)
    with torch.inference_mode():
        x = torch.randn(2, 16, 3, 8)
        torch.testing.assert_close(copy_(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="nothing converted"):
        _, report = retune(loaded, batch_sizes=[7, 1])
    assert report.batch_sizes == (1, 7)


# ------------------------------------------------------------------------------------ argument checks
def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_convert_refuses_what_is_not_a_module_or_has_no_values():
    with pytest.raises(SparseforgeError) as e:
        convert({"0.weight": torch.zeros(2, 2)})
    assert one_line(e) == "model is a dict; allowed: a torch.nn.Module"
    with pytest.raises(SparseforgeError) as e:
        retune([nn.Linear(2, 2)])
    assert one_line(e) == "model is a list; allowed: a torch.nn.Module"
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(SparseforgeError, match=r"parameter '0.weight' is on the meta device") as e:
        convert(meta)
    one_line(e)
    with pytest.raises(SparseforgeError, match="meta device"):
        retune(meta)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"batch_sizes": (1.5,)},
            r"batch_sizes=\(1.5,\) is not allowed \(1.5\); allowed: a non-empty tuple or list of ints >= 1",
        ),
        ({"batch_sizes": ("16",)}, "batch_sizes"),
        ({"batch_sizes": (True,)}, "batch_sizes"),
        ({"batch_sizes": 16}, r"batch_sizes=16 is not allowed; allowed: a non-empty tuple"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"batch_sizes": (0, 4)}, "batch_sizes"),
        ({"reps": True}, r"reps=True is not allowed; allowed: an int in \[1, 1000\]"),
        ({"reps": 0}, "reps=0"),
        ({"reps": 2.0}, "reps=2.0"),
        ({"reps": 10**6}, "reps=1000000"),
        ({"max_formats": True}, r"max_formats=True is not allowed; allowed: 1 or 2"),
        ({"min_sparsity": math.nan}, r"min_sparsity=nan is outside the allowed range \[0, 1\)"),
        ({"min_sparsity": True}, "min_sparsity=True"),
        ({"autotune": "yes"}, r"autotune='yes' is not allowed; allowed: True or False"),
        ({"inplace": 1}, r"inplace=1 is not allowed; allowed: True or False"),
    ],
)
def test_convert_and_retune_refuse_bad_arguments(kwargs, match):
    model = mlp()
    with pytest.raises(SparseforgeError, match=match) as e:
        convert(model, **kwargs)
    one_line(e)
    if "autotune" not in kwargs:
        with pytest.raises(SparseforgeError, match=match.split("=")[0]):
            retune(model, **kwargs)


def test_under_load_a_measurement_far_above_the_model_is_capped(stub):
    """A busy machine inflates measured speedups (dense suffers more); under load a measurement is
    trusted up to MODEL_SLACK x the prediction, so it cannot pick one sparse format over another
    that the model rates higher. On a quiet machine the measurement stands as it is."""
    stub(({"dense": [30.0, 40.0, 40.0], "*": [10.0, 12.0, 12.0]}, BUSY), predicted=1.6)  # measured 3x
    choice = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    name = next(n for n in choice.timings_ms if n != "dense")
    assert choice.under_load and "capped" in choice.load_note
    assert choice.timings_ms[name][16] == pytest.approx(30.0 / (autotune.MODEL_SLACK * 1.6))
    stub(({"dense": [30.0, 30.0, 30.0], "*": [10.0, 10.0, 10.0]}, QUIET), predicted=1.6)
    quiet = autotune.measure_layer(weight(), None, (16,), max_formats=1)
    assert not quiet.under_load and quiet.timings_ms[name][16] == pytest.approx(10.0)


# ------------------------------------------------------------------------------------ AVX-512 bitmask SpMV
needs_avx512_bitmask = pytest.mark.skipif(
    not kernels.bitmask_spmv_avx512(), reason="the C kernels have no AVX-512 bitmask SpMV on this machine"
)


@needs_avx512_bitmask
def test_cost_model_of_the_avx512_bitmask_spmv():
    """Its work overlaps the value stream: at 50 % (measured 1.6-2.4x of dense on 2 threads for
    layers past L2) the prediction is near the bytes ratio, not the ~0.7x of the AVX2 kernel's
    model, which would cap such a measurement under load; at 90 % the 16-column steps bound it,
    so a second thread helps."""
    shape = (1024, 2816)
    w50 = weight(0.5, *shape)
    bm = Bitmask.from_dense(w50)
    dense = autotune.predict_ms(None, shape, 1, threads=2)
    fast = dense / autotune.predict_ms(bm, shape, 1, threads=2)
    bytes_ratio = (4 * shape[0] * shape[1]) / bm.nbytes
    assert 1.7 <= fast <= bytes_ratio
    kernels.set_spmv_variant(bm, 1)  # pinned to the AVX2 byte expand: the old model
    try:
        assert dense / autotune.predict_ms(bm, shape, 1, threads=2) < 1.0
    finally:
        kernels.set_spmv_variant(bm, None)
    bm90 = Bitmask.from_dense(weight(0.9, *shape))
    one, two = (autotune.predict_ms(bm90, shape, 1, threads=t) for t in (1, 2))
    assert one > 1.5 * two
    assert autotune.predict_ms(bm, shape, 16, threads=2) > autotune.predict_ms(bm, shape, 1, threads=2)


@needs_avx512_bitmask
def test_under_load_the_avx512_bitmask_is_not_capped_back_to_dense(stub):
    """Every round noisy, the bitmask measured 1.8x of dense at batch 1 (CSR 0.5x): the cost model
    of the AVX-512 kernel agrees, so convert keeps the bitmask instead of capping it below dense."""
    stub(({"dense": [10.0, 12.0, 12.0], "bitmask": [5.5, 6.5, 6.5], "*": [20.0, 24.0, 24.0]}, BUSY))
    choice = autotune.measure_layer(weight(0.5, 1024, 2816), None, (1,), max_formats=1)
    assert isinstance(choice.packed, Bitmask) and choice.choices == {1: "sparse"}
    assert choice.under_load and choice.predicted["bitmask"][1] >= 1.7
