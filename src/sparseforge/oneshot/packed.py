"""Pruned transformers with packed layers: written beside the weights, loaded ready to run fast.

* :func:`pack_layers` converts the pruned layers of a model (``nn.Linear`` and GPT-2's ``Conv1D``)
  with :func:`sparseforge.inference.convert`, on a copy of those layers alone (the model is not
  changed); :func:`~sparseforge.oneshot.io.save_pruned` with ``packed=True`` stores them as
  :data:`PACKED_FILE` (a layers-only file of :func:`sparseforge.inference.save_converted`: every
  tensor with a CRC-32) in the same temporary folder as the rest, so the output folder still
  appears all at once.
* :func:`load` reads such a folder back: the transformer with :func:`~.io.load_transformer`, then,
  when :data:`PACKED_FILE` is there, its layers replaced by the packed ones
  (:func:`sparseforge.inference.load_converted`, checksums verified, and every packed weight compared
  with the weight of the folder's model file, so a packed file of another model is refused).

Batch sizes: a linear layer of a transformer sees ``batch x tokens`` rows per call. The defaults
are :data:`DECODER_BATCH_SIZES` ``(1, 8, 128)`` for a decoder (1: one sequence generating token by
token; 8: eight sequences at a time or a short prompt; 128: a prompt being read) and
:data:`ENCODER_BATCH_SIZES` ``(32, 128, 512)`` for an encoder (one short sentence; one passage or a
few sentences; a batch of sentences). Each size is measured; rows between two sizes use the path
chosen for the larger one, rows above the largest use the largest's.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import SparseforgeError

__all__ = [
    "DECODER_BATCH_SIZES",
    "ENCODER_BATCH_SIZES",
    "MAX_BATCH_ROWS",
    "PACKED_FILE",
    "LoadedModel",
    "PackResult",
    "check_batch_sizes",
    "default_batch_sizes",
    "load",
    "pack_layers",
]

#: The packed layers of a pruned model's folder (safetensors, layers only, CRC-32 per tensor).
PACKED_FILE = "sparseforge_packed.safetensors"
#: Rows per call tuned for by default in a decoder: generation of 1 and 8 sequences, a prompt of 128 tokens.
DECODER_BATCH_SIZES: tuple[int, ...] = (1, 8, 128)
#: Rows per call tuned for by default in an encoder: a short sentence, a passage, a batch of sentences.
ENCODER_BATCH_SIZES: tuple[int, ...] = (32, 128, 512)
#: The largest batch size (rows per call) accepted: each one is timed on random inputs of that many rows.
MAX_BATCH_ROWS = 65536


def default_batch_sizes(kind: str) -> tuple[int, ...]:
    """The batch sizes (rows per call) tuned for by default: by ``kind``, ``"decoder"`` or ``"encoder"``."""
    return DECODER_BATCH_SIZES if kind == "decoder" else ENCODER_BATCH_SIZES


def check_batch_sizes(batch_sizes: object, name: str = "batch_sizes") -> tuple[int, ...]:
    """``batch_sizes`` as a sorted tuple of distinct ints in ``[1, MAX_BATCH_ROWS]``, else a one-line error."""
    allowed = f"a non-empty list of integers in [1, {MAX_BATCH_ROWS}] (rows per call: batch x tokens)"
    if isinstance(batch_sizes, (str, bytes)) or not isinstance(batch_sizes, Sequence) or not batch_sizes:
        raise SparseforgeError(f"{name}={batch_sizes!r} is not allowed; allowed: {allowed}")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_BATCH_ROWS:
            raise SparseforgeError(f"{name}={list(batch_sizes)!r} is not allowed ({b!r}); allowed: {allowed}")
    return tuple(sorted({int(b) for b in batch_sizes}))


def model_kind(model: nn.Module) -> str:
    """``"decoder"`` or ``"encoder"`` from a transformers model's config (``"decoder"`` without one)."""
    from .io import _kind

    config = getattr(model, "config", None)
    return "decoder" if config is None else _kind(config)


def _pruned_layer_names(model: nn.Module, param_names: Sequence[str]) -> list[str]:
    names = []
    for param in param_names:
        module_name, _, leaf = param.rpartition(".")
        if leaf != "weight":
            continue
        try:
            model.get_submodule(module_name)
        except AttributeError:
            continue
        names.append(module_name)
    return names


def check_packable(model: nn.Module, param_names: Sequence[str]) -> None:
    """Refuse, before any work, pruned layers that cannot be packed (not float32 on the CPU)."""
    from ..inference.convert import _is_layer

    names = _pruned_layer_names(model, param_names)
    if not names:
        raise SparseforgeError("packed=True: the model has no pruned layer to pack")
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not _is_layer(module) or not isinstance(weight, torch.Tensor):
            raise SparseforgeError(
                f"packed=True: pruned layer {name!r} is a {type(module).__name__}; allowed: nn.Linear or GPT-2's Conv1D"
            )
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise SparseforgeError(
                f"packed=True: pruned layer {name!r} has {weight.dtype} weights on {weight.device}; packed layers "
                "run float32 on the CPU: load the model in float32 on the CPU, or save without packing"
            )


class PackResult(NamedTuple):
    """What :func:`pack_layers` made: the converted layers (a module tree with the model's names),
    the :class:`~sparseforge.inference.ConversionReport`, and the warnings convert gave, one line each."""

    layers: nn.Module
    report: Any
    notes: list[str]


def pack_layers(
    model: nn.Module, param_names: Sequence[str], batch_sizes: Sequence[int], *, autotune: bool = True
) -> PackResult:
    """Convert the layers owning ``param_names`` (the pruned weights) on copies; ``model`` is unchanged.

    The copies hang in a bare module tree under the model's own names, so that saving it
    (``save_converted(..., layers_only=True)``) gives names that :func:`load` finds in the model.
    """
    from ..inference.convert import convert

    check_packable(model, param_names)
    sizes = check_batch_sizes(list(batch_sizes))
    if not isinstance(autotune, bool):
        raise SparseforgeError(f"autotune={autotune!r} is not allowed; allowed: True or False")
    root = nn.Module()
    for name in _pruned_layer_names(model, param_names):
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            child = getattr(parent, part, None)
            if child is None:
                child = nn.Module()
                parent.add_module(part, child)
            parent = child
        parent.add_module(leaf, model.get_submodule(name))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        converted, report = convert(root, batch_sizes=sizes, autotune=autotune, inplace=False)
    notes = [str(w.message).splitlines()[0] for w in caught]
    return PackResult(converted, report, notes)


def dense_bytes(report: Any, layers: nn.Module) -> int:
    """Bytes that the packed layers of ``report`` take as dense float32 weights and biases."""
    from ..inference.modules import SparseLinear

    total = 0
    for name in report.sparse_layers:
        module = layers.get_submodule(name)
        assert isinstance(module, SparseLinear)  # convert made every sparse layer a SparseLinear
        total += 4 * module.out_features * module.in_features
        if module.bias is not None:
            total += 4 * module.out_features
    return total


# -- loading -------------------------------------------------------------------------------------


class LoadedModel(NamedTuple):
    """What :func:`load` returns: ``model, tokenizer, kind, packing, note = load(DIR)``.

    ``packing`` is ``"packed"`` (layers from :data:`PACKED_FILE`), ``"converted"`` (no packed
    file; converted on load with ``convert=True``) or ``"dense"`` (no packed file: the dense
    pruned model); ``note`` says which in one line.
    """

    model: nn.Module
    tokenizer: Any
    kind: str
    packing: str
    note: str


def _check_matches_weights(model: nn.Module, before: dict[str, nn.Module], path: Path) -> None:
    """Every packed layer must hold exactly the weight the folder's model file has for it.

    ``before``: the model's layers before the packed ones replaced them (by name).
    """
    from ..inference.convert import _weight_2d
    from ..inference.modules import SparseLinear

    for name, module in model.named_modules():
        if not isinstance(module, SparseLinear):
            continue
        old = before.get(name)
        weight = None if old is None else _weight_2d(old)
        packed = _weight_2d(module)
        if weight is None or tuple(weight.shape) != tuple(packed.shape) or not torch.equal(weight, packed):
            raise SparseforgeError(
                f"packed file {str(path)!r}: layer {name!r} differs from the weight in the folder's model file; "
                "the packed file belongs to another model (save the pruned model again with packed=True)"
            )


def load(
    model_dir: str | os.PathLike[str],
    *,
    convert: bool = False,
    batch_sizes: Sequence[int] | None = None,
    autotune: bool = True,
) -> LoadedModel:
    """A pruned model's folder (as :func:`~.io.save_pruned` writes it), ready to run.

    The model and tokenizer are loaded with :func:`~.io.load_transformer`. When the folder holds
    :data:`PACKED_FILE`, its layers replace the model's (every tensor's CRC-32 checked, every
    packed weight compared with the model file's): ``packing == "packed"``; the formats and
    per-batch-size paths are those measured when the file was written (re-measure on another
    machine with :func:`sparseforge.inference.retune`). Without it, ``convert=True`` converts the
    pruned layers now (:func:`sparseforge.inference.convert` with ``batch_sizes``, default
    :func:`default_batch_sizes` of the model's kind, and ``autotune``): ``"converted"``; else the
    dense pruned model is returned: ``"dense"``, and ``note`` says how to get packed layers.

    Raises a one-line :class:`SparseforgeError` for a missing folder, a file, a folder that is
    not a transformer, a corrupted packed file (naming the file and the tensor), a packed file
    of another model, or ``batch_sizes`` / ``autotune`` without ``convert=True``.
    """
    from ..inference.convert import _is_layer
    from ..inference.convert import convert as convert_model
    from ..inference.serialization import load_converted
    from .io import check_model_dir, load_transformer

    if not isinstance(convert, bool):
        raise SparseforgeError(f"convert={convert!r} is not allowed; allowed: True or False")
    if not isinstance(autotune, bool):
        raise SparseforgeError(f"autotune={autotune!r} is not allowed; allowed: True or False")
    if not convert and (batch_sizes is not None or autotune is not True):
        raise SparseforgeError(
            "batch_sizes and autotune are used only when converting on load; allowed: pass them with convert=True"
        )
    sizes = check_batch_sizes(batch_sizes) if batch_sizes is not None else None
    path = check_model_dir(model_dir, "pruned model folder")
    packed_path = path / PACKED_FILE
    if packed_path.exists() and not packed_path.is_file():
        raise SparseforgeError(f"packed file {str(packed_path)!r} is not a file; allowed: a file {PACKED_FILE}")
    model, tokenizer, kind = load_transformer(path, what="pruned model folder")
    if packed_path.is_file():
        before = {name: module for name, module in model.named_modules() if name and _is_layer(module)}
        model = load_converted(packed_path, model)
        _check_matches_weights(model, before, packed_path)
        n = sum(1 for m in model.modules() if type(m).__name__ == "SparseLinear")
        return LoadedModel(model.eval(), tokenizer, kind, "packed", f"{n} packed layers from {PACKED_FILE}")
    if convert:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the report says which layers stay dense
            model, report = convert_model(
                model, batch_sizes=sizes or default_batch_sizes(kind), autotune=autotune, inplace=True
            )
        note = f"no {PACKED_FILE}: converted on load, {len(report.sparse_layers)} of {len(report.layers)} layers packed"
        return LoadedModel(model.eval(), tokenizer, kind, "converted", note)
    note = (
        f"no {PACKED_FILE} in {str(path)!r}: the dense pruned model (pass convert=True to pack its layers on load, "
        "or save it with packed=True / sparseforge llm prune --packed)"
    )
    return LoadedModel(model, tokenizer, kind, "dense", note)
