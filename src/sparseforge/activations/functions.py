"""Activation functions for sparse MLPs, and swapping a model's MLP activation (ReLU² Wins, ProSparse)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError
from ..masks import check_module, unwrap
from .sites import find_mlps

__all__ = ["ACTIVATIONS", "ReLU2", "make_activation", "swap_activation"]


class ReLU2(nn.Module):
    """``relu(x) ** 2`` (So et al., Primer; the best sparsity / quality trade-off in ReLU² Wins)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


#: Activation names :func:`swap_activation` accepts.
ACTIVATIONS = ("relu", "relu2", "gelu", "silu")


def make_activation(kind: str) -> nn.Module:
    """A fresh activation module: ``"relu"``, ``"relu2"``, ``"gelu"`` or ``"silu"``."""
    table: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "relu2": ReLU2, "gelu": nn.GELU, "silu": nn.SiLU}
    if kind not in table:
        raise SparseforgeError(f"activation {kind!r} is not known; allowed: {', '.join(ACTIVATIONS)}")
    return table[kind]()


def swap_activation(model: nn.Module, kind: str) -> list[str]:
    """Replace the activation module of every MLP of a transformer (in place); the names replaced.

    In a gated MLP (Llama's ``act(gate) * up``) the gate's activation is replaced, so ``"relu"``
    gives ReGLU and ``"relu2"`` a squared-ReLU GLU. The weights are unchanged: a swapped
    pretrained model needs fine-tuning to recover its quality. Raises when an MLP calls its
    activation as a function rather than a module (nothing to replace; the block is named).
    """
    model = unwrap(check_module(model))
    make_activation(kind)  # validate before changing anything
    sites = find_mlps(model)
    missing = [site.block for site in sites if site.activation is None]
    if missing:
        raise SparseforgeError(
            f"the MLP of block {missing[0]} has no activation module to replace (looked for "
            "modules such as nn.SiLU, nn.GELU or transformers' GELUActivation beside its layers); allowed: "
            "MLPs whose activation is a module"
        )
    names: list[str] = []
    for site in sites:
        name = site.activation
        assert name is not None
        model.set_submodule(name, make_activation(kind))
        names.append(name)
    return names
