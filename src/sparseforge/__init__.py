"""sparseforge: sparse neural networks on PyTorch.

Conventions used everywhere: *sparsity* is the fraction of zeros, *density* = 1 - sparsity;
``NM(n_keep, m)`` counts kept weights in each group of ``m`` inputs; a global sparsity budget
counts the prunable weights only (the report shows both totals).

The public names below are imported on first use, so ``import sparseforge`` (and the command
line's start-up, where Ctrl-C must already be handled) does not import torch until it is needed.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "load": "checkpoint",
    "save": "checkpoint",
    "er": "distributions",
    "erk": "distributions",
    "global_sparsities": "distributions",
    "layer_sparsities": "distributions",
    "uniform": "distributions",
    "SparseforgeError": "errors",
    "MaskState": "masks",
    "METHODS": "pruning",
    "prune": "pruning",
    "SparsityReport": "report",
    "sparsity_report": "report",
    "Sparsifier": "sparsifier",
    "NM": "structures",
    "Block": "structures",
    "Channel": "structures",
    "ConstantFanIn": "structures",
    "Structure": "structures",
    "Unstructured": "structures",
    "parse_structure": "structures",
    "select_prunable": "targets",
    "evaluate": "training",
    "train": "training",
}

__all__ = [
    "Block",
    "Channel",
    "ConstantFanIn",
    "METHODS",
    "MaskState",
    "NM",
    "SparseforgeError",
    "Sparsifier",
    "SparsityReport",
    "Structure",
    "Unstructured",
    "er",
    "erk",
    "evaluate",
    "global_sparsities",
    "layer_sparsities",
    "load",
    "parse_structure",
    "prune",
    "save",
    "select_prunable",
    "sparsity_report",
    "train",
    "uniform",
]
assert sorted(__all__) == sorted(_EXPORTS)  # one list of public names, spelled out for readers and linters


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sparseforge' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static type checkers and IDEs see the names directly
    from .checkpoint import load, save
    from .distributions import er, erk, global_sparsities, layer_sparsities, uniform
    from .errors import SparseforgeError
    from .masks import MaskState
    from .pruning import METHODS, prune
    from .report import SparsityReport, sparsity_report
    from .sparsifier import Sparsifier
    from .structures import NM, Block, Channel, ConstantFanIn, Structure, Unstructured, parse_structure
    from .targets import select_prunable
    from .training import evaluate, train
