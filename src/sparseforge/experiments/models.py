"""Small reference models for MNIST-1D and digits, shared by the demo, training and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import SparseforgeError

__all__ = ["MLP", "CNN1d", "MODELS", "build_model", "model_from_spec"]


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

    ``spec`` is ``mlp`` / ``cnn`` (built for ``in_features`` inputs and ``num_classes`` outputs,
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
