"""Training-time sparsity algorithms: how masks start and how they change.

Each algorithm implements :class:`~sparseforge.algorithms.base.Algorithm` and is driven by a
:class:`~sparseforge.sparsifier.Sparsifier`; steps count completed optimizer steps.
"""

from .base import Algorithm
from .dst import SET, DynamicSparse, RigL
from .gmp import GMP
from .granet import GraNet
from .imp import IMPHistory, IMPRound, IMPRoundRecord, imp, prune_surviving, round_sparsities
from .nm_training import GradientFlowSchedule, NMTraining, progressive_gradient_flow, srste
from .snfs import SNFS
from .soups import Ingredient, SoupCycle, SoupHistory, average_states, sparse_model_soups
from .srigl import SRigL
from .static import StaticSparse, init_sparse

__all__ = [
    "Algorithm",
    "DynamicSparse",
    "GradientFlowSchedule",
    "IMPHistory",
    "IMPRound",
    "IMPRoundRecord",
    "Ingredient",
    "NMTraining",
    "SoupCycle",
    "SoupHistory",
    "average_states",
    "imp",
    "progressive_gradient_flow",
    "prune_surviving",
    "round_sparsities",
    "sparse_model_soups",
    "srste",
    "GMP",
    "GraNet",
    "RigL",
    "SET",
    "SNFS",
    "SRigL",
    "StaticSparse",
    "init_sparse",
]
