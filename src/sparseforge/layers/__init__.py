"""Sparse layers that spend sparsity on capacity at the dense layer's FLOPs (Sparse-IFT).

Sparse Iso-FLOP Transformations (Thangarasa et al., ICML 2024) replace a dense layer by a larger
sparse one with the same number of multiply-adds per input: instead of fewer FLOPs, the same
FLOPs buy more parameters to choose from, and dynamic sparse training (RigL) picks which ones.
This package holds the transformations of ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers
(``groups=1``) and the model rewrite:

- :class:`SparseParallel`: ``1 / (1 - s)`` sparse copies of the layer, summed;
- :class:`SparseFactorized`: ``W ~ U V`` with both factors sparse and the inner width chosen so
  that their kept weights equal the dense layer's (a convolution: ``V`` with the dense kernel,
  ``U`` 1x1);
- :class:`SparseDoped`: a dense low-rank ``U V`` plus a sparse full-size residual;
- Sparse Wide (:func:`transform` with ``"wide"``): every hidden width of a chain of layers
  widened by ``1 / sqrt(1 - s)``;
- :func:`transform`: rewrites a model and returns the masks whose kept counts make each replaced
  layer's multiply-adds equal to the dense layer's, exactly.
"""

from .base import IsoFlopLayer, LayerSpec
from .budget import iso_macs, split_exactly
from .doped import SparseDoped
from .factorized import SparseFactorized
from .parallel import SparseParallel
from .transform import TRANSFORMS, transform

__all__ = [
    "TRANSFORMS",
    "IsoFlopLayer",
    "LayerSpec",
    "SparseDoped",
    "SparseFactorized",
    "SparseParallel",
    "iso_macs",
    "split_exactly",
    "transform",
]
