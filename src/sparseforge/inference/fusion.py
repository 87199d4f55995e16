"""Fusing an activation into the sparse layer before it, and chaining layers in the transposed layout.

Before :func:`~.convert.convert` rebuilds the layers, :func:`plan_fusions` looks for an
activation module that consumes a linear layer's output and nothing else, in two places where the
model's structure says so:

* an ``nn.Sequential`` with children ``..., SparseLinear, activation, ...``;
* the MLP of every transformer block (:func:`~sparseforge.activations.find_mlps`): the one layer
  widening the hidden state and its activation (BERT, GPT-2, OPT), or, in a gated MLP, the layer
  named ``*gate*`` and the activation (Llama: ``down(act(gate(x)) * up(x))``).

``convert`` times each such layer with its activation (dense: the layer, then the activation;
sparse: the fused kernel), and the layer after it with its input as it will arrive. After the
conversion, :func:`apply_fusions` makes the activation the converted layer's epilogue
(``SparseLinear.activation``) and replaces the activation module by ``nn.Identity``, so the model
computes the same function. When the layer
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

__all__ = ["Fusion", "PlannedFusion", "apply_fusions", "mlp_sites", "plan_fusions"]


@dataclass(frozen=True)
class Fusion:
    """One fused activation: ``layer`` (module name) now applies ``activation`` (the module at
    ``replaced``, now ``nn.Identity``); ``chained`` names the layers reading its transposed output."""

    layer: str
    activation: str
    replaced: str
    chained: tuple[str, ...]


def _fusable_layer(m: nn.Module | None) -> bool:
    """A plain linear layer (not a thresholded or input-sparse one) whose output may carry an epilogue."""
    if type(m) is SparseLinear:
        return m.layout == "linear" and m.activation is None
    return type(m) is nn.Linear


def _reads_transposed(m: nn.Module | None) -> bool:
    return isinstance(m, SparseLinear) and not isinstance(m, InputSparseLinear) and m.layout == "linear"


def _get(root: nn.Module, name: str) -> nn.Module | None:
    try:
        return root.get_submodule(name)
    except AttributeError:
        return None


@dataclass(frozen=True)
class PlannedFusion:
    """A fusion found on the model before conversion: ``layer``'s output goes through the
    activation module ``module`` (kind ``activation``) and then, possibly multiplied with the
    outputs of the other layers in ``feeds``, into ``consumer`` (``None``: not a linear layer)."""

    layer: str
    activation: str
    module: str
    consumer: str | None
    feeds: tuple[str, ...]


def _in_sequentials(model: nn.Module) -> list[PlannedFusion]:
    found: list[PlannedFusion] = []
    for seq_name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        keys = list(seq._modules)  # noqa: SLF001 - the children in forward order, with their names
        prefix = f"{seq_name}." if seq_name else ""
        for i in range(len(keys) - 1):
            layer, act = seq._modules[keys[i]], seq._modules[keys[i + 1]]  # noqa: SLF001
            kind = activation_name_of(act) if act is not None else None
            if not _fusable_layer(layer) or kind is None:
                continue
            nxt = seq._modules[keys[i + 2]] if i + 2 < len(keys) else None  # noqa: SLF001
            consumer = prefix + keys[i + 2] if _fusable_layer(nxt) or _reads_transposed(nxt) else None
            found.append(PlannedFusion(prefix + keys[i], kind, prefix + keys[i + 1], consumer, (prefix + keys[i],)))
    return found


def _in_mlps(model: nn.Module, sites: list[MLPSite]) -> list[PlannedFusion]:
    found: list[PlannedFusion] = []
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
        layer, act = _get(model, target), _get(model, site.activation)
        kind = activation_name_of(act) if act is not None else None
        if _fusable_layer(layer) and kind is not None:
            found.append(PlannedFusion(target, kind, site.activation, site.down, tuple(site.up)))
    return found


def mlp_sites(model: nn.Module) -> list[MLPSite]:
    """The transformer MLPs of ``model`` (found among its ``nn.Linear`` layers, so before
    conversion), or ``[]`` for a model without transformer blocks."""
    try:
        return find_mlps(unwrap(model))
    except SparseforgeError:
        return []


def plan_fusions(model: nn.Module) -> list[PlannedFusion]:
    """The activations :func:`apply_fusions` can fuse in ``model`` (call it before conversion)."""
    bare = unwrap(model)
    return _in_sequentials(bare) + _in_mlps(bare, mlp_sites(bare))


def apply_fusions(model: nn.Module, planned: list[PlannedFusion]) -> list[Fusion]:
    """Fuse the planned activations whose layer was converted (in place); returns what was fused.

    Names are relative to ``model`` (inside a DDP / ``torch.compile`` wrapper: to the bare model).
    """
    bare = unwrap(model)
    done: list[Fusion] = []
    for p in planned:
        layer, act = _get(bare, p.layer), _get(bare, p.module)
        if type(layer) is not SparseLinear or layer.activation is not None or act is None:
            continue
        if activation_name_of(act) != p.activation:
            continue
        assert isinstance(layer, SparseLinear)
        layer.activation = p.activation
        layer.fused_from = p.module
        parent, _, child = p.module.rpartition(".")
        setattr(bare.get_submodule(parent) if parent else bare, child, nn.Identity())
        chained: tuple[str, ...] = ()
        feeds = [_get(bare, f) for f in p.feeds]
        if (
            p.consumer is not None
            and _reads_transposed(_get(bare, p.consumer))
            and all(_reads_transposed(f) for f in feeds)
        ):
            for f in feeds:
                assert isinstance(f, SparseLinear)
                f.transposed_output = True
            chained = (p.consumer,)
        done.append(Fusion(p.layer, p.activation, p.module, chained))
    return done
