"""sparseforge: sparse neural networks on PyTorch.

Conventions used everywhere: *sparsity* is the fraction of zeros, *density* = 1 - sparsity;
``NM(n_keep, m)`` counts kept weights in each group of ``m`` inputs; a global sparsity budget
counts the prunable weights only (the report shows both totals).
"""

from .checkpoint import load, save
from .distributions import er, erk, global_sparsities, layer_sparsities, uniform
from .errors import SparseforgeError
from .masks import MaskState
from .prune import METHODS, prune
from .report import SparsityReport, sparsity_report
from .sparsifier import Sparsifier
from .structures import NM, Block, Channel, ConstantFanIn, Structure, Unstructured, parse_structure
from .targets import select_prunable
from .training import evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Block", "Channel", "ConstantFanIn", "METHODS", "MaskState", "NM", "SparseforgeError", "Sparsifier",
    "SparsityReport", "Structure", "Unstructured", "er", "erk", "global_sparsities", "layer_sparsities",
    "evaluate", "load", "parse_structure", "prune", "save", "select_prunable", "sparsity_report", "train", "uniform",
]
