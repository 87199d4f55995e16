"""Fusing an activation into the sparse layer before it, and chaining layers in the transposed layout.

After :func:`~.convert.convert` has rebuilt the layers, :func:`fuse_epilogues` looks for an
activation module that consumes a :class:`~.modules.SparseLinear`'s output and nothing else, in
two places where the model's structure says so:

* an ``nn.Sequential`` with children ``..., SparseLinear, activation, ...``;
* the MLP of every transformer block (:func:`~sparseforge.activations.find_mlps`): the one layer
  widening the hidden state and its activation (BERT, GPT-2, OPT), or, in a gated MLP, the layer
  named ``*gate*`` and the activation (Llama: ``down(act(gate(x)) * up(x))``).

The activation becomes the layer's epilogue (``SparseLinear.activation``) and the activation
module is replaced by ``nn.Identity``, so the model computes the same function. When the layer
after the activation is a :class:`~.modules.SparseLinear` too, the widening layer(s) return the
pairs kernel's transposed output (``transposed_output``), which that layer reads in place: the
transpose out of one layer and into the next disappear. Only exact activation types are fused
(:func:`.epilogue.activation_name_of`); a module with hooks is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..activations.sites import MLPSite, find_mlps
from ..errors import SparseforgeError
from ..masks import unwrap
from .epilogue import activation_name_of
from .modules import InputSparseLinear, SparseLinear

__all__ = ["Fusion", "fuse_epilogues", "mlp_sites"]


@dataclass(frozen=True)
class Fusion:
    """One fused activation: ``layer`` (module name) now applies ``activation`` (the module at
    ``replaced``, now ``nn.Identity``); ``chained`` names the layers reading its transposed output."""

    layer: str
    activation: str
    replaced: str
    chained: tuple[str, ...]


def _fusable_layer(m: nn.Module | None) -> bool:
    return type(m) is SparseLinear and m.layout == "linear" and m.activation is None


def _reads_transposed(m: nn.Module | None) -> bool:
    return isinstance(m, SparseLinear) and not isinstance(m, InputSparseLinear) and m.layout == "linear"


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


def _in_sequentials(model: nn.Module) -> list[Fusion]:
    done: list[Fusion] = []
    for seq_name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)  # noqa: SLF001 - the children in forward order, with their names
        for i in range(len(keys) - 1):
            layer, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]  # noqa: SLF001
            kind = activation_name_of(act) if act is not None else None
            if not _fusable_layer(layer) or kind is None:
                continue
            assert isinstance(layer, SparseLinear)  # _fusable_layer
            prefix = f"{seq_name}." if seq_name else ""
            nxt = seq._modules[keys[i + 2]] if i + 2 < len(keys) else None  # noqa: SLF001
            layer.activation = kind
            layer.fused_from = prefix + keys[i + 1]
            seq._modules[keys[i + 1]] = nn.Identity()  # noqa: SLF001
            chained: tuple[str, ...] = ()
            if _reads_transposed(nxt):
                layer.transposed_output = True
                chained = (prefix + keys[i + 2],)
            done.append(Fusion(prefix + keys[i], kind, prefix + keys[i + 1], chained))
    return done


def mlp_sites(model: nn.Module) -> list[MLPSite]:
    """The transformer MLPs of ``model`` (before conversion: they are found among ``nn.Linear``
    layers), or ``[]`` for a model without transformer blocks."""
    try:
        return find_mlps(unwrap(model))
    except SparseforgeError:
        return []


def _in_mlps(model: nn.Module, sites: list[MLPSite]) -> list[Fusion]:
    bare = unwrap(model)
    done: list[Fusion] = []
    for site in sites:
        if site.activation is None:
            continue
        if len(site.up) == 1:
            target = site.up[0]
        else:
            gates = [u for u in site.up if "gate" in u.rpartition(".")[2]]
            if len(gates) != 1 or len(site.up) != 2:
                continue  # which input layer the activation follows is not known
            target = gates[0]
        layer, act = _get(bare, target), _get(bare, site.activation)
        kind = activation_name_of(act) if act is not None else None
        if not _fusable_layer(layer) or kind is None:
            continue
        assert isinstance(layer, SparseLinear)  # _fusable_layer
        layer.activation = kind
        layer.fused_from = site.activation
        _set(bare, site.activation, nn.Identity())
        chained: tuple[str, ...] = ()
        ups = [_get(bare, u) for u in site.up]
        if _reads_transposed(_get(bare, site.down)) and all(isinstance(u, SparseLinear) for u in ups):
            for u in ups:
                assert isinstance(u, SparseLinear)
                u.transposed_output = True
            chained = (site.down,)
        done.append(Fusion(target, kind, site.activation, chained))
    return done


def fuse_epilogues(model: nn.Module, sites: list[MLPSite] | None = None) -> list[Fusion]:
    """Fuse activations into the converted layers of ``model`` (in place); returns what was fused.

    ``sites``: the MLPs found by :func:`mlp_sites` on the model *before* conversion (default: none,
    only ``nn.Sequential`` patterns). Names are relative to ``model`` (inside a DDP /
    ``torch.compile`` wrapper: to the bare model).
    """
    return _in_sequentials(model) + _in_mlps(model, sites or [])
