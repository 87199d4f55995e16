"""The repeated blocks of a model, found by structure rather than by model family.

A transformer keeps its layers in one ``nn.ModuleList`` of identical blocks (``model.layers`` in
Llama and OPT's ``model.decoder.layers``, ``transformer.h`` in GPT-2, ``encoder.layer`` in BERT).
The sequential one-shot driver prunes those blocks one at a time.
"""

from __future__ import annotations

from torch import nn

from ..errors import SparseforgeError
from ..masks import canonical_name, check_module, unwrap
from .layers import is_prunable_layer

__all__ = ["find_blocks"]


def _holds_prunable_layer(block: nn.Module) -> bool:
    return any(is_prunable_layer(m) for m in block.modules())


def _inside(name: str, other: str) -> bool:
    """Whether module ``name`` lies strictly inside module ``other`` (``""`` is the model itself)."""
    return name != other and (other == "" or name.startswith(f"{other}."))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: ``(name, module_list)``, the name relative to the bare model.

    Candidates are ``nn.ModuleList``\\ s of at least one child, all children of one class, each a
    container (not itself a linear layer) holding at least one prunable linear layer. A list
    nested inside another candidate's blocks (e.g. a mixture of experts inside each layer) is not
    a candidate. Of the rest the longest wins; among equally long lists the first registered (so
    an encoder-decoder's encoder). DDP and ``torch.compile`` wrappers are looked through.
    """
    model = unwrap(check_module(model))
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        children = list(module)
        kinds = {type(child) for child in children}
        if len(kinds) != 1 or is_prunable_layer(children[0]):
            continue
        if not all(_holds_prunable_layer(child) for child in children):
            continue
        candidates.append((canonical_name(name), module))
    top = [(name, blocks) for name, blocks in candidates if not any(_inside(name, other) for other, _ in candidates)]
    if not top:
        raise SparseforgeError(
            f"{type(model).__name__} has no nn.ModuleList of identical blocks holding linear layers; "
            "allowed: a transformer with repeated layers (e.g. model.layers, transformer.h, encoder.layer)"
        )
    longest = max(len(blocks) for _, blocks in top)
    return next((name, blocks) for name, blocks in top if len(blocks) == longest)
