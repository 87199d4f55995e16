"""Built-in experiment models: parameter counts against hand-computed numbers, shapes, seeding,
pruning, and refusal of data of the wrong kind."""

from __future__ import annotations

import pytest
import torch

import sparseforge as sf
from sparseforge.errors import SparseforgeError
from sparseforge.experiments.models import IMAGE_MODELS, MODELS, build_model, image_shape, model_from_spec


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def resnet_params(n: int, w: int, classes: int, in_channels: int = 3) -> int:
    """Option-A CIFAR ResNet by hand: 3x3 convs without bias, BN (2 per channel), Linear head."""

    def conv_bn(cin: int, cout: int) -> int:
        return 9 * cin * cout + 2 * cout

    total = conv_bn(in_channels, w)
    channels = w
    for out in (w, 2 * w, 4 * w):
        for _ in range(n):
            total += conv_bn(channels, out) + conv_bn(out, out)
            channels = out
    return total + 4 * w * classes + classes


def test_resnet_counts_match_the_paper():
    # He et al. (2016), Table 6: 0.27 M, 0.46 M, 0.85 M parameters on CIFAR-10
    assert count(build_model("resnet20", 3072, 10)) == 269_722
    assert count(build_model("resnet32", 3072, 10)) == 464_154
    assert count(build_model("resnet56", 3072, 10)) == 853_018
    assert count(build_model("resnet20", 3072, 100)) == 269_722 + 64 * 90 + 90


def test_resnet_width_scales_every_stage():
    assert resnet_params(3, 16, 10) == 269_722  # the helper agrees with the paper's number
    assert count(build_model("resnet20", 3072, 10, width=8)) == resnet_params(3, 8, 10)
    assert count(build_model("resnet56", 784, 10, width=4)) == resnet_params(9, 4, 10, in_channels=1)


def test_resnet_option_a_shortcuts_have_no_parameters():
    model = build_model("resnet20", 3072, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 19  # stem + 18; 20th layer is the Linear head; no 1x1 projection convs
    assert all(c.kernel_size == (3, 3) for c in convs)


def test_lenet5_counts():
    # 3x32x32: conv 3->6 5x5, conv 6->16 5x5, 16*5*5 -> 120 -> 84 -> 10
    colour = (3 * 6 * 25 + 6) + (6 * 16 * 25 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert count(build_model("lenet5", 3072, 10)) == colour == 62_006
    # 1x28x28 padded by 2 in the first conv: the classic 61,706
    assert count(build_model("lenet5", 784, 10)) == colour - 2 * 6 * 25 == 61_706
    # width 12: 12 and 32 channels
    wide = (3 * 12 * 25 + 12) + (12 * 32 * 25 + 32) + (32 * 25 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
    assert count(build_model("lenet5", 3072, 10, width=12)) == wide


def test_vgg16_count():
    plan = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs, cin = 0, 3
    for c in plan:
        convs += 9 * cin * c + 2 * c  # conv without bias, BN
        cin = c
    head = (512 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert count(build_model("vgg16", 3072, 10)) == convs + head == 15_249_354
    half = build_model("vgg16", 3072, 10, width=32)
    assert [m.out_channels for m in half.modules() if isinstance(m, torch.nn.Conv2d)] == [c // 2 for c in plan]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in half.modules()) == 13


def test_vit_count_and_every_matrix_is_linear():
    dim, depth, hidden, patches = 128, 6, 256, 64
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    total = (48 * dim + dim) + dim + (patches + 1) * dim + depth * block + 2 * dim + (dim * 10 + 10)
    model = build_model("vit", 3072, 10)
    assert count(model) == total == 811_146
    matrices = depth * (dim * 3 * dim + dim * dim + 2 * dim * hidden) + 48 * dim + dim * 10
    prunable = sf.select_prunable(model)
    assert sum(p.numel() for p in prunable.values()) == matrices
    assert all(p.dim() == 2 for p in prunable.values())
    wide = build_model("vit", 3072, 10, width=192)
    assert wide.head.in_features == 192 and len(wide.blocks) == 6


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_output_shapes(name):
    model = build_model(name, 3072, 7).eval()
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, 7)
    if name not in ("vgg16",):
        grey = build_model(name, 784, 10).eval()
        assert grey(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_input_shape_keyword_and_inference():
    assert image_shape(3072) == (3, 32, 32)
    assert image_shape(784) == (1, 28, 28)
    assert image_shape(3 * 64 * 64) == (3, 64, 64)
    assert image_shape(40) is None
    model = build_model("resnet20", 3 * 24 * 40, 5, input_shape=(3, 24, 40)).eval()
    assert model(torch.randn(2, 3, 24, 40)).shape == (2, 5)
    assert build_model("vgg16", 3 * 64 * 64, 10)(torch.randn(2, 3, 64, 64)).shape == (2, 10)
    assert build_model("mlp", 40, 10, input_shape=(40,))(torch.randn(2, 40)).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS)
def test_seeded_init_leaves_global_rng_alone(name):
    features = 40 if name in ("mlp", "cnn") else 3072
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(name, features, 10, seed=5, width=8)
    assert torch.equal(torch.rand(3), expected)
    b = build_model(name, features, 10, seed=5, width=8)
    c = build_model(name, features, 10, seed=6, width=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_prune_then_forward(name):
    model = build_model(name, 3072, 10, seed=1)
    masks = sf.prune(model, 0.9)
    prunable = sf.select_prunable(model)
    assert prunable
    zeros = sum(int((p == 0).sum()) for p in prunable.values())
    total = sum(p.numel() for p in prunable.values())
    assert abs(zeros / total - 0.9) < 0.01
    assert abs(masks.sparsity() - 0.9) < 0.01
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_vector_models_refuse_images(name):
    with pytest.raises(SparseforgeError, match=r"takes \(batch, features\) inputs.*allowed for images: lenet5"):
        build_model(name, 3072, 10, input_shape=(3, 32, 32))
    model = build_model(name, 3072, 10)
    with pytest.raises(SparseforgeError, match=r"got images of shape \(2, 3, 32, 32\)"):
        model(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_image_models_refuse_vectors(name):
    with pytest.raises(SparseforgeError, match=rf"model '{name}' takes images, but 40 features are no square image"):
        build_model(name, 40, 10)
    with pytest.raises(SparseforgeError, match=r"got input_shape=\(3072,\)"):
        build_model(name, 3072, 10, input_shape=(3072,))
    model = build_model(name, 3072, 10)
    with pytest.raises(
        SparseforgeError, match=r"takes images of shape \(batch, 3, 32, 32\), got a tensor of shape \(2, 3072\)"
    ):
        model(torch.randn(2, 3072))
    with pytest.raises(SparseforgeError, match=r"got a tensor of shape \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))


def test_bad_arguments():
    with pytest.raises(SparseforgeError, match=r"model='resnet18' is not recognised; allowed: .*'resnet20'"):
        build_model("resnet18", 3072, 10)
    with pytest.raises(SparseforgeError, match=r"input_shape=\(3, 32, 30\) does not hold in_features=3072"):
        build_model("resnet20", 3072, 10, input_shape=(3, 32, 30))
    with pytest.raises(SparseforgeError, match=r"width=0 is not allowed"):
        build_model("resnet20", 3072, 10, width=0)
    with pytest.raises(SparseforgeError, match=r"width=130 is not allowed for 'vit'.*multiple of 4"):
        build_model("vit", 3072, 10, width=130)
    with pytest.raises(SparseforgeError, match=r"'vgg16' needs images of at least 32x32, got 28x28"):
        build_model("vgg16", 784, 10)
    with pytest.raises(SparseforgeError, match=r"'vit' cuts 4x4 patches, got 30x30"):
        build_model("vit", 900, 10)
    with pytest.raises(SparseforgeError, match=r"input_shape='3,32,32' is not allowed"):
        build_model("vit", 3072, 10, input_shape="3,32,32")  # type: ignore[arg-type]


def test_model_from_spec_builds_image_models():
    model = model_from_spec("resnet20", in_features=3072, num_classes=10, seed=3)
    assert count(model) == 269_722
    with pytest.raises(SparseforgeError, match="no square image"):
        model_from_spec("lenet5")  # default 40 features
