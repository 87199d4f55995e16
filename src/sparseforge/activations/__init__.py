"""Activation sparsity: measure it, induce it, and run the sparse inputs fast.

Most MLP hidden activations of a transformer are close to zero for any given token; skipping the
weight columns they multiply saves work with no weight pruning at all. This package holds:

- where: :func:`find_mlps` finds every block's MLP (its up / gate layers, the down layer that
  reads the hidden activation, the activation module) by structure;
- measuring: :func:`measure_activations` (per layer and per token: exact zeros and entries below
  a threshold), :func:`cett_thresholds` (ReLU² Wins' CETT), :func:`ppl_p_sparsity` (the Sparsing
  Law's PPL-p% sparsity), :func:`plot_activation_sparsity`;
- training-free thresholds (TEAL, CATS): :func:`sparsify_activations` turns chosen layers into
  :class:`ThresholdedLinear`, calibrated per layer to a target sparsity; ``convert`` then runs
  them with a sparse-input kernel at batch 1;
- methods with fine-tuning: :func:`swap_activation` (ReLU, ReLU², ...), :func:`apply_topk`
  (top-k activation, The Lazy Neuron Phenomenon), :class:`ActivationL1` with a
  :class:`ProSparseSchedule` (ProSparse's progressive L1).
"""

from .calibrate import (
    WHERE,
    ActivationThresholds,
    LayerThreshold,
    apply_thresholds,
    sparsify_activations,
    threshold_layers,
)
from .cett import cett, cett_threshold, cett_thresholds, down_inputs
from .functions import ACTIVATIONS, ReLU2, make_activation, swap_activation
from .measure import ActivationReport, LayerActivity, measure_activations
from .plot import plot_activation_sparsity
from .ppl_sparsity import PPLSparsity, ppl_p_sparsity
from .prosparse import ActivationL1, ProSparseSchedule
from .sites import MLPSite, find_mlps
from .thresholded import ThresholdedLinear, drop_small
from .topk import TopKLinear, apply_topk, keep_topk

__all__ = [
    "ACTIVATIONS",
    "WHERE",
    "ActivationL1",
    "ActivationReport",
    "ActivationThresholds",
    "LayerActivity",
    "LayerThreshold",
    "MLPSite",
    "PPLSparsity",
    "ProSparseSchedule",
    "ReLU2",
    "ThresholdedLinear",
    "TopKLinear",
    "apply_thresholds",
    "apply_topk",
    "cett",
    "cett_threshold",
    "cett_thresholds",
    "down_inputs",
    "drop_small",
    "find_mlps",
    "keep_topk",
    "make_activation",
    "measure_activations",
    "plot_activation_sparsity",
    "ppl_p_sparsity",
    "sparsify_activations",
    "swap_activation",
    "threshold_layers",
]
