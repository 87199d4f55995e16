"""Small reference models for MNIST-1D and digits, shared by the demo, training and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SparseforgeError

__all__ = ["MLP", "CNN1d", "MODELS", "build_model"]


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


class CNN1d(nn.Module):
    """A small 1-D CNN for sequences of ``length`` scalars (MNIST-1D: 40).

    Three stride-2 convolutions (``channels`` wide, kernel 4, ReLU) and a Linear classifier; the
    input ``(batch, length)`` gets a channel axis inside ``forward``. Kernel 4 keeps every layer's
    fan-in divisible by 4, so 2:4 and 1:4 patterns fit every layer.
    """

    def __init__(self, length: int, num_classes: int, channels: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 4, stride=2, padding=1), nn.ReLU(),
        )
        with torch.no_grad():
            flat = self.features(torch.zeros(1, 1, length)).numel()
        self.classifier = nn.Linear(flat, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x = x.unsqueeze(1)
        return self.classifier(self.features(x).flatten(1))


MODELS = ("mlp", "cnn")


def build_model(name: str, in_features: int, num_classes: int, *, seed: int = 0, width: int | None = None) -> nn.Module:
    """Build a reference model with a seeded initialisation (global RNG state is left unchanged)."""
    if name not in MODELS:
        raise SparseforgeError(f"model={name!r} is not recognised; allowed: {list(MODELS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            w = width or 256
            return MLP(in_features, num_classes, hidden=(w, w))
        return CNN1d(in_features, num_classes, channels=width or 32)
