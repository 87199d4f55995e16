"""Where a transformer's MLP hidden activations live, found by structure rather than by family.

Every block of a transformer (found by :func:`~sparseforge.oneshot.find_blocks`) holds an MLP:
one or more layers that read the block's hidden state and widen it (``gate_proj`` and
``up_proj`` in Llama, ``fc1`` / ``c_fc`` in OPT / GPT-2, ``intermediate.dense`` in BERT), an
activation function, and one layer that narrows it back (``down_proj``, ``fc2``, ``c_proj``,
``output.dense``). The *MLP hidden activation* is what the narrowing layer reads: the activation
output (times the up projection in gated MLPs). Activation-sparsity methods act there, or on the
inputs of the MLP's layers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import nn

from ..errors import SparseforgeError
from ..masks import canonical_name, check_module, unwrap
from ..oneshot.blocks import find_blocks
from ..oneshot.layers import LinearLayer, find_linear_layers

__all__ = ["ACTIVATION_TYPES", "MLPSite", "find_mlps"]

#: Class names of activation modules recognised inside an MLP (torch's and transformers').
ACTIVATION_TYPES = frozenset(
    {
        "ReLU",
        "GELU",
        "SiLU",
        "Tanh",
        "Sigmoid",
        "ReLU2",
        "GELUActivation",
        "NewGELUActivation",
        "FastGELUActivation",
        "QuickGELUActivation",
        "GELUTanh",
        "PytorchGELUTanh",
        "SiLUActivation",
        "ReLUSquaredActivation",
        "AccurateGELUActivation",
        "MishActivation",
        "LinearActivation",
    }
)


@dataclass(frozen=True)
class MLPSite:
    """One block's MLP: module names relative to the bare model.

    ``up``: the layers that read the block's hidden state and produce the hidden width (gate and
    up projections of a gated MLP); ``down``: the layer that reads the MLP hidden activation;
    ``activation``: the activation module's name, or ``None`` when the MLP calls a function
    (then it cannot be swapped, only measured); ``width``: the MLP hidden width.
    """

    block: int
    up: tuple[str, ...]
    down: str
    activation: str | None
    width: int


def _activation_in(model: nn.Module, container: str) -> str | None:
    """The activation module inside ``container`` (itself or a child), by class name."""
    module = model.get_submodule(container) if container else model
    for name, child in module.named_modules():
        if type(child).__name__ in ACTIVATION_TYPES:
            return f"{container}.{name}" if container and name else (name or container)
    return None


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix: list[str] = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        prefix.append(column[0])
    return ".".join(prefix)


def find_mlps(model: nn.Module) -> list[MLPSite]:
    """One :class:`MLPSite` per block of the model, in block order.

    In each block the hidden size is the most common ``in_features`` of its linear layers; the
    ``down`` layer is the one whose ``in_features`` differs from it and whose ``out_features``
    equals it (the widest such input if several), and the ``up`` layers are those reading the
    hidden size and writing the down layer's input width. The activation module is looked for
    in the modules enclosing those layers. Raises :class:`SparseforgeError` (naming what was
    looked for) when a block has no such pair of layers.
    """
    model = unwrap(check_module(model))
    blocks_name, blocks = find_blocks(model)
    sites: list[MLPSite] = []
    for index in range(len(blocks)):
        prefix = f"{blocks_name}.{index}" if blocks_name else str(index)
        layers: list[LinearLayer] = [
            layer for layer in find_linear_layers(model, exclude=()) if layer.name.startswith(f"{prefix}.")
        ]
        if not layers:
            raise SparseforgeError(f"block {prefix} has no linear layer; allowed: transformer blocks with an MLP")
        hidden = Counter(layer.in_features for layer in layers).most_common(1)[0][0]
        downs = [layer for layer in layers if layer.in_features != hidden and layer.out_features == hidden]
        if not downs:
            raise SparseforgeError(
                f"block {prefix} has no MLP: looked for a linear layer reading a width other than the hidden "
                f"size {hidden} and writing {hidden} (e.g. down_proj, fc2, output.dense); allowed: a transformer "
                "whose blocks hold a feed-forward MLP"
            )
        down = max(downs, key=lambda layer: layer.in_features)
        ups = [layer for layer in layers if layer.in_features == hidden and layer.out_features == down.in_features]
        if not ups:
            raise SparseforgeError(
                f"block {prefix} has no MLP input layer: looked for a linear layer {hidden} -> {down.in_features} "
                f"feeding {down.name}; allowed: a transformer whose blocks hold a feed-forward MLP"
            )
        names = [layer.name for layer in ups] + [down.name]
        container = _common_prefix(names)
        # the activation sits beside the layers (LlamaMLP.act_fn) or one level further in (BertIntermediate)
        activation = None
        for candidate in {canonical_name(layer.name.rpartition(".")[0]) for layer in ups} | {container}:
            activation = activation or _activation_in(model, candidate)
        sites.append(
            MLPSite(
                block=index,
                up=tuple(layer.name for layer in ups),
                down=down.name,
                activation=activation,
                width=down.in_features,
            )
        )
    return sites
