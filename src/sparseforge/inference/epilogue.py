"""Activation functions that a sparse layer can apply to its own output (the fused epilogue).

``convert`` fuses an activation module into the linear layer before it when the model's
structure says the activation consumes that layer's output and nothing else does (a
``nn.Sequential`` of ``Linear, activation``, or the MLP of a transformer block found by
:func:`~sparseforge.activations.find_mlps`). The batched C kernel then adds the bias and applies the
activation to each output tile while it is still in registers; every other path applies it with
PyTorch after the matmul, so a layer computes the same function whichever path runs.

Names (:data:`ACTIVATIONS`): ``"relu"``, ``"gelu"`` (erf form, ``nn.GELU()``), ``"gelu_tanh"``
(``nn.GELU(approximate="tanh")``) and ``"silu"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SparseforgeError

__all__ = ["ACTIVATIONS", "activation_code", "activation_name_of", "apply_activation"]

#: Activation name -> the C kernels' code (``csrc/spmm.c``, SF_ACT_*).
ACTIVATIONS: dict[str, int] = {"relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}

# Hugging Face activation classes by name (transformers.activations), recognised without importing
# transformers: the erf GELU, the tanh approximations, and SiLU.
_HF_NAMES = {"GELUActivation": "gelu", "NewGELUActivation": "gelu_tanh", "SiLUActivation": "silu"}


def activation_code(name: str | None) -> int:
    """The C code of ``name`` (0 for ``None``); raises for an unknown name."""
    if name is None:
        return 0
    code = ACTIVATIONS.get(name)
    if code is None:
        raise SparseforgeError(f"activation {name!r} is not allowed; allowed: {sorted(ACTIVATIONS)} or None")
    return code


def activation_name_of(module: nn.Module) -> str | None:
    """The fusable activation ``module`` computes, or ``None`` (not an activation we fuse).

    Exact types only (a subclass may override ``forward``); ``nn.ReLU``, ``nn.GELU`` (both
    approximations), ``nn.SiLU``, and the Hugging Face GELU / SiLU classes. A module with hooks is
    never fused (the hook would stop running).
    """
    if module._forward_hooks or module._forward_pre_hooks:  # noqa: SLF001
        return None
    kind = type(module)
    if kind is nn.ReLU:
        return "relu"
    if kind is nn.SiLU:
        return "silu"
    if kind is nn.GELU:
        approximate = getattr(module, "approximate", "none")
        return "gelu" if approximate == "none" else "gelu_tanh" if approximate == "tanh" else None
    name = _HF_NAMES.get(kind.__name__)
    if name is not None and kind.__module__.startswith("transformers."):
        if name == "gelu" and getattr(module, "act", None) is not F.gelu:
            return None  # GELUActivation(use_gelu_python=True): a Python erf formula, left alone
        return name
    return None


def apply_activation(y: torch.Tensor, name: str | None) -> torch.Tensor:
    """``y`` after the activation ``name`` (in place where PyTorch allows it); ``None``: ``y``."""
    if name is None:
        return y
    if name == "relu":
        return torch.relu_(y)
    if name == "gelu":
        return F.gelu(y)
    if name == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if name == "silu":
        return F.silu(y)
    raise SparseforgeError(f"activation {name!r} is not allowed; allowed: {sorted(ACTIVATIONS)} or None")
