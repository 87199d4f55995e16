"""Capture what the model feeds its first block, so the blocks can then be run one at a time.

A forward pre-hook (``with_kwargs=True``) on block 0 stores the hidden states and every other
argument the model passes (attention mask, position ids, rotary position embeddings, cache flags,
...) and raises a private exception, so only the embedding part of the model runs. Nothing here
knows a model family: whatever the model's forward computes for its blocks is replayed as is.

Some models give different blocks different arguments (e.g. a sliding-window mask for some
layers and a full causal mask for others). So the first calibration batch runs through all
blocks with a recording hook on each; if any block gets arguments that differ from block 0's,
every batch is captured that way and each block is replayed with its own arguments.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import SparseforgeError

__all__ = ["BlockCall", "Captured", "capture_block_inputs", "hidden_states_of"]


class _StopForward(Exception):
    """Raised by a capture hook to end the model's forward once the wanted inputs are stored."""


@functools.lru_cache(maxsize=1)
def _cache_type() -> type | None:
    """transformers' key/value ``Cache`` base class, or ``None`` without transformers."""
    try:
        module = importlib.import_module("transformers.cache_utils")
    except ImportError:
        return None
    cache = getattr(module, "Cache", None)
    return cache if isinstance(cache, type) else None


def _without_cache(value: Any) -> Any:
    """``None`` for a key/value cache object (replaying blocks must not grow a cache), else ``value``."""
    cache = _cache_type()
    return None if cache is not None and isinstance(value, cache) else value


def hidden_states_of(output: object) -> torch.Tensor:
    """The hidden states a block returned: the tensor itself, or the first item of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    first = next(iter(output.values()), None) if isinstance(output, Mapping) else None
    if isinstance(first, torch.Tensor):
        return first
    raise SparseforgeError(
        f"a block returned a {type(output).__name__}; allowed: a tensor, or a tuple whose first item is the hidden states"
    )


@dataclass
class BlockCall:
    """Everything a block is called with except its hidden states.

    ``hidden_key`` is ``None`` when the hidden states are the first positional argument, else the
    keyword they are passed under (``hidden_states``).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_key: str | None = None

    def run(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Call ``block`` on ``hidden`` with the stored arguments; return its output hidden states."""
        if self.hidden_key is None:
            return hidden_states_of(block(hidden, *self.args, **self.kwargs))
        return hidden_states_of(block(*self.args, **{**self.kwargs, self.hidden_key: hidden}))


@dataclass
class Captured:
    """The inputs of block 0 for every calibration batch and the arguments of every block.

    ``hidden[b]``: block 0's hidden states for batch ``b``; ``calls[i][b]``: what block ``i`` is
    called with for batch ``b``. ``per_block`` says whether the blocks get different arguments
    (else every ``calls[i]`` is the same list).
    """

    hidden: list[torch.Tensor]
    calls: list[list[BlockCall]]
    per_block: bool


def _split(args: tuple[Any, ...], kwargs: dict[str, Any], where: str) -> tuple[torch.Tensor, BlockCall]:
    kwargs = {key: _without_cache(value) for key, value in kwargs.items()}
    if kwargs.get("use_cache") is True:
        kwargs["use_cache"] = False
    if args and isinstance(args[0], torch.Tensor):
        rest = tuple(_without_cache(value) for value in args[1:])
        return args[0], BlockCall(rest, kwargs, None)
    hidden = kwargs.pop("hidden_states", None)
    if isinstance(hidden, torch.Tensor):
        return hidden, BlockCall(tuple(_without_cache(value) for value in args), kwargs, "hidden_states")
    raise SparseforgeError(
        f"{where} was called without a tensor as its first argument or as hidden_states=; "
        "allowed: blocks that take the hidden states first (as transformers' layers do)"
    )


def _same(a: Any, b: Any) -> bool:
    """Whether two block arguments are equal (tensors by value; unknown objects by identity or ==)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if type(a) is not type(b):
        return False
    try:
        return bool(a == b)
    except Exception:  # an object without a usable ==: treat as different, which is always safe
        return False


def _same_call(a: BlockCall, b: BlockCall) -> bool:
    return a.hidden_key == b.hidden_key and _same(a.args, b.args) and _same(a.kwargs, b.kwargs)


def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    batches: Sequence[Mapping[str, Any]],
    *,
    name: str = "blocks",
) -> Captured:
    """Run ``model(**batch)`` for each batch far enough to capture what the blocks are called with.

    Call under ``torch.inference_mode()`` (or ``no_grad``) with the model in eval mode. ``name``
    (the blocks' module name) is only used in messages. Hooks are removed whatever happens.
    """
    n_blocks = len(blocks)
    hidden: list[torch.Tensor] = []
    calls: list[list[BlockCall]] = [[] for _ in range(n_blocks)]
    recorded: dict[int, BlockCall] = {}
    first_hidden: list[torch.Tensor] = []

    def recorder(index: int, stop: bool) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if index not in recorded:  # a block called twice in one forward: its first call counts
                states, call = _split(args, kwargs, f"block {name}.{index}")
                if index == 0:
                    first_hidden.append(states.detach().clone())
                recorded[index] = call
            if stop:
                raise _StopForward

        return hook

    per_block = False
    for b, batch in enumerate(batches):
        record_all = n_blocks > 1 and (b == 0 or per_block)
        last = n_blocks - 1 if record_all else 0
        recorded.clear()
        first_hidden.clear()
        handles = [
            blocks[i].register_forward_pre_hook(recorder(i, i == last), with_kwargs=True) for i in range(last + 1)
        ]
        try:
            model(**batch)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in range(last + 1) if i not in recorded]
        if missing:
            raise SparseforgeError(
                f"the model's forward never called block {name}.{missing[0]}; allowed: models whose forward "
                f"runs every block of {name} in order"
            )
        if b == 0 and record_all:
            per_block = not all(_same_call(recorded[i], recorded[0]) for i in range(1, n_blocks))
        hidden.append(first_hidden[0])
        for i in range(n_blocks if per_block else 1):
            calls[i].append(recorded[i])
    if not per_block:
        calls = [calls[0]] * n_blocks
    return Captured(hidden, calls, per_block)
