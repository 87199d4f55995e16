"""Distributed data parallel (DDP) support: every rank must hold the same masks.

What sparseforge needs under DDP, and where it comes from:

* **Identical masks on every rank.** Draw them from a seed shared by all ranks
  (:func:`shared_seed`) or compute them on rank 0 and :func:`broadcast_masks`.
* **Identical inputs to mask decisions.** DDP averages parameter gradients inside ``backward``,
  so the Sparsifier's dense gradients are already identical across ranks. Anything computed
  outside backward from rank-local data (SNIP/movement scores, calibration statistics, a
  separately accumulated gradient) must be averaged with :func:`all_reduce_scores` before
  masks are chosen from it. Random choices must use a generator seeded identically on every
  rank (e.g. from :func:`shared_seed` plus the step).
* **Names.** ``DistributedDataParallel`` prefixes parameter names with ``module.``; masks are
  keyed by canonical names (:func:`sparseforge.masks.canonical_name` strips the prefix), so a
  Sparsifier built on the DDP model and one built on ``ddp.module`` agree.
* **Same configuration.** :func:`check_same_config` all-gathers a hash of the algorithm
  configuration and raises :class:`SparseforgeError` on *every* rank if they differ; call it
  before training. :func:`check_masks_in_sync` does the same for masks (a cheap debug check).

Every function is a no-op returning its input when ``torch.distributed`` is not initialised
(or the world has one rank), so the same code runs single-process.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
import torch.distributed as dist

from .errors import SparseforgeError, check_int, check_seed
from .masks import MaskState

__all__ = [
    "is_distributed",
    "world_size",
    "rank",
    "config_hash",
    "check_same_config",
    "broadcast_masks",
    "all_reduce_scores",
    "shared_seed",
    "check_masks_in_sync",
]


def is_distributed(group: Any = None) -> bool:
    """Whether ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def rank(group: Any = None) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return repr(value) if not math.isfinite(value) else value
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype), "sha": _tensor_digest(value)}
    return repr(value)


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    return hashlib.sha256(data.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def config_hash(config: Mapping[str, Any]) -> str:
    """A stable hex digest of a configuration dict (keys sorted; non-JSON values by ``repr``)."""
    if not isinstance(config, Mapping):
        raise SparseforgeError(f"config is a {type(config).__name__}; allowed: a dict")
    text = json.dumps(_jsonable(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _gather_strings(value: str, group: Any = None) -> list[str]:
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return [str(v) for v in gathered]


def check_same_config(config: Mapping[str, Any], group: Any = None) -> str:
    """Raise :class:`SparseforgeError` on every rank unless all ranks pass the same ``config``.

    Collective: every rank of ``group`` must call it. Returns this rank's hash.
    """
    digest = config_hash(config)
    if not is_distributed(group):
        return digest
    hashes = _gather_strings(digest, group)
    differing = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if differing:
        raise SparseforgeError(
            f"algorithm config differs across ranks: rank {differing[0]} has hash {hashes[differing[0]][:12]} but "
            f"rank 0 has {hashes[0][:12]} (this rank {rank(group)}: {json.dumps(_jsonable(config), sort_keys=True)[:200]}); "
            "allowed: the same config on every rank"
        )
    return digest


def broadcast_masks(
    masks: MaskState | MutableMapping[str, torch.Tensor], src: int = 0, group: Any = None
) -> MaskState | MutableMapping[str, torch.Tensor]:
    """Overwrite every rank's masks with rank ``src``'s, in place; return ``masks``.

    Names and shapes must already agree (checked first, on every rank). Masks travel as
    ``uint8`` (every backend supports it) and come back as ``bool`` on their original device.
    ``src`` must be a rank of the group (checked even single-process).
    """
    if not isinstance(masks, (MaskState, MutableMapping)):
        raise SparseforgeError(f"masks is a {type(masks).__name__}; allowed: a MaskState or a dict name -> bool tensor")
    check_int(src, "src", 0, world_size(group) - 1)
    if not is_distributed(group):
        return masks
    names = sorted(masks.keys() if not isinstance(masks, MaskState) else masks.names())
    check_same_config({"mask_layout": {n: list(masks[n].shape) for n in names}}, group)
    backend = dist.get_backend(group)
    for name in names:
        mask = masks[name]
        device = mask.device
        comm_device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = mask.to(device=comm_device, dtype=torch.uint8).contiguous()
        dist.broadcast(buf, src=src, group=group)
        masks[name] = buf.to(device=device, dtype=torch.bool)
    return masks


@torch.no_grad()
def all_reduce_scores(
    scores: MutableMapping[str, torch.Tensor], group: Any = None
) -> MutableMapping[str, torch.Tensor]:
    """Average floating-point score tensors over ranks, in place (sum, then divide by world size).

    Keys are processed in sorted order so every rank issues the same collectives. Use this for
    anything a mask decision reads that was computed outside DDP's backward (SNIP, movement,
    accumulated gradients). Returns ``scores``; every tensor in it is the same object as before,
    now holding the average (a non-contiguous tensor, e.g. a transposed view, is reduced through a
    contiguous copy that is copied back). Dtypes are checked even single-process.
    """
    if not isinstance(scores, MutableMapping):
        raise SparseforgeError(f"scores is a {type(scores).__name__}; allowed: a dict name -> floating-point tensor")
    for name, score in scores.items():
        if not isinstance(score, torch.Tensor) or not score.is_floating_point():
            kind = score.dtype if isinstance(score, torch.Tensor) else type(score).__name__
            raise SparseforgeError(f"score {name!r} has dtype {kind}; allowed: a floating-point tensor")
    if not is_distributed(group):
        return scores
    names = sorted(scores)
    check_same_config({"score_layout": {n: [list(scores[n].shape), str(scores[n].dtype)] for n in names}}, group)
    n_ranks = dist.get_world_size(group)
    for name in names:
        score = scores[name]
        buf = score if score.is_contiguous() else score.contiguous()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        buf.div_(n_ranks)
        if buf is not score:
            score.copy_(buf)
    return scores


def shared_seed(seed: int | None = None, src: int = 0, group: Any = None) -> int:
    """A seed identical on every rank: ``seed`` if given (an integer, checked equal), else drawn in
    [0, 2**31 - 1) on rank ``src`` (a rank of the group)."""
    check_int(src, "src", 0, world_size(group) - 1)
    if seed is not None:
        seed = check_seed(seed)
        check_same_config({"seed": seed}, group)
        return seed
    drawn = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if not is_distributed(group):
        return drawn
    buf = torch.tensor([drawn], dtype=torch.int64)
    dist.broadcast(buf, src=src, group=group)
    return int(buf.item())


def check_masks_in_sync(masks: MaskState | Mapping[str, torch.Tensor], group: Any = None) -> None:
    """Raise :class:`SparseforgeError` on every rank unless all ranks hold identical masks."""
    names = sorted(masks.names() if isinstance(masks, MaskState) else masks.keys())
    digest = {n: _tensor_digest(masks[n].bool()) for n in names}
    try:
        check_same_config({"masks": digest}, group)
    except SparseforgeError:
        raise SparseforgeError(
            f"masks differ across ranks (rank {rank(group)}); allowed: identical masks (seed them from "
            "shared_seed or call broadcast_masks)"
        ) from None
