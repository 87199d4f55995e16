"""Activation sparsity: thresholds, calibration, measurement, CETT, PPL-p%, swaps, top-k, ProSparse."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from conftest import requires
from sparseforge.activations import (
    ActivationL1,
    ProSparseSchedule,
    ReLU2,
    ThresholdedLinear,
    TopKLinear,
    apply_topk,
    cett,
    cett_threshold,
    cett_thresholds,
    drop_small,
    find_mlps,
    keep_topk,
    measure_activations,
    plot_activation_sparsity,
    ppl_p_sparsity,
    sparsify_activations,
    swap_activation,
)
from sparseforge.errors import SparseforgeError

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
needs_transformers = requires(HAS_TRANSFORMERS, "transformers (the [llm] extra) is not installed")
if HAS_TRANSFORMERS:
    from test_oneshot_driver import VOCAB, _bert, _gpt2, _llama


def _ids(n: int, seqlen: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 100, (n, seqlen), generator=torch.Generator().manual_seed(seed))


# -- the thresholded layer -------------------------------------------------------------------------


def test_drop_small_by_hand() -> None:
    x = torch.tensor([0.1, -0.5, 0.5, -2.0, 0.0, float("nan"), float("inf")])
    out = drop_small(x, 0.5)
    assert out[:5].tolist() == [0.0, 0.0, 0.0, -2.0, 0.0]
    assert math.isnan(out[5]) and out[6] == float("inf")
    assert drop_small(x, 0.0) is x and drop_small(x, torch.tensor(0.0)) is x  # nothing to drop: no pass over x


def test_thresholded_linear_matches_linear_on_kept_inputs() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    t = ThresholdedLinear.from_linear(layer, threshold=0.3, sparsity=0.25)
    assert t.weight is layer.weight and t.bias is layer.bias
    x = torch.tensor([[0.2, -0.31, 0.3, 1.0, -0.05, 0.0]])
    expected = layer(torch.tensor([[0.0, -0.31, 0.0, 1.0, 0.0, 0.0]]))
    assert torch.equal(t(x), expected)
    assert set(t.state_dict()) == {"weight", "bias", "input_threshold", "input_sparsity"}
    assert torch.equal(ThresholdedLinear.from_linear(layer)(x), layer(x))  # threshold 0: dense
    assert torch.isnan(t(torch.tensor([[float("nan")] + [1.0] * 5]))).all()
    assert type(t.to_linear()) is nn.Linear and t.to_linear().weight is layer.weight


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.5", True])
def test_thresholded_linear_refuses_bad_thresholds(bad: object) -> None:
    with pytest.raises(SparseforgeError, match="threshold"):
        ThresholdedLinear.from_linear(nn.Linear(3, 2), threshold=bad)  # type: ignore[arg-type]
    with pytest.raises(SparseforgeError, match="input sparsity"):
        ThresholdedLinear(3, 2, threshold=0.1, sparsity=1.0)


# -- where the MLPs are ----------------------------------------------------------------------------


@needs_transformers
def test_find_mlps_in_three_families() -> None:
    llama = find_mlps(_llama())
    assert llama[1].up == ("model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj")
    assert llama[1].down == "model.layers.1.mlp.down_proj" and llama[1].activation == "model.layers.1.mlp.act_fn"
    bert = find_mlps(_bert())
    assert bert[0].up == ("encoder.layer.0.intermediate.dense",) and bert[0].down == "encoder.layer.0.output.dense"
    assert bert[0].activation == "encoder.layer.0.intermediate.intermediate_act_fn" and bert[0].width == 64
    gpt2 = find_mlps(_gpt2())
    assert gpt2[0].down == "transformer.h.0.mlp.c_proj" and gpt2[0].activation == "transformer.h.0.mlp.act"


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.o = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x))


class _NoMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])


def test_a_model_without_mlp_is_refused_naming_what_was_looked_for() -> None:
    with pytest.raises(SparseforgeError, match=r"block layers\.0 has no MLP: looked for .*down_proj"):
        find_mlps(_NoMLP())


# -- training-free thresholds ----------------------------------------------------------------------


@needs_transformers
@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_calibrated_thresholds_hit_the_target_on_held_out_data(target: float) -> None:
    torch.manual_seed(0)
    model = _llama(intermediate=96)
    result = sparsify_activations(model, _ids(16, 32, seed=1), sparsity=target, where="mlp")
    assert len(result.layers) == 2 * 3
    assert all(abs(layer.sparsity - target) < 0.005 for layer in result.layers)
    assert all(isinstance(model.get_submodule(layer.name), ThresholdedLinear) for layer in result.layers)
    held_out = measure_activations(model, _ids(16, 32, seed=2), where="mlp")
    assert len(held_out.layers) == 6
    for layer in held_out.layers:  # the layers' own thresholds, on other tokens
        assert abs(layer.below - target) <= 0.02, (layer.name, layer.below)


@needs_transformers
def test_thresholds_change_the_output_and_zero_is_dense() -> None:
    torch.manual_seed(0)
    model = _llama()
    ids = _ids(4, 16, seed=3)
    dense = model(input_ids=ids).logits
    sparsify_activations(model, ids, sparsity=0.0, where="all")
    assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-6)
    sparsify_activations(model, ids, sparsity=0.6, where="all")
    assert not torch.allclose(model(input_ids=ids).logits, dense, atol=1e-3)


@needs_transformers
def test_explicit_thresholds_and_their_bad_values() -> None:
    torch.manual_seed(0)
    model = _llama()
    ids = _ids(4, 16, seed=3)
    names = [site.down for site in find_mlps(model)]
    result = sparsify_activations(model, ids, thresholds=dict.fromkeys(names, 0.0), where="mlp-down")
    assert [layer.name for layer in result.layers] == names
    with pytest.raises(SparseforgeError, match=r"drops every calibration input of layer model\.layers\.0"):
        sparsify_activations(model, ids, thresholds=dict.fromkeys(names, 1e9), where="mlp-down")
    with pytest.raises(SparseforgeError, match="lack"):
        sparsify_activations(model, ids, thresholds={names[0]: 0.1}, where="mlp-down")
    with pytest.raises(SparseforgeError, match="both given"):
        sparsify_activations(model, ids, sparsity=0.3, thresholds=dict.fromkeys(names, 0.0), where="mlp-down")
    with pytest.raises(SparseforgeError, match="-1"):
        sparsify_activations(model, ids, thresholds=dict.fromkeys(names, -1), where="mlp-down")


@needs_transformers
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sparsity": 1.0}, "outside the allowed range"),
        ({"sparsity": 0.5, "where": "attention"}, "where='attention' is not known"),
        ({"sparsity": 0.5, "exclude": ["nothing*"]}, "matches none"),
        ({"sparsity": 0.5, "exclude": ["*"]}, "leaves no layer"),
    ],
)
def test_sparsify_refuses_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SparseforgeError, match=message):
        sparsify_activations(_llama(), _ids(2, 8, seed=0), **kwargs)  # type: ignore[arg-type]


@needs_transformers
def test_sparsify_refuses_bad_calibration_and_gpt2_conv1d() -> None:
    with pytest.raises(SparseforgeError, match="outside the model's vocabulary"):
        sparsify_activations(_llama(), torch.full((2, 8), VOCAB + 5), sparsity=0.5)
    with pytest.raises(SparseforgeError, match="Conv1D"):
        sparsify_activations(_gpt2(), _ids(2, 8, seed=0), sparsity=0.5)


@needs_transformers
def test_thresholds_round_trip_through_json_onto_a_fresh_model() -> None:
    import json

    from sparseforge.activations import ActivationThresholds, apply_thresholds

    torch.manual_seed(0)
    model = _llama()
    fresh = _llama()
    fresh.load_state_dict(model.state_dict())
    ids = _ids(4, 16, seed=3)
    result = sparsify_activations(model, ids, sparsity=0.5, where="mlp")
    loaded = ActivationThresholds.from_dict(json.loads(json.dumps(result.to_dict())))
    assert loaded.layers == result.layers
    assert apply_thresholds(fresh, loaded) == [layer.name for layer in result.layers]
    assert torch.equal(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    for bad in (
        {"layers": "x"},
        {"layers": [{"name": 3}]},
        {"layers": [{"name": "a", "threshold": -1, "sparsity": 0.5}]},
    ):
        with pytest.raises(SparseforgeError, match="activation threshold"):
            ActivationThresholds.from_dict(bad)
    wrong = ActivationThresholds.from_dict({"layers": [{"name": "model.nothing", "threshold": 0.1, "sparsity": 0.5}]})
    with pytest.raises(SparseforgeError, match="'model.nothing' is not in the model"):
        apply_thresholds(fresh, wrong)


# -- measurement -----------------------------------------------------------------------------------


@needs_transformers
def test_measured_zeros_match_the_hidden_activation_seen_by_a_hook() -> None:
    torch.manual_seed(0)
    model = _llama()
    swap_activation(model, "relu")
    ids = _ids(4, 16, seed=5)
    seen: list[torch.Tensor] = []
    handle = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    model(input_ids=ids)
    handle.remove()
    h = seen[0].reshape(-1, seen[0].shape[-1])
    report = measure_activations(model, ids, threshold=0.01)
    layer = report.layers[1]
    assert layer.name == "model.layers.1.mlp.down_proj" and report.tokens == 64
    assert layer.zero == pytest.approx(float((h == 0).float().mean()), abs=1e-6)
    per_token = (h.abs() <= 0.01).float().mean(dim=1)
    assert layer.below == pytest.approx(float(per_token.mean()), abs=1e-6)
    assert layer.token_min == pytest.approx(float(per_token.min())) and layer.zero > 0.2  # ReLU zeros


@needs_transformers
def test_plot_writes_a_png(tmp_path) -> None:  # type: ignore[no-untyped-def]
    report = measure_activations(_llama(), _ids(2, 8, seed=0))
    path = plot_activation_sparsity({"dense": report}, tmp_path / "act.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SparseforgeError, match="no reports"):
        plot_activation_sparsity({}, tmp_path / "x.png")


# -- CETT and PPL-p% -------------------------------------------------------------------------------


def test_cett_by_hand() -> None:
    h = torch.tensor([[3.0, 1.0, 0.5]])
    w = torch.eye(3)
    assert cett(h, w, 0.5) == pytest.approx(0.5 / math.sqrt(10.25))
    assert cett(h, w, 1.0) == pytest.approx(math.sqrt(1.25) / math.sqrt(10.25))
    assert cett_threshold(h, w, 0.2) == pytest.approx(0.5)
    assert cett_threshold(h, w, 0.4) == pytest.approx(1.0)
    assert cett_threshold(h, w, 0.1) == 0.0
    assert cett_threshold(h, w, 1.0) == pytest.approx(3.0)


@needs_transformers
def test_cett_thresholds_grow_with_the_target() -> None:
    torch.manual_seed(0)
    model = _llama()
    ids = _ids(8, 16, seed=0)
    low, high = cett_thresholds(model, ids, 0.05), cett_thresholds(model, ids, 0.3)
    assert list(low) == [site.down for site in find_mlps(model)]
    assert all(0 <= low[n] < high[n] for n in low)


@needs_transformers
def test_ppl_p_sparsity_stays_within_p_and_leaves_the_model_unchanged() -> None:
    torch.manual_seed(0)
    model = _llama()
    ids = _ids(8, 16, seed=0)
    before = model(input_ids=ids).logits
    result = ppl_p_sparsity(model, ids, _ids(4, 16, seed=1), p=5.0, steps=4)
    assert result.perplexity <= result.dense_perplexity * 1.05 + 1e-9
    assert 0 < result.sparsity < 1 and len(result.trials) == 5
    assert torch.equal(model(input_ids=ids).logits, before)
    assert not any(isinstance(m, ThresholdedLinear) for m in model.modules())


# -- activation functions, top-k, ProSparse --------------------------------------------------------


def test_relu2_by_hand() -> None:
    assert ReLU2()(torch.tensor([-2.0, 0.0, 0.5, 3.0])).tolist() == [0.0, 0.0, 0.25, 9.0]


@needs_transformers
def test_swap_activation_replaces_every_mlp_activation() -> None:
    model = _llama()
    assert swap_activation(model, "relu2") == ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"]
    assert all(isinstance(model.get_submodule(f"model.layers.{i}.mlp.act_fn"), ReLU2) for i in range(2))
    with pytest.raises(SparseforgeError, match="activation 'tanh2' is not known"):
        swap_activation(model, "tanh2")


class _FunctionalMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.up = nn.Linear(8, 32)
        self.down = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(self.q(x))))


class _FunctionalModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_FunctionalMLP(), _FunctionalMLP()])


def test_swap_refuses_an_mlp_calling_a_function() -> None:
    with pytest.raises(SparseforgeError, match="MLP of block 0 has no activation module"):
        swap_activation(_FunctionalModel(), "relu")


def test_keep_topk_by_hand() -> None:
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5], [1.0, 0.0, -0.25, 0.5]])
    assert keep_topk(x, 2).tolist() == [[0.0, -3.0, 2.0, 0.0], [1.0, 0.0, 0.0, 0.5]]
    assert torch.equal(keep_topk(x, 4), x)


@given(rows=st.integers(1, 5), width=st.integers(1, 40), data=st.data())
@settings(max_examples=40, deadline=None)
def test_keep_topk_keeps_exactly_k_largest(rows: int, width: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, width))
    x = torch.randn(rows, width, generator=torch.Generator().manual_seed(width * 7 + rows))
    out = keep_topk(x, k)
    assert ((out != 0).sum(dim=1) == k).all()
    kept_min = torch.where(out != 0, x.abs(), torch.full_like(x, math.inf)).min(dim=1).values
    dropped_max = torch.where(out == 0, x.abs(), torch.zeros_like(x)).max(dim=1).values
    assert (kept_min >= dropped_max).all()


@needs_transformers
def test_topk_layers_are_measured_as_they_multiply_and_refused_by_ppl_p() -> None:
    torch.manual_seed(0)
    model = _llama(intermediate=64)
    assert set(apply_topk(model, 0.25).values()) == {16}
    ids = _ids(4, 16, seed=0)
    report = measure_activations(model, ids)
    assert all(layer.zero == pytest.approx(1 - 16 / 64) for layer in report.layers)
    with pytest.raises(SparseforgeError, match="keeps the top 16 activations"):
        ppl_p_sparsity(model, ids, ids, p=1.0, steps=1)


def test_topk_apply_and_bad_density() -> None:
    model = _FunctionalModel()
    assert apply_topk(model, 0.25) == {"layers.0.down": 8, "layers.1.down": 8}
    layer = model.layers[0].down
    assert isinstance(layer, TopKLinear)
    x = torch.randn(3, 32)
    assert torch.equal(layer(x), F.linear(keep_topk(x, 8), layer.weight, layer.bias))
    for bad in (0, 1.5, "half"):
        with pytest.raises(SparseforgeError, match="density"):
            apply_topk(model, bad)  # type: ignore[arg-type]


def test_prosparse_schedule_by_hand() -> None:
    schedule = ProSparseSchedule(((4, 1.0), (2, 3.0)))
    assert schedule.steps == 6
    assert schedule.factor(0) == 0.0
    assert schedule.factor(2) == pytest.approx(math.sin(math.pi / 4))
    assert schedule.factor(4) == pytest.approx(1.0)
    assert schedule.factor(5) == pytest.approx(1.0 + 2.0 * math.sin(math.pi / 4))
    assert schedule.factor(6) == schedule.factor(100) == 3.0
    for bad in ((), ((0, 1.0),), ((2, 1.0), (2, 0.5)), ((2, float("nan")),)):
        with pytest.raises(SparseforgeError):
            ProSparseSchedule(bad)  # type: ignore[arg-type]


def test_activation_l1_is_the_mean_magnitude_of_each_hidden_activation_and_has_gradients() -> None:
    torch.manual_seed(0)
    model = _FunctionalModel()
    x = torch.randn(5, 8)
    with ActivationL1(model) as l1:
        model.layers[1](model.layers[0](x))
        penalty = l1.take()
        assert l1.take().item() == 0.0
    h0 = F.gelu(model.layers[0].up(model.layers[0].q(x)))
    h1 = F.gelu(model.layers[1].up(model.layers[1].q(model.layers[0](x))))
    assert float(penalty.detach()) == pytest.approx(float((h0.abs().mean() + h1.abs().mean()).detach()), rel=1e-6)
    penalty.backward()
    assert model.layers[0].up.weight.grad is not None
    assert not model.layers[0].down._forward_pre_hooks  # hooks removed on exit


@needs_transformers
def test_the_guide_examples_run_as_written() -> None:
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "activations.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert len(blocks) >= 3
    namespace: dict[str, object] = {}
    exec(compile("\n".join(blocks), "activations.md", "exec"), namespace)
    assert isinstance(namespace["sparse"], torch.nn.Module)
    held_out = namespace["held_out"]
    assert abs(held_out.mean_below - 0.5) < 0.03  # type: ignore[attr-defined]
