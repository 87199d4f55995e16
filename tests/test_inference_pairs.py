"""The row-pair format and batched kernel (encoder regime), the fused epilogues and the fusion in convert."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import older_cpu_library, requires, stub_timing_rounds
from sparseforge.errors import SparseforgeError
from sparseforge.inference import SparseLinear, convert, load_converted, native, retune, save_converted
from sparseforge.inference.autotune import predict_ms
from sparseforge.inference.epilogue import ACTIVATIONS, activation_name_of, apply_activation
from sparseforge.inference.formats import Bitmask, CompactCSR, PairedCSR
from sparseforge.inference.kernels import (
    KernelRunner,
    pairs_padded_batch,
    sparse_matmul_tensor,
    transposed_view_ok,
)
from sparseforge.inference.modules import BatchPlan

needs_native = requires(native.native_available(), f"C kernels unavailable: {native.native_reason()}")

#: every batch size class of the tiling: below, at and above each tile width and 128-multiple
BATCHES = (1, 2, 7, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 143, 144, 255, 256, 257, 511, 512, 513)


def _weight(rows: int, cols: int, density: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[torch.rand(rows, cols, generator=g) >= density] = 0.0
    return w


def _close(got: torch.Tensor, ref: torch.Tensor, cols: int) -> None:
    # fp32 sums of `cols` products in another order: scale the tolerance with sqrt(cols)
    tol = 2e-6 * max(1.0, float(np.sqrt(cols))) * max(1.0, float(ref.abs().max()))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=tol)


# ------------------------------------------------------------------------------------ format
@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 300),
    density=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]),
    cb=st.sampled_from([1, 7, 64, 256]),
    group=st.sampled_from([2, 4, 64]),
    share=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_pairs_round_trip_is_exact(rows, cols, density, cb, group, share, seed):
    w = _weight(rows, cols, density, seed)
    fmt = PairedCSR.from_dense(w, cb, group, share)
    assert torch.equal(fmt.to_dense(), w)
    back = PairedCSR.from_arrays((rows, cols), fmt.arrays(), fmt.params())
    assert torch.equal(back.to_dense(), w) and back.params() == fmt.params()
    # a shared column holds two values under one column byte
    shared = int(fmt.counts[..., 0].sum())
    assert fmt.nnz == int((w != 0).sum()) and fmt.cols.shape[0] == fmt.nnz - shared
    assert shared == 0 or share


def test_pairs_counts_by_hand():
    # rows 0 and 1 share column 1 (values 2, 4); row 0 alone keeps column 0, row 1 alone column 3
    w = torch.tensor([[1.0, 2.0, 0.0, 0.0], [0.0, 4.0, 0.0, 5.0], [0.0, 0.0, 6.0, 0.0]])
    fmt = PairedCSR.from_dense(w, cb=4, group=4)
    assert fmt.counts.tolist() == [[[[1, 1, 1], [0, 1, 0]]]]  # pair 1 = row 2 + the padding row
    assert fmt.cols.tolist() == [1, 0, 3, 2] and fmt.values.tolist() == [2.0, 4.0, 1.0, 5.0, 6.0]
    alone = PairedCSR.from_dense(w, cb=4, group=4, share=False)
    assert alone.counts.tolist() == [[[[0, 2, 2], [0, 1, 0]]]]


def test_pairs_refuses_bad_parameters_and_corrupted_arrays():
    w = _weight(6, 20, 0.5)
    with pytest.raises(SparseforgeError, match="cb=0 is not allowed"):
        PairedCSR.from_dense(w, cb=0)
    with pytest.raises(SparseforgeError, match="cb=257 is not allowed"):
        PairedCSR.from_dense(w, cb=257)
    with pytest.raises(SparseforgeError, match="group=3 is not allowed"):
        PairedCSR.from_dense(w, group=3)
    fmt = PairedCSR.from_dense(w, cb=8, group=2)
    good = fmt.arrays()

    def load(**change):
        arrays = {**good, **{k: v for k, v in change.items() if k != "params"}}
        return PairedCSR.from_arrays((6, 20), arrays, change.get("params", fmt.params()))

    cols = good["cols"].copy()
    cols[-1] = 7  # the last block holds columns 16..19: 7 would read past the input
    with pytest.raises(SparseforgeError, match="outside shape"):
        load(cols=cols)
    counts = good["counts"].copy()
    counts[0, 0, 0, 1] += 1
    with pytest.raises(SparseforgeError, match="inconsistent"):
        load(counts=counts)
    with pytest.raises(SparseforgeError, match="inconsistent"):
        load(values=good["values"][:-1])
    with pytest.raises(SparseforgeError, match="inconsistent"):
        load(counts=good["counts"].astype(np.int64))
    with pytest.raises(SparseforgeError, match="share=2"):
        load(params={**fmt.params(), "share": 2})
    dup = PairedCSR.from_dense(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), cb=2, group=2)
    twice = {"counts": np.array([[[[0, 2, 0]]]], np.int32), "cols": np.array([0, 0], np.uint8)}
    with pytest.raises(SparseforgeError, match="repeat a weight"):
        PairedCSR.from_arrays((2, 2), {**twice, "values": np.ones(2, np.float32)}, dup.params())


# ------------------------------------------------------------------------------------ kernel vs dense
@needs_native
@pytest.mark.parametrize("share, cb", [(True, 128), (False, 256), (True, 5)])
def test_pairs_kernel_matches_dense_on_every_batch_size(share, cb):
    w = _weight(37, 150, 0.5, seed=1)  # odd rows: the last pair has a padding row
    w[3] = 0.0  # an empty row
    w[8] = torch.randn(150)  # a fully dense row
    bias = torch.randn(37)
    fmt = PairedCSR.from_dense(w, cb, 4, share)
    for batch in BATCHES:
        x = torch.randn(batch, 150)
        got = sparse_matmul_tensor(fmt, x, bias=bias)
        assert got.shape == (batch, 37) and got.is_contiguous()
        _close(got, F.linear(x, w, bias), 150)


@needs_native
@pytest.mark.parametrize("shape", [(1, 1), (1, 300), (2, 1), (300, 3), (64, 512)])
@pytest.mark.parametrize("density", [0.0, 0.02, 1.0])
def test_pairs_kernel_extreme_shapes_and_densities(shape, density):
    w = _weight(*shape, density, seed=shape[0])
    fmt = PairedCSR.from_dense(w)
    for batch in (3, 64, 200):
        x = torch.randn(batch, shape[1])
        _close(sparse_matmul_tensor(fmt, x), x @ w.T, shape[1])


@needs_native
@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 90),
    cols=st.integers(1, 400),
    batch=st.integers(1, 300),
    density=st.floats(0.0, 1.0),
    act=st.sampled_from([None, *ACTIVATIONS]),
    seed=st.integers(0, 100),
)
def test_pairs_kernel_property(rows, cols, batch, density, act, seed):
    w = _weight(rows, cols, density, seed)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 1))
    got = sparse_matmul_tensor(PairedCSR.from_dense(w), x, bias=bias, activation=act)
    _close(got, apply_activation(F.linear(x, w, bias), act), cols)


@needs_native
def test_pairs_kernel_reads_non_contiguous_inputs():
    w = _weight(48, 100, 0.4, seed=2)
    fmt = PairedCSR.from_dense(w)
    wide = torch.randn(70, 200)
    strided = wide[:, ::2]  # column stride 2: copied first
    _close(sparse_matmul_tensor(fmt, strided), strided @ w.T, 100)
    rows_view = wide[5:69, :100]  # row stride 200 > 100: read as it is
    _close(sparse_matmul_tensor(fmt, rows_view), rows_view @ w.T, 100)
    expanded = torch.randn(1, 100).expand(33, 100)  # row stride 0
    _close(sparse_matmul_tensor(fmt, expanded), expanded @ w.T, 100)
    for batch in (64, 50):  # a (features, batch) tensor seen transposed: read in place when wide enough
        xt = torch.randn(100, batch)
        assert transposed_view_ok(xt.T) == (batch >= pairs_padded_batch(batch))
        _close(sparse_matmul_tensor(fmt, xt.T), xt.T @ w.T, 100)


@needs_native
def test_pairs_transposed_output_feeds_the_next_layer_in_place():
    w1, w2 = _weight(90, 60, 0.5, seed=3), _weight(20, 90, 0.5, seed=4)
    f1, f2 = PairedCSR.from_dense(w1), PairedCSR.from_dense(w2)
    for batch in (2, 40, 130, 300):
        x = torch.randn(batch, 60)
        h = sparse_matmul_tensor(f1, x, activation="gelu", transposed_output=True)
        assert h.shape == (batch, 90) and h.stride(0) == 1 and transposed_view_ok(h)
        ref_h = F.gelu(x @ w1.T)
        _close(h, ref_h, 60)
        _close(sparse_matmul_tensor(f2, h), ref_h @ w2.T, 90)
        _close(F.linear(h, w2), ref_h @ w2.T, 90)  # any other consumer sees an ordinary tensor


@needs_native
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("act", [None, "gelu", "silu"])
def test_pairs_kernel_propagates_nan_and_inf_like_dense(bad, act):
    # a sparse kernel skips 0 * inf (NaN in dense): rows holding a NaN or an infinity are computed
    # with the dense weight, so every output is NaN / infinite exactly where dense's is
    w = _weight(30, 40, 0.5, seed=5)
    w[0, 7] = 0.0
    w[1, 7] = 2.0
    fmt = PairedCSR.from_dense(w)
    x = torch.randn(20, 40)
    x[3, 7] = bad
    bias = torch.randn(30)
    for transposed in (False, True):
        got = sparse_matmul_tensor(fmt, x, bias=bias, activation=act, transposed_output=transposed)
        ref = apply_activation(F.linear(x, w, bias), act)
        assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.equal(torch.isinf(got), torch.isinf(ref))
        assert torch.isnan(got[3]).any()  # the bad row
        fine = torch.isfinite(ref)
        _close(got[fine], ref[fine], 40)


@needs_native
def test_pairs_kernel_results_do_not_depend_on_the_thread_count():
    w = _weight(200, 300, 0.5, seed=6)
    fmt = PairedCSR.from_dense(w)
    x = torch.randn(150, 300)
    outs = [sparse_matmul_tensor(fmt, x, KernelRunner(threads=t), activation="gelu") for t in (1, 2, 3)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


# ------------------------------------------------------------------------------------ epilogues
@needs_native
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_fused_epilogue_equals_the_unfused_layer(act):
    w = _weight(64, 128, 0.5, seed=7)
    fmt = PairedCSR.from_dense(w)
    bias = torch.randn(64) * 5
    x = torch.randn(100, 128) * 3
    fused = sparse_matmul_tensor(fmt, x, bias=bias, activation=act)
    unfused = apply_activation(sparse_matmul_tensor(fmt, x, bias=bias), act)  # same sums, PyTorch's function
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=2e-6)


@needs_native
@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
def test_epilogue_over_the_whole_float_range(act):
    # one weight 1.0: the output is the activation of the input; no subnormal result anywhere
    v = torch.cat([torch.linspace(-120, 120, 20001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e38, -1e38])])
    got = sparse_matmul_tensor(PairedCSR.from_dense(torch.ones(1, 1)), v.reshape(-1, 1), activation=act).flatten()
    ref = apply_activation(v.clone(), act)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=2e-6, equal_nan=True)
    tiny = (got != 0) & (got.abs() < torch.finfo(torch.float32).tiny)
    assert not tiny.any(), v[tiny]


def _gelu_truth(v: torch.Tensor) -> torch.Tensor:
    import math

    return torch.tensor([0.5 * x * math.erfc(-x / math.sqrt(2.0)) for x in v.double().tolist()], dtype=torch.float64)


def _gelu_through_kernel(v: torch.Tensor) -> torch.Tensor:
    # one weight 1.0 and no bias: the output is the GELU of the input
    return sparse_matmul_tensor(PairedCSR.from_dense(torch.ones(1, 1)), v.reshape(-1, 1), activation="gelu").flatten()


def _check_gelu_accuracy(got: torch.Tensor, v: torch.Tensor) -> None:
    truth = _gelu_truth(v)
    err = (got.double() - truth).abs()
    assert float(err.max()) < 6e-7  # PyTorch's own erf GELU is 1.1e-6 from the truth on this grid
    big = truth.abs() > 1e-3
    assert float((err[big] / truth[big].abs()).max()) < 2e-6
    assert bool((got[v < -6] == 0).all()) and bool(torch.signbit(got[v < -6]).all())  # -0.0, as PyTorch
    assert bool((got[v >= 0] >= 0).all()) and bool((got[v < 0] <= 0).all())  # the sign never flips


@needs_native
def test_fused_gelu_against_the_exact_function():
    # x * Phi(x) with Phi from a piecewise polynomial: checked against erfc in double precision,
    # across every interval of the table, its edges at -6 and 6, and beyond
    v = torch.cat([torch.linspace(-8, 8, 64001), torch.tensor([-6.0, 6.0, -5.9999995, 5.9999995])])
    _check_gelu_accuracy(_gelu_through_kernel(v), v)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e38, -1e38])
    got = _gelu_through_kernel(special)
    torch.testing.assert_close(got, F.gelu(special), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(torch.signbit(got[3:]), torch.signbit(F.gelu(special)[3:]))


@needs_native
def test_portable_gelu_against_the_exact_function(tmp_path, monkeypatch):
    from sparseforge.inference import kernels

    portable = older_cpu_library(tmp_path, "x86-64-v3")
    monkeypatch.setattr(kernels, "get_library", lambda: portable)
    v = torch.linspace(-8, 8, 16001)
    _check_gelu_accuracy(_gelu_through_kernel(v), v)


def test_epilogue_names_and_modules():
    assert activation_name_of(nn.GELU()) == "gelu" and activation_name_of(nn.GELU(approximate="tanh")) == "gelu_tanh"
    assert activation_name_of(nn.ReLU()) == "relu" and activation_name_of(nn.SiLU()) == "silu"
    assert activation_name_of(nn.Tanh()) is None and activation_name_of(nn.Identity()) is None

    class MyReLU(nn.ReLU):
        def forward(self, x):
            return x * 2

    assert activation_name_of(MyReLU()) is None  # a subclass may compute something else
    hooked = nn.ReLU()
    hooked.register_forward_hook(lambda m, i, o: None)
    assert activation_name_of(hooked) is None
    with pytest.raises(SparseforgeError, match="activation 'tanh' is not allowed"):
        apply_activation(torch.zeros(1), "tanh")
    with pytest.raises(SparseforgeError, match=r"input shape \(3, 9\) does not fit: expected \(rows, 8\)"):
        sparse_matmul_tensor(PairedCSR.from_dense(torch.randn(4, 8)), torch.randn(3, 9))
    w = _weight(4, 4, 0.5)
    with pytest.raises(SparseforgeError, match="activation 'swish' is not allowed"):
        SparseLinear(None, w, None, BatchPlan(((1, "dense"),)), activation="swish")
    with pytest.raises(SparseforgeError, match="transposed_output=1 is not allowed"):
        SparseLinear(None, w, None, BatchPlan(((1, "dense"),)), transposed_output=1)  # type: ignore[arg-type]


@needs_native
def test_sparse_linear_applies_its_activation_on_every_path():
    w = _weight(24, 40, 0.5, seed=8)
    bias = torch.randn(24)
    fmt = PairedCSR.from_dense(w)
    layers = {
        "dense": SparseLinear(None, w, bias, BatchPlan(((1, "dense"),)), activation="silu"),
        "pairs": SparseLinear(fmt, None, bias, BatchPlan(((1, "sparse"),)), activation="silu"),
        "mixed": SparseLinear(fmt, w, bias, BatchPlan(((1, "dense"), (8, "sparse"))), activation="silu"),
    }
    for batch in (1, 5, 30):
        x = torch.randn(batch, 40)
        ref = F.silu(F.linear(x, w, bias))
        with torch.inference_mode():
            for layer in layers.values():
                _close(layer(x), ref, 40)


# ------------------------------------------------------------------------------------ convert
def _pruned(layer: nn.Linear, sparsity: float) -> nn.Linear:
    with torch.no_grad():
        w = layer.weight
        w[w.abs() < w.abs().flatten().kthvalue(max(1, int(sparsity * w.numel()))).values] = 0.0
    return layer


def _ffn(width: int = 128, hidden: int = 512, act: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        _pruned(nn.Linear(width, hidden), 0.5), act or nn.GELU(), _pruned(nn.Linear(hidden, width), 0.5)
    ).eval()


def _force_pairs(monkeypatch):
    """Make every measurement pick the pairs format (timings stubbed: no clock in tests)."""
    from sparseforge.inference import autotune

    def timing(fns, reps):
        return autotune.TimingRound(
            {k: [10.0 if k == "dense" else 1.0 if k.startswith("pairs") else 20.0] * 3 for k in fns}, wait=0.0
        )

    stub_timing_rounds(monkeypatch, timing)


@needs_native
@pytest.mark.parametrize(
    "act, name", [(nn.GELU(), "gelu"), (nn.GELU(approximate="tanh"), "gelu_tanh"), (nn.SiLU(), "silu")]
)
def test_convert_fuses_a_sequential_activation_and_chains_the_layers(monkeypatch, act, name):
    _force_pairs(monkeypatch)
    model = _ffn(act=act)
    fast, report = convert(model, batch_sizes=(16, 64))
    assert isinstance(fast[1], nn.Identity) and fast[0].activation == name and fast[0].transposed_output
    assert fast[2].activation is None and not fast[2].transposed_output
    assert [(f.layer, f.activation, f.replaced, f.chained) for f in report.fusions] == [("0", name, "1", ("2",))]
    assert f"pairs+{name}" in report.layers[0].format and "fused: 1" in str(report)
    with torch.inference_mode():
        for batch in (1, 16, 64, 100):
            x = torch.randn(batch, 128)
            _close(fast(x), model(x), 512)
    unfused, plain = convert(model, batch_sizes=(64,), fuse=False)
    assert not plain.fusions and type(unfused[1]) is type(act) and unfused[0].activation is None


@needs_native
def test_convert_leaves_unfusable_activations(monkeypatch):
    _force_pairs(monkeypatch)
    model = _ffn(act=nn.Tanh())
    fast, report = convert(model, batch_sizes=(64,))
    assert not report.fusions and isinstance(fast[1], nn.Tanh)
    hooked = _ffn()
    seen = []
    hooked[1].register_forward_hook(lambda m, i, o: seen.append(1))
    fast, report = convert(hooked, batch_sizes=(64,))
    assert not report.fusions and isinstance(fast[1], nn.GELU)
    with torch.inference_mode():
        fast(torch.randn(64, 128))
    assert seen  # the hook still runs


@needs_native
def test_convert_fuses_the_mlp_of_a_transformer(monkeypatch):
    transformers = pytest.importorskip("transformers")
    _force_pairs(monkeypatch)
    cfg = transformers.BertConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            _pruned(m, 0.5)
    fast, report = convert(model, batch_sizes=(32,))
    fused = {f.layer: f for f in report.fusions}
    assert set(fused) == {f"encoder.layer.{i}.intermediate.dense" for i in range(2)}
    assert all(f.chained == (f.layer.replace("intermediate", "output"),) for f in fused.values())
    assert isinstance(fast.encoder.layer[0].intermediate.intermediate_act_fn, nn.Identity)
    ids = torch.randint(0, 100, (4, 16))
    with torch.inference_mode():
        _close(fast(ids).last_hidden_state, model(ids).last_hidden_state, 256)


@needs_native
def test_fused_model_round_trips_and_refuses_another_activation(monkeypatch, tmp_path):
    _force_pairs(monkeypatch)
    model = _ffn()
    fast, _ = convert(model, batch_sizes=(64,))
    path = save_converted(tmp_path / "ffn.safetensors", fast)
    skeleton = nn.Sequential(nn.Linear(128, 512), nn.GELU(), nn.Linear(512, 128))
    back = load_converted(path, skeleton)
    assert isinstance(back[1], nn.Identity) and back[0].activation == "gelu" and back[0].transposed_output
    assert back[0].packed.name == "pairs"
    x = torch.randn(64, 128)
    with torch.inference_mode():
        _close(back(x), model(x), 512)
    with pytest.raises(SparseforgeError, match="applies the gelu that was at '1', but the skeleton has ReLU"):
        load_converted(path, nn.Sequential(nn.Linear(128, 512), nn.ReLU(), nn.Linear(512, 128)))


@needs_native
def test_retune_keeps_a_fused_activation_when_the_layer_goes_dense(monkeypatch):
    _force_pairs(monkeypatch)
    model = _ffn()
    fast, _ = convert(model, batch_sizes=(64,))
    from sparseforge.inference import autotune

    stub_timing_rounds(
        monkeypatch,
        lambda fns, reps: autotune.TimingRound({k: [1.0 if k == "dense" else 50.0] * 3 for k in fns}, wait=0.0),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again, report = retune(fast)
    assert [d.action for d in report.layers] == ["dense", "dense"]
    assert isinstance(again[0], SparseLinear) and again[0].activation == "gelu" and again[0].packed is None
    assert isinstance(again[2], nn.Linear)
    with torch.inference_mode():
        x = torch.randn(64, 128)
        _close(again(x), model(x), 512)


# ------------------------------------------------------------------------------------ cost model
@needs_native
def test_pairs_cost_model_follows_kept_weights_and_lanes():
    shape = (768, 3072)
    t = {d: predict_ms(PairedCSR.from_dense(_weight(*shape, d)), shape, 64, threads=2) for d in (0.1, 0.5)}
    assert t[0.1] < t[0.5] / 3
    fmt = PairedCSR.from_dense(_weight(*shape, 0.5))
    assert predict_ms(fmt, shape, 65, threads=2) > predict_ms(fmt, shape, 64, threads=2)  # one more tile
    # tiles of 64 lanes, the last one 16, 32 or 64 wide
    got = [pairs_padded_batch(b) for b in (1, 16, 17, 33, 64, 65, 100, 129, 200, 224)]
    assert got == [16, 16, 32, 64, 64, 80, 128, 144, 208, 224]


@needs_native
def test_portable_build_computes_the_same(tmp_path, monkeypatch):
    """The pairs kernel without AVX-512 (plain loops over the lanes) against dense and the
    AVX-512 build: the same runs and order of additions, so the two agree to rounding of the
    activation functions."""
    from sparseforge.inference import kernels

    portable = older_cpu_library(tmp_path, "x86-64-v3")
    assert portable.sf_has_avx512() == 0
    w = _weight(45, 90, 0.5, seed=9)
    bias = torch.randn(45)
    xs = {b: torch.randn(b, 90) * 3 for b in (3, 64, 130)}
    fast = {
        (b, a): sparse_matmul_tensor(PairedCSR.from_dense(w), x, bias=bias, activation=a)
        for b, x in xs.items()
        for a in (None, "gelu", "silu")
    }
    monkeypatch.setattr(kernels, "get_library", lambda: portable)
    for (b, a), want in fast.items():
        got = sparse_matmul_tensor(PairedCSR.from_dense(w), xs[b], bias=bias, activation=a)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
        _close(got, apply_activation(F.linear(xs[b], w, bias), a), 90)


@needs_native
def test_convert_times_each_layer_as_it_will_run(monkeypatch):
    """The widening layer is timed with its activation (dense: layer then GELU; pairs: the fused
    kernel handing its output on transposed); the next layer with its input transposed at the
    batch sizes where the first runs pairs, as a plain row-major tensor elsewhere."""
    from sparseforge.inference import autotune

    seen: list[tuple[int, dict]] = []

    def timing(fns, reps):
        out = fns["dense"]()
        seen.append((out.shape[-1], dict(fns)))
        return autotune.TimingRound(
            {k: [10.0 if k == "dense" else 1.0 if k.startswith("pairs") else 20.0] * 3 for k in fns}, wait=0.0
        )

    stub_timing_rounds(monkeypatch, timing)
    convert(_ffn(), batch_sizes=(1, 64))
    up = [fns for width, fns in seen if width == 512]
    down = [fns for width, fns in seen if width == 128]
    assert up and down
    for fns in up:
        assert fns["dense"].args[3] == "gelu"
        pairs = [f for k, f in fns.items() if k.startswith("pairs")]
        assert bool(pairs) == (fns["dense"].args[0].shape[0] >= 8)  # timed from 8 rows on
        assert all(f.args[4] == "gelu" and f.args[5] is True for f in pairs)
    inputs = {fns["dense"].args[0].shape[0]: fns["dense"].args[0] for fns in down}
    assert inputs[64].stride(0) == 1 and transposed_view_ok(inputs[64])  # from the pairs layer before it
    assert inputs[1].is_contiguous()  # one row runs another format: a plain row
    assert all(fns["dense"].args[3] is None for fns in down)


@needs_native
def test_chained_layers_keep_dense_nan_pattern_when_the_first_overflows():
    """Finite inputs whose first-layer sums overflow to inf: the first layer's output is not marked
    finite, so the second checks it and computes those rows with its dense weight (NaN where dense
    has 0 * inf)."""
    w1 = _weight(40, 30, 0.5, seed=11)
    w1[5] = 0.0
    w1[5, :3] = 3e38  # row 5 overflows to +inf for positive inputs
    w2 = _weight(10, 40, 0.5, seed=12)
    w2[:, 5] = 0.0
    w2[0, 5] = 1.0  # only output 0 reads feature 5
    f1, f2 = PairedCSR.from_dense(w1), PairedCSR.from_dense(w2)
    x = torch.rand(32, 30) + 0.5
    h = sparse_matmul_tensor(f1, x, transposed_output=True)
    assert torch.isinf(h[:, 5]).all() and not getattr(h, "_sf_finite", False)
    got = sparse_matmul_tensor(f2, h)
    ref = F.linear(x @ w1.T, w2)
    assert torch.equal(torch.isnan(got), torch.isnan(ref)) and torch.isnan(got[:, 1]).all()
    fine = sparse_matmul_tensor(f1, x.clamp(max=0.6) * 0, transposed_output=True)
    assert getattr(fine, "_sf_finite", False)  # an all-finite output is marked for the next layer


@needs_native
@pytest.mark.parametrize("csr_ms, expect", [(0.95, "bitmask"), (0.85, "bitmask"), (0.75, "csr")])
def test_close_formats_resolve_to_the_smaller_one(monkeypatch, csr_ms, expect):
    """Two sparse formats within 20 % of each other at a batch size count as tied: the smaller
    one runs there (bitmask at 50 % density: 2.1 vs CSR's 3 bytes per weight), so noise cannot swap
    them between runs; clearly faster (1 / 0.75 = 33 %) wins. The pairs format takes the large batch."""
    from sparseforge.inference import autotune

    fake = {
        1: {"dense": 2.0, "bitmask": 1.0, "csr": csr_ms, "csr[gather]": csr_ms, "pairs": 3.0},
        64: {"dense": 10.0, "bitmask": 9.0, "csr": 9.0, "pairs": 5.0},
    }

    def timing(fns, reps):
        b = 1 if "csr[gather]" in fns else 64
        times = {k: fake[b][k.split("(")[0]] for k in fns}
        return autotune.TimingRound({k: [v] * 3 for k, v in times.items()}, wait=0.0)

    stub_timing_rounds(monkeypatch, timing)
    monkeypatch.setattr(
        autotune, "_confirm_close_calls", lambda fns, medians, reps, margin, after_dense=False: (medians, None)
    )
    choice = autotune.measure_layer(_weight(128, 256, 0.5), None, (1, 64))
    runs = {b: (choice.packed if c == "sparse" else choice.extra).name for b, c in choice.choices.items()}
    assert runs == {1: expect, 64: "pairs"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"x": torch.randn(16, 8, dtype=torch.float64)}, "input torch.float64 on cpu is not supported"),
        ({"x": torch.randn(16, 8).half()}, "input torch.float16 on cpu is not supported"),
        ({"bias": torch.randn(8, dtype=torch.float64)}, "bias torch.float64 on cpu is not supported"),
        ({"bias": torch.randn(5)}, r"bias shape \(5,\) does not fit: expected \(8,\)"),
        ({"bias": torch.randn(1, 8)}, r"bias shape \(1, 8\) does not fit"),
        ({"transposed_output": "yes"}, "transposed_output='yes' is not allowed"),
    ],
)
def test_sparse_matmul_tensor_refuses_what_the_kernels_would_misread(kwargs, message):
    # the C kernels read raw float32 memory: a float64 input or bias, or a short bias, would be
    # read as garbage (or past its end) without these checks
    w = _weight(8, 8, 0.5, seed=3)
    args = {"x": torch.randn(16, 8), "bias": None, "transposed_output": False, **kwargs}
    for fmt in (PairedCSR.from_dense(w), Bitmask.from_dense(w), CompactCSR.from_dense(w)):
        for rows in (1, 16):
            with pytest.raises(SparseforgeError, match=message):
                sparse_matmul_tensor(
                    fmt, args["x"][:rows], bias=args["bias"], transposed_output=args["transposed_output"]
                )


def test_pairs_share_must_be_a_flag():
    with pytest.raises(SparseforgeError, match="share='no' is not allowed; allowed: True or False"):
        PairedCSR.from_dense(_weight(8, 8, 0.5), share="no")
    assert PairedCSR.from_dense(_weight(8, 8, 0.5), share=0).share == 0  # as a saved file stores it


@needs_native
@pytest.mark.parametrize("rows", [2, 30, 200, 777, 3072])
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_pairs_chunks_start_on_whole_output_lines(rows, threads):
    # chunk boundaries on multiples of 8 pairs: the 16 outputs one 64-byte line of a row-major
    # output row holds are written by one thread
    from sparseforge.inference.kernels import _native_plan

    plan = _native_plan(PairedCSR.from_dense(_weight(rows, 64, 0.5, seed=rows)))
    ptr, n = plan.cuts_for(threads)
    cuts = plan.cuts[threads]
    npairs = (rows + 1) // 2
    assert cuts.ctypes.data == ptr and len(cuts) == n + 1 >= 2
    assert cuts[0] == 0 and cuts[-1] == npairs and bool(np.all(np.diff(cuts) > 0))
    assert all(c % 8 == 0 for c in cuts[1:-1])
    assert n <= max(1, threads * 4 if threads > 1 else 1)
