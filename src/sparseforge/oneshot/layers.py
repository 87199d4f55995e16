"""The prunable linear layers of a model: ``nn.Linear`` and GPT-2's ``Conv1D``.

transformers' ``Conv1D`` (GPT-2 and its relatives) is a linear layer whose weight is stored
transposed, ``(in, out)``. The one-shot methods see every weight as ``(out, in)``;
:class:`LinearLayer` hands them that view and writes results back in the parameter's own layout.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import SparseforgeError
from ..masks import canonical_name, check_module, unwrap

__all__ = ["DEFAULT_EXCLUDE", "LinearLayer", "find_linear_layers", "is_prunable_layer"]

#: Layers kept dense by default. These entries may match nothing (an encoder has no ``lm_head``);
#: every other exclude pattern must match at least one linear layer, so a typo is an error.
DEFAULT_EXCLUDE: tuple[str, ...] = ("lm_head",)


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2's transposed Linear; transformers is an optional dependency)."""
    from ..inference.convert import is_hf_conv1d

    return is_hf_conv1d(module)


def is_prunable_layer(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a transformers ``Conv1D`` with a 2-D weight."""
    if not (isinstance(module, nn.Linear) or _is_conv1d(module)):
        return False
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 2


@dataclass(frozen=True, eq=False)
class LinearLayer:
    """One prunable linear layer: its module name relative to the model and its weight layout.

    ``transposed`` is ``True`` for ``Conv1D``, whose weight parameter is ``(in, out)``.
    """

    name: str
    module: nn.Module
    transposed: bool

    @property
    def param_name(self) -> str:
        """Canonical name of the weight parameter (the key of its mask)."""
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def weight(self) -> torch.Tensor:
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)  # checked by is_prunable_layer
        return weight

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0] if self.transposed else self.weight.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1] if self.transposed else self.weight.shape[0])

    def weight_out_in(self) -> torch.Tensor:
        """A copy of the weight as ``(out, in)``, in the model's dtype (methods may change it freely)."""
        weight = self.weight.detach()
        return (weight.t() if self.transposed else weight).contiguous().clone()

    def to_param_layout(self, tensor: torch.Tensor) -> torch.Tensor:
        """An ``(out, in)`` tensor (weight or mask) in the parameter's own layout."""
        return tensor.t().contiguous() if self.transposed else tensor

    @torch.no_grad()
    def write_out_in(self, weight: torch.Tensor) -> None:
        """Overwrite the parameter in place with an ``(out, in)`` weight (cast to its dtype)."""
        self.weight.copy_(self.to_param_layout(weight).to(dtype=self.weight.dtype, device=self.weight.device))


def _matches(pattern: str, module_name: str) -> bool:
    param_name = f"{module_name}.weight" if module_name else "weight"
    return any(fnmatch.fnmatchcase(candidate, pattern) for candidate in (module_name, param_name))


def _check_exclude(exclude: object) -> list[str]:
    if isinstance(exclude, str) or not isinstance(exclude, Sequence):
        raise SparseforgeError(
            f"exclude={exclude!r} is not allowed; allowed: a list of module-name patterns, e.g. ['lm_head', '*.mlp.*']"
        )
    bad = [p for p in exclude if not isinstance(p, str) or not p]
    if bad:
        raise SparseforgeError(f"exclude item {bad[0]!r} is not allowed; allowed: non-empty module-name patterns (str)")
    return list(exclude)


def find_linear_layers(model: nn.Module, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> list[LinearLayer]:
    """The prunable linear layers of ``model`` in registration order, minus the excluded ones.

    Args:
        exclude: glob patterns (``fnmatch``, case-sensitive) matched against each layer's module
            name and its weight's name, relative to the bare model (``"lm_head"``,
            ``"*.mlp.down_proj"``, ``"model.layers.0.*"``). A pattern that matches no linear
            layer is an error, except the entries of :data:`DEFAULT_EXCLUDE`.

    A weight shared by several modules (tied weights) is returned once, under its first name,
    and is excluded if any of its names is.
    """
    model = unwrap(check_module(model))
    patterns = _check_exclude(exclude)
    names_of: dict[int, list[str]] = {}
    first: dict[int, tuple[str, nn.Module]] = {}
    for raw_name, module in model.named_modules(remove_duplicate=False):
        if not is_prunable_layer(module):
            continue
        key = id(module.weight)
        name = canonical_name(raw_name)
        names_of.setdefault(key, []).append(name)
        first.setdefault(key, (name, module))
    used: set[str] = set()
    layers: list[LinearLayer] = []
    for key, (name, module) in first.items():
        hits = {p for p in patterns for alias in names_of[key] if _matches(p, alias)}
        used |= hits
        if not hits:
            layers.append(LinearLayer(name, module, _is_conv1d(module)))
    unused = [p for p in patterns if p not in used and p not in DEFAULT_EXCLUDE]
    if unused:
        example = next(iter(first.values()), ("", None))[0]
        raise SparseforgeError(
            f"exclude pattern {unused[0]!r} matches no linear layer of the model; "
            f"allowed: glob patterns over module names such as {example!r}"
        )
    return layers
