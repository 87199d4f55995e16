"""Save and load a sparse model: weights plus masks, as safetensors or a torch state dict.

Loading never runs pickled code: safetensors holds only tensors and a JSON header, and torch
files are read with ``torch.load(..., weights_only=True)``. Writes go to a temporary file in the
same folder which is then moved into place, so a crash never leaves half a file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SparseforgeError
from .fileio import atomic_write
from .masks import MaskState, canonical_name

__all__ = ["save", "load", "atomic_write"]

_MASK_PREFIX = "__sparseforge_mask__."
_FORMATS = ("safetensors", "torch")


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
    """Save ``model``'s weights and ``masks`` to ``path``.

    ``format``: ``"safetensors"`` or ``"torch"``; by default chosen from the suffix
    (``.safetensors`` -> safetensors, anything else -> torch).
    """
    path = Path(path)
    fmt = _format_for(path, format)
    weights = _model_state(model)
    if fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
        meta: dict[str, str] = {"sparseforge": "1"}
        if masks is not None:
            for name, mask in masks.items():
                tensors[_MASK_PREFIX + name] = mask.cpu().contiguous().clone()
            meta["masks"] = "1"
            meta["step"] = str(masks.step)
            meta["targets"] = json.dumps(masks.targets)
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    payload: dict[str, Any] = {"model": {k: v.detach().cpu() for k, v in weights.items()}}
    if masks is not None:
        payload["masks"] = masks.state_dict()
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def _read(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if not path.is_file():
        raise SparseforgeError(f"checkpoint {str(path)!r} does not exist")
    try:
        if fmt == "safetensors":
            from safetensors import safe_open

            weights: dict[str, torch.Tensor] = {}
            masks: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                for key in f.keys():
                    if key.startswith(_MASK_PREFIX):
                        masks[key[len(_MASK_PREFIX):]] = f.get_tensor(key)
                    else:
                        weights[key] = f.get_tensor(key)
            mask_state = None
            if masks or meta.get("masks") == "1":
                mask_state = {"masks": masks, "step": int(meta.get("step", 0)), "targets": json.loads(meta.get("targets", "{}"))}
            return weights, mask_state
        payload = torch.load(str(path), map_location="cpu", weights_only=True)
    except SparseforgeError:
        raise
    except Exception as exc:  # corrupted or not a checkpoint at all
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise SparseforgeError(f"checkpoint {str(path)!r} cannot be read as {fmt} ({reason})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise SparseforgeError(f"checkpoint {str(path)!r} is not a sparseforge checkpoint (no 'model' entry)")
    return payload["model"], payload.get("masks")


def load(
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    format: str | None = None,
) -> MaskState | None:
    """Load weights into ``model`` (in place) and return the saved masks (``None`` if none).

    Refuses, with a one-line error, a checkpoint whose weight or mask names or shapes do not
    match ``model``; the model is left untouched in that case.
    """
    path = Path(path)
    fmt = _format_for(path, format)
    weights, mask_state = _read(path, fmt)
    own = _model_state(model)
    missing = sorted(set(own) - set(weights))
    extra = sorted(set(weights) - set(own))
    if missing or extra:
        raise SparseforgeError(
            f"checkpoint {str(path)!r} does not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, value in own.items():
        if tuple(weights[key].shape) != tuple(value.shape):
            raise SparseforgeError(
                f"checkpoint {str(path)!r}: {key!r} has shape {tuple(weights[key].shape)}, the model expects {tuple(value.shape)}"
            )
    masks = MaskState.from_state_dict(mask_state) if mask_state is not None else None
    if masks is not None:
        try:
            masks.resolve(model)
        except SparseforgeError as exc:
            raise SparseforgeError(f"checkpoint {str(path)!r}: {exc}") from None
    # Load under the model's own keys (a wrapper's ``module.`` prefix kept), matched canonically.
    own_keys = {canonical_name(k): k for k in model.state_dict()}
    model.load_state_dict({own_keys[k]: weights[k] for k in own}, strict=True)
    if masks is not None:
        masks.apply(model)
    return masks
