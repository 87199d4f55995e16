"""Sparse-IFT layers: each transformation keeps the dense model's multiply-adds exactly (Linear,
Conv1d and Conv2d; Sparse Wide over chains of them), reduces to the dense model where it should,
trains with the library's algorithms, and refuses bad input in one line."""

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
from sparseforge.experiments.models import build_model
from sparseforge.layers import SparseDoped, SparseFactorized, SparseParallel, iso_macs, split_exactly, transform

KINDS = ["wide", "parallel", "factorized", "doped"]


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def _macs(model: nn.Module, x: torch.Tensor, masks: object = None) -> int:
    """Multiply-adds per sample, counted here from the masks (kept weights x output positions of
    every Linear / Conv layer that runs; all weights where there is no mask)."""
    kept = dict(masks.items()) if masks is not None else {}  # type: ignore[attr-defined]
    total = 0

    def count(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object, out: torch.Tensor) -> None:
            nonlocal total
            channels = out.shape[1] if out.dim() > 2 and not isinstance(module, nn.Linear) else out.shape[-1]
            positions = out.numel() // out.shape[0] // channels
            key = f"{name}.weight"
            total += (int(kept[key].sum()) if key in kept else module.weight.numel()) * positions

        return hook

    handles = [
        m.register_forward_hook(count(n))
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))
    ]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total


def _layer(kind: str, n_in: int, n_out: int, geometry: dict[str, int]) -> nn.Module:
    if kind == "linear":
        return nn.Linear(n_in, n_out)
    cls = nn.Conv1d if kind == "conv1d" else nn.Conv2d
    return cls(n_in, n_out, **geometry)


def _input(kind: str, n_in: int) -> torch.Tensor:
    return {"linear": torch.randn(2, n_in), "conv1d": torch.randn(2, n_in, 24), "conv2d": torch.randn(2, n_in, 17, 18)}[
        kind
    ]


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


_GEOMETRY = st.fixed_dictionaries(
    {
        "kernel_size": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "padding": st.integers(0, 1),
        "dilation": st.integers(1, 2),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    layer=st.sampled_from(["linear", "conv1d", "conv2d"]),
    sparsity=st.sampled_from([0.0, 0.5, 0.75, 0.9]),
    n_in=st.integers(4, 24),
    n_mid=st.integers(4, 24),
    n_out=st.integers(4, 24),
    geometry=_GEOMETRY,
)
def test_every_transformation_keeps_the_dense_multiply_adds_exactly(
    kind, layer, sparsity, n_in, n_mid, n_out, geometry
):
    # a chain of two layers (Sparse Wide widens the width between them; the others replace both)
    torch.manual_seed(0)
    model = nn.Sequential(_layer(layer, n_in, n_mid, geometry), nn.ReLU(), _layer(layer, n_mid, n_out, geometry))
    x = _input(layer, n_in)
    dense_macs, dense_shape = _macs(model, x), model(x).shape
    dense_counts = [model[0].weight.numel(), model[2].weight.numel()]
    model, masks = transform(model, kind, sparsity, seed=1, example=x)
    assert _macs(model, x, masks) == dense_macs  # per sample, counted from the masks
    assert iso_macs(model, dict(masks.items())) == sum(dense_counts)  # per row / output position
    for name, mask in masks.items():  # pruned weights are zero
        assert not dict(model.named_parameters())[name].detach()[~mask].any()
    assert model(x).shape == dense_shape
    if kind == "wide":  # each layer keeps its dense count; the hidden width grew by 1 / sqrt(1 - s)
        assert [masks.nnz("0.weight"), masks.nnz("2.weight")] == dense_counts
        width = model[0].weight.shape[0]
        assert width == int(n_mid / (1 - sparsity) ** 0.5 + 0.5) and model[2].weight.shape[1] == width


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


def test_conv_sizes_by_hand():
    # Conv1d 8 -> 8, kernel 3: 192 weights, fan-in 24. At 50 %:
    conv = nn.Conv1d(8, 8, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(2, 8, 20)
    # parallel: 2 branches of the same conv, 96 kept each
    model, masks = transform(nn.Sequential(conv), "parallel", 0.5)
    assert [masks.nnz(f"0.branches.{b}.weight") for b in (0, 1)] == [96, 96]
    assert model[0].branches[1].stride == (2,) and model[0].branches[1].dilation == (2,)
    # factorized: rank = 192 / (0.5 x (24 + 8)) = 12; V: conv 8 -> 12 (3 x 8 x 12 = 288), U: 1x1 12 -> 8 (96)
    model, masks = transform(nn.Sequential(nn.Conv1d(8, 8, 3, stride=2, padding=1, dilation=2)), "factorized", 0.5)
    layer = model[0]
    assert isinstance(layer, SparseFactorized) and tuple(layer.v.weight.shape) == (12, 8, 3)
    assert tuple(layer.u.weight.shape) == (8, 12, 1) and layer.u.bias is not None and layer.v.bias is None
    assert (layer.v.stride, layer.u.stride, layer.u.padding) == ((2,), (1,), (0,))
    assert masks.nnz("0.v.weight") == 144 and masks.nnz("0.u.weight") == 48  # half of each, 192 in all
    assert layer(x).shape == conv(x).shape == (2, 8, 9)
    # doped: rank = floor(0.5 x 192 / 32) = 3: low rank 3 x 32 = 96 dense, the sparse conv keeps 96
    model, masks = transform(nn.Sequential(nn.Conv1d(8, 8, 3)), "doped", 0.5)
    assert model[0].v.weight.shape[0] == 3 and masks.nnz("0.sparse.weight") == 96


def test_wide_by_hand_through_flatten_pooling_and_norms():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 4 * 4, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 10),
    )  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    dense = _macs(model, x)
    model, masks = transform(model, "wide", 0.75, example=x)  # k = 2
    assert tuple(model[0].weight.shape) == (16, 3, 3, 3) and masks.nnz("0.weight") == 8 * 3 * 9  # keeps 50 %
    assert model[1].num_features == 16 and model[8].normalized_shape == (32,)  # norms rebuilt
    assert tuple(model[4].weight.shape) == (16, 16, 3, 3) and masks.nnz("4.weight") == 8 * 8 * 9  # keeps 25 %
    assert (
        tuple(model[7].weight.shape) == (32, 16 * 16) and masks.nnz("7.weight") == 128 * 16
    )  # 16 channels x 16 positions
    assert tuple(model[10].weight.shape) == (10, 32) and masks.nnz("10.weight") == 160
    assert masks.sparsity("4.weight") == pytest.approx(0.75) and masks.sparsity("0.weight") == pytest.approx(0.5)
    assert _macs(model, x, masks) == dense and model(x).shape == (2, 10)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_wide_on_the_experiments_models(name):
    model = build_model(name, in_features=40, num_classes=10, width=32)
    x = torch.randn(3, 40)
    dense = _macs(model, x)
    model, masks = transform(model, "wide", 0.5, example=x)  # 32 / sqrt(0.5) = 45.25 -> 45
    widths = [m.weight.shape[0] for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv1d))]
    assert widths == ([45, 45, 10] if name == "mlp" else [45, 45, 45, 10])
    assert _macs(model, x, masks) == dense and model(x).shape == (3, 10)
    if name == "cnn":  # the classifier takes the flattened 45 channels x 5 positions
        assert model.classifier.in_features == 45 * 5


def test_wide_exclude_keeps_the_layer_and_the_widths_next_to_it():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)
    )
    first, last = model[0], model[6]
    x = torch.randn(2, 6)
    dense = _macs(model, x)
    model, masks = transform(model, "wide", 0.75, exclude=["0", "6"])  # only the width between 2 and 4 widens
    assert model[0] is first and model[6] is last and sorted(masks) == ["2.weight", "4.weight"]
    assert tuple(model[2].weight.shape) == (16, 8) and tuple(model[4].weight.shape) == (8, 16)
    assert masks.nnz("2.weight") == masks.nnz("4.weight") == 64
    assert _macs(model, x, masks) == dense
    # excluding the middle layer of three leaves no width whose two layers are both transformed
    with pytest.raises(SparseforgeError, match=r"every width between two layers touches an excluded layer"):
        transform(_mlp(), "wide", 0.75, exclude=["2"])


@pytest.mark.parametrize("layer", ["linear", "conv1d", "conv2d"])
@pytest.mark.parametrize("kind", ["wide", "parallel", "doped"])
def test_at_sparsity_0_the_transformation_is_the_dense_model(kind, layer):
    # parallel: one branch holding the dense weight; doped: rank 0, the sparse part is the dense
    # layer; wide: k = 1, nothing widened. Every mask keeps everything.
    torch.manual_seed(0)
    geometry = {"kernel_size": 3, "padding": 1}
    model = nn.Sequential(_layer(layer, 5, 7, geometry), nn.ReLU(), _layer(layer, 7, 4, geometry))
    x = _input(layer, 5)
    reference = model(x).detach()
    model, masks = transform(model, kind, 0.0, seed=3, example=x)
    torch.testing.assert_close(model(x), reference, rtol=0, atol=1e-6)
    assert all(bool(mask.all()) for _, mask in masks.items()) and len(masks) == 2
    if kind == "parallel":
        assert all(len(model[i].branches) == 1 for i in (0, 2))


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
    for layer, x in ((nn.Linear(16, 8), torch.randn(4, 16)), (nn.Conv2d(4, 6, 3), torch.randn(2, 4, 7, 7))):
        doped = SparseDoped.from_layer(layer, rank=3)
        torch.testing.assert_close(doped(x), layer(x))  # U = 0 at the start


@pytest.mark.parametrize("kind", KINDS)
def test_at_sparsity_0_999_each_transformation_is_exact_or_refused(kind):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(2, 6)
    dense = _macs(model, x)
    if kind == "parallel":  # 1000 branches for 48 weights: refused, with the highest sparsity that works
        with pytest.raises(SparseforgeError, match=r"1000 branches for its 48 weights.*at most 0.979 \(48 branches\)"):
            transform(model, kind, 0.999)
        return
    model, masks = transform(model, kind, 0.999)
    assert _macs(model, x, masks) == dense


@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized", "doped"])
def test_rigl_trains_a_transformed_model_and_keeps_it_iso_flop(kind):
    model = _mlp()
    exclude = [] if kind == "wide" else ["4"]
    model, masks = transform(model, kind, 0.75, exclude=exclude, seed=0)
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


def test_rigl_keeps_a_transformed_cnn_iso_flop():
    model = build_model("cnn", in_features=40, num_classes=10, width=8)
    x, y = torch.randn(64, 40), torch.randint(0, 10, (64,))
    dense = _macs(model, x)
    model, masks = transform(model, "factorized", 0.75, exclude=["features.0", "classifier"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = Sparsifier(model, opt, masks, RigL(total_steps=12, every=4))
    for _ in range(12):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert sparsifier.algorithm.history and _macs(model, x, sparsifier.masks) == dense


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.head(h + self.b(h))


class _Scaled(nn.Module):  # an output that is not the last layer's
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * self.b(self.a(x))


def _chain(*middle: nn.Module, first: nn.Module | None = None, last: nn.Module | None = None) -> nn.Sequential:
    return nn.Sequential(first or nn.Linear(8, 8), *middle, last or nn.Linear(8, 2))


_CONV_X = torch.randn(2, 3, 10)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: transform(m, "wider", 0.5), r"transformation 'wider' is not known; allowed: wide, parallel"),
        (lambda m: transform(m, "parallel", 1.0), r"sparsity"),
        (
            lambda m: transform(m, "parallel", 0.5, exclude=["nope"]),
            r"exclude pattern 'nope' matches no Linear or conv",
        ),
        (lambda m: transform(m, "parallel", 0.5, exclude="0"), r"exclude='0' is not allowed"),
        (lambda m: transform(nn.Linear(3, 3), "parallel", 0.5), r"the model itself is a Linear layer"),
        (lambda m: transform(nn.Conv1d(3, 3, 1), "wide", 0.5), r"the model itself is a Conv1d layer"),
        (lambda m: transform(nn.ReLU(), "parallel", 0.5), r"has no nn.Linear, nn.Conv1d or nn.Conv2d layer"),
        (lambda m: transform("model", "parallel", 0.5), r"model is a str"),
        # grouped convolutions, named, for every kind
        *[
            (
                lambda m, k=k: transform(
                    nn.Sequential(nn.Conv1d(4, 4, 3, groups=2), nn.Conv1d(4, 4, 1)),
                    k,
                    0.5,
                    example=torch.randn(2, 4, 9),
                ),  # fmt: skip
                r"layer '0' is a Conv1d with groups=2; allowed: groups=1",
            )
            for k in KINDS
        ],
        # no integer shape at this sparsity: say which sparsities work
        (lambda m: transform(m, "parallel", 0.2), r"parallel at sparsity 0.2 gives layer '0' 1 branch.*at least 0.334"),
        (
            lambda m: transform(nn.Sequential(nn.Linear(1, 2)), "parallel", 0.75),
            r"4 branches for its 2 weights \(fewer than one each\); allowed: sparsity at most 0.5 \(2 branches\)",
        ),
        (
            lambda m: transform(nn.Sequential(nn.Linear(1, 1)), "factorized", 0.5),
            r"factorized cannot split the 1 weight of layer '0' over two factors",
        ),
        (lambda m: transform(m, "doped", 0.05), r"doped at sparsity 0.05 gives layer '4' .* rank 0.*at least 0.116"),
        (lambda m: transform(nn.Sequential(nn.Linear(2, 2)), "doped", 0.5), r"rank 0.*sparsity 0 only"),
        (
            lambda m: transform(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 4)), "wide", 0.1),
            r"wide at sparsity 0.1 widens the 2 outputs of layer '0' to .* = 2, no wider; allowed: .* at least 0.36 \(3",
        ),
        # Sparse Wide outside its scope
        (lambda m: transform(_Residual(), "wide", 0.5), r"layer 'head' does not take the output of 'b' \(a residual"),
        (lambda m: transform(_Scaled(), "wide", 0.5), r"the model's output is not the output of its last module 'b'"),
        (
            lambda m: transform(
                nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16), nn.Linear(8, 2)),
                "wide",
                0.5,
                example=torch.randn(2, 3, 8),
            ),  # fmt: skip
            r"wide needs layer '0.self_attn.out_proj' called once per forward pass, not 0 times",
        ),
        (lambda m: transform(_chain(nn.GroupNorm(2, 8)), "wide", 0.5), r"cannot widen through '1' \(GroupNorm\)"),
        (lambda m: transform(_chain(nn.PReLU(8)), "wide", 0.5), r"cannot widen through '1' \(PReLU\)"),
        (  # a LayerNorm over the positions, not the channels
            lambda m: transform(
                _chain(nn.LayerNorm(8), first=nn.Conv1d(3, 8, 3), last=nn.Conv1d(8, 2, 1)), "wide", 0.5, example=_CONV_X
            ),  # fmt: skip
            r"cannot widen through '1' \(LayerNorm\)",
        ),
        (
            lambda m: transform(_chain(first=nn.Conv1d(3, 8, 3), last=nn.Linear(8, 2)), "wide", 0.5, example=_CONV_X),
            r"layer '1' does not take the 8 channels of '0' as its inputs \(input shape \(2, 8, 8\)\)",
        ),
        (lambda m: transform(_chain(first=nn.Conv1d(3, 8, 3)), "wide", 0.5), r"first layer '0' is a Conv1d.*example="),
        (lambda m: transform(m, "wide", 0.5, example=torch.randn(2, 7)), r"forward pass, which failed \(RuntimeError"),
        (
            lambda m: transform(nn.Sequential(nn.Linear(4, 4)), "wide", 0.5),
            r"no width to widen in Sequential: it has one",
        ),
        (lambda m: transform(m, "wide", 0.5, exclude=["2"]), r"touches an excluded layer"),
    ],
)
def test_bad_input_is_one_line(call, message):
    model = _mlp()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SparseforgeError, match=message) as info:
        call(model)
    assert "\n" not in str(info.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing changed


def test_the_guide_examples_run_as_written():
    import re
    from pathlib import Path

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "layers.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", guide, re.S)
    assert len(blocks) >= 2
    for i, code in enumerate(blocks):
        namespace: dict[str, object] = {}
        exec(compile(code, f"layers.md block {i}", "exec"), namespace)
        assert isinstance(namespace["sparsifier"], Sparsifier)


def test_the_guide_config_snippet_validates():
    import re
    from pathlib import Path

    import yaml

    from sparseforge.experiments.config import parse_config

    guide = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "layers.md").read_text(encoding="utf-8")
    snippet = re.findall(r"```yaml\n(.*?)```", guide, re.S)[0]
    config = parse_config(yaml.safe_load(snippet))
    assert config.model.sparse_ift is not None and config.model.sparse_ift.kind == "wide"


@pytest.mark.parametrize("kind", ["wide", "parallel", "factorized"])
def test_an_absurd_sparsity_is_refused_before_allocating(kind: str) -> None:
    model = nn.Sequential(nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 4))
    with pytest.raises(SparseforgeError, match=r"would hold [\d,]+ weights .*GiB as float32.*a lower sparsity"):
        transform(model, kind, 0.9999)
    assert isinstance(model[2], nn.Linear) and model[2].weight.shape == (4096, 4096)  # left unchanged
