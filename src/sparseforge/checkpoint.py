"""Save and load a sparse model: weights plus masks, as safetensors or a torch state dict.

Loading never runs pickled code: safetensors holds only tensors and a JSON header, and torch
files are read with ``torch.load(..., weights_only=True)``. Writes go through
:func:`~sparseforge.fileio.atomic_write` (a temporary file in the same folder, moved into place),
so a crash never leaves half a file.

Integrity: every tensor (weights and masks) is saved with a CRC-32 of its dtype, shape and bytes
(:func:`sparseforge.fileio.tensor_checksum`), under the names the safetensors file uses (masks as
``__sparseforge_mask__.NAME``): in the safetensors metadata as ``sparseforge.tensor_crc32``
(JSON ``{name: int}``), in a torch file as the payload's ``checksums`` entry. :func:`read_checkpoint` checks every tensor and the masks' dtype and shape;
:func:`load` does that and matches every name and shape to the model before it changes the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparseforgeError
from .fileio import (
    atomic_write,
    check_input_file,
    check_output_file,
    checksum_table,
    describe_os_error,
    describe_read_error,
    verify_checksums,
)
from .masks import MaskState, canonical_name, named_parameters

__all__ = ["save", "load", "read_checkpoint", "atomic_write"]

_MASK_PREFIX = "__sparseforge_mask__."
_CHECKSUM_KEY = "sparseforge.tensor_crc32"
_FORMATS = ("safetensors", "torch")
_WHAT = "checkpoint"


def _format_for(path: Path, fmt: str | None) -> str:
    if fmt is None:
        fmt = "safetensors" if path.suffix == ".safetensors" else "torch"
    if fmt not in _FORMATS:
        raise SparseforgeError(f"format={fmt!r} is not recognised; allowed: {list(_FORMATS)}")
    return fmt


def _model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {canonical_name(k): v for k, v in model.state_dict().items()}


def save(
    path: str | os.PathLike[str],
    model: nn.Module,
    masks: MaskState | None = None,
    *,
    format: str | None = None,
) -> Path:
    """Save ``model``'s weights and ``masks`` to ``path``, with a CRC-32 of every tensor.

    ``format``: ``"safetensors"`` or ``"torch"``; by default chosen from the suffix
    (``.safetensors`` -> safetensors, anything else -> torch). The folder of ``path`` must exist.
    Raises a one-line :class:`SparseforgeError` for a bad format or a path that cannot be written
    (a directory, no such directory, permission denied, disk full); an existing file at ``path``
    keeps its old content then.
    """
    fmt = _format_for(Path(path), format)
    path = check_output_file(path, _WHAT)
    weights = {k: v.detach().cpu() for k, v in _model_state(model).items()}
    mask_tensors = {name: mask.detach().cpu().clone() for name, mask in masks.items()} if masks is not None else {}
    stored = dict(weights)
    stored.update({_MASK_PREFIX + name: m for name, m in mask_tensors.items()})
    checksums = checksum_table(stored)  # of the logical (row-major) bytes, whatever the strides
    if fmt == "safetensors":
        from safetensors.torch import save_file

        # safetensors refuses tensors that share memory (tied weights): give each its own copy
        stored = {k: v.contiguous().clone() for k, v in stored.items()}
        meta: dict[str, str] = {"sparseforge": "1", _CHECKSUM_KEY: json.dumps(checksums, sort_keys=True)}
        if masks is not None:
            meta["masks"] = "1"
            meta["step"] = str(masks.step)
            meta["targets"] = json.dumps(masks.targets)
        return atomic_write(path, lambda tmp: save_file(stored, tmp, metadata=meta), what=_WHAT)
    payload: dict[str, Any] = {"model": weights, "checksums": checksums}
    if masks is not None:
        payload["masks"] = {"masks": mask_tensors, "step": masks.step, "targets": dict(masks.targets)}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), what=_WHAT)


def _unreadable(path: Path, fmt: str, exc: BaseException) -> SparseforgeError:
    if isinstance(exc, OSError) and exc.errno is not None:
        return describe_os_error(exc, path, _WHAT)
    return SparseforgeError(f"{_WHAT} {str(path)!r} cannot be read as {fmt} ({describe_read_error(exc)})")


def _read(path: Path, fmt: str) -> tuple[Any, Any, Any]:
    """The file's weights, mask state and checksum table (``None`` where absent), unchecked."""
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            weights: dict[str, torch.Tensor] = {}
            masks: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                for key in f.keys():
                    if key.startswith(_MASK_PREFIX):
                        masks[key[len(_MASK_PREFIX) :]] = f.get_tensor(key)
                    else:
                        weights[key] = f.get_tensor(key)
            mask_state = None
            if masks or meta.get("masks") == "1":
                mask_state = {
                    "masks": masks,
                    "step": int(meta.get("step", 0)),
                    "targets": json.loads(meta.get("targets", "{}")),
                }
            table = None
            if _CHECKSUM_KEY in meta:
                try:
                    table = json.loads(meta[_CHECKSUM_KEY])
                except ValueError:
                    raise SparseforgeError(
                        f"{_WHAT} {str(path)!r}: its checksum table is not valid JSON (the file is corrupted)"
                    ) from None
            return weights, mask_state, table
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except SparseforgeError:
        raise
    except Exception as exc:  # corrupted, not a checkpoint at all, or unreadable
        raise _unreadable(path, fmt, exc) from None
    if (
        isinstance(payload, dict)
        and "model" not in payload
        and payload
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items())
    ):  # a plain ``torch.save(model.state_dict())``: weights only, no masks, no checksums
        return {canonical_name(k): v for k, v in payload.items()}, None, None
    if not isinstance(payload, dict) or "model" not in payload:
        raise SparseforgeError(
            f"{_WHAT} {str(path)!r} is neither a sparseforge checkpoint (no 'model' entry) nor a plain state dict "
            "(a dict of tensors)"
        )
    return payload["model"], payload.get("masks"), payload.get("checksums")


def _check_tensors(path: Path, entries: Any, kind: str) -> dict[str, torch.Tensor]:
    """``entries`` as a ``{str: Tensor}`` dict, or a one-line error naming the bad entry."""
    if not isinstance(entries, Mapping):
        raise SparseforgeError(
            f"{_WHAT} {str(path)!r}: its {kind}s are a {type(entries).__name__}; allowed: a dict of tensors"
        )
    for name, value in entries.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise SparseforgeError(
                f"{_WHAT} {str(path)!r}: {kind} {name!r} is a {type(value).__name__}; allowed: a tensor"
            )
    return dict(entries)


def _label(stored_name: str) -> str:
    if stored_name.startswith(_MASK_PREFIX):
        return f"mask {stored_name[len(_MASK_PREFIX) :]!r}"
    return f"tensor {stored_name!r}"


def read_checkpoint(
    path: str | os.PathLike[str], *, format: str | None = None
) -> tuple[dict[str, torch.Tensor], MaskState | None]:
    """Read and verify a checkpoint without a model: its weights (canonical names) and masks.

    Checked, each failure a one-line :class:`SparseforgeError` naming the file and the tensor:
    the path (a directory, missing, unreadable), the file's structure, every weight's and mask's
    CRC-32 (files saved without checksums, by older versions, are read without that check), and
    every mask: ``torch.bool`` and exactly the shape of the weight it names. ``format`` as in
    :func:`load`.
    """
    fmt = _format_for(Path(path), format)
    path = check_input_file(path, _WHAT)
    source = f"{_WHAT} {str(path)!r}"
    raw_weights, mask_state, table = _read(path, fmt)
    weights = _check_tensors(path, raw_weights, "weight")
    mask_tensors: dict[str, torch.Tensor] = {}
    if mask_state is not None:
        if not isinstance(mask_state, Mapping) or "masks" not in mask_state:
            raise SparseforgeError(f"{source}: its mask state has no 'masks' entry (the file is corrupted)")
        mask_tensors = _check_tensors(path, mask_state["masks"], "mask")
    if table is not None:  # files saved before checksums existed have none
        stored = dict(weights)
        stored.update({_MASK_PREFIX + name: m for name, m in mask_tensors.items()})
        verify_checksums(stored, table, source, _label)
    if mask_state is None:
        return weights, None
    for name, mask in mask_tensors.items():
        if mask.dtype != torch.bool:
            raise SparseforgeError(f"{source}: mask {name!r} has dtype {mask.dtype}; allowed: torch.bool")
        if name not in weights:
            raise SparseforgeError(
                f"{source}: mask {name!r} names no weight in the file; the file has e.g. {sorted(weights)[:5]}"
            )
        if tuple(mask.shape) != tuple(weights[name].shape):
            raise SparseforgeError(
                f"{source}: mask {name!r} has shape {tuple(mask.shape)}, its weight has shape {tuple(weights[name].shape)}"
            )
    try:
        masks = MaskState.from_state_dict(mask_state)
    except (TypeError, ValueError) as exc:  # step or targets that are not numbers
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SparseforgeError(f"{source}: its mask state is corrupted ({first})") from None
    return weights, masks


def _check_against(path: Path, model: nn.Module, weights: dict[str, torch.Tensor], masks: MaskState | None) -> None:
    """Refuse weights or masks that do not fit ``model`` exactly; the model is not touched."""
    source = f"{_WHAT} {str(path)!r}"
    own = _model_state(model)
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise SparseforgeError(f"{source} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, value in own.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise SparseforgeError(
                f"{source}: {key!r} has shape {tuple(weights[key].shape)}, the model expects {tuple(value.shape)}"
            )
    if masks is None:
        return
    params = named_parameters(model)
    for name, mask in masks.items():
        if name not in params:
            raise SparseforgeError(
                f"{source}: mask {name!r} names no parameter of the model (a buffer); model has e.g. {sorted(params)[:5]}"
            )
        if tuple(mask.shape) != tuple(params[name].shape):  # implied by the checks above; kept as a guard
            raise SparseforgeError(
                f"{source}: mask {name!r} has shape {tuple(mask.shape)}, the parameter has shape {tuple(params[name].shape)}"
            )


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    format: str | None = None,
) -> MaskState | None:
    """Load weights into ``model`` (in place) and return the saved masks (``None`` if none).

    Everything is checked before the model is changed, and a failed check raises a one-line
    :class:`SparseforgeError` naming the file and what is wrong; the model is then left
    untouched. Refused: a path that is a directory, missing or unreadable; a file that is not a
    sparseforge checkpoint or cannot be parsed; a weight or mask whose bytes fail their stored
    CRC-32 (the file is damaged); weight names or exact shapes that differ from ``model``'s; a
    mask that is not ``torch.bool``, names no parameter, or has another shape than its parameter.

    Files saved without checksums (by sparseforge versions before checksums were stored) still
    load: all checks but the checksum one apply to them.
    """
    weights, masks = read_checkpoint(path, format=format)
    _check_against(Path(path), model, weights, masks)
    # Load under the model's own keys (a wrapper's ``module.`` prefix kept), matched canonically.
    own_keys = {canonical_name(k): k for k in model.state_dict()}
    model.load_state_dict({own_keys[k]: weights[k] for k in own_keys}, strict=True)
    if masks is not None:
        masks.apply(model)
    return masks
