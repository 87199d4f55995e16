"""What the Sparse-IFT layers share: the dense layer's type and geometry, checked once.

A Sparse-IFT layer replaces an ``nn.Linear``, ``nn.Conv1d`` or ``nn.Conv2d`` (``groups=1``). Its
parts are layers of the same type: a convolution's parts keep the dense layer's kernel, stride,
padding, dilation and padding mode (or are 1x1 / pointwise, where a factor only mixes channels),
so every part produces the dense layer's output positions. A part's multiply-adds per output
position are its kept weights, which is why kept-weight counts are FLOP counts here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError, check_int

__all__ = ["MAX_WEIGHTS", "REPLACEABLE", "IsoFlopLayer", "Layer", "LayerSpec", "check_layer", "check_weights", "in_out"]

#: The most weights (dense storage, float elements) one transformed layer may hold: 2^30, 4 GiB as
#: float32. A sparsity close to 1 would otherwise ask for absurd widths, branches or ranks.
MAX_WEIGHTS = 1 << 30


def check_weights(count: int, what: str) -> None:
    """Refuse a transformed layer of more than :data:`MAX_WEIGHTS` weights (``what`` names it)."""
    if count > MAX_WEIGHTS:
        raise SparseforgeError(
            f"{what} would hold {count:,} weights ({count * 4 / 2**30:.1f} GiB as float32); allowed: at most "
            f"{MAX_WEIGHTS:,} per transformed layer (a lower sparsity)"
        )


#: A layer Sparse-IFT replaces, and the type of the parts it builds.
Layer = nn.Linear | nn.Conv1d | nn.Conv2d
#: The layer types Sparse-IFT replaces (convolutions with ``groups=1`` only).
REPLACEABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


def check_layer(layer: object, name: str = "") -> Layer:
    """``layer`` if Sparse-IFT can replace it: an ``nn.Linear``, or an ``nn.Conv1d`` / ``nn.Conv2d``
    with ``groups=1``; else a one-line error that names it (``name``: its name in the model)."""
    label = f"layer {name!r}" if name else "the layer"
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        if layer.groups != 1:
            raise SparseforgeError(
                f"{label} is a {type(layer).__name__} with groups={layer.groups}; allowed: groups=1 "
                "(exclude the layer to keep it dense)"
            )
        return layer
    if isinstance(layer, nn.Linear):
        return layer
    raise SparseforgeError(f"{label} is a {type(layer).__name__}; allowed: nn.Linear, nn.Conv1d, nn.Conv2d")


def in_out(layer: nn.Module) -> tuple[int, int]:
    """``(inputs, outputs)`` of a Linear (features) or a convolution (channels)."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if isinstance(layer, (nn.Conv1d, nn.Conv2d)):
        return layer.in_channels, layer.out_channels
    raise SparseforgeError(f"{type(layer).__name__} has no in/out size; allowed: nn.Linear, nn.Conv1d, nn.Conv2d")


@dataclass(frozen=True)
class LayerSpec:
    """The type and geometry new layers copy from a dense one.

    ``conv`` is ``nn.Conv1d`` or ``nn.Conv2d`` (``None``: ``nn.Linear``); a convolution's kernel
    size, stride, padding, dilation and padding mode are kept. ``kernel`` is the number of kernel
    positions (1 for a Linear): a layer's weights are ``outputs x inputs x kernel``.
    """

    conv: type[nn.Conv1d] | type[nn.Conv2d] | None = None
    kernel_size: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] | str = ()
    dilation: tuple[int, ...] = ()
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, layer: nn.Module, name: str = "") -> LayerSpec:
        """The spec of a replaceable ``layer`` (see :func:`check_layer`)."""
        layer = check_layer(layer, name)
        if isinstance(layer, nn.Linear):
            return cls()
        conv = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        padding = layer.padding if isinstance(layer.padding, str) else tuple(layer.padding)
        return cls(
            conv, tuple(layer.kernel_size), tuple(layer.stride), padding, tuple(layer.dilation), layer.padding_mode
        )

    @property
    def kernel(self) -> int:
        """Kernel positions per weight row: ``prod(kernel_size)``, 1 for a Linear."""
        return math.prod(self.kernel_size)

    def make(self, inputs: int, outputs: int, *, bias: bool, pointwise: bool = False) -> Layer:
        """A fresh layer (default initialisation) of this type with ``inputs`` -> ``outputs``;
        ``pointwise``: a 1x1 convolution (stride 1, no padding) instead of the dense geometry.
        Refused (:func:`check_weights`) beyond :data:`MAX_WEIGHTS` weights."""
        check_weights(inputs * outputs * (1 if pointwise else self.kernel), f"a {inputs} -> {outputs} part")
        if self.conv is None:
            return nn.Linear(inputs, outputs, bias=bias)
        conv: Any = self.conv  # its geometry comes from a layer of the same type
        if pointwise:
            return conv(inputs, outputs, 1, bias=bias)
        return conv(
            inputs,
            outputs,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=bias,
            padding_mode=self.padding_mode,
        )

    def add_bias(self, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``out + bias`` along the output axis: the last for a Linear, 1 (channels) for a convolution."""
        if bias is None:
            return out
        if self.conv is None:
            return out + bias
        return out + bias.view(-1, *([1] * (out.dim() - 2)))

    def describe(self) -> str:
        """The geometry for a module's ``repr`` (empty for a Linear)."""
        if self.conv is None:
            return ""
        return (
            f", {self.conv.__name__}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )


class IsoFlopLayer(nn.Module):
    """A replacement of a dense layer with the same inputs and outputs.

    ``in_features`` and ``out_features`` are the dense layer's: features of an ``nn.Linear``,
    channels of a convolution. ``like``: a dense layer whose type and geometry the parts copy
    (see :class:`LayerSpec`); ``None`` builds Linear parts.
    """

    def __init__(self, in_features: int, out_features: int, like: nn.Module | None = None) -> None:
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1)
        self.out_features = check_int(out_features, "out_features", 1)
        self.spec = LayerSpec() if like is None else LayerSpec.of(like)

    @classmethod
    def _source(cls, layer: object) -> Layer:
        """``layer`` if this class can replace it, else a one-line error."""
        if not isinstance(layer, REPLACEABLE):
            raise SparseforgeError(
                f"{cls.__name__} replaces an nn.Linear, nn.Conv1d or nn.Conv2d, not {type(layer).__name__}"
            )
        return check_layer(layer)

    def _like(self, layer: nn.Module) -> None:
        """Move to ``layer``'s device and dtype."""
        weight = layer.weight
        assert isinstance(weight, torch.Tensor)
        self.to(device=weight.device, dtype=weight.dtype)

    @staticmethod
    def _copy(target: torch.Tensor | None, source: torch.Tensor | None) -> None:
        if target is not None and source is not None:
            with torch.no_grad():
                target.copy_(source)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}{self.spec.describe()}"
