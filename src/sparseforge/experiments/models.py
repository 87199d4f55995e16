"""Reference models for the experiments: small 1-D models and CIFAR-style image models.

1-D models take ``(batch, features)`` inputs:

* ``mlp``: Linear layers with ReLU (``width`` hidden units, default 256);
* ``cnn``: a small 1-D CNN (``width`` channels, default 32), e.g. for MNIST-1D.

Image models take ``(batch, channels, height, width)`` inputs:

* ``lenet5``: LeNet-5 with ReLU and max pooling (conv 5x5 ``width`` -> conv 5x5 -> 120 -> 84);
  a 28x28 input is padded by 2 in the first convolution, as LeCun padded MNIST to 32x32;
* ``resnet20`` / ``resnet32`` / ``resnet56``: the CIFAR ResNets of He et al. (2016): a 3x3 stem,
  three stages of n = 3 / 5 / 9 basic blocks of ``width`` / 2 ``width`` / 4 ``width`` channels
  (default 16), global average pooling and one Linear layer. Shortcuts are option A (identity,
  and parameter-free at a stage change: stride-2 subsampling and zero channels), so ResNet-20
  has 0.27 M parameters for 10 classes, as in the paper;
* ``vgg16``: VGG-16 for CIFAR with batch norm: 13 3x3 convolutions (``width`` -> 8 ``width``
  channels, default 64), global average pooling, and a classifier of two 512-wide Linear layers;
* ``vit``: a small Vision Transformer: 4x4 patches, a class token, 6 pre-norm blocks of
  4 heads, embedding ``width`` (default 128) and MLP 2 ``width``; every weight matrix (patch
  embedding, attention, MLP, head) is an ``nn.Linear``, so the pruning applies to all of them.

Each build is seeded (the global RNG is left unchanged). Image models get their input shape
from ``input_shape`` or, without it, from the number of features: ``3 * s * s`` is a colour
``s x s`` image, ``s * s`` a grey one (3072 -> 3x32x32, 784 -> 1x28x28).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError

__all__ = [
    "CNN1d",
    "IMAGE_MODELS",
    "LeNet5",
    "MLP",
    "MODELS",
    "ResNetCifar",
    "VGG16",
    "VECTOR_MODELS",
    "ViT",
    "build_model",
    "image_shape",
    "model_from_spec",
]


def _refuse_images(model: str, x: torch.Tensor) -> None:
    if x.dim() >= 4:
        raise SparseforgeError(
            f"model {model!r} takes (batch, features) inputs, got images of shape {tuple(x.shape)}; "
            f"allowed for images: {', '.join(IMAGE_MODELS)}"
        )


class MLP(nn.Sequential):
    """``in -> hidden... -> classes`` with ReLU between Linear layers."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (256, 256)) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_images("mlp", x)
        return super().forward(x)


class CNN1d(nn.Module):
    """A small 1-D CNN for sequences of ``length`` scalars (MNIST-1D: 40).

    Three stride-2 convolutions (``channels`` wide, kernel 4, ReLU) and a Linear classifier; the
    input ``(batch, length)`` gets a channel axis inside ``forward``. Kernel 4 keeps every layer's
    fan-in divisible by 4, so 2:4 and 1:4 patterns fit every layer.
    """

    def __init__(self, length: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 4, stride=2, padding=1),
            nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, length)).numel()
        self.classifier = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_images("cnn", x)
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x).flatten(1))


class _ImageModel(nn.Module):
    """Checks that inputs are ``(batch, *input_shape)`` images before the layers see them."""

    model_name = "image model"

    def __init__(self, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.input_shape = input_shape

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            c, h, w = self.input_shape
            raise SparseforgeError(
                f"model {self.model_name!r} takes images of shape (batch, {c}, {h}, {w}), got a tensor of shape "
                f"{tuple(x.shape)}; allowed for (batch, features) data: {', '.join(VECTOR_MODELS)}"
            )


class LeNet5(_ImageModel):
    """LeNet-5 with ReLU and max pooling: conv 5x5 (``channels``), pool, conv 5x5, pool, 120, 84."""

    model_name = "lenet5"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, channels: int = 6) -> None:
        super().__init__(input_shape)
        c, h, w = input_shape
        second = max(1, round(channels * 16 / 6))
        pad = 2 if min(h, w) < 32 else 0  # 28x28 digits padded to 32x32, as LeCun did
        self.features = nn.Sequential(
            nn.Conv2d(c, channels, 5, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, second, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, *input_shape)).numel()
        self.classifier = nn.Sequential(
            nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.classifier(self.features(x).flatten(1))


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers; an option-A shortcut (subsample, zero channels) where the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride = stride
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1:
            shortcut = shortcut[:, :, :: self.stride, :: self.stride]
        if self.extra:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))
        return F.relu(out + shortcut)


class ResNetCifar(_ImageModel):
    """He et al. (2016) CIFAR ResNet with ``6 n + 2`` layers (n = 3: ResNet-20) and option-A shortcuts."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, blocks: int, width: int = 16) -> None:
        super().__init__(input_shape)
        self.model_name = f"resnet{6 * blocks + 2}"
        self.conv1 = nn.Conv2d(input_shape[0], width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        layers: list[nn.Module] = []
        channels = width
        for stage in range(3):
            out = width * 2**stage
            for i in range(blocks):
                layers.append(_BasicBlock(channels, out, 2 if stage > 0 and i == 0 else 1))
                channels = out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(out.mean(dim=(2, 3)))


class VGG16(_ImageModel):
    """VGG-16 for CIFAR: 13 conv-BN-ReLU layers in 5 pooled stages, then 512 -> 512 -> classes."""

    model_name = "vgg16"

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 64) -> None:
        super().__init__(input_shape)
        stages = ((1, 2), (2, 2), (4, 3), (8, 3), (8, 3))  # (channels / width, convolutions)
        layers: list[nn.Module] = []
        channels = input_shape[0]
        for factor, convs in stages:
            for _ in range(convs):
                layers += [
                    nn.Conv2d(channels, width * factor, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width * factor),
                    nn.ReLU(),
                ]
                channels = width * factor
            layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(channels, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, num_classes)
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.classifier(self.features(x).mean(dim=(2, 3)))


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(_ImageModel):
    """A small Vision Transformer: ``patch`` x ``patch`` patches embedded by an ``nn.Linear``, a class
    token, learned position embeddings, ``depth`` pre-norm blocks and a Linear head on the class token."""

    model_name = "vit"

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dim: int = 128,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: int = 2,
        patch: int = 4,
    ) -> None:
        super().__init__(input_shape)
        c, h, w = input_shape
        self.patch = patch
        patches = (h // patch) * (w // patch)
        self.patch_embed = nn.Linear(c * patch * patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, patches + 1, dim))
        self.blocks = nn.Sequential(*[_Block(dim, heads, mlp_ratio * dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        b, c, h, w = x.shape
        p = self.patch
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        x = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


VECTOR_MODELS: tuple[str, ...] = ("mlp", "cnn")
IMAGE_MODELS: tuple[str, ...] = ("lenet5", "resnet20", "resnet32", "resnet56", "vgg16", "vit")
MODELS: tuple[str, ...] = VECTOR_MODELS + IMAGE_MODELS
_RESNET_BLOCKS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}
_MIN_SIDE = {"lenet5": 16, "vgg16": 32, "vit": 4}  # others: 8 (three stride-2 stages)


def image_shape(in_features: int) -> tuple[int, int, int] | None:
    """``(channels, side, side)`` of a square image with ``in_features`` values (3 channels or 1), else None."""
    for channels in (3, 1):
        if in_features % channels == 0:
            side = math.isqrt(in_features // channels)
            if side > 0 and side * side * channels == in_features:
                return (channels, side, side)
    return None


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SparseforgeError(f"{name}={value!r} is not allowed; allowed: an integer >= {low}")
    return value


def _image_input(name: str, in_features: int, input_shape: tuple[int, ...] | None) -> tuple[int, int, int]:
    if input_shape is None:
        shape = image_shape(in_features)
        if shape is None:
            raise SparseforgeError(
                f"model {name!r} takes images, but {in_features} features are no square image; allowed: "
                "3*s*s (colour) or s*s (grey) features, or input_shape=(channels, height, width); "
                f"for (batch, features) data: {', '.join(VECTOR_MODELS)}"
            )
    elif len(input_shape) != 3:
        raise SparseforgeError(
            f"model {name!r} takes images, got input_shape={input_shape}; allowed: (channels, height, width), "
            f"or a (batch, features) model: {', '.join(VECTOR_MODELS)}"
        )
    else:
        shape = (input_shape[0], input_shape[1], input_shape[2])
    low = _MIN_SIDE.get(name, 8)
    if min(shape[1:]) < low:
        raise SparseforgeError(
            f"model {name!r} needs images of at least {low}x{low}, got {shape[1]}x{shape[2]}; allowed: height, width >= {low}"
        )
    if name == "vit" and (shape[1] % 4 or shape[2] % 4):
        raise SparseforgeError(
            f"model 'vit' cuts 4x4 patches, got {shape[1]}x{shape[2]} images; allowed: height and width divisible by 4"
        )
    return shape


def build_model(
    name: str,
    in_features: int,
    num_classes: int,
    *,
    seed: int = 0,
    width: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> nn.Module:
    """Build a reference model with a seeded initialisation (global RNG state is left unchanged).

    ``width`` is the hidden width of ``mlp`` and the first layer's channels (or the ViT's embedding
    size) otherwise; ``input_shape`` is one sample's shape (``(features,)`` or ``(C, H, W)``); image
    models infer a square image from ``in_features`` without it.
    """
    if name not in MODELS:
        raise SparseforgeError(f"model={name!r} is not recognised; allowed: {list(MODELS)}")
    _check_int("in_features", in_features, 1)
    _check_int("num_classes", num_classes, 1)
    if width is not None:
        _check_int("width", width, 1)
    shape: tuple[int, ...] | None = None
    if input_shape is not None:
        if isinstance(input_shape, (str, bytes, torch.Tensor)) or not isinstance(input_shape, Sequence):
            raise SparseforgeError(f"input_shape={input_shape!r} is not allowed; allowed: a tuple of positive integers")
        shape = tuple(_check_int("input_shape", d, 1) for d in input_shape)
        if not shape or math.prod(shape) != in_features:
            raise SparseforgeError(
                f"input_shape={shape} does not hold in_features={in_features} values; allowed: a shape whose product "
                "is in_features"
            )
    if name in VECTOR_MODELS and shape is not None and len(shape) != 1:
        raise SparseforgeError(
            f"model {name!r} takes (batch, features) inputs, got input_shape={shape}; allowed for images: "
            f"{', '.join(IMAGE_MODELS)}"
        )
    image = _image_input(name, in_features, shape) if name in IMAGE_MODELS else None
    if name == "vit" and width is not None and width % 4:
        raise SparseforgeError(f"width={width} is not allowed for 'vit' (4 attention heads); allowed: a multiple of 4")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            w = width or 256
            return MLP(in_features, num_classes, hidden=(w, w))
        if name == "cnn":
            return CNN1d(in_features, num_classes, channels=width or 32)
        assert image is not None
        if name == "lenet5":
            return LeNet5(image, num_classes, channels=width or 6)
        if name in _RESNET_BLOCKS:
            return ResNetCifar(image, num_classes, _RESNET_BLOCKS[name], width=width or 16)
        if name == "vgg16":
            return VGG16(image, num_classes, width=width or 64)
        return ViT(image, num_classes, dim=width or 128)


def _import_target(spec: str) -> object:
    """The object ``module.path:attr`` or ``path/to/file.py:attr`` names (cwd is importable)."""
    import importlib
    import importlib.util
    import os
    import sys
    from pathlib import Path

    module_part, _, attr = spec.rpartition(":")
    if not module_part or not attr:
        raise SparseforgeError(
            f"model={spec!r} is neither a built-in model ({', '.join(MODELS)}) nor an import path; "
            "allowed: a built-in name, package.module:factory or path/to/file.py:factory"
        )
    if module_part.endswith(".py"):
        file = Path(module_part)
        if not file.is_file():
            raise SparseforgeError(
                f"model={spec!r}: {module_part!r} " + ("is a directory" if file.is_dir() else "does not exist")
            )
        loader_spec = importlib.util.spec_from_file_location(f"_sparseforge_user_{file.stem}", file)
        if loader_spec is None or loader_spec.loader is None:
            raise SparseforgeError(f"model={spec!r}: {module_part!r} cannot be imported as a Python file")
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            raise SparseforgeError(
                f"model={spec!r}: importing {module_part!r} failed ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` does: modules of the current folder import
        try:
            module = importlib.import_module(module_part)
        except Exception as exc:
            raise SparseforgeError(
                f"model={spec!r}: cannot import module {module_part!r} ({type(exc).__name__}: {_first_line(exc)})"
            ) from None
    if not hasattr(module, attr):
        raise SparseforgeError(f"model={spec!r}: module {module_part!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no message"


def model_from_spec(spec: str, *, in_features: int = 40, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """Build the model a command line names: a built-in name or a factory given by import path.

    ``spec`` is a built-in name (built for ``in_features`` inputs and ``num_classes`` outputs,
    seeded by ``seed``), or ``package.module:factory`` / ``path/to/file.py:factory``, where
    ``factory`` is called with no arguments (a class or a function) and must return an
    ``nn.Module``; an ``nn.Module`` instance is used as is. Every failure is one line.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SparseforgeError(
            f"model={spec!r} is empty; allowed: {', '.join(MODELS)}, package.module:factory or file.py:factory"
        )
    spec = spec.strip()
    if spec in MODELS:
        return build_model(spec, in_features, num_classes, seed=seed)
    target = _import_target(spec)
    if isinstance(target, nn.Module):
        return target
    if not callable(target):
        raise SparseforgeError(
            f"model={spec!r} names a {type(target).__name__}; allowed: a function or class returning an nn.Module"
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = target()
    except Exception as exc:
        raise SparseforgeError(
            f"model={spec!r}: calling the factory with no arguments failed ({type(exc).__name__}: {_first_line(exc)})"
        ) from None
    if not isinstance(model, nn.Module):
        raise SparseforgeError(f"model={spec!r} returned a {type(model).__name__}; allowed: a torch.nn.Module")
    return model
